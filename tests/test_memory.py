"""Memory: an export the machine cannot hold is refused up front with its estimate; one that runs out
anyway says so in one line (never 'bad GGUF', never an internal error) and leaves nothing; a killed
one's partial folder tells the next run what likely happened. Tiny models; the real model's figures
are arithmetic on its parameter count."""
import errno
import json
import os

import pytest

from conftest import tiny_model

from slm_export.memory import AVAILABLE_ENV


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slm-export: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _export(tiny_dir, out, *extra):
    from slm_export.cli import main

    return main(["--model", str(tiny_dir), "--out", str(out), "--bits", "16", "--max-context", "64", *extra])


def test_refused_up_front_when_the_machine_has_too_little(tmp_path, tiny_dir, monkeypatch, capsys):
    import slm_export.pipeline as pipeline

    monkeypatch.setenv(AVAILABLE_ENV, "100M")
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code = _export(tiny_dir, tmp_path / "o")
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"exporting {tiny_dir} to onnx float needs about " in line and " GB of memory at its peak" in line
    assert f"and this machine has 0.1 GB available ({AVAILABLE_ENV})" in line  # 100 MiB
    assert "free memory, raise the limit" in line and "--skip-memory-check" in line
    assert sorted(tmp_path.iterdir()) == [tiny_dir]  # no output folder, no partial


def test_skip_memory_check_exports_anyway(tmp_path, tiny_dir, monkeypatch, capsys):
    from slm_export.staging import RUN_NOTE

    monkeypatch.setenv(AVAILABLE_ENV, "100M")
    assert _export(tiny_dir, tmp_path / "o", "--skip-memory-check") == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert not (tmp_path / "o" / RUN_NOTE).exists() and RUN_NOTE not in manifest["files"]
    import slm_export

    slm_export.open_artifact(tmp_path / "o")  # every file matches the manifest's checksums


def test_the_refusal_names_a_target_that_fits(monkeypatch):
    from slm_export.errors import SlmExportError
    from slm_export.exporters import TARGETS
    from slm_export.memory import check_memory, estimate_export, estimate_for_target
    from slm_export.quantize import QuantSpec
    from slm_export.quantize.spec import resolve_spec

    fp32 = 4 * 134_515_008  # SmolLM2-135M
    et = TARGETS.get("executorch")()
    spec = resolve_spec(et, QuantSpec(bits=4))
    estimate = estimate_export(et, spec, 32, fp32, "exporting m to executorch int4")
    onnx = estimate_for_target("onnx", QuantSpec(bits=4), fp32)
    assert onnx < estimate.peak_bytes  # the measured order (benchmarks/EXPORT_MEMORY.md)
    monkeypatch.setenv(AVAILABLE_ENV, str(onnx + 2**20))
    with pytest.raises(SlmExportError) as e:
        check_memory(estimate, lambda name: estimate_for_target(name, QuantSpec(bits=4), fp32))
    assert f"or use --target onnx (about {onnx / 1e9:.1f} GB)" in str(e.value)
    monkeypatch.setenv(AVAILABLE_ENV, str(estimate.peak_bytes))
    check_memory(estimate, lambda name: None)  # exactly enough: no refusal


def test_the_suggested_target_is_estimated_as_it_would_stream():
    """A checkpoint that streams: the target a refusal suggests is estimated streamed too (it once said
    'use --target onnx (about 15.8 GB)' for the Llama-3.2-1B shape, which ONNX exports in 2.3 GB)."""
    from transformers import LlamaConfig

    from slm_export.exporters import TARGETS
    from slm_export.fit import shape_of
    from slm_export.memory import estimate_export, estimate_for_target, fp32_weight_bytes
    from slm_export.quantize import QuantSpec
    from slm_export.quantize.spec import resolve_spec

    shape = shape_of(LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True))
    fp32 = fp32_weight_bytes(shape)
    onnx = TARGETS.get("onnx")()
    spec = resolve_spec(onnx, QuantSpec(bits=4))
    streamed = estimate_export(onnx, spec, 32, fp32, "", shape, True).peak_bytes
    whole = estimate_export(onnx, spec, 32, fp32, "").peak_bytes
    assert estimate_for_target("onnx", QuantSpec(bits=4), fp32, shape, True) == streamed < whole / 2
    assert estimate_for_target("onnx", QuantSpec(bits=4), fp32) == whole  # a model in memory: loaded whole


def test_running_out_mid_export_is_one_line_with_the_estimate_and_no_debris(tmp_path, tiny_dir, monkeypatch, capsys):
    from slm_export.exporters.onnx import OnnxExporter

    def oom(self, decoder, spec, out_dir, *a, **k):
        (out_dir / "model.onnx.data").write_bytes(b"\0" * 1000)  # half written when memory runs out
        raise MemoryError()

    monkeypatch.setattr(OnnxExporter, "write", oom)
    code = _export(tiny_dir, tmp_path / "o")
    line = _one_error_line(capsys.readouterr().err)
    assert code == 3
    assert f"exporting {tiny_dir} to onnx float ran out of memory (estimated to need about " in line
    assert " available (" in line and "nothing was kept" in line
    assert sorted(tmp_path.iterdir()) == [tiny_dir]


@pytest.mark.parametrize("failure", [
    MemoryError(),
    OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)),  # an mmap of the file refused
    ImportError("libfoo.so: failed to map segment from shared object"),  # a library loaded under ulimit -v
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 1048576 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_a_gguf_load_that_runs_out_of_memory_is_not_called_a_bad_file(failure, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slm_export.cli import main
    from slm_export.loading import default_gguf_path, load

    def out_of_memory(*a, **k):
        raise failure

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory)  # the whole load (the API's default)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", out_of_memory)  # read by the streamed load (an export's) too
    with pytest.raises(type(failure)):  # the API: the failure itself, not SlmExportError("could not load ...")
        load(default_gguf_path())
    code = main(["--out", str(tmp_path / "o"), "--skip-memory-check"])  # the bundled GGUF
    line = _one_error_line(capsys.readouterr().err)
    assert code == 3 and "could not load" not in line and "GGUF" not in line
    assert "exporting smollm2-135m-instruct to onnx int4 ran out of memory (estimated to need about" in line
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_outside_an_export_is_not_an_internal_error(tmp_path, monkeypatch, capsys):
    import slm_export.cli as cli

    def oom(a):
        raise MemoryError()

    monkeypatch.setitem(cli.HANDLERS, "inspect", oom)
    code = cli.main(["inspect", str(tmp_path)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 3 and "`slm-export inspect` ran out of memory" in line and "internal error" not in line


def test_a_killed_exports_partial_folder_says_memory_to_the_next_run(tmp_path):
    from slm_export.staging import RUN_NOTE, staged_folder, sweep_stale

    stale = tmp_path / ".o.partial-999999-abcdefgh"  # what a SIGKILLed export leaves (its lock died with it)
    stale.mkdir()
    (stale / RUN_NOTE).write_text(json.dumps({"what": "exporting m to executorch int4", "peak_bytes": 3 * 10**9,
                                              "available": "2.1 GB available (cgroup limit 2.1 GB)"}))
    os.utime(stale, (0, 0))
    said = []
    assert sweep_stale(tmp_path, said.append) == [stale]
    assert said == [f"removed {stale}: left by an earlier run that was killed before it could clean up "
                    "(exporting m to executorch int4, possibly killed for lack of memory: it was estimated to need "
                    "about 3.0 GB at its peak, and 2.1 GB available (cgroup limit 2.1 GB) when it started)"]
    note = {"what": "w", "peak_bytes": 1, "available": "a"}
    with staged_folder(tmp_path / "p", note=note) as tmp:  # the note is there while the folder is written
        assert json.loads((tmp / RUN_NOTE).read_text()) == note
    assert not (tmp_path / "p" / RUN_NOTE).exists()


def test_a_full_disk_is_refused_before_the_model_loads(tmp_path, tiny_dir, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    import slm_export.pipeline as pipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code = _export(tiny_dir, tmp_path / "o")
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and f"exporting {tiny_dir} to onnx float writes at least " in line
    assert f" MB into {tmp_path} and its disk has 0.0 MB free; free some space there or choose another --out" in line


def test_an_in_memory_model_without_a_readable_config_is_checked_on_its_weights(tmp_path, monkeypatch):
    import slm_export
    import slm_export.pipeline as pipeline
    from slm_export.errors import SlmExportError

    monkeypatch.setattr(pipeline, "shape_before_loading", lambda *a, **k: None)
    monkeypatch.setenv(AVAILABLE_ENV, "1M")
    with pytest.raises(SlmExportError, match="needs about .* GB of memory at its peak and this machine has 0.0 GB"):
        slm_export.export(tiny_model("llama"), out=tmp_path / "o", bits=16, max_context=64, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_fit_prints_the_export_estimate(tiny_dir, capsys):
    from slm_export.cli import main

    from slm_export.exporters.onnx import OnnxExporter

    assert main(["fit", "--device", "raspberry-pi-5-8gb", "--model", str(tiny_dir), "--context", "256"]) == 0
    base = OnnxExporter.export_base_mb / 1000  # a tiny model's export is the interpreter and libraries
    assert (f"  export: about {base:.1f} GB of memory at its peak, on the machine that runs slm-export"
            in capsys.readouterr().out)


# ---------------------------------------------------------------- what the machine has

def _fake_proc(tmp_path, cgroup: str, mounts: list[str]):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(mounts))
    return proc


def test_cgroup_v2_limits_of_the_cgroup_and_its_ancestors(tmp_path):
    from slm_export.memory import _cgroup_rooms

    root = tmp_path / "cg2"
    mine = root / "user.slice" / "job"
    mine.mkdir(parents=True)
    (root / "user.slice" / "memory.max").write_text(f"{4 * 2**30}\n")
    (root / "user.slice" / "memory.current").write_text(f"{3 * 2**30}\n")
    (root / "user.slice" / "memory.stat").write_text(f"anon 1\ninactive_file {2**29}\n")
    (mine / "memory.max").write_text(f"{2 * 2**30}\n")
    (mine / "memory.current").write_text(f"{2**29}\n")
    (mine / "memory.stat").write_text("inactive_file 0\n")
    (root / "memory.max").write_text("max\n")
    proc = _fake_proc(tmp_path, "0::/user.slice/job\n",
                      [f"30 25 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n"])
    assert sorted(_cgroup_rooms(proc)) == [(2 * 2**30, 2 * 2**30 - 2**29),  # its own limit
                                           (4 * 2**30, 4 * 2**30 - (3 * 2**30 - 2**29))]  # page cache is room


def test_cgroup_v1_memory_controller(tmp_path):
    from slm_export.memory import _cgroup_rooms

    root = tmp_path / "memory"
    mine = root / "process_api" / "abc"
    mine.mkdir(parents=True)
    (mine / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    (mine / "memory.usage_in_bytes").write_text(f"{2**28}\n")
    (mine / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {2**27}\n")
    (root / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    proc = _fake_proc(tmp_path, "4:memory:/process_api/abc\n1:cpu:/\n0::/\n",
                      [f"31 25 0:27 / {root} rw,relatime - cgroup cgroup rw,memory\n"])
    assert _cgroup_rooms(proc) == [(2**30, 2**30 - 2**27)]


def test_available_memory_is_the_least_bound(monkeypatch):
    import slm_export.memory as memory

    monkeypatch.delenv(AVAILABLE_ENV, raising=False)
    # a limit far above this process (the test process itself can hold over a GiB late in a full run),
    # with 1 GiB of room left under it: the room, plus what this process already holds, is the bound
    monkeypatch.setattr(memory, "_cgroup_rooms", lambda: [(64 * 2**30, 2**30)])
    have = memory.available_memory()
    import psutil

    rss = psutil.Process().memory_info().rss
    assert have.bound == "cgroup limit 68.7 GB" and abs(have.bytes - (2**30 + rss)) < 64 * 2**20
    monkeypatch.setenv(AVAILABLE_ENV, "1.5G")
    assert memory.available_memory().bytes == int(1.5 * 2**30)


# ---------------------------------------------------------------- the declared facts against measurements

# Peak RSS (MiB) of `python -m slm_export.cli --target T --bits B [options] --out DIR --skip-memory-check`
# (model load included; ru_maxrss from wait4), measured by benchmarks/export_memory.py on this project's
# 2-core AMD EPYC / 23.5 GiB Linux machine (benchmarks/EXPORT_MEMORY.md): the bundled SmolLM2-135M GGUF and
# a Qwen2.5-0.5B-shaped folder of random weights. Defaults: GPTQ at 4 and 8 bits (+ ONNX's mixed precision).
SMOLLM2_135M = 134_479_872  # parameters in its matrices (what the estimate counts, from the config)
QWEN25_05B = 493_961_216
RTN = "--quant-method rtn --mixed-precision 0"
MEASURED = [  # (parameters, target, bits, options, peak RSS MiB)
    (SMOLLM2_135M, "onnx", 4, "", 3125), (SMOLLM2_135M, "onnx", 8, "", 3125), (SMOLLM2_135M, "onnx", 16, "", 3376),
    (SMOLLM2_135M, "executorch", 4, "", 3179), (SMOLLM2_135M, "executorch", 8, "", 3298),
    (SMOLLM2_135M, "executorch", 16, "", 3370),
    (SMOLLM2_135M, "coreml", 16, "", 3544),
    # Core ML with quantized weights entering the program as codes (2026-12-07; the model loaded whole
    # through the API: benchmarks/sittings/2026-12-07-coreml-streaming/in_memory_peak.py)
    (SMOLLM2_135M, "coreml", 4, "", 2744), (SMOLLM2_135M, "coreml", 8, "", 2702),
    (SMOLLM2_135M, "coreml", 4, RTN, 2166), (SMOLLM2_135M, "coreml", 8, RTN, 2132),
    (SMOLLM2_135M, "onnx", 4, RTN, 2023), (SMOLLM2_135M, "onnx", 8, RTN, 2207), (SMOLLM2_135M, "executorch", 4, RTN, 2683),
    (SMOLLM2_135M, "executorch", 8, RTN, 2592),
    (QWEN25_05B, "onnx", 4, "", 9687), (QWEN25_05B, "onnx", 16, "", 11490),
    (QWEN25_05B, "executorch", 4, "", 9924), (QWEN25_05B, "executorch", 16, "", 10575),
]


# Calibrating from memory, every target is estimated with one factor (CALIBRATION_PEAK, fitted to ONNX and
# ExecuTorch); Core ML's calibrated exports hold less since its weights enter the program as codes: the
# estimate is 20% over them, allowed here rather than hidden.
OVER = {("coreml", ""): 1.25}


@pytest.mark.parametrize("parameters,target,bits,options,measured", MEASURED)
def test_the_declared_factors_reproduce_the_measured_peaks(parameters, target, bits, options, measured):
    from slm_export.exporters import TARGETS
    from slm_export.memory import estimate_export
    from slm_export.quantize import QuantSpec
    from slm_export.quantize.spec import resolve_spec

    exporter = TARGETS.get(target)()
    asked = QuantSpec(bits=bits, method="rtn", mixed_precision=0.0) if options else QuantSpec(bits=bits)
    spec = resolve_spec(exporter, asked)
    got = estimate_export(exporter, spec, 32, 4 * parameters, "").peak_bytes / 2**20
    # never under by more than noise (under is an OOM kill let through), never far over (a needless refusal)
    assert measured * 0.96 <= got <= measured * OVER.get((target, options), 1.08), (got, measured)
