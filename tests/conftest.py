"""Tiny randomly initialised models built from real architecture configs, and helpers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 512


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                # a wide init makes logits peaked, so top-1 agreement means something on random weights
                initializer_range=0.08)
    base.update(kw)
    return base


def tiny_config(arch: str):
    from transformers import Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config

    if arch == "llama":  # SmolLM2 / Llama-3.2 shape: GQA, tied embeddings, llama3 rope scaling
        return LlamaConfig(**_common(tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    if arch == "tinyllama":  # untied lm_head, 4:1 GQA
        return LlamaConfig(**_common(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=2,
                                     hidden_size=128))
    if arch == "mobilellm":  # deep and thin, embedding shared
        return LlamaConfig(**_common(num_hidden_layers=8, hidden_size=32, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=96, tie_word_embeddings=True))
    if arch == "qwen2":  # q/k/v biases
        return Qwen2Config(**_common(tie_word_embeddings=True))
    if arch == "phi3":  # fused qkv / gate_up, sliding window on every layer
        return Phi3Config(**_common(tie_word_embeddings=False, sliding_window=24, pad_token_id=0))
    if arch == "gemma2":  # (1+w) norms, post-norms, gelu-tanh, scaled embeddings, softcaps, alternating windows
        return Gemma2Config(**_common(head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
                                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                      num_hidden_layers=3))
    raise ValueError(arch)


ARCHS = ["llama", "tinyllama", "mobilellm", "qwen2", "phi3", "gemma2"]


def tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if arch == "gemma2":  # HF inits Gemma norms at 0 (= scale 1); randomise them so the (1+w) fold is tested
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.1)
    return model


def tiny_tokenizer():
    """A real fast tokenizer (word level) over the tiny vocab, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def tiny_bpe_tokenizer(ascii_only: bool = False):
    """A byte-level BPE tokenizer (the GPT-2 / SmolLM2 kind) of VOCAB entries trained on the shipped passage,
    with ChatML special tokens and template: one onnxruntime-genai's tokenizer and ExecuTorch's LLM runners read
    (they cannot read the word-level one above). ascii_only: trained on the passage's ASCII with no byte alphabet,
    so every token decodes to ASCII text (ExecuTorch's Python TextLLMRunner raises on a piece that is not whole
    UTF-8, which a random model's byte tokens can be)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slm_export.text import passage_text

    text = passage_text().encode("ascii", "ignore").decode() if ascii_only else passage_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=[] if ascii_only else pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert tok.get_vocab_size() == VOCAB
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


_TEXT_LLM_RUNNER = """
import ctypes, json, sys
import torch  # noqa: F401  (executorch's Python bindings need libtorch loaded first)
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
from executorch.kernels import quantized  # noqa: F401
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

if sys.argv[3]:
    ctypes.CDLL(sys.argv[3], mode=ctypes.RTLD_GLOBAL)  # a kernel library of the app's (registers its ops)

runner = TextLLMRunner("model.pte", "tokenizer.json")
pieces, stats = [], []
config = GenerationConfig(echo=False, max_new_tokens=int(sys.argv[2]), temperature=0.0)
runner.generate(json.loads(sys.argv[1]), config, token_callback=pieces.append,
                stats_callback=lambda s: stats.append(json.loads(s.to_json_string())))
with open("result.json", "w") as f:
    json.dump({"pieces": pieces, "stats": stats[0]}, f)
"""


def text_llm_runner(folder: Path, work: Path, prompt: str, max_new_tokens: int, load_first: Path | None = None) -> dict:
    """ExecuTorch's own LLM runner (TextLLMRunner, its Python binding) given only `folder`'s model.pte and
    tokenizer.json (copied alone into `work`), greedy, in a child process: {"pieces": the text of each token it
    generated, in order, "stats": its stats}. `load_first`: a kernel library loaded into that process first."""
    import shutil
    import subprocess
    import sys

    work.mkdir(parents=True, exist_ok=True)
    for name in ("model.pte", "tokenizer.json"):
        shutil.copyfile(folder / name, work / name)
    p = subprocess.run([sys.executable, "-c", _TEXT_LLM_RUNNER, json.dumps(prompt), str(max_new_tokens),
                        str(load_first or "")], cwd=work, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((work / "result.json").read_text())


def runner_pieces(tokenizer_json: Path, tokens: list[int]) -> list[str]:
    """The text TextLLMRunner hands its callback for each of `tokens`: its C++ tokenizer's (pytorch_tokenizers,
    whose Python binding decodes one token at a time; the runner's decode(previous, token) of a Hugging Face
    tokenizer decodes `token` alone)."""
    from pytorch_tokenizers import CppHFTokenizer

    tok = CppHFTokenizer()
    tok.load(str(tokenizer_json))
    return [tok.decode(t) for t in tokens]


def assert_runner_tokens(got: dict, tokenizer_json: Path, ours: list[int], eos_ids, max_new_tokens: int) -> None:
    """TextLLMRunner generated exactly `ours` (our runner's greedy tokens, which stop before a stop id): the same
    pieces, then the stop token's if ours stopped early (the runner hands that one to its callback too)."""
    pieces = got["pieces"]
    assert pieces[:len(ours)] == runner_pieces(tokenizer_json, ours), (pieces, ours)
    if len(ours) == max_new_tokens:
        assert len(pieces) == len(ours), pieces
    else:  # ours met a stop id: the runner's last piece is that id's
        assert len(pieces) == len(ours) + 1 and pieces[-1] in runner_pieces(tokenizer_json, sorted(eos_ids)), pieces
    assert got["stats"]["generated_tokens"] == len(pieces) - 1  # the runner counts the decode steps after the first


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A local Hugging Face folder (safetensors + tokenizer) of a tiny Llama."""
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d, safe_serialization=True)
    tiny_tokenizer().save_pretrained(d)
    return d


def run_cli(*args, env=None):
    """Run the CLI in a subprocess (as a user would); returns (code, stdout, stderr)."""
    import os
    import subprocess
    import sys

    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "slm_export.cli", *map(str, args)], capture_output=True, text=True,
                       env=full_env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session", autouse=True)
def fresh_slm_export_cache(tmp_path_factory):
    """Every test session starts from an empty slm-export cache (the emulated ARM userland, bandwidth):
    what a fresh machine sees, and nothing of the user's is touched."""
    import os

    old = os.environ.get("SLM_EXPORT_CACHE")
    os.environ["SLM_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("slm-export-cache"))
    yield
    if old is None:
        os.environ.pop("SLM_EXPORT_CACHE", None)
    else:
        os.environ["SLM_EXPORT_CACHE"] = old


def require_qemu() -> None:
    """Skip without qemu-aarch64-static, or fail when SLM_EXPORT_REQUIRE_QEMU=1 (CI installs it)."""
    import os
    import shutil

    if not shutil.which("qemu-aarch64-static"):
        why = "qemu-aarch64-static is not installed (apt install qemu-user-static; scripts/setup-test-system.sh, run by scripts/test.sh, does it as root)"
        if os.environ.get("SLM_EXPORT_REQUIRE_QEMU"):
            pytest.fail(f"SLM_EXPORT_REQUIRE_QEMU is set but {why}")
        pytest.skip(why)


def require_extra(module: str, extra: str) -> None:
    """Skip a test module whose target SDK is not installed, saying which extra installs it; fail instead
    when SLM_EXPORT_REQUIRE_SDKS=1 (CI installs every extra, so a skip there would hide a broken install)."""
    import importlib
    import os

    try:
        importlib.import_module(module)
    except ImportError as e:
        why = f"{module} is not importable ({e}): pip install -e '.[{extra}]' (scripts/setup.sh installs it)"
        if os.environ.get("SLM_EXPORT_REQUIRE_SDKS"):
            pytest.fail(f"SLM_EXPORT_REQUIRE_SDKS is set but {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


def require_gxx() -> None:
    """Skip without g++ (the C++ runner and examples are built with it), or fail when SLM_EXPORT_REQUIRE_SDKS=1
    (CI installs it: a skip there would hide a broken setup)."""
    import os
    import shutil

    if not shutil.which("g++"):
        why = "no g++ here (apt install g++; scripts/setup-test-system.sh, run by scripts/test.sh, does it as root)"
        if os.environ.get("SLM_EXPORT_REQUIRE_SDKS"):
            pytest.fail(f"SLM_EXPORT_REQUIRE_SDKS is set but {why}", pytrace=False)
        pytest.skip(why)


def run_cpp_example(folder: Path, prompt: str | None = None) -> str:
    """Run the "## C++ without the runner" block of an ExecuTorch bundle's README as written (with `prompt` in place of its
    sample prompt) and check what it generated against our runner; returns what it printed."""
    import os
    import re
    import subprocess
    import sys

    import slm_export
    from slm_export.runtimes.base import generate

    require_gxx()
    readme = (folder / "README.md").read_text()
    script = re.search(r"## C\+\+ without the runner[^\n]*\n.*?```sh\n(.*?)```", readme, re.S).group(1)
    if prompt is not None:
        script = re.sub(r"^prompt = .*$", lambda m: f"prompt = {prompt!r}", script, count=1, flags=re.M)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # `python` is this venv's
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    art = slm_export.open_artifact(folder)
    codec = art.codec()
    ids = [int(t) for t in (folder / "prompt_ids.txt").read_text().split()]
    assert ids == (codec.encode(prompt, add_special_tokens=False) if prompt is not None
                   else codec.encode_chat("What is the capital of France?"))
    got = [int(t) for t in (folder / "answer_ids.txt").read_text().split()]
    # built with our runner's flags, it generates exactly what our runner does (other flags may break
    # near-ties the other way: 8da4w's dynamic activation quantization amplifies float noise)
    assert got == generate(art.runner(), ids, 32, eos_ids=codec.eos_ids) and got, p.stderr
    from tokenizers import Tokenizer

    assert p.stdout.strip() == Tokenizer.from_file(str(folder / "tokenizer.json")).decode(got).strip()
    return p.stdout
