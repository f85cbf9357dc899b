"""Loading the bundled GGUF: the file is parsed once, and what comes out still answers; streamed, the same
weights. About 40 s."""
import gguf

from slm_export.loading import load


def _count_parses(monkeypatch):
    """(the files gguf.GGUFReader parses from now on, the counting reader put in its place)."""
    parses = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    return parses, CountingReader


def test_gguf_is_parsed_once_quietly_and_the_model_still_answers(monkeypatch, capfd):
    # transformers parses the file for the config, the weights and maybe the tokenizer; loading.py
    # hands all of them one parse (load 25 s -> 13 s on this machine). Count real parses.
    parses, CountingReader = _count_parses(monkeypatch)
    loaded = load(None)
    assert len(parses) == 1, parses
    assert gguf.GGUFReader is CountingReader  # put back as it was found
    assert "de-quantizing GGUF tensors" not in capfd.readouterr().err  # no per-tensor progress bar

    import torch

    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")["input_ids"]
    out = loaded.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert loaded.tokenizer.decode(out[0, ids.shape[1]:]).startswith("The capital of France is Paris")
    assert torch.isfinite(loaded.model.lm_head.weight).all()


def test_bundled_gguf_streamed_is_parsed_once_and_reads_what_transformers_loads(monkeypatch):
    # the export's load: a meta skeleton whose weights are read from the file when used (gguf_checkpoint.py)
    import numpy as np

    parses, CountingReader = _count_parses(monkeypatch)
    streamed = load(None, tokenizer=False, stream=True)
    assert len(parses) == 1, parses
    ckpt = streamed.model.slm_checkpoint
    monkeypatch.setattr(gguf, "GGUFReader", CountingReader.__base__)
    eager = load(None, tokenizer=False).model
    params = dict(eager.named_parameters())
    assert set(ckpt.names()) == set(params) and len(params) == 272  # lm_head is the (tied) embedding
    differ = [name for name, p in params.items() if not np.array_equal(ckpt.read(name), p.detach().numpy())]
    assert differ == []
