"""Device profiles, `fit`, simulated devices and the phone transports' missing-tool messages."""
import json
import os

import pytest

import slm_export
from slm_export.devices import open_device
from slm_export.devices.probe import simd_features
from slm_export.devices.profiles import load_profile, profile_names
from slm_export.errors import SlmExportError
from slm_export.fit import decode_roofline, estimate_weight_bytes, fit, report_weight_bytes, shape_of
from slm_export.quantize import QuantSpec

from conftest import require_qemu, run_cli, tiny_model, tiny_tokenizer

REQUIRED = {"local", "raspberry-pi-5-4gb", "raspberry-pi-5-8gb", "raspberry-pi-5-16gb", "iphone-15-pro", "pixel-8",
            "snapdragon-8-gen-3", "budget-android-4gb"}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("dev") / "tiny-int4"
    return slm_export.export(tiny_model("llama"), tokenizer=tiny_tokenizer(), bits=4, out=out, max_context=96,
                             log=lambda *a: None)


@pytest.fixture
def user_profiles(tmp_path, monkeypatch):
    folder = tmp_path / "config" / "devices"
    folder.mkdir(parents=True)
    monkeypatch.setenv("SLM_EXPORT_CONFIG", str(tmp_path / "config"))
    return folder


def test_builtin_profiles_load_with_every_hardware_figure():
    assert REQUIRED <= set(profile_names())
    for name in REQUIRED:
        p = load_profile(name)
        assert p.big_cores > 0 and p.sustained_bandwidth_gb_s <= p.peak_bandwidth_gb_s
        assert 0 < p.app_budget_mb <= p.memory_gb * 2**30 / 1e6 and p.formats  # RAM GB as sold = GiB; budgets in MB
    pi = load_profile("raspberry-pi-5-4gb")  # extends the 8 GB board: same SoC, less memory
    assert (pi.big_cores, pi.big_core_ghz, pi.peak_bandwidth_gb_s, pi.memory_gb) == (4, 2.4, 17.1, 4)
    assert "coreml" in load_profile("iphone-15-pro").formats
    assert all("coreml" not in load_profile(n).formats for n in REQUIRED - {"iphone-15-pro"})


def test_local_profile_is_detected_from_this_machine():
    p = load_profile("local")
    assert p.big_cores == len(os.sched_getaffinity(0)) and p.memory_gb > 1
    assert p.peak_bandwidth_gb_s > 0.5 and "measured" in p.notes["bandwidth_source"]


def test_user_profile_extends_overrides_and_is_validated(user_profiles):
    (user_profiles / "my-pi.toml").write_text('extends = "raspberry-pi-5-8gb"\napp_memory_gb = 2.0\n'
                                              'address = "ssh://pi@10.0.0.7"\n')
    p = load_profile("my-pi")
    assert p.app_budget_mb == 2 * 2**30 / 1e6 and p.big_cores == 4 and p.address == "ssh://pi@10.0.0.7"
    (user_profiles / "bad.toml").write_text('extends = "pixel-8"\nram_gb = 4\n')
    with pytest.raises(SlmExportError, match=r"bad.toml has unknown field\(s\) ram_gb"):
        load_profile("bad")
    (user_profiles / "loop.toml").write_text('extends = "loop"\n')
    with pytest.raises(SlmExportError, match="extends itself"):
        load_profile("loop")
    with pytest.raises(SlmExportError, match="unknown device profile 'nope'; choose one of: .*pixel-8"):
        load_profile("nope")
    (user_profiles / "half.toml").write_text('description = "no figures"\nformats = ["onnx"]\n')
    with pytest.raises(SlmExportError, match="missing big_cores"):
        load_profile("half")


def test_device_specs_resolve_or_say_what_exists(user_profiles):
    assert open_device("local").name == "local"
    sim = open_device("sim:pixel-8")
    assert sim.simulated and sim.name == "sim:pixel-8" and sim.profile.big_cores == 5
    with pytest.raises(SlmExportError, match="unknown device kind 'tcp'; choose one of: adb, limits, local, sim, simctl, ssh"):
        open_device("tcp://host")
    with pytest.raises(SlmExportError, match="unknown device 'pixel-9'.*sim:PROFILE"):
        open_device("pixel-9")
    with pytest.raises(SlmExportError, match="no `address`.*--device sim:pixel-8"):
        open_device("pixel-8")
    with pytest.raises(SlmExportError, match="sim: needs a profile name"):
        open_device("sim:")


@pytest.mark.parametrize("target", ["onnx", "executorch", "coreml"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_fit_weight_estimate_matches_the_exported_report(tmp_path, target, bits):
    """The pre-export estimate against the real per-weight sizes the exporter reports."""
    model = tiny_model("tinyllama")
    art = slm_export.export(model, target=target, bits=bits, out=tmp_path / "a", max_context=64, log=lambda *a: None)
    spec = QuantSpec.from_dict(art.manifest["quant"]["spec"])
    from slm_export.exporters import TARGETS

    estimated = sum(w["stored_bytes"] for w in estimate_weight_bytes(shape_of(model.config), spec, TARGETS.get(target)()))
    real = sum(w["stored_bytes"] for w in report_weight_bytes(art.path))
    assert abs(estimated - real) / real < 0.03, (estimated, real)


@pytest.mark.parametrize("kw", [dict(embedding_bits=4, lm_head_bits=4), dict(lm_head_bits=8)])
def test_fit_estimate_knows_onnx_shares_a_tied_table_with_the_lm_head(tmp_path, kw):
    model = tiny_model("llama")  # tied: the embedding's rows come out of the lm_head's weights
    art = slm_export.export(model, target="onnx", bits=4, out=tmp_path / "a", max_context=64, log=lambda *a: None, **kw)
    assert next(w["shares"] for w in json.loads((art.path / "quant_report.json").read_text())["weights"]
                if w["name"] == "embed_tokens") == "lm_head"
    spec = QuantSpec.from_dict(art.manifest["quant"]["spec"])
    from slm_export.exporters import TARGETS

    estimated = sum(w["stored_bytes"] for w in estimate_weight_bytes(shape_of(model.config), spec, TARGETS.get("onnx")()))
    real = sum(w["stored_bytes"] for w in report_weight_bytes(art.path))
    assert abs(estimated - real) / real < 0.03, (estimated, real)


def test_fit_estimate_of_an_fp16_executorch_program_matches_its_report(tmp_path):
    model = tiny_model("tinyllama")
    art = slm_export.export(model, target="executorch", bits=16, compute_precision="float16", out=tmp_path / "a",
                            max_context=64, log=lambda *a: None)
    from slm_export.exporters import TARGETS

    spec = QuantSpec.from_dict(art.manifest["quant"]["spec"])
    estimated = sum(w["stored_bytes"] for w in estimate_weight_bytes(shape_of(model.config), spec,
                                                                     TARGETS.get("executorch")(), "float16"))
    real = sum(w["stored_bytes"] for w in report_weight_bytes(art.path))
    assert abs(estimated - real) / real < 0.03, (estimated, real)
    # and `fit` of that artifact takes its KV cache as the fp16 one it holds
    report = fit(load_profile("raspberry-pi-5-8gb"), artifact=art.path, context=64)
    assert report.kv_bits == 16 and report.quant == "float16"


@pytest.mark.parametrize("target,precision,kv_bits,kv_ratio", [
    ("onnx", None, 8, 1 / 4),
    ("executorch", None, 16, 1 / 2),
    ("executorch", None, 8, (1 + 5 / 16) / 4),  # int8 rows + an fp32 scale and int8 zero point per row of 16
    ("executorch", "float16", None, 1 / 2),  # an fp16 program keeps an fp16 cache
])
def test_fit_kv_cache_follows_kv_bits_and_precision(target, precision, kv_bits, kv_ratio, tiny_dir):
    pi = load_profile("raspberry-pi-5-8gb")
    spec = QuantSpec(bits=16 if precision else 4)
    base = fit(pi, target=target, spec=spec, model=tiny_dir, context=1024)
    got = fit(pi, target=target, spec=spec, model=tiny_dir, context=1024, compute_precision=precision, kv_bits=kv_bits)
    assert base.kv_bits == 32 and got.kv_bits == (kv_bits or 16)
    assert got.kv_cache_mb == pytest.approx(base.kv_cache_mb * kv_ratio, abs=0.05)
    assert f"({got.kv_bits}-bit)" in got.format()
    if precision:  # fp16 float weights: half the bytes (the int8 embedding's stay)
        float_mb = lambda r: sum(w["mb"] for w in r.weights if w["bits"] is None)  # noqa: E731
        assert float_mb(base) > 0 and float_mb(got) == pytest.approx(float_mb(base) / 2, abs=0.005)
        assert got.quant == "float16" and got.weights_mb < base.weights_mb


def test_fit_refuses_what_export_would_refuse(tiny_dir, tiny_onnx):
    pi = load_profile("raspberry-pi-5-8gb")
    with pytest.raises(SlmExportError, match="--kv-bits 16 is not available for the onnx target; use 32 or 8"):
        fit(pi, target="onnx", model=tiny_dir, kv_bits=16)
    with pytest.raises(SlmExportError, match="at --compute-precision float16; use 16"):
        fit(pi, target="executorch", spec=QuantSpec(bits=16), model=tiny_dir, compute_precision="float16", kv_bits=8)
    with pytest.raises(SlmExportError, match="float16"):  # an fp16 program has float weights only
        fit(pi, target="executorch", spec=QuantSpec(bits=4), model=tiny_dir, compute_precision="float16")
    with pytest.raises(SlmExportError, match="with --artifact, fit uses what the artifact was exported with"):
        fit(pi, artifact=tiny_onnx.path, kv_bits=8)
    code, out, err = run_cli("fit", "--device", "pixel-8", "--model", tiny_dir, "--kv-bits", "16")
    assert code == 2 and "--kv-bits 16 is not available for the onnx target" in err and "Traceback" not in err


def test_roofline_bounds():
    pi = load_profile("raspberry-pi-5-8gb")
    tok_s, bound = decode_roofline(pi, 100e6, 0, 2e8, int8=True)
    assert bound == "memory bandwidth" and tok_s == pytest.approx(110.0)  # 11 GB/s / 100 MB
    tok_s, bound = decode_roofline(pi, 1e6, 0, 2e11, int8=False)  # tiny weights, huge compute
    assert bound == "compute" and tok_s == pytest.approx(4 * 2.4 * 16 / 200)


def test_fit_cli_fits_does_not_fit_and_json(tmp_path, tiny_dir, user_profiles):
    code, out, err = run_cli("fit", "--device", "raspberry-pi-5-8gb", "--model", tiny_dir, "--bits", "4",
                             "--context", "256")
    assert code == 0, err
    assert "fits" in out and "KV cache" in out and "tok/s expected" in out
    (user_profiles / "tiny-phone.toml").write_text('extends = "budget-android-4gb"\napp_memory_gb = 0.01\n')
    code, out, err = run_cli("fit", "--device", "tiny-phone", "--model", tiny_dir, "--bits", "16", "--format", "json")
    assert code == 1, err
    report = json.loads(out)
    assert report["fits"] is False and report["total_mb"] > report["app_budget_mb"] == pytest.approx(0.01 * 2**30 / 1e6, abs=0.1)
    # KV cache = layers x 2 x kv heads x head dim x context x 4 bytes
    assert report["kv_cache_mb"] == pytest.approx(2 * 2 * 2 * 16 * 2048 * 4 / 1e6, abs=0.1)  # MB
    code, out, err = run_cli("fit", "--device", "pixel-8", "--model", tmp_path / "missing")
    assert code == 2 and "missing" in err and "Traceback" not in err


def test_fit_from_an_artifact_uses_its_real_report(tiny_onnx):
    report = fit(load_profile("raspberry-pi-5-8gb"), artifact=tiny_onnx.path, context=512, model=None)
    assert report.weights_source.startswith("quant report of")
    real = sum(w["stored_bytes"] for w in report_weight_bytes(tiny_onnx.path)) / 1e6
    assert report.weights_mb == pytest.approx(real, abs=0.05)
    assert any("holds 96 tokens" in n for n in report.notes)


def test_local_bench_reports_peak_bandwidth_and_prediction(tiny_onnx):
    (row,) = tiny_onnx.bench(prompt_tokens=(8,), decode_tokens=4, warmup=1, repeats=1)
    assert row.error is None and not row.simulated
    assert row.device_peak_gb_s == load_profile("local").peak_bandwidth_gb_s
    assert row.predicted_decode_tok_s > 0 and row.decode_gb_s > 0
    # the row names the SIMD extensions it ran with, as this machine's /proc/cpuinfo lists them
    with open("/proc/cpuinfo") as f:
        assert row.machine.get("simd", []) == simd_features(f.read())


def test_probe_names_the_simd_extensions_kernels_dispatch_on():
    x86 = ("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni amx_int8\n\n"
           "processor\t: 1\nflags\t\t: fpu sse4_2\n")
    assert simd_features(x86) == ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"]
    pi5 = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
           "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n")
    assert simd_features(pi5) == ["asimd", "asimdhp", "asimddp"]  # Cortex-A76: dot product, no i8mm
    assert simd_features("model name\t: Some CPU\n") == []


def test_limits_device_caps_threads_and_labels_the_result(tiny_onnx):
    (row,) = tiny_onnx.bench(device="limits:raspberry-pi-5-8gb", prompt_tokens=(8,), decode_tokens=4, warmup=1,
                             repeats=1, threads=64)
    assert row.error is None and row.simulated and row.device == "limits:raspberry-pi-5-8gb"
    assert row.emulated is None and row.decode_tok_s > 0  # this machine's runtime: its own timings
    assert row.threads == min(4, len(os.sched_getaffinity(0)))
    assert row.device_peak_gb_s == 17.1 and row.predicted_decode_tok_s > 0
    assert row.machine["simulates"]["profile"] == "raspberry-pi-5-8gb"
    assert str(int(load_profile("raspberry-pi-5-8gb").app_budget_mb * 1e6)) in row.machine["memory_limit"]


def test_simulated_phone_kills_an_over_budget_model(tiny_onnx, user_profiles):
    require_qemu()  # sim: on an ARM profile runs the phone's aarch64 runtime under QEMU, within the budget
    (user_profiles / "small-phone.toml").write_text('extends = "pixel-8"\napp_memory_gb = 0.02\n')
    (row,) = tiny_onnx.bench(device="sim:small-phone", prompt_tokens=(8,), decode_tokens=4, warmup=1, repeats=1)
    assert row.error and "killed at the small-phone app memory budget of 21 MB" in row.error  # 0.02 GiB of RAM
    assert row.simulated and row.decode_tok_s is None


def test_simulated_device_refuses_a_format_it_cannot_run(tiny_onnx, user_profiles):
    (user_profiles / "coreml-only.toml").write_text('extends = "iphone-15-pro"\nformats = ["coreml"]\n')
    with pytest.raises(SlmExportError, match="an onnx artifact does not run on coreml-only .it runs coreml."):
        open_device("sim:coreml-only").measure(tiny_onnx.path, prompts=[[1]], decode_tokens=1, warmup=0, repeats=1,
                                           threads=None)


def test_cli_sim_bench_and_phone_tools_missing(tiny_onnx, tmp_path):
    code, out, err = run_cli("bench", tiny_onnx.path, "--device", "limits:pixel-8", "--prompt-tokens", "8",
                             "--decode-tokens", "4", "--repeats", "1")
    assert code == 0, err
    assert "(simulated)" in out and "predicted tok/s" in out
    env = {"PATH": str(tmp_path)}  # no adb, no xcrun
    code, out, err = run_cli("bench", tiny_onnx.path, "--device", "adb", "--prompt-tokens", "8", "--decode-tokens", "4", env=env)
    assert code == 2 and "`adb` is not on PATH" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("bench", tiny_onnx.path, "--device", "simctl", "--prompt-tokens", "8", "--decode-tokens", "4", env=env)
    assert code == 2 and "`xcrun` is not on PATH: the iOS simulator needs macOS" in err


def test_devices_command_lists_profiles():
    code, out, err = run_cli("devices")
    assert code == 0 and all(name in out for name in REQUIRED) and "add your own" in out
    code, out, err = run_cli("devices", "raspberry-pi-5-8gb")
    assert code == 0 and "17.1" in out and "app_budget_mb" in out


def test_without_a_cgroup_the_watchdog_enforces_the_budget(tiny_onnx, user_profiles, monkeypatch):
    """Where no memory cgroup can be made (no root, no delegation), an RSS watchdog kills the runner."""
    from slm_export.devices import sim

    monkeypatch.setattr(sim, "CGROUP_ROOTS", (("/nonexistent", "memory.max", "memory.peak"),))
    (user_profiles / "small-phone.toml").write_text('extends = "pixel-8"\napp_memory_gb = 0.02\n')
    (row,) = tiny_onnx.bench(device="limits:small-phone", prompt_tokens=(8,), decode_tokens=4, warmup=1, repeats=1)
    assert row.error and "killed at the small-phone app memory budget" in row.error and "RSS watchdog" in row.error
    assert "RSS watchdog" in row.machine["memory_limit"]
