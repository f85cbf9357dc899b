"""Every supported architecture, as a tiny random model, through fp32 / int8 / int4 ONNX export."""
import json

import numpy as np
import onnx
import pytest

import slm_export
from slm_export import SlmExportError
from slm_export.verify import TOLERANCES

from conftest import ARCHS, tiny_model


def _export(model, tmp_path, bits, **kw):
    kw.setdefault("mixed_precision", 0 if bits == 4 else None)  # every int4 weight int4, unless a test asks
    return slm_export.export(model, target="onnx", bits=bits, out=tmp_path / f"b{bits}", max_context=128,
                             log=lambda *a: None, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_export_matches_pytorch(arch, bits, tmp_path):
    model = tiny_model(arch)
    art = _export(model, tmp_path, bits)
    onnx.checker.check_model(str(art.path / "model.onnx"))
    # 40 prompt tokens + 24 decode steps: longer than the 24-token sliding windows of phi3/gemma2
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=24, perplexity=False)
    by_ref = {c.reference: c for c in report.comparisons}
    if bits == 16:
        assert by_ref["fp32"].passed, report.format()
        assert by_ref["fp32"].max_abs_logit_diff < 1e-3
        assert by_ref["fp32"].greedy_match_tokens == 24
    else:
        # same weights, so what is left is the graph and int8-activation rounding
        assert by_ref["same-quant"].passed, report.format()
        assert by_ref["same-quant"].mean_kl < TOLERANCES[bits]["same-quant"].mean_kl
        assert set(by_ref) == {"same-quant", "fp32"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_weight_only_int4_is_exact_against_same_quant(arch, tmp_path):
    """With float activations, the int4 graph equals PyTorch running the dequantized weights."""
    model = tiny_model(arch)
    art = _export(model, tmp_path, 4, activations="float")
    report = art.verify(reference=model, prompt_tokens=32, decode_steps=8, perplexity=False)
    same = next(c for c in report.comparisons if c.reference == "same-quant")
    assert same.max_abs_logit_diff < 1e-3 and same.top1_agreement == 1.0


def test_tied_lm_head_is_quantized_and_report_lists_every_weight(tmp_path):
    model = tiny_model("llama")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    art = _export(model, tmp_path, 4, lm_head_bits=4)
    report = json.loads((art.path / "quant_report.json").read_text())
    entries = {e["name"]: e for e in report["weights"]}
    assert entries["lm_head"]["bits"] == 4 and "MatMulNBits" in entries["lm_head"]["scheme"]
    assert entries["embed_tokens"]["bits"] == 8
    assert report["summary"]["kept_float"] == []
    # every linear weight of the PyTorch model is accounted for
    linear = {n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n}
    covered = {s for e in report["weights"] for s in e["sources"]}
    assert linear <= covered, linear - covered
    # no float MatMul left in the graph
    graph = onnx.load(str(art.path / "model.onnx"), load_external_data=False).graph
    assert not [n.name for n in graph.node if n.op_type == "MatMul"]


def test_spec_can_keep_embeddings_and_lm_head_float(tmp_path):
    art = _export(tiny_model("llama"), tmp_path, 4, quantize_embeddings=False, quantize_lm_head=False)
    summary = art.manifest["quant"]["summary"]
    assert set(summary["kept_float"]) == {"embed_tokens", "lm_head"}


def test_width_not_divisible_by_group_falls_back(tmp_path):
    # intermediate 80: down_proj in-features 80 -> group 16; 72 is not even divisible by 16 -> padded
    for inter, expect in [(80, "fell back to group 16"), (72, "zero-padded")]:
        model = tiny_model("llama", intermediate_size=inter)
        art = slm_export.export(model, target="onnx", bits=4, out=tmp_path / f"i{inter}", max_context=64,
                                mixed_precision=0, log=lambda *a: None)
        down = [e for e in json.loads((art.path / "quant_report.json").read_text())["weights"] if "down_proj" in e["name"]]
        assert down and all(e["bits"] == 4 and expect in e["reason"] for e in down)
        report = art.verify(reference=model, prompt_tokens=24, decode_steps=8, perplexity=False)
        assert next(c for c in report.comparisons if c.reference == "same-quant").passed


def test_unsupported_architecture_names_it_and_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0))
    with pytest.raises(SlmExportError, match=r"architecture 'gpt2' is not supported; supported: .*llama.*qwen2"):
        _export(model, tmp_path, 4)
    assert list(tmp_path.iterdir()) == []


def test_plain_module_without_config_is_refused(tmp_path):
    import torch

    with pytest.raises(SlmExportError, match="has no transformers `config.model_type`"):
        _export(torch.nn.Linear(4, 4), tmp_path, 4)


def test_manifest_records_io_kv_layout_and_checksums(tmp_path):
    art = _export(tiny_model("qwen2"), tmp_path, 8)
    m = art.manifest
    assert m["architecture"] == "qwen2" and m["max_context"] == 128
    assert m["io"]["kv_layout"]["kv_heads"] == 2 and m["io"]["kv_layout"]["head_dim"] == 16
    assert {"model.onnx", "model.onnx.data", "quant_report.json"} <= set(m["files"])
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert m["versions"]["onnxruntime"] and m["quant"]["spec"]["bits"] == 8
    # cos/sin tables cover exactly max_context positions
    graph = onnx.load(str(art.path / "model.onnx")).graph
    cos = next(t for t in graph.initializer if t.name == "cos_cache")
    assert list(cos.dims) == [128, 8]
    assert np.isfinite(onnx.numpy_helper.to_array(cos)).all()


def test_tied_int4_embedding_shares_the_lm_head_weights(tmp_path):
    model = tiny_model("llama")
    art = _export(model, tmp_path, 4, embedding_bits=4, lm_head_bits=4)
    graph = onnx.load(str(art.path / "model.onnx"), load_external_data=False).graph
    names = {t.name for t in graph.initializer}
    assert "embed_tokens.qweight" not in names and "lm_head.qweight" in names
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert gather.input[0] == "lm_head.qweight"
    entry = next(e for e in json.loads((art.path / "quant_report.json").read_text())["weights"] if e["name"] == "embed_tokens")
    assert entry["bits"] == 4 and entry["shares"] == "lm_head"
    report = art.verify(reference=model, prompt_tokens=32, decode_steps=8, perplexity=False)
    assert next(c for c in report.comparisons if c.reference == "same-quant").passed, report.format()
    (tmp_path / "int8emb").mkdir()
    int8_table = _export(model, tmp_path / "int8emb", 4, lm_head_bits=4)
    assert art.size_mb < int8_table.size_mb


def test_lm_head_bits_8_keeps_the_output_layer_int8_and_shares_it_with_the_embedding(tmp_path):
    model = tiny_model("llama")  # tied
    art = _export(model, tmp_path, 4, lm_head_bits=8)
    assert art.manifest["quant"]["label"] == "int4-g32-sym-a8-head8"
    entries = {e["name"]: e for e in json.loads((art.path / "quant_report.json").read_text())["weights"]}
    assert entries["lm_head"]["bits"] == 8 and entries["lm_head"]["scheme"].startswith("int8 MatMulNBits")
    assert entries["embed_tokens"]["scheme"].startswith("int8 GatherBlockQuantized") and entries["embed_tokens"]["shares"] == "lm_head"
    assert {e["bits"] for n, e in entries.items() if n.startswith("layers.")} == {4}
    report = art.verify(reference=model, prompt_tokens=32, decode_steps=8, perplexity=False)
    by_ref = {c.reference: c for c in report.comparisons}
    assert by_ref["same-quant"].passed, report.format()
    (tmp_path / "head4").mkdir()
    plain = _export(model, tmp_path / "head4", 4, lm_head_bits=4)
    plain_fp32 = next(c for c in plain.verify(reference=model, prompt_tokens=32, decode_steps=8,
                                              perplexity=False).comparisons if c.reference == "fp32")
    assert by_ref["fp32"].mean_kl < plain_fp32.mean_kl  # the int8 output layer is closer to fp32


def test_int4_embedding_request_on_untied_model_is_reported_as_int8(tmp_path):
    art = _export(tiny_model("tinyllama"), tmp_path, 4, embedding_bits=4)
    entry = next(e for e in json.loads((art.path / "quant_report.json").read_text())["weights"] if e["name"] == "embed_tokens")
    assert entry["bits"] == 8 and "the onnx target stores a table of its own at int8" in entry["reason"]
