"""Exporting from a safetensors checkpoint streams it: the same artifact bytes as loading the whole
model (sharded or single-file, bf16 or fp32), a peak memory no whole-model float32 copy fits under, and
a broken checkpoint refused in one line before anything is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import require_extra, run_cli, tiny_model, tiny_tokenizer
from slm_export.loading import load
from slm_export.pipeline import run_export
from slm_export.quantize import QuantSpec


# Files that differ between two exports of the same model: the manifest and its checksums (they name the
# source and the time), and a Core ML package's spec and manifest (coremltools writes fresh identifiers
# into them; its weights file is compared, byte for byte).
UNREPEATABLE = ("manifest.json", "SHA256SUMS", "model.mlmodel", "Manifest.json")


def _files(folder: Path) -> dict:
    """Every written file's bytes but the UNREPEATABLE ones."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in UNREPEATABLE}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same tiny bf16 Llama saved as one file and as shards."""
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model("llama").to(torch.bfloat16)
    for name, shard in (("single", "50MB"), ("sharded", "100KB")):
        model.save_pretrained(root / name, max_shard_size=shard)
        tiny_tokenizer().save_pretrained(root / name)
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    assert (root / "single" / "model.safetensors").is_file()
    return root


@pytest.mark.parametrize("target,args", [("onnx", {}), ("onnx", {"kv_bits": 8}), ("executorch", {}), ("coreml", {}),
                                         ("onnx", {"spec": QuantSpec(bits=8, method="awq")}),
                                         ("executorch", {"spec": QuantSpec(method="awq")})])
def test_streamed_export_is_the_eager_export(checkpoints, tmp_path, target, args):
    if target == "coreml":
        require_extra("coremltools", "coreml")
    outs = {}
    for name in ("single", "sharded"):
        outs[name] = _files(run_export(str(checkpoints / name), target=target, out=tmp_path / name, log=lambda *a: None,
                                       **args))
    # the whole model loaded by transformers first, as every export did before streaming
    eager = load(str(checkpoints / "single"))
    assert not hasattr(eager.model, "slm_checkpoint")
    outs["eager"] = _files(run_export(eager, target=target, out=tmp_path / "eager", log=lambda *a: None, **args))
    assert outs["single"].keys() == outs["eager"].keys() and outs["single"]
    for name in ("sharded", "eager"):
        differ = [f for f in outs["single"] if outs["single"][f] != outs[name][f]]
        assert not differ, f"{name} differs from the single-file streamed export in {differ}"


def _random_checkpoint(folder: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """A random-weight bf16 Llama in two shards, written tensor by tensor; returns its float32 bytes."""
    folder.mkdir()
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, vocab_size=vocab,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                  dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    kv = hidden // 4
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (kv, hidden),
                   f"{p}.self_attn.v_proj.weight": (kv, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden),
                   f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                   f"{p}.mlp.down_proj.weight": (hidden, inter), f"{p}.input_layernorm.weight": (hidden,),
                   f"{p}.post_attention_layernorm.weight": (hidden,)}
    names = list(shapes)
    weight_map = {}
    for s, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({n: (torch.randn(shapes[n], generator=g) * 0.02 if len(shapes[n]) == 2 else torch.ones(shapes[n]))
                   .to(torch.bfloat16) for n in part}, str(folder / file))
        weight_map |= {n: file for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return 4 * sum(int(np.prod(s)) for s in shapes.values())


# Run in a fresh small Python that starts the export and reports its ru_maxrss: a child forked straight
# from this test process would count this process's own resident memory at the fork (Linux keeps the
# high-water mark across exec), and pytest holds torch and models by then.
_MEASURE = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
            "out = p.stdout.read()\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)\n"
            "print(out)\n")


def _peak_rss(args: list, cwd: Path) -> int:
    """Peak resident bytes of one CLI export, in its own process (ru_maxrss from wait4)."""
    import slm_export

    here = str(Path(slm_export.__file__).resolve().parents[1])  # the code under test, whatever the cwd
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "slm_export.cli", *map(str, args)],
                         capture_output=True, text=True, cwd=cwd, env=env, timeout=600).stdout
    code, peak = out.split("\n", 1)[0].split()
    assert code == "0", out
    return int(peak)


# The most an export of the checkpoint below may hold above a tiny model's, per float32 byte of its
# weights: ONNX half (a whole-model float32 copy would not fit); Core ML one (it holds the codes twice,
# the quantizer's and coremltools' program's, and no float copy: its old path held six).
HOLDS_AT_MOST = {"onnx": 0.5, "coreml": 1.0}


@pytest.mark.parametrize("target", list(HOLDS_AT_MOST))
def test_streamed_export_holds_no_whole_model_copy(tmp_path, target):
    """The export of a ~280M-parameter bf16 checkpoint (1.1 GB as float32) peaks at less than
    HOLDS_AT_MOST of its float32 size above the export of a tiny model, and under the estimate."""
    if target == "coreml":
        require_extra("coremltools", "coreml")
    fp32 = _random_checkpoint(tmp_path / "big", layers=24, hidden=1024, inter=2816, vocab=16000)
    tiny = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(tiny)
    flags = ["--target", target, "--bits", "4", "--quant-method", "rtn", "--mixed-precision", "0", "--no-tokenizer",
             "--skip-memory-check", "--quiet"]
    base = _peak_rss(["--model", tiny, *flags, "--out", tmp_path / "o-tiny"], tmp_path)
    big = _peak_rss(["--model", tmp_path / "big", *flags, "--out", tmp_path / "o-big"], tmp_path)
    assert big - base < HOLDS_AT_MOST[target] * fp32, f"peak {big / 1e9:.2f} GB, tiny {base / 1e9:.2f} GB, fp32 weights {fp32 / 1e9:.2f} GB"
    # what the export estimated before starting (and would have refused on): never under the peak, not far over
    from slm_export.exporters import TARGETS
    from slm_export.fit import load_config, shape_of
    from slm_export.memory import estimate_export
    from slm_export.quantize import QuantSpec
    from slm_export.quantize.spec import resolve_spec

    exporter = TARGETS.get(target)()
    spec = resolve_spec(exporter, QuantSpec(bits=4, method="rtn", mixed_precision=0.0))
    kv_bits = exporter.resolve_precision(None, None)[1]
    estimate = estimate_export(exporter, spec, kv_bits, fp32, "", shape_of(load_config(str(tmp_path / "big"))),
                               True).peak_bytes
    assert big <= estimate <= 1.6 * big, (estimate / 1e9, big / 1e9)


def _break(folder: Path, how: str) -> str:
    """Break a sharded checkpoint one way; returns the file name the error must name."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    if how == "truncated":
        data = (folder / shard).read_bytes()
        (folder / shard).write_bytes(data[:-64])
    elif how == "missing shard":
        (folder / shard).unlink()
    elif how == "shape":
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] += 8
        (folder / "config.json").write_text(json.dumps(config))
        return "model.layers.0.mlp"
    elif how == "dtype":
        from safetensors.torch import load_file

        tensors = load_file(str(folder / shard))
        name = sorted(n for n in tensors if n.endswith("norm.weight"))[0]
        tensors[name] = tensors[name].double()
        save_file(tensors, str(folder / shard))
        return name
    return shard


@pytest.mark.parametrize("how", ["truncated", "missing shard", "shape", "dtype"])
def test_broken_checkpoint_is_refused_in_one_line(checkpoints, tmp_path, how):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(checkpoints / "sharded", folder)
    named = _break(folder, how)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("--model", folder, "--target", "onnx", "--bits", "4", "--out", out)
    lines = [line for line in stderr.strip().splitlines() if line.startswith("slm-export: error")]
    assert code == 2 and len(lines) == 1, stderr
    assert named in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written, not even a staged folder
