"""The executorch target: tiny models of every architecture through fp32 / int8 / int4 .pte files,
run by the real ExecuTorch runtime (XNNPACK, LLM custom ops) and checked against PyTorch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import slm_export
from slm_export import SlmExportError
from slm_export.exporters.executorch import ExecuTorchExporter
from slm_export.verify import tolerances_for

from conftest import (ARCHS, assert_runner_tokens, require_extra, run_cpp_example, text_llm_runner, tiny_bpe_tokenizer,
                      tiny_model)

require_extra("executorch", "executorch")


def _export(model, tmp_path, bits, name=None, **kw):
    kw.setdefault("max_context", 128)
    return slm_export.export(model, target="executorch", bits=bits, out=tmp_path / (name or f"b{bits}"),
                             log=lambda *a: None, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_pte_matches_pytorch(arch, bits, tmp_path):
    model = tiny_model(arch)
    art = _export(model, tmp_path, bits)
    assert (art.path / "model.pte").stat().st_size > 0
    # 40 prompt + 24 decode steps: past the 24-token sliding windows of phi3 / gemma2
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=24, perplexity=False)
    by_ref = {c.reference: c for c in report.comparisons}
    if bits == 16:
        assert by_ref["fp32"].max_abs_logit_diff < 1e-3, report.format()
        assert by_ref["fp32"].greedy_match_tokens == 24
    else:
        # On a random tiny model many logits are near-tied, so top-1 flips on tiny differences; the
        # KL is the meaningful measure here (the real-model test gates on the full tolerances).
        assert by_ref["same-quant"].mean_kl < tolerances_for(bits, "per-token")["same-quant"].mean_kl, report.format()
        assert by_ref["same-quant"].max_abs_logit_diff < 0.5, report.format()
        # top-1 against fp32 means little on a random tiny model (near-tied logits); KL does
        assert by_ref["fp32"].mean_kl < tolerances_for(bits, "per-token")["fp32"].mean_kl, report.format()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_program_matches_pytorch(arch, tmp_path):
    model = tiny_model(arch)
    art = _export(model, tmp_path, 16, compute_precision="float16")
    m = art.manifest
    assert m["target_extra"]["compute_precision"] == "float16" and m["target_extra"]["kv_bits"] == 16
    assert m["io"]["kv_layout"]["dtype"] == "float16"
    assert {e["scheme"] for e in json.loads((art.path / "quant_report.json").read_text())["weights"]} <= \
        {"float16 Linear", "float16 Embedding"}
    # 40 prompt + 24 decode steps: past the 24-token sliding windows of phi3 / gemma2
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=24, perplexity=False)
    (fp32,) = report.comparisons
    bound = tolerances_for(16, "per-token", "float16")["fp32"]
    assert report.passed and fp32.mean_kl < bound.mean_kl and fp32.max_abs_logit_diff < 0.05, report.format()


def test_fp16_file_is_half_the_fp32_file(tmp_path):
    model = tiny_model("tinyllama")  # untied: every weight once
    fp32 = _export(model, tmp_path, 16, name="fp32")
    fp16 = _export(model, tmp_path, 16, name="fp16", compute_precision="float16")
    size = lambda art: (art.path / "model.pte").stat().st_size  # noqa: E731
    assert 0.45 < size(fp16) / size(fp32) < 0.55, (size(fp16), size(fp32))
    assert fp16.manifest["target_extra"]["custom_ops"] == ["slm::sdpa", "slm::update_cache"]


def test_scaled_norm_survives_activations_that_overflow_fp16_squares():
    import torch

    from slm_export.exporters.executorch.module import RMSNorm, ScaledRMSNorm

    weight = torch.linspace(0.5, 1.5, 64).numpy()
    x = torch.randn(1, 3, 64)
    x[0, 1, 7] = 2.4e4  # a massive activation, as SmolLM2-135M carries from layer 12 on
    x[0, 2] *= 1e-3  # and a small row
    ref = RMSNorm(weight, 1e-5)(x)
    plain, scaled = RMSNorm(weight, 1e-5).half(), ScaledRMSNorm(weight, 1e-5).half()
    # 2.4e4 ** 2 overflows fp16: the mean of squares is inf and the plain norm zeroes that row
    assert (plain(x.half()).float()[0, 1] - ref[0, 1]).abs().max() > 1.0
    got = scaled(x.half()).float()
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2), (got - ref).abs().max()


@pytest.mark.parametrize("args, message", [
    (dict(bits=4, compute_precision="float16"), r"--compute-precision float16 is for --bits 16 on the executorch target"),
    (dict(bits=16, compute_precision="float16", kv_bits=32),
     r"--kv-bits 32 is not available for the executorch target at --compute-precision float16; use 16"),
])
def test_fp16_bad_combinations_are_refused_before_loading(tmp_path, args, message):
    with pytest.raises(SlmExportError, match=message):
        slm_export.export("no/such-model-is-loaded", target="executorch", out=tmp_path / "x", log=lambda *a: None, **args)
    assert list(tmp_path.iterdir()) == []


def test_prompt_longer_than_one_chunk_goes_through_the_cache_in_chunks(tmp_path):
    model = tiny_model("llama")
    art = _export(model, tmp_path, 16, max_context=256)
    assert art.manifest["io"]["prefill_chunk"] == 128
    report = art.verify(reference=model, prompt_tokens=200, decode_steps=16, perplexity=False)
    fp32 = report.comparisons[0]
    assert fp32.max_abs_logit_diff < 1e-3 and fp32.greedy_match_tokens == 16, report.format()


def test_lowering_decomposes_the_graph_once(tmp_path, monkeypatch):
    # Each decomposition re-traces every node (~11 s on SmolLM2-135M here); executorch 1.5.1's
    # to_edge_transform_and_lower runs three unless the partitioner says no per-node check is needed
    # and the graph holds nothing left to decompose (lower.py, module.py). This guards that seam
    # against an executorch upgrade or a module change quietly bringing the other two back. Once per
    # method: forward, and logits (a norm and the lm_head).
    from torch.export import ExportedProgram

    calls = []
    original = ExportedProgram.run_decompositions

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ExportedProgram, "run_decompositions", counted)
    model = tiny_model("llama")
    art = _export(model, tmp_path, 4)
    assert len(calls) == len({id(ep) for ep in calls}) == 2
    report = art.verify(reference=model, prompt_tokens=16, decode_steps=8, perplexity=False)
    same = next(c for c in report.comparisons if c.reference == "same-quant")
    assert same.mean_kl < tolerances_for(4, "per-token")["same-quant"].mean_kl, report.format()


@pytest.mark.parametrize("arch, bits, kw", [  # ~40 s each: the graphs that differ most
    ("gemma2", 4, {"embedding_bits": 4}),  # 8da4w, int4 table; soft-capping, four norms per layer, explicit attention
    ("qwen2", 8, {"weight_only": True}),  # split biases, the weight-only linear
    ("llama", 8, {"kv_bits": 8}),  # int8 cache ops
    ("phi3", 16, {"kv_bits": 16, "compute_precision": "float16"}),  # fp16 program, casts at its edges
])
def test_fast_lowering_builds_the_stock_program(arch, bits, kw):
    # edge_passes.py's shortcuts (fused Edge passes, skipped idle re-traces, torchao quant ops' shapes
    # learned once) and lower.py's skipped dim-order legalization: the serialized program must be
    # byte for byte the one the stock passes build.
    from slm_export.architectures import to_decoder
    from slm_export.exporters.executorch import build_module
    from slm_export.exporters.executorch.lower import export_program
    from slm_export.quantize import QuantSpec

    # data-free methods: the lowering is what is compared, not the codes
    spec = QuantSpec(bits=bits, activations="float" if kw.get("weight_only") else "int8",
                     embedding_bits=kw.get("embedding_bits", 8), method=None if bits == 16 else "hqq" if bits == 4 else "rtn")
    decoder = to_decoder(tiny_model(arch), 64)
    plan, codes = ExecuTorchExporter().quantize(decoder, spec, kw.get("compute_precision"))
    module, _ = build_module(decoder, spec, plan, codes, 64, kw.get("kv_bits", 32), kw.get("compute_precision") == "float16")
    shortcuts = {}
    ours = export_program(module, 64, shortcuts=shortcuts).buffer
    stock = export_program(module, 64, stock_passes=True).buffer
    assert ours == stock
    # ...and the shortcuts were taken, not merely switched on (the pinned versions are the ones they know)
    assert shortcuts["fused_edge_passes"] is True
    assert shortcuts["idle_linear_conversion_skipped"].count > 0, shortcuts
    assert shortcuts["delegate_outputs_reused"].count > 0, shortcuts
    assert shortcuts["constants_shared_with_preprocess"].count > 0, shortcuts
    assert shortcuts["compact_dependency_closure"].count > 0, shortcuts
    if bits < 16:  # torchao quant ops exist only in quantized graphs
        assert shortcuts["quant_op_shapes_memoized"].count > 0, shortcuts
    if bits == 4:
        assert shortcuts["int4_packed_in_row_blocks"].count > 0, shortcuts
    if bits == 4 and spec.embedding_bits == 4:
        assert shortcuts["embedding_packed_in_row_blocks"].count > 0, shortcuts


def test_int4_row_block_packing_is_xnnpack_own(monkeypatch):
    # Blocks of a few rows, an odd width (padded), every code from -8 to 7: the very bytes of the stock packing.
    import torch
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor

    from slm_export.exporters.executorch import edge_passes

    codes = torch.randint(-8, 8, (37, 33), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    codes[0, :16] = torch.arange(-8, 8, dtype=torch.int8)
    stock = NodeVisitor.convert_to_qc4w(codes)
    monkeypatch.setattr(edge_passes, "PACK_ROWS_BYTES", 5 * 33)
    with edge_passes.int4_packed_in_row_blocks() as taken:
        ours = NodeVisitor.convert_to_qc4w(codes)
    assert taken.on and taken.count == 1
    assert NodeVisitor.convert_to_qc4w(codes).equal(stock)  # the stock is back after the block
    assert ours.dtype == stock.dtype and ours.equal(stock)


def test_weights_freed_as_serialized_leave_the_program_unchanged():
    # What the export does to bound its memory: the quantized weights in torch's own memory, each freed
    # as soon as XNNPACK has serialized it (not the lm_head's, which both methods read), then every
    # remaining copy released once lowered. Same program bytes as an export that frees nothing.
    import gc
    import weakref

    from slm_export.architectures import to_decoder
    from slm_export.exporters.executorch import build_module, single_use
    from slm_export.exporters.executorch.lower import export_program
    from slm_export.quantize import QuantSpec

    spec = QuantSpec(bits=4, activations="int8", embedding_bits=4, method="rtn")
    decoder = to_decoder(tiny_model("llama"), 64)
    kept = export_program(build_module(decoder, spec, *ExecuTorchExporter().quantize(decoder, spec), 64)[0], 64).buffer
    plan, codes = ExecuTorchExporter().quantize(decoder, spec)  # the same codes again (rtn)
    held = {name: weakref.ref(qw.codes) for name, qw in codes.items()}
    owned = []
    module, _ = build_module(decoder, spec, plan, codes, 64, owned=owned)
    freeable = single_use(module, owned)
    assert 0 < len(freeable) < len(owned)  # the lm_head's are owned but not freeable
    table = module.embed_tokens.weight  # looked up outside the delegates: never freed, released at the end
    table = {t.untyped_storage().data_ptr() for t in (table.qdata, table.scale, table.zero_point)}
    shortcuts = {}
    program = export_program(module, 64, shortcuts=shortcuts, release_weights=True, freeable=freeable)
    assert program.buffer == kept
    # (pointers and sizes in assertions, not tensors: a freed tensor's repr would read freed memory)
    left = {t.untyped_storage().data_ptr() for t in freeable if t.untyped_storage().nbytes()}
    assert left == table
    assert shortcuts["delegated_weights_freed"].count == len(freeable) - len(table)
    assert all(p.device.type == "meta" for p in module.parameters())
    # the quantizer's arrays of the owned weights are gone (codes keeps their shapes, not their values)
    codes.clear()
    gc.collect()
    assert {name for name, r in held.items() if r() is not None} <= {"model.embed_tokens.weight"}


@pytest.mark.parametrize("arch, bits, weight_only", [("qwen2", 4, False), ("llama", 8, True)])
def test_module_built_with_quantized_weights_lowers_to_the_bytes_of_one_packed_after(arch, bits, weight_only):
    # build_module makes each quantized weight a torchao tensor as its module is made (no float copy
    # of it ever) and takes float weights as views of the Decoder's arrays: the program must be byte for
    # byte the one from a float module whose weights are replaced afterwards (the way it used to be built).
    import torch

    from slm_export.architectures import to_decoder
    from slm_export.exporters.executorch import build_module
    from slm_export.exporters.executorch.lower import export_program
    from slm_export.exporters.executorch.module import ExportableDecoder
    from slm_export.exporters.executorch.quant import pack_weight
    from slm_export.exporters.torch_parts import split_biases
    from slm_export.quantize import QuantSpec

    spec = QuantSpec(bits=bits, activations="float" if weight_only else "int8", embedding_bits=bits, method="rtn")
    decoder = to_decoder(tiny_model(arch), 64)
    plan, codes = ExecuTorchExporter().quantize(decoder, spec)
    module, _ = build_module(decoder, spec, plan, codes, 64)
    with torch.no_grad():
        packed = ExportableDecoder(decoder, 64, chunk=64).eval()
        if weight_only:
            split_biases(packed)
        for fqn, (source, rows) in packed.sources.items():
            if plan[source].quantized:
                qw = codes[source] if rows is None else codes[source].rows(*rows)
                pack_weight(packed.get_submodule(fqn), qw, spec.activations)
    assert export_program(module, 64).buffer == export_program(packed, 64).buffer


def test_edge_pass_fusion_is_on_with_the_pinned_executorch():
    # With another ExecuTorch pass list the fusion turns itself off (correct, but slower): say so here.
    from slm_export.exporters.executorch.edge_passes import fused_edge_passes

    with fused_edge_passes() as on:
        assert on, "ExecuTorch's ATen->Edge pass list is not the one edge_passes.py fuses"


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory):
    """One tiny Llama int4 .pte shared by the tests that only read it (each export costs ~15 s)."""
    model = tiny_model("llama")
    return model, _export(model, tmp_path_factory.mktemp("et"), 4)


def test_report_covers_every_weight_and_quantizes_the_tied_lm_head(llama_int4):
    model, art = llama_int4
    report = json.loads((art.path / "quant_report.json").read_text())
    entries = {e["name"]: e for e in report["weights"]}
    # the int4 default: an int8 lm_head and mixed-precision units, on float activations (XNNPACK qc8w)
    assert entries["lm_head"]["bits"] == 8 and "weight-only" in entries["lm_head"]["scheme"]
    linears = [e for e in report["weights"] if e["name"] != "embed_tokens"]
    assert all(("weight-only" if e["bits"] == 8 else "8da4w") in e["scheme"] for e in linears), linears
    assert {e["bits"] for e in linears} == {4, 8}
    assert entries["embed_tokens"]["bits"] == 4 and "Embedding" in entries["embed_tokens"]["scheme"]  # the int4 default
    assert report["summary"]["kept_float"] == []
    linear = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert linear <= {s for e in report["weights"] for s in e["sources"]}


def test_int4_embedding_is_the_int4_default_smaller_and_still_matches(llama_int4, tmp_path):
    # --bits 4 stores the embedding rows as int4 too on this target; --embedding-bits 8 asks for int8 rows.
    model, default = llama_int4
    int8_rows = _export(model, tmp_path, 4, name="e8", embedding_bits=8)
    for art, bits in ((default, 4), (int8_rows, 8)):
        entry = next(e for e in json.loads((art.path / "quant_report.json").read_text())["weights"]
                     if e["name"] == "embed_tokens")
        assert entry["bits"] == bits and art.manifest["quant"]["spec"]["embedding_bits"] == bits
    assert default.size_mb < int8_rows.size_mb
    report = default.verify(reference=model, prompt_tokens=32, decode_steps=8, perplexity=False)
    same = next(c for c in report.comparisons if c.reference == "same-quant")
    assert same.mean_kl < 1e-3 and same.max_abs_logit_diff < 0.5, report.format()


def test_lm_head_bits_8_is_an_int8_linear_in_the_program():
    # --lm-head-bits reaches torchao through the spec's rules like every other choice (no export: the plan)
    from slm_export.architectures import to_decoder
    from slm_export.exporters.executorch import build_module
    from slm_export.quantize import QuantSpec

    dec, spec = to_decoder(tiny_model("llama"), 64), QuantSpec(bits=4, embedding_bits=4, lm_head_bits=8, method="hqq")
    _, report = build_module(dec, spec, *ExecuTorchExporter().quantize(dec, spec), 64)
    entries = {e.name: e for e in report.entries}
    # finer than --bits: on float activations (TargetLimits.finer_weights_float_activations)
    assert entries["lm_head"].bits == 8 and entries["lm_head"].scheme == "int8 per-channel sym weight-only hqq"
    assert entries["embed_tokens"].bits == 4 and {e.bits for n, e in entries.items() if n.startswith("layers")} == {4}


def test_width_not_divisible_by_group_falls_back_and_says_so(tmp_path):
    # down_proj in-features 96: group 64 -> 32 (XNNPACK's smallest); 80: no group >= 32 divides -> int8
    for inter, bits, expect in [(96, 4, "fell back to group 32"), (80, 8, "stored int8 per-channel instead")]:
        model = tiny_model("llama", intermediate_size=inter)
        # no mixed precision: it would move some of these units to int8 for a reason of its own
        art = _export(model, tmp_path, 4, name=f"i{inter}", group_size=64, mixed_precision=0)
        down = [e for e in json.loads((art.path / "quant_report.json").read_text())["weights"] if "down" in e["name"]]
        assert down and all(e["bits"] == bits and expect in e["reason"] for e in down), down
        report = art.verify(reference=model, prompt_tokens=24, decode_steps=8, perplexity=False)
        same = next(c for c in report.comparisons if c.reference == "same-quant")
        assert same.mean_kl < 1e-3 and same.max_abs_logit_diff < 0.5, report.format()


def test_group_size_below_32_is_refused_before_loading(tmp_path):
    with pytest.raises(SlmExportError, match=r"--group-size 16 is too small for the executorch target"):
        slm_export.export("not/loaded", target="executorch", bits=4, group_size=16, out=tmp_path / "g",
                          log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_method_inputs_and_kv_cache(llama_int4):
    _, art = llama_int4
    m = art.manifest
    assert m["target"] == "executorch" and m["runtime"] == "executorch" and m["max_context"] == 128
    method = m["io"]["methods"]["forward"]
    assert list(method["inputs"]) == ["tokens", "input_pos"] and method["outputs"]["logits"]["shape"] == [1, 512]
    assert list(m["io"]["methods"]["logits"]["inputs"]) == ["rows"]
    assert m["io"]["prefill_chunk"] == 128
    # 2 (k, v) x 2 layers x 128 positions x 2 kv heads x 16 head dim x 4 bytes
    assert m["io"]["kv_layout"]["in_program"] and m["io"]["kv_layout"]["bytes"] == 2 * 2 * 128 * 2 * 16 * 4
    assert m["versions"]["executorch"] and "model.pte" in m["files"]
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(art.path / "model.pte")
    assert set(program.method_names) == {"forward", "logits", *m["io"]["runner_metadata"]}


def test_pte_follows_executorch_llm_runner_contract(tmp_path):
    # ExecuTorch's own LLM runner (TextLLMRunner: the C++ behind Android's LlmModule and the iOS runner), given
    # only model.pte and tokenizer.json, loads the .pte and generates greedily what our runner does. fp32: its
    # custom_sdpa and ours sum in another order, and 8da4w's int8 rounding of activations turns such float noise
    # into flips of near-tied greedy choices on a random tiny model (the real-model test runs int4).
    from executorch.runtime import Runtime

    from slm_export.runtimes.base import generate
    from slm_export.text import format_chat

    model, tok = tiny_model("llama"), tiny_bpe_tokenizer(ascii_only=True)
    art = slm_export.export(model, tokenizer=tok, target="executorch", bits=16, out=tmp_path / "pte", max_context=128,
                            log=lambda *a: None)
    program = Runtime.get().load_program(art.path / "model.pte")
    contract = {"get_max_seq_len": 128, "get_max_context_len": 128, "get_vocab_size": 512, "get_n_layers": 2,
                "use_kv_cache": True, "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True,
                "get_bos_id": tok.bos_token_id, "get_eos_ids": [tok.eos_token_id]}
    for name, value in contract.items():
        got = program.load_method(name).execute([])
        assert (got if name == "get_eos_ids" else got[0]) == value, name
    assert art.manifest["io"]["runner_metadata"] == contract
    forward = program.metadata("forward")
    assert forward.num_inputs() == 2 and forward.num_outputs() == 1  # TextLLMRunner takes no other
    assert not {"prefill", "decode"} & set(program.method_names)  # the runner would run those instead
    assert art.manifest["target_extra"]["own_kernels"] == []
    assert {k["from"] for k in art.manifest["target_extra"]["kernels"]} == {"executorch"}
    assert art.verify(reference=model, prompt_tokens=24, decode_steps=4, perplexity=False).passed  # logits

    codec = art.codec()
    prompt = "What is the capital of France?"
    ours = generate(art.runner(), codec.encode_chat(prompt), 16, eos_ids=codec.eos_ids)
    text = format_chat(codec.chat_template, prompt, codec.bos_token, codec.eos_token)  # what encode_chat tokenizes
    got = text_llm_runner(art.path, tmp_path / "only", text, 16)
    assert_runner_tokens(got, art.path / "tokenizer.json", ours, codec.eos_ids, 16)


def test_context_overflow_is_a_clear_error(llama_int4):
    from slm_export.runtimes.base import generate

    _, art = llama_int4
    runner = art.runner()
    with pytest.raises(SlmExportError, match="exceed the artifact's max context of 128"):
        generate(runner, list(range(125)), max_new_tokens=8)
    assert len(generate(runner, list(range(100)), max_new_tokens=8)) == 8  # and the runner still works


def test_bench_runs_in_its_own_process_and_records_torch_baseline(llama_int4):
    _, art = llama_int4
    (row,) = art.bench(prompt_tokens=(16,), decode_tokens=8, warmup=2, repeats=1)
    assert row.error is None, row.error
    assert row.runtime == "executorch" and row.decode_tok_s > 0 and row.peak_rss_mb >= row.baseline_rss_mb
    assert row.versions["executorch"]


@pytest.mark.parametrize("kv_bits", ["32", "16"])  # 16: our slm:: ops, so the snippet uses our runner
def test_cli_export_then_bundle_has_the_app_readme(tmp_path, kv_bits):
    import re

    src = tmp_path / "tiny-llama"  # a tokenizer ExecuTorch's runner reads (byte-level BPE)
    tiny_model("llama").save_pretrained(src, safe_serialization=True)
    tiny_bpe_tokenizer(ascii_only=True).save_pretrained(src)
    out = tmp_path / "pte"
    r = subprocess.run([sys.executable, "-m", "slm_export.cli", "--model", str(src), "--target", "executorch", "--bits", "4",
                        "--kv-bits", kv_bits, "--max-context", "256", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "slm_export.cli", "bundle", str(out), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "slm_export.cli", "inspect", str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "method        forward(tokens, input_pos) -> logits" in r.stdout and "checksums     ok" in r.stdout
    readme = (tmp_path / "b" / "README.md").read_text()
    assert "`forward(tokens, input_pos) -> logits`" in readme and "chunks of at most 128" in readme
    assert "| `get_max_context_len` | 256 |" in readme and "| `get_max_seq_len` | 128 |" in readme
    for whole_program in ("```cpp\n// answer.cpp", "```kotlin\n// MainActivity.kt", "```swift\n// AnswerApp.swift"):
        assert whole_program in readme, whole_program
    assert ("compile `cpp/llama_ops.cpp`" in readme) == (kv_bits == "16")  # what an app must add to ExecuTorch
    assert ("TextLLMRunner(\"model.pte\", \"tokenizer.json\")" in readme) == (kv_bits == "32")
    assert {"cpp/generate.cpp", "cpp/llama_ops.cpp", "cpp/attention.h", "cpp/app_memory.h"} <= set(json.loads(
        (tmp_path / "b" / "manifest.json").read_text())["files"])
    # the app developer's Python program runs as written (ExecuTorch's TextLLMRunner, or ours for slm:: ops), with a
    # prompt of two chunks
    words = (Path(slm_export.__file__).parent / "data" / "passage.txt").read_text().split()
    prompt = " ".join(words[:next(n for n in range(len(words)) if len(tiny_bpe_tokenizer(ascii_only=True).encode(" ".join(words[:n]))) > 140)])
    code = re.search(r"## Python[^\n]*\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert re.search(r"^prompt = .*$", code, re.M), code
    code = re.sub(r"^prompt = .*$", lambda m: f"prompt = {prompt!r}", code, count=1, flags=re.M)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "b", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip()
    if kv_bits == "16":  # the C++ example builds and runs as written (2 prefill chunks), as our runner would
        run_cpp_example(tmp_path / "b", prompt=prompt)


def test_missing_executorch_is_one_clear_sentence(monkeypatch):
    from slm_export.exporters.executorch import require_sdk

    monkeypatch.setitem(sys.modules, "executorch", None)
    with pytest.raises(SlmExportError, match=r"needs the executorch and torchao packages .*pip install executorch"):
        require_sdk()


@pytest.mark.parametrize("kw, message", [
    (dict(bits=4), "--weight-only with --bits 4 is not supported by the executorch target"),
    (dict(bits=8, symmetric=False), "--asymmetric is not supported by the executorch target: its int4/int8 linear "
                                    "kernels store no zero points"),
])
def test_weight_only_int4_and_asymmetric_are_refused_before_loading(tmp_path, kw, message):
    with pytest.raises(SlmExportError, match=message):
        slm_export.export("no/such-model-is-loaded", target="executorch", activations="float",
                          out=tmp_path / "wo", log=lambda *a: None, **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_weight_only_matches_pytorch(arch, tmp_path):
    model = tiny_model(arch)
    art = _export(model, tmp_path, 8, activations="float")
    schemes = {e["scheme"] for e in json.loads((art.path / "quant_report.json").read_text())["weights"]}
    assert "int8 per-channel sym weight-only gptq" in schemes and not any("8da" in s for s in schemes), schemes
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=24, perplexity=False)
    by_ref = {c.reference: c for c in report.comparisons}
    # fp32 activations and the same int8 weights: the delegate computes what PyTorch does, up to float
    # rounding (8da8w differs by its activation rounding; see test_pte_matches_pytorch)
    assert by_ref["same-quant"].max_abs_logit_diff < 1e-3, report.format()
    assert by_ref["fp32"].mean_kl < tolerances_for(8, "per-token")["fp32"].mean_kl, report.format()


def test_int8_weight_only_file_holds_int8_weights(tmp_path):
    model = tiny_model("tinyllama")  # untied: every weight once
    fp32 = _export(model, tmp_path, 16, name="fp32")
    wo = _export(model, tmp_path, 8, name="wo", activations="float")
    dyn = _export(model, tmp_path, 8, name="8da8w")
    size = lambda art: (art.path / "model.pte").stat().st_size  # noqa: E731
    # int8 weights plus one fp32 scale per row: about a quarter of fp32, as 8da8w's
    assert size(wo) < 0.32 * size(fp32) and abs(size(wo) - size(dyn)) < 0.05 * size(dyn), (size(wo), size(fp32), size(dyn))


def test_limits_device_runs_a_pte_under_the_profiles_limits(llama_int4):
    """limits:PROFILE runs this machine's runtime under the profile's threads and memory (sim: on an ARM
    profile runs the aarch64 build under QEMU: tests/test_emulation.py)."""
    _, art = llama_int4
    (row,) = art.bench(device="limits:raspberry-pi-5", prompt_tokens=(8,), decode_tokens=2, warmup=0, repeats=1)
    assert row.error is None and row.simulated and row.emulated is None and row.decode_tok_s > 0
