"""Exporting from a GGUF file streams it: each tensor (or its rows) dequantized when it is used, the very
values transformers' GGUF loader gives (its name map, llama's q/k un-permutation, Gemma's norms), the
same artifact bytes as the whole-model load, and a broken file refused in one line naming the tensor."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_model
from slm_export.loading import load, streamable
from slm_export.pipeline import run_export

# the GGUF architecture of each tiny family, and the GGML type its matrices are written in
FAMILIES = {"llama": ("llama", "Q4_1"), "tinyllama": ("llama", "Q8_0"), "qwen2": ("qwen2", "F16"),
            "gemma2": ("gemma2", "Q8_0"), "phi3": ("phi3", "BF16")}


def write_gguf(model, path: Path, architecture: str, matrix_type: str, **metadata) -> Path:
    """`model`'s weights as a GGUF file (no tokenizer), named as transformers' GGUF loader expects.
    `metadata` overrides what its config says (to make a file that contradicts itself)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    cfg = model.config
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=cfg.to_dict())
    to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(model, processor).items()}
    w = gguf.GGUFWriter(str(path), architecture)
    keys = dict(context_length=cfg.max_position_embeddings, embedding_length=cfg.hidden_size,
                block_count=cfg.num_hidden_layers, feed_forward_length=cfg.intermediate_size,
                head_count=cfg.num_attention_heads, head_count_kv=cfg.num_key_value_heads,
                layer_norm_rms_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size) | metadata
    for key, value in keys.items():
        getattr(w, f"add_{key}")(value)
    if architecture == "gemma2":
        w.add_key_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:  # llama.cpp writes no output.weight then
            continue
        data = p.detach().float().numpy()
        if data.ndim == 2:
            w.add_tensor(to_gguf[name], gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(to_gguf[name], data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    # Phi3Config's pad_token_id (32000), which a GGUF's metadata cannot change, must be inside the vocabulary
    sizes = {"phi3": {"vocab_size": 32064}}
    return {family: write_gguf(tiny_model(family, **sizes.get(family, {})), root / f"{family}.gguf", *FAMILIES[family])
            for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_tensors_are_what_transformers_loads(ggufs, family):
    path = ggufs[family]
    assert streamable(path)
    streamed = load(path, tokenizer=False, stream=True)
    ckpt = streamed.model.slm_checkpoint
    assert next(streamed.model.parameters()).is_meta
    eager = load(path, tokenizer=False).model
    params = dict(eager.named_parameters())
    assert set(ckpt.names()) == set(params)  # the tied lm_head is the embedding's name, not a tensor of its own
    for name, p in params.items():
        want = p.detach().numpy()
        got = ckpt.read(name)
        assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, want), name
        if want.ndim == 2:  # rows alone: a row block of a matrix, llama's permuted q/k among them
            assert np.array_equal(ckpt.read(name, rows=(1, 5)), want[1:5]), name


def _files(folder: Path) -> dict:
    """Every written file's bytes but the manifest and its checksums (they name the source and the time)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "SHA256SUMS")}


@pytest.mark.parametrize("target,args", [("onnx", {}), ("executorch", {})])
def test_streamed_gguf_export_is_the_eager_export(ggufs, tmp_path, target, args):
    path = ggufs["llama"]
    quiet = {"log": lambda *a: None, "no_tokenizer": True}
    streamed = _files(run_export(str(path), target=target, out=tmp_path / "streamed", **quiet, **args))
    eager = load(path, tokenizer=False)  # the whole model dequantized by transformers, as exports did before
    assert not hasattr(eager.model, "slm_checkpoint")
    whole = _files(run_export(eager, target=target, out=tmp_path / "eager", **quiet, **args))
    assert streamed.keys() == whole.keys() and streamed
    assert [f for f in streamed if streamed[f] != whole[f]] == []


def _cut(path: Path, out: Path) -> str:
    """`path` with its last tensor's data cut short; returns that tensor's name."""
    import gguf

    last = max(gguf.GGUFReader(path).tensors, key=lambda t: t.data_offset)
    out.write_bytes(path.read_bytes()[: last.data_offset + last.n_bytes // 2])
    return last.name


def _one_error(code, stderr) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("slm-export: error: "), stderr
    return lines[0]


def test_truncated_gguf_is_refused_naming_the_tensor(ggufs, tmp_path):
    bad = tmp_path / "cut.gguf"
    name = _cut(ggufs["llama"], bad)
    code, _, stderr = run_cli("--model", bad, "--no-tokenizer", "--out", tmp_path / "o")
    line = _one_error(code, stderr)
    assert str(bad) in line and f"tensor {name!r}" in line and "truncated" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]  # nothing written, not even a staged folder


def test_gguf_whose_tensor_contradicts_its_metadata_is_refused(tmp_path):
    model = tiny_model("llama")
    bad = write_gguf(model, tmp_path / "bad.gguf", "llama", "Q8_0",
                     feed_forward_length=model.config.intermediate_size + 32)
    code, _, stderr = run_cli("--model", bad, "--no-tokenizer", "--out", tmp_path / "o")
    line = _one_error(code, stderr)
    assert str(bad) in line and "'blk.0.ffn_" in line and "metadata implies" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_a_gguf_parse_that_runs_out_of_memory_is_not_called_a_bad_file(ggufs, monkeypatch):
    import gguf

    from slm_export.gguf_checkpoint import open_gguf

    def out_of_memory(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(gguf, "GGUFReader", out_of_memory)
    with pytest.raises(MemoryError):  # the export's memory message says it, not "truncated or corrupt"
        open_gguf(ggufs["llama"])
