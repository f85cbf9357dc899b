"""The torch-free ExecuTorch runner (runtimes/native): our C++ kernels for llama::update_cache and
llama::custom_sdpa on the wheel's runtime, checked against PyTorch and against ExecuTorch's own
kernels in its Python bindings; where it runs (a child process) and what it refuses."""
import json

import numpy as np
import pytest

import slm_export
from slm_export import SlmExportError

from conftest import assert_runner_tokens, require_extra, require_gxx, text_llm_runner, tiny_bpe_tokenizer, tiny_model

require_extra("executorch", "executorch")


def _export(model, path, **kw):
    kw.setdefault("max_context", 256)
    return slm_export.export(model, target="executorch", bits=16, out=path, log=lambda *a: None, **kw)


@pytest.mark.parametrize("head_dim", [16, 64])  # 16: the generic loops; 64: the unrolled ones (SmolLM2's size)
def test_attention_matches_pytorch_across_key_chunks_and_row_blocks(head_dim, tmp_path):
    model = tiny_model("llama", head_dim=head_dim)
    art = _export(model, tmp_path / "pte")
    assert art.manifest["runtime"] == "executorch"
    # 203 prompt tokens: prefill chunks of 128 + 75 (75 = 18 blocks of 4 query rows + 3); the last
    # rows see 243 keys, two chunks of 128 merged; then one-token steps through the same merge.
    report = art.verify(reference=model, prompt_tokens=203, decode_steps=40, perplexity=False)
    fp32 = report.comparisons[0]
    assert report.executed_by == "executorch"
    assert fp32.max_abs_logit_diff < 1e-3 and fp32.greedy_match_tokens == 40, report.format()


def test_native_and_python_bindings_give_the_same_logits(tmp_path):
    from slm_export.runtimes.executorch import PybindExecuTorchRunner

    model = tiny_model("qwen2")
    art = _export(model, tmp_path / "pte")
    ids = np.random.default_rng(1).integers(0, 512, 150).tolist()
    native = art.runner()  # a child process: this one has ExecuTorch's Python packages loaded
    assert type(native).__name__ == "ChildRunner"
    ours = [native.forward(ids, all_logits=True)] + [native.forward([t]) for t in (3, 7, 11)]
    theirs_runner = PybindExecuTorchRunner(art.path, art.manifest)
    theirs = [theirs_runner.forward(ids, all_logits=True)] + [theirs_runner.forward([t]) for t in (3, 7, 11)]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_bench_process_holds_no_torch(tmp_path):
    art = _export(tiny_model("llama"), tmp_path / "pte", max_context=128)
    (row,) = art.bench(prompt_tokens=(16,), decode_tokens=8, warmup=2, repeats=1)
    assert row.error is None, row.error  # the measuring process fails if torch was imported
    assert row.runtime == "executorch" and row.decode_tok_s > 0 and "torch" not in row.versions
    # Python, numpy and the runtime's libraries; libtorch alone is ~220 MB
    assert row.baseline_rss_mb < 100, row.baseline_rss_mb


def test_in_process_load_beside_executorch_packages_is_refused_not_aborted(tmp_path):
    art = _export(tiny_model("llama"), tmp_path / "pte", max_context=128)  # exporting loads ExecuTorch's kernels
    with pytest.raises(SlmExportError, match="cannot load into a process that has loaded lib.*child process"):
        art.runner(in_process=True)


def test_missing_compiler_is_one_clear_sentence(monkeypatch, tmp_path):
    from slm_export.runtimes import native

    native.library_path.cache_clear()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("SLM_EXPORT_CACHE", str(tmp_path / "cache"))
    try:
        with pytest.raises(SlmExportError, match=r"needs a C\+\+ compiler: install one \(Debian/Ubuntu: apt install g\+\+\)"):
            native.library_path()
    finally:
        native.library_path.cache_clear()
    assert not (tmp_path / "cache").exists()


def test_int8_kv_cache_is_a_quarter_and_runs_in_the_python_bindings(tmp_path):
    model = tiny_model("llama")
    art = _export(model, tmp_path / "kv8", max_context=128, kv_bits=8)
    m = art.manifest
    assert m["runtime"] == "executorch-pybind" and m["target_extra"]["kv_bits"] == 8
    assert "llama::custom_quantized_sdpa" in m["target_extra"]["custom_ops"]
    # 2 (k, v) x 2 layers x 128 positions x 2 kv heads x (16 int8 + fp32 scale + int8 zero point)
    assert m["io"]["kv_layout"]["bytes"] == 2 * 2 * 128 * 2 * (16 + 5)
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=24, perplexity=False)
    fp32 = report.comparisons[0]
    assert report.executed_by == "executorch-pybind"
    assert fp32.mean_kl < 1e-3 and fp32.greedy_match_tokens >= 20, report.format()


@pytest.mark.parametrize("head_dim", [16, 64])  # 16: the fp32-tile loops; 64: the register-widening ones (AVX here)
def test_fp16_kv_cache_is_half_the_bytes_and_matches_pytorch(head_dim, tmp_path):
    model = tiny_model("llama", head_dim=head_dim)
    art = _export(model, tmp_path / "kv16", kv_bits=16)
    m, cfg = art.manifest, model.config
    assert m["runtime"] == "executorch" and m["target_extra"]["kv_bits"] == 16
    assert m["target_extra"]["custom_ops"] == ["slm::sdpa", "slm::update_cache"]  # read off the program
    kv = m["io"]["kv_layout"]
    assert kv["dtype"] == "float16"
    assert kv["bytes"] == 2 * cfg.num_hidden_layers * 256 * cfg.num_key_value_heads * head_dim * 2
    # 203 prompt tokens: two key chunks merged, row blocks with a remainder, then one-token steps.
    report = art.verify(reference=model, prompt_tokens=203, decode_steps=40, perplexity=False)
    fp32 = report.comparisons[0]
    assert report.executed_by == "executorch"
    assert fp32.max_abs_logit_diff < 1e-2 and fp32.greedy_match_tokens == 40, report.format()


def test_fp16_cache_runs_in_executorch_llm_runner_with_our_own_ops_only(tmp_path):
    # What the bundle README tells an app for a --kv-bits 16 file: beside ExecuTorch's LLM custom ops, add
    # cpp/llama_ops.cpp built with -DSLM_EXPORT_OWN_OPS_ONLY (the slm:: ops alone: a second registration of a
    # llama:: op would abort). ExecuTorch's TextLLMRunner then runs the file and generates what our runner does.
    import shutil
    import subprocess

    from slm_export.runtimes import native
    from slm_export.runtimes.base import generate
    from slm_export.text import format_chat

    require_gxx()
    root = native._executorch_root()
    lib = tmp_path / "libslm_own_ops.so"
    subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-DSLM_EXPORT_OWN_OPS_ONLY",
                    *(f"-D{d}" for d in native.DEFINES), f"-I{root / 'include'}",
                    f"-I{root / 'include/executorch/runtime/core/portable_type/c10'}", str(native.HERE / "llama_ops.cpp"),
                    "-o", str(lib), f"-L{root / 'lib'}", "-Wl,--no-as-needed", "-lexecutorch", "-lexecutorch_threadpool",
                    f"-Wl,-rpath,{root / 'lib'}", "-Wno-deprecated-declarations"], check=True, capture_output=True)
    assert "llama::" not in lib.read_bytes().decode("latin-1") and "slm::sdpa.out" in lib.read_bytes().decode("latin-1")
    art = slm_export.export(tiny_model("llama"), tokenizer=tiny_bpe_tokenizer(ascii_only=True), target="executorch", bits=16, kv_bits=16,
                            out=tmp_path / "kv16", max_context=128, log=lambda *a: None)
    assert art.manifest["target_extra"]["own_kernels"] == ["slm::sdpa", "slm::update_cache"]
    codec, question = art.codec(), "What is the capital of France?"
    ours = generate(art.runner(), codec.encode_chat(question), 12, eos_ids=codec.eos_ids)
    prompt = format_chat(codec.chat_template, question, codec.bos_token, codec.eos_token)
    got = text_llm_runner(art.path, tmp_path / "only", prompt, 12, load_first=lib)
    assert_runner_tokens(got, art.path / "tokenizer.json", ours, codec.eos_ids, 12)


def test_slm_ops_pytorch_definition_matches_executorch_custom_sdpa():
    # kv_ops.py's eager implementation is the meaning of slm::sdpa; with an fp32 cache it must be
    # ExecuTorch's llama::custom_sdpa (whose CPU kernel is loaded by the export path).
    import torch

    from slm_export.exporters.executorch.module import _custom_ops

    _custom_ops()
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(1, 64, 2, 16, generator=gen), torch.randn(1, 64, 2, 16, generator=gen)
    q = torch.randn(1, 5, 6, 16, generator=gen)
    ours = torch.ops.slm.sdpa(q, k_cache, v_cache, 20, 0.25)
    theirs = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, 20, None, 0, True, 0.25)
    assert torch.allclose(ours, theirs, atol=1e-5)
    half = torch.zeros(1, 64, 2, 16, dtype=torch.float16)
    torch.ops.slm.update_cache(k_cache[:, :25], half, 0)
    assert torch.equal(half[:, :25], k_cache[:, :25].half()) and not half[:, 25:].any()


def test_runner_drops_its_mapping_of_the_pte_after_each_call(tmp_path):
    # The embedding is read through the .pte's file mapping; after a call the runner holds none of
    # those pages (they stay in the page cache). Run in a child: this process has ExecuTorch loaded.
    import subprocess
    import sys

    art = _export(tiny_model("llama"), tmp_path / "pte", max_context=128)  # bits 16: fp32 embedding in the file
    script = f"""
import os, numpy as np
from pathlib import Path
from slm_export.runtimes.native import NativeProgram
pte = os.path.realpath({str(art.path / 'model.pte')!r})
def resident_kb():
    total, ours = 0, False
    for line in open('/proc/self/smaps'):
        head = line.split()
        if '-' in head[0] and ':' not in head[0]:
            ours = line.rstrip().endswith(pte)
        elif ours and head[0] == 'Rss:':
            total += int(head[1])
    return total
p = NativeProgram(Path(pte), 2, {art.manifest['model']['vocab_size']})
p.forward(np.arange(0, 500, 7)[None], 0)
p.logits(np.arange(3))  # the second method, loaded now
print(resident_kb())
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == 0, r.stdout


def test_pte_reaches_the_os_in_small_writes(tmp_path):
    from slm_export.exporters.executorch.lower import WRITE_PIECE, _SmallWrites, write_pte

    class ShortWritingRaw:  # records what reaches the OS, and takes at most half a piece per call
        def __init__(self):
            self.sizes, self.data = [], bytearray()

        def write(self, data):
            self.sizes.append(len(data))
            taken = bytes(data[:WRITE_PIECE // 2])
            self.data += taken
            return len(taken)

    raw = ShortWritingRaw()
    payload = b"a" * (3 * WRITE_PIECE + 5)
    _SmallWrites(raw).write(payload)
    _SmallWrites(raw).write(bytearray(b"bc"))
    assert max(raw.sizes) <= WRITE_PIECE and bytes(raw.data) == payload + b"bc"

    class Program:
        def write_to_file(self, f):
            f.write(payload)

    write_pte(Program(), tmp_path / "m.pte")
    assert (tmp_path / "m.pte").read_bytes() == payload


def test_cli_kv_bits_reaches_the_manifest(tmp_path, tiny_dir):
    import subprocess
    import sys

    out = tmp_path / "kv8"
    r = subprocess.run([sys.executable, "-m", "slm_export.cli", "--model", str(tiny_dir), "--target", "executorch",
                        "--bits", "16", "--kv-bits", "8", "--max-context", "64", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["target_extra"]["kv_bits"] == 8
