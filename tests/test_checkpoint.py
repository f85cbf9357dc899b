"""The streaming safetensors reader: exact dtype conversion, shards, every bad input refused in one
line naming the file and tensor, and a read that holds only the tensor read. A few seconds."""
import json
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from slm_export import checkpoint as ck
from slm_export.checkpoint import NotSafetensors, check_shapes, expected_shapes, open_checkpoint
from slm_export.errors import SlmExportError


def special_values():
    """Random normals plus the values a conversion gets wrong first: signed zeros, infinities, NaN,
    subnormals of both half formats, the extremes."""
    torch.manual_seed(0)
    extra = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-41, 6e-8, -3e-5,
                          65504.0, 3.0e38, -3.0e38, 1.0, -1.0])
    return torch.cat([torch.randn(50) * 10, extra])


def tensors():
    torch.manual_seed(1)
    return {"a.bf16": (special_values().to(torch.bfloat16)),
            "b.f16": special_values().to(torch.float16).reshape(8, 8),
            "c.f32": torch.randn(3, 4, 5),
            "d.scalar": torch.tensor(2.5, dtype=torch.bfloat16),
            "e.empty": torch.zeros(0, 7, dtype=torch.float16),
            "f.odd": torch.randn(13, dtype=torch.bfloat16)}


def write_sharded(folder, parts: list[dict], index_extra=None):
    """Shards named like transformers' and the index mapping every tensor to its shard."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_torch(part, str(folder / name))
        weight_map.update({k: name for k in part})
    weight_map.update(index_extra or {})
    (folder / ck.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_raw(path, header: dict, data: bytes):
    """A safetensors file written by hand, to say exactly what a broken one says."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def refused(fn, *needles) -> str:
    """The one-line message fn() is refused with; it names every needle."""
    with pytest.raises(SlmExportError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and not isinstance(e.value, NotSafetensors), msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


# ---- reading ---------------------------------------------------------------------------------------

def test_single_and_sharded_read_the_same_exact_float32(tmp_path):
    ts = tensors()
    (tmp_path / "one").mkdir()
    save_torch(ts, str(tmp_path / "one" / "model.safetensors"))
    keys = list(ts)
    write_sharded(tmp_path / "two", [{k: ts[k] for k in keys[:3]}, {k: ts[k] for k in keys[3:]}])
    one, two = open_checkpoint(tmp_path / "one"), open_checkpoint(tmp_path / "two")
    assert len(one.files) == 1 and len(two.files) == 2
    assert sorted(one.names()) == sorted(two.names()) == sorted(ts)
    assert two.file_of("a.bf16").name == "model-00001-of-00002.safetensors"
    assert two.file_of("f.odd").name == "model-00002-of-00002.safetensors"
    assert one.nbytes == two.nbytes == sum(t.numel() * t.element_size() for t in ts.values())
    for name, t in ts.items():
        assert one.dtype(name) == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[t.dtype]
        assert one.shape(name) == tuple(t.shape) == two.shape(name)
        want = t.float().numpy()
        for got in (one.read(name), two.read(name)):
            assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
            assert got.shape == want.shape
            assert np.array_equal(bits(got), bits(want)), name  # bit for bit, NaN and -0.0 included
    assert "a.bf16" in one and "nope" not in one


def test_conversion_in_chunks_is_the_same(tmp_path, monkeypatch):
    # Real tensors are converted CHUNK_BYTES at a time; make chunks 3 elements so the seams are tested.
    ts = tensors()
    save_torch(ts, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(ck, "CHUNK_BYTES", 6)
    c = open_checkpoint(tmp_path)
    for name, t in ts.items():
        assert np.array_equal(bits(c.read(name)), bits(t.float().numpy())), name


def test_reads_are_fresh_arrays(tmp_path):
    save_numpy({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(tmp_path / "model.safetensors"))
    c = open_checkpoint(tmp_path)
    first = c.read("w")
    first[:] = -1
    assert np.array_equal(c.read("w"), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_one_safetensors_file_of_another_name_is_the_checkpoint(tmp_path):
    save_numpy({"w": np.ones(3, np.float32)}, str(tmp_path / "weights.safetensors"))
    c = open_checkpoint(tmp_path)
    assert c.files == [tmp_path / "weights.safetensors"] and c.names() == ["w"]


def test_reading_a_small_tensor_holds_only_it(tmp_path, monkeypatch):
    # A file with an 8 MB bf16 tensor and a tiny one: reading the tiny one allocates next to nothing,
    # and reading the big one allocates its float32 result plus one conversion chunk, not a copy of the file.
    big = torch.randn(2048, 2048).to(torch.bfloat16)
    small = torch.randn(4, 4).to(torch.bfloat16)
    save_torch({"big": big, "small": small}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(ck, "CHUNK_BYTES", 1 << 20)
    c = open_checkpoint(tmp_path)

    tracemalloc.start()
    try:
        got = c.read("small")
        _, peak_small = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        got_big = c.read("big")
        _, peak_big = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, small.float().numpy()) and np.array_equal(got_big, big.float().numpy())
    assert peak_small < 64 * 1024, peak_small
    assert peak_big - base < got_big.nbytes + (1 << 20) + 256 * 1024, (peak_big - base, got_big.nbytes)


# ---- what the folder holds ------------------------------------------------------------------------

def test_a_folder_without_safetensors_is_told_apart(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(NotSafetensors) as e:
        open_checkpoint(tmp_path)
    assert isinstance(e.value, SlmExportError) and str(tmp_path) in str(e.value)


def test_several_files_without_an_index_are_refused(tmp_path):
    for i in (1, 2):
        save_numpy({f"w{i}": np.ones(2, np.float32)}, str(tmp_path / f"model-0000{i}-of-00002.safetensors"))
    msg = refused(lambda: open_checkpoint(tmp_path), tmp_path, ck.INDEX_NAME)
    assert "2 .safetensors files" in msg


# ---- broken checkpoints ---------------------------------------------------------------------------

def test_index_naming_a_missing_shard(tmp_path):
    write_sharded(tmp_path, [{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    refused(lambda: open_checkpoint(tmp_path), tmp_path / "model-00002-of-00002.safetensors", "missing")


def test_index_naming_a_shard_outside_the_folder(tmp_path):
    save_torch({"x": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    write_sharded(tmp_path / "m", [{"a": torch.ones(2)}], index_extra={"x": "../outside.safetensors"})
    refused(lambda: open_checkpoint(tmp_path / "m"), ck.INDEX_NAME, "../outside.safetensors")


def test_index_naming_a_tensor_its_shard_does_not_hold(tmp_path):
    write_sharded(tmp_path, [{"a": torch.ones(2)}, {"b": torch.ones(2)}],
                  index_extra={"model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors"})
    refused(lambda: open_checkpoint(tmp_path), tmp_path / "model-00001-of-00002.safetensors",
            "model.layers.0.mlp.up_proj.weight")


def test_bad_index_json(tmp_path):
    write_sharded(tmp_path, [{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    (tmp_path / ck.INDEX_NAME).write_text('{"weight_map": ')
    refused(lambda: open_checkpoint(tmp_path), tmp_path / ck.INDEX_NAME)


def test_truncated_shard_data(tmp_path):
    write_sharded(tmp_path, [{"a": torch.ones(2)}, {"b": torch.ones(3, 4), "last": torch.ones(5)}])
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])  # a download cut short
    msg = refused(lambda: open_checkpoint(tmp_path), shard, "truncated")
    assert "'b'" in msg or "'last'" in msg


def test_truncated_header(tmp_path):
    path = tmp_path / "model.safetensors"
    save_numpy({"w": np.ones(4, np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    refused(lambda: open_checkpoint(tmp_path), path, "truncated")
    path.write_bytes(b"\x01\x02")
    refused(lambda: open_checkpoint(tmp_path), path, "truncated")


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "model.safetensors"
    raw = b'{"w": {"dtype": "F32", '
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    refused(lambda: open_checkpoint(tmp_path), path, "not a safetensors file")


def test_malformed_header_entry(tmp_path):
    path = write_raw(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [2]}}, bytes(8))
    refused(lambda: open_checkpoint(tmp_path), path, "'w'")


def test_byte_length_that_contradicts_the_shape(tmp_path):
    path = write_raw(tmp_path / "model.safetensors",
                     {"__metadata__": {"format": "pt"},
                      "ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [8, 18]}}, bytes(18))
    refused(lambda: open_checkpoint(tmp_path), path, "'w'", "12")


@pytest.mark.parametrize("dtype", ["F64", "I8", "F8_E4M3"])
def test_unsupported_dtype_is_refused_when_used(tmp_path, dtype):
    t = {"F64": torch.ones(2, 2, dtype=torch.float64), "I8": torch.ones(2, 2, dtype=torch.int8),
         "F8_E4M3": torch.ones(2, 2).to(torch.float8_e4m3fn)}[dtype]
    save_torch({"model.norm.weight": t, "other": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    c = open_checkpoint(tmp_path)  # a tensor nobody reads may have any dtype
    assert c.dtype("model.norm.weight") == dtype and np.array_equal(c.read("other"), np.ones(2, np.float32))
    needles = (tmp_path / "model.safetensors", "'model.norm.weight'", dtype, "BF16, F16, F32")
    refused(lambda: c.read("model.norm.weight"), *needles)
    refused(lambda: check_shapes(c, {"model.norm.weight": (2, 2)}), *needles)


# ---- shapes against the config --------------------------------------------------------------------

def test_check_shapes(tmp_path):
    save_torch({"embed.weight": torch.ones(8, 4), "norm.weight": torch.ones(4), "rotary.inv_freq": torch.ones(2)},
               str(tmp_path / "model.safetensors"))
    c = open_checkpoint(tmp_path)
    check_shapes(c, {"embed.weight": (8, 4), "norm.weight": (4,), "lm_head.weight": (8, 4)},
                 optional={"lm_head.weight"})  # unexpected rotary.inv_freq ignored, tied head absent
    refused(lambda: check_shapes(c, {"embed.weight": (8, 6)}), tmp_path / "model.safetensors", "'embed.weight'",
            "[8, 4]", "[8, 6]", "does not match its config.json")
    msg = refused(lambda: check_shapes(c, {"lm_head.weight": (8, 4), "x.weight": (1,)}), tmp_path,
                  "'lm_head.weight'", "missing")
    assert "1 more" in msg


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_expected_shapes_match_a_saved_sharded_llama(tmp_path, tie):
    model = _tiny_llama(tie)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    c = open_checkpoint(tmp_path)
    assert len(c.files) >= 2 and (tmp_path / ck.INDEX_NAME).is_file()

    config = json.loads((tmp_path / "config.json").read_text())
    for source in (model.config, config):
        shapes, optional = expected_shapes(source)
        assert ("lm_head.weight" in optional) is tie and ("lm_head.weight" in c) is not tie
        check_shapes(c, shapes, optional)
    assert set(shapes) - optional == set(c.names())
    for name, p in model.named_parameters():
        assert c.dtype(name) == "BF16" and np.array_equal(c.read(name), p.detach().float().numpy()), name

    config["intermediate_size"] = 96  # a config.json that contradicts the weights
    shapes, optional = expected_shapes(config)
    refused(lambda: check_shapes(c, shapes, optional), "mlp.", "[128, 64]", "[96, 64]",
            "does not match its config.json", ".safetensors")


def test_a_mapped_stored_weight_reads_as_the_change_made_in_memory():
    """stored.mapped (awq's rescaling of a weight still in its checkpoint): read whole, by rows, or part by part
    of a stack (q|k|v), it gives the bytes the same change makes to the weight in memory, and the source
    stays as it was."""
    from slm_export.stored import Stored, mapped, stacked

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 6)).astype(np.float32) for n in (4, 2, 3)]
    stored = stacked([Stored(lambda a=a: a.copy(), a.shape, f"p{i}", read_rows=lambda r0, r1, a=a: a[r0:r1].copy())
                      for i, a in enumerate(parts)])
    whole = np.concatenate(parts)
    s = rng.uniform(0.5, 2, 6).astype(np.float32)
    d = rng.uniform(0.5, 2, 3).astype(np.float32)

    def change(a, r0):  # columns times s, then rows 5..8 of the whole over d: crosses the second and third parts
        a = (a * s[None]).astype(np.float32)
        lo, hi = max(5, r0), min(8, r0 + len(a))
        if lo < hi:
            a[lo - r0:hi - r0] = a[lo - r0:hi - r0] / d[lo - 5:hi - 5, None]
        return a

    want = change(whole.copy(), 0)
    got = mapped(stored, change, "changed")
    assert np.array_equal(np.asarray(got), want) and np.array_equal(mapped(whole, change, "changed"), want)
    assert [p.shape for p in got.parts] == [p.shape for p in parts]  # each part still reads only its own rows
    assert np.array_equal(np.concatenate([np.asarray(p) for p in got.parts]), want)
    assert np.array_equal(got.parts[1].read_rows(1, 2), want[5:6])
    assert np.array_equal(np.asarray(stored), whole)
