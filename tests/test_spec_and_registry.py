import pytest

from slm_export import QuantSpec, SlmExportError
from slm_export.exporters import TARGETS
from slm_export.quantize.spec import block_size_for
from slm_export.registry import Registry


@pytest.mark.parametrize("bits", [3, 2, 32, 0])
def test_invalid_bits_is_a_clear_error(bits):
    with pytest.raises(SlmExportError, match=rf"--bits {bits} is not supported"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("gs", [48, 0, 8, 100, 8192])
def test_invalid_group_size_is_a_clear_error(gs):
    with pytest.raises(SlmExportError, match=rf"--group-size {gs} is not valid"):
        QuantSpec(group_size=gs)


def test_rules_first_match_wins():
    spec = QuantSpec(bits=4, embedding_bits=8)
    assert spec.plan_for("model.embed_tokens.weight").bits == 8  # embeddings int8
    assert spec.plan_for("lm_head.weight").bits == 4  # lm_head int4
    assert spec.plan_for("model.layers.3.input_layernorm.weight").bits is None
    assert spec.plan_for("model.layers.3.mlp.down_proj.weight").bits == 4
    off = QuantSpec(bits=4, embeddings=False, lm_head=False)
    assert off.plan_for("model.embed_tokens.weight").bits is None
    assert "excluded" in off.plan_for("lm_head.weight").reason
    assert QuantSpec(bits=16).plan_for("model.layers.0.mlp.down_proj.weight").bits is None


def test_lm_head_bits_rule_label_and_refusals():
    spec = QuantSpec(bits=4, embedding_bits=8, lm_head_bits=8)
    assert spec.plan_for("lm_head.weight").bits == 8 and "--lm-head-bits 8" in spec.plan_for("lm_head.weight").reason
    assert spec.plan_for("model.layers.0.mlp.down_proj.weight").bits == 4  # every other linear keeps --bits
    assert spec.label() == "int4-g32-sym-a8-head8"
    assert QuantSpec(bits=8, lm_head_bits=8).label() == "int8-g32-sym-a8"  # same as --bits: no suffix
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SlmExportError, match="--lm-head-bits 3 is not supported; use 8 or 4"):
        QuantSpec(lm_head_bits=3)
    with pytest.raises(SlmExportError, match="--lm-head-bits 8 has no effect: --no-quantize-lm-head keeps it float"):
        QuantSpec(lm_head=False, lm_head_bits=8)
    with pytest.raises(SlmExportError, match="--lm-head-bits 8 has no effect: --bits 16 quantizes nothing"):
        QuantSpec(bits=16, lm_head_bits=8)


@pytest.mark.parametrize("target, bits, expected", [
    ("executorch", 4, 4), ("executorch", 8, 8), ("executorch", 16, 8), ("onnx", 4, 8), ("coreml", 4, 8)])
def test_embedding_bits_default_is_the_targets(target, bits, expected):
    from slm_export.quantize.spec import resolve_spec

    exporter = TARGETS.get(target)()
    assert resolve_spec(exporter, QuantSpec(bits=bits)).embedding_bits == expected
    assert resolve_spec(exporter, QuantSpec(bits=bits, embedding_bits=8)).embedding_bits == 8  # asked: kept
    assert resolve_spec(exporter, None) == resolve_spec(exporter, QuantSpec())


def test_an_unresolved_spec_is_not_applied():
    # The target's default is filled in once by the pipeline; a spec that skipped it must not guess.
    with pytest.raises(ValueError, match="embedding_bits is unset"):
        QuantSpec(bits=4).plan_for("model.embed_tokens.weight")
    assert QuantSpec(bits=4, embeddings=False).plan_for("model.embed_tokens.weight").bits is None


def test_block_size_falls_back_never_to_float():
    assert block_size_for(576, 32) == (32, "")
    assert block_size_for(80, 32)[0] == 16 and "fell back to group 16" in block_size_for(80, 32)[1]
    block, note = block_size_for(72, 32)
    assert block == 32 and "padded" in note


def test_registry_unknown_and_duplicate():
    r = Registry("widget")
    r.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a")(2)
    with pytest.raises(SlmExportError, match="unknown widget 'b'; choose one of: a"):
        r.get("b")
    with pytest.raises(SlmExportError, match="unknown target 'tflite'; choose one of: coreml, executorch, onnx"):
        TARGETS.get("tflite")
