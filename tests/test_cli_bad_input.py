"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing left behind."""
import pytest

from conftest import run_cli, tiny_model


def _assert_clean_refusal(code, out, err, tmp_path, expect):
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("slm-export: error: "), err
    assert expect in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("args,expect", [
    (["--bits", "3"], "--bits 3 is not supported"),
    (["--group-size", "48"], "--group-size 48 is not valid"),
    (["--lm-head-bits", "2"], "--lm-head-bits 2 is not supported; use 8 or 4"),
    (["--no-quantize-lm-head", "--lm-head-bits", "8"], "--lm-head-bits 8 has no effect"),
    (["--target", "tflite"], "unknown target 'tflite'; choose one of: coreml, executorch, onnx"),
    (["--bits", "four"], "argument --bits: invalid int value"),
    (["--max-context", "4"], "too small"),
    (["--target", "executorch", "--bits", "4", "--compute-precision", "float16"],
     "--compute-precision float16 is for --bits 16 on the executorch target"),
    (["--target", "executorch", "--bits", "16", "--compute-precision", "float16", "--kv-bits", "8"],
     "--kv-bits 8 is not available for the executorch target at --compute-precision float16; use 16"),
    (["--target", "onnx", "--compute-precision", "float16"], "--compute-precision float16 is not available for the onnx"),
    (["--quant-method", "nf4"], "--quant-method nf4 is not known; use one of: awq, gptq, hqq, mse, rtn"),
    (["--quant-method", "awq", "--no-tokenizer"], "--quant-method awq chooses its scales on calibration text"),
    (["--target", "coreml", "--quant-method", "awq"], "--quant-method awq is not available for the coreml target"),
    (["--quant-method", "hqq", "--asymmetric"], "--quant-method hqq chooses symmetric scales only"),
    (["--bits", "16", "--quant-method", "gptq"], "--quant-method gptq has no effect: --bits 16 quantizes nothing"),
    (["--mixed-precision", "2"], "--mixed-precision 2.0 is not valid; use a fraction from 0 (off) to 1"),
    (["--bits", "8", "--mixed-precision", "0.1"], "--mixed-precision 0.1 needs --bits 4"),
    (["--target", "executorch", "--asymmetric"], "--asymmetric is not supported by the executorch target"),
    (["--target", "executorch", "--quant-method", "hqq", "--mixed-precision", "0", "--calibration-text", "README.md"],
     "--calibration-text is for exports that calibrate"),
])
def test_invalid_options(args, expect, tmp_path):
    _assert_clean_refusal(*run_cli(*args, "--out", tmp_path / "o"), tmp_path, expect)


def test_missing_model_path(tmp_path):
    _assert_clean_refusal(*run_cli("--model", tmp_path / "nope", "--out", tmp_path / "o"), tmp_path, "does not exist")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    _assert_clean_refusal(*run_cli("--model", bad, "--out", tmp_path / "o"), tmp_path, "is not a GGUF file")


def test_truncated_gguf(tmp_path):
    from slm_export.loading import default_gguf_path

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_gguf_path().read_bytes()[:200_000])
    _assert_clean_refusal(*run_cli("--model", bad, "--out", tmp_path / "o"), tmp_path, "could not load GGUF file")


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    _assert_clean_refusal(*run_cli("--model", tmp_path / "m", "--out", tmp_path / "o"), tmp_path, "has no config.json")


def test_corrupt_safetensors(tmp_path, tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    _assert_clean_refusal(*run_cli("--model", tiny_dir, "--out", tmp_path / "o"), tmp_path, "model.safetensors: truncated")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    _assert_clean_refusal(*run_cli("--model", tmp_path / "gpt2", "--out", tmp_path / "o"), tmp_path,
                          "architecture 'gpt2' is not supported; supported: gemma2, llama, mistral, phi3, qwen2")


def test_unreachable_hub_fails_fast(tmp_path):
    import time

    t = time.time()
    code, out, err = run_cli("--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--out", tmp_path / "o",
                             env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    _assert_clean_refusal(code, out, err, tmp_path, "cannot reach the Hugging Face Hub")
    assert time.time() - t < 60


def test_existing_output_refused_without_force(tmp_path, tiny_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("--model", tiny_dir, "--out", out)
    assert code == 2 and "already exists; pass --force" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, err = run_cli("--model", tiny_dir, "--out", out, "--force", "--max-context", "64")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_unknown_command_and_bad_artifact(tmp_path):
    code, _, err = run_cli("frobnicate")
    assert code == 2 and "unknown command 'frobnicate'" in err and "--model" not in err
    for argv in (["/no/such/model"], ["export", "./my-model"]):  # a model given without --model
        code, _, err = run_cli(*argv)
        assert code == 2 and f"pass it as --model: slm-export export --model {argv[-1]}" in err, err
    code, _, err = run_cli("verify", tmp_path)
    assert code == 2 and "has no manifest.json" in err


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import slm_export
    from slm_export.exporters.onnx import OnnxExporter

    def boom(self, *a, **k):
        (a[2] / "model.onnx").write_text("half")  # a half-written file in the temp folder
        raise KeyboardInterrupt

    monkeypatch.setattr(OnnxExporter, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        slm_export.export(tiny_model("llama"), out=tmp_path / "o", log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_tampered_artifact_is_refused(tmp_path):
    import slm_export

    art = slm_export.export(tiny_model("llama"), out=tmp_path / "a", max_context=64, log=lambda *a: None)
    data = art.path / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    code, _, err = run_cli("bench", art.path)
    assert code == 2 and "does not match its sha256" in err
    data.write_bytes(bytes(blob[:1000]))
    code, _, err = run_cli("generate", art.path, "--prompt", "w1")
    assert code == 2 and "truncated or changed" in err


# ---------------------------------------------------------------- numeric arguments (argparse types)

@pytest.mark.parametrize("argv,expect", [
    (["verify", "A", "--prompt-tokens", "0"], "argument --prompt-tokens: 0 is out of range; use an integer >= 1"),
    (["verify", "A", "--prompt-tokens", "-3"], "argument --prompt-tokens: -3 is out of range; use an integer >= 1"),
    (["verify", "A", "--decode-steps", "-1"], "argument --decode-steps: -1 is out of range; use an integer >= 0"),
    (["verify", "A", "--threads", "0"], "argument --threads: 0 is out of range; use an integer >= 1"),
    (["bench", "A", "--prompt-tokens", "32,0"], "argument --prompt-tokens: '32,0' is out of range; use comma-separated integers >= 1"),
    (["bench", "A", "--prompt-tokens", "a,b"], "argument --prompt-tokens: 'a,b' is out of range; use comma-separated integers >= 1"),
    (["bench", "A", "--decode-tokens", "0"], "argument --decode-tokens: 0 is out of range; use an integer >= 1"),
    (["bench", "A", "--warmup", "-1"], "argument --warmup: -1 is out of range; use an integer >= 0"),
    (["bench", "A", "--repeats", "0"], "argument --repeats: 0 is out of range; use an integer >= 1"),
    (["generate", "A", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range; use an integer >= 1"),
    (["generate", "A", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: -1 is out of range; use a number >= 0"),
    (["generate", "A", "--prompt", "hi", "--temperature", "nan"], "argument --temperature: nan is out of range; use a number >= 0"),
    (["generate", "A", "--prompt", "hi", "--top-p", "0"], "argument --top-p: 0 is out of range; use a number in (0, 1]"),
    (["generate", "A", "--prompt", "hi", "--top-p", "1.5"], "argument --top-p: 1.5 is out of range; use a number in (0, 1]"),
    (["generate", "A", "--prompt", "hi", "--top-k", "-1"], "argument --top-k: -1 is out of range; use an integer >= 0"),
    (["generate", "A", "--prompt", "hi", "--seed", "-1"], "argument --seed: -1 is out of range; use an integer >= 0"),
    (["fit", "--device", "pixel-8", "--context", "0"], "argument --context: 0 is out of range; use an integer >= 1"),
])
def test_numeric_arguments_refused_up_front(argv, expect, tmp_path, capsys):
    from slm_export.cli import main

    argv = [str(tmp_path / "no-artifact") if x == "A" else x for x in argv]  # refused before the artifact opens
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expect in lines[0], err


@pytest.fixture
def tiny_art(tmp_path):
    import slm_export
    from conftest import tiny_tokenizer

    return slm_export.export(tiny_model("llama"), tokenizer=tiny_tokenizer(), bits=16, out=tmp_path / "art",
                             max_context=64, log=lambda *a: None)


def test_lengths_over_the_kv_cache_refused_before_anything_loads(tiny_art, capsys):
    from slm_export.cli import main

    # an in-memory model's artifact: verify would need reference=; the length is refused before that
    assert main(["verify", str(tiny_art.path), "--prompt-tokens", "60", "--decode-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--prompt-tokens 60 + --decode-steps 10 exceed the artifact's max context of "
                                     "64 tokens; use at most 64 in all") in err, err
    assert main(["bench", str(tiny_art.path), "--prompt-tokens", "8,60", "--decode-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--prompt-tokens 60 + --warmup 8 + --decode-tokens 4 exceed the artifact's max "
                                     "context of 64 tokens") in err, err
    assert not (tiny_art.path / "reports").exists()  # nothing ran, nothing was recorded


# ---------------------------------------------------------------- what the target's runtime cannot run

def test_onnx_refuses_a_head_dim_its_attention_kernel_cannot_run(tmp_path):
    from conftest import tiny_tokenizer

    d = tmp_path / "hd40"
    tiny_model("llama", hidden_size=160, head_dim=40).save_pretrained(d)  # onnxruntime's GQA: multiples of 16
    tiny_tokenizer().save_pretrained(d)
    code, out, err = run_cli("--model", d, "--out", tmp_path / "o")
    _assert_clean_refusal(code, out, err, tmp_path, "the onnx target cannot run this model: onnxruntime's "
                          "GroupQueryAttention needs a head_dim that is a multiple of 16, and this model's is 40; "
                          "export it with --target coreml or --target executorch")
    assert "quantized" not in out  # refused before any quantization
    code, out, err = run_cli("fit", "--device", "pixel-8", "--model", d)  # fit says what export would
    assert code == 2 and "this model's is 40" in err, (code, out, err)


# ---------------------------------------------------------------- a model without tokenizer files

@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_model_folder_without_tokenizer_files(arch, tmp_path):
    d = tmp_path / "m"
    tiny_model(arch).save_pretrained(d)
    code, out, err = run_cli("--model", d, "--out", tmp_path / "o", "--bits", "16", "--max-context", "64")
    _assert_clean_refusal(code, out, err, tmp_path, f"model folder {d} has no tokenizer files")
    assert "--no-tokenizer" in err and "loaded" not in out  # refused before the weights load


def test_no_tokenizer_export_then_generate_and_verify_say_what_they_need(tmp_path):
    from conftest import read_json

    d, out = tmp_path / "m", tmp_path / "o"
    tiny_model("qwen2").save_pretrained(d)
    code, stdout, err = run_cli("--model", d, "--out", out, "--bits", "16", "--max-context", "64", "--no-tokenizer")
    assert code == 0, err
    assert read_json(out / "manifest.json")["tokenizer"]["present"] is False
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    code, stdout, err = run_cli("generate", out, "--prompt", "hello")
    assert code == 2 and err.count("\n") == 1 and "has no tokenizer (it was exported without one)" in err, err
    code, stdout, err = run_cli("verify", out, "--prompt-tokens", "16", "--decode-steps", "4")
    assert code == 0, err
    assert "prompt: random token ids: the artifact has no tokenizer (so no perplexity either)" in stdout


def test_an_empty_tokenizer_is_refused(tmp_path):
    import slm_export
    from slm_export.errors import SlmExportError

    class Empty:  # what transformers builds for a Qwen2 folder without tokenizer files
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": []}

    with pytest.raises(SlmExportError, match="is empty .* encodes text to no tokens"):
        slm_export.export(tiny_model("qwen2"), tokenizer=Empty(), out=tmp_path / "o", log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the destination

def _read_only_folder(tmp_path):
    """A folder this process cannot create anything in (root ignores modes: a kernel folder then)."""
    import os
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    for candidate in ("/sys", "/proc/sys"):
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            return Path(candidate)
    pytest.skip("running as root with no folder it cannot write in")


def test_unwritable_out_parent_refused_before_the_model_loads(tmp_path, tiny_dir):
    ro = _read_only_folder(tmp_path)
    try:
        code, out, err = run_cli("--model", tiny_dir, "--out", ro / "o")
    finally:
        if ro.is_relative_to(tmp_path):
            ro.chmod(0o755)
    assert code == 2 and err.count("\n") == 1 and f"cannot write in {ro} (" in err and "choose another --out" in err, err
    assert "loaded" not in out and "Traceback" not in err
    assert not (ro / "o").exists()


def test_unwritable_report_file_refused_before_verify_runs(tiny_art, capsys):
    from slm_export.cli import main

    assert main(["verify", str(tiny_art.path), "--json", str(tiny_art.path / "nope" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the folder of --json ({tiny_art.path / 'nope'}) does not exist" in err, err


def _disk_full(path=None):
    import errno
    import os

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path else []))


def test_disk_full_while_writing_names_the_path_and_leaves_nothing(tmp_path, tiny_dir, monkeypatch, capsys):
    from slm_export.cli import main
    from slm_export.exporters.onnx import OnnxExporter

    def full(self, decoder, spec, out_dir, *a, **k):
        (out_dir / "model.onnx.data").write_bytes(b"\0" * 1000)  # half written when the disk fills up
        raise _disk_full()

    monkeypatch.setattr(OnnxExporter, "write", full)
    code = main(["--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--bits", "16", "--max-context", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"no space left on the device while writing {tmp_path / 'o'} (nothing was kept)" in err
    assert sorted(tmp_path.iterdir()) == [tiny_dir]


def test_bundle_zip_on_a_full_disk_leaves_nothing(tiny_art, tmp_path, monkeypatch, capsys):
    import zipfile

    from slm_export.cli import main

    def full(self, filename, arcname=None, *a, **k):
        self.fp.write(b"\0" * 100)  # some of the zip is out
        raise _disk_full()

    before = sorted(tmp_path.iterdir())
    monkeypatch.setattr(zipfile.ZipFile, "write", full)
    code = main(["bundle", str(tiny_art.path), "--zip", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"no space left on the device while writing {tmp_path / 'b.zip'}" in err
    assert sorted(tmp_path.iterdir()) == before  # neither the bundle folder nor a partial zip


# ---------------------------------------------------------------- SIGTERM, SIGKILL and their leftovers

_SLOW_EXPORT = """
import pathlib, sys, time
from slm_export.exporters.onnx import OnnxExporter
from slm_export.cli import main

def slow(self, decoder, spec, out_dir, *a, **k):
    (out_dir / "model.onnx").write_text("half")  # a half-written file in the partial folder
    pathlib.Path(sys.argv[1]).write_text("writing")
    time.sleep(300)

OnnxExporter.write = slow
sys.exit(main(sys.argv[2:]))
"""


def _start_slow_export(tmp_path, tiny_dir, out):
    """An export of a tiny model stopped mid-write (in its partial folder) until a signal arrives."""
    import subprocess
    import sys
    import time

    marker = tmp_path / "writing"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, marker, "--model", tiny_dir, "--out", out,
                          "--bits", "16", "--max-context", "64"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.2)
    marker.unlink()
    return p


def _partials(folder):
    return [p for p in folder.iterdir() if ".partial" in p.name]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, tiny_dir):
    import signal

    p = _start_slow_export(tmp_path, tiny_dir, tmp_path / "o")
    assert len(_partials(tmp_path)) == 1
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, (out, err)
    assert err.strip().splitlines()[-1] == "slm-export: terminated (nothing half-written was left behind)"
    assert not _partials(tmp_path) and not (tmp_path / "o").exists()


def test_sigkill_leftover_is_swept_by_the_next_export(tmp_path, tiny_dir):
    import signal

    p = _start_slow_export(tmp_path, tiny_dir, tmp_path / "o")
    p.send_signal(signal.SIGKILL)  # no cleanup can run
    p.communicate(timeout=120)
    (stale,) = _partials(tmp_path)
    assert stale.name.startswith(f".o.partial-{p.pid}-")
    code, out, err = run_cli("--model", tiny_dir, "--out", tmp_path / "o", "--bits", "16", "--max-context", "64")
    assert code == 0, err
    assert f"removed {stale}: left by an earlier run that was killed before it could clean up" in out
    assert not _partials(tmp_path) and (tmp_path / "o" / "manifest.json").is_file()


def test_a_live_writers_partial_is_never_swept(tmp_path):
    import os

    from slm_export.staging import staged_folder, sweep_stale

    with staged_folder(tmp_path / "o") as tmp:
        (tmp_path / ".old.zip.partial").write_bytes(b"PK")  # what `bundle --zip` used to leave
        os.utime(tmp_path / ".old.zip.partial", (0, 0))
        os.utime(tmp, (0, 0))  # as old as a dead run's: its writer's lock is what keeps it
        (tmp / "f").write_text("x")
        os.utime(tmp, (0, 0))
        assert sweep_stale(tmp_path) == [tmp_path / ".old.zip.partial"]
        assert tmp.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_file_for_a_folder_and_an_unneeded_calibration_text_are_one_line(tmp_path, tiny_dir):
    code, _, err = run_cli("inspect", tiny_dir / "config.json")
    assert code == 2 and err.strip().endswith("is a file, not an artifact folder; pass the folder an export wrote "
                                              "(`slm-export inspect` also takes a bundle .zip)")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli("--model", tiny_dir, "--out", tmp_path / "f", "--bits", "16", "--max-context", "256")
    assert code == 0, err
    before = sorted(p.name for p in (tmp_path / "f").rglob("*"))
    code, _, err = run_cli("verify", tmp_path / "f", "--calibration-text", tmp_path / "nope.txt", "--model", tiny_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "this artifact was exported with no calibration text, so verify needs none; leave the flag out" in err
    assert sorted(p.name for p in (tmp_path / "f").rglob("*")) == before  # nothing written
