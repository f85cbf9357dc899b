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
    (["--quant-method", "awq"], "--quant-method awq is not known; use one of: gptq, hqq, mse, rtn"),
    (["--quant-method", "hqq", "--asymmetric"], "--quant-method hqq chooses symmetric scales only"),
    (["--bits", "16", "--quant-method", "gptq"], "--quant-method gptq has no effect: --bits 16 quantizes nothing"),
    (["--mixed-precision", "2"], "--mixed-precision 2.0 is not valid; use a fraction from 0 (off) to 1"),
    (["--bits", "8", "--mixed-precision", "0.1"], "--mixed-precision 0.1 needs --bits 4"),
    (["--target", "executorch", "--asymmetric"], "--asymmetric is not supported by the executorch target"),
    (["--target", "executorch", "--quant-method", "hqq", "--calibration-text", "README.md"],
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
    _assert_clean_refusal(*run_cli("--model", tiny_dir, "--out", tmp_path / "o"), tmp_path, "could not load model folder")


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
        assert code == 2 and f"pass it as --model: slm-export --model {argv[-1]} " in err, err
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
