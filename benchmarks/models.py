"""The benchmark's models, each as a Hugging Face folder (the common input of every system).

- smollm2-135m: the bundled SmolLM2-135M-Instruct GGUF (Q4_1), dequantized by transformers and
  saved as safetensors, so every peer starts from the same weights we do.
- smollm2-360m-random, qwen2.5-0.5b-random: the real configs of SmolLM2-360M-Instruct and
  Qwen2.5-0.5B-Instruct with seeded random weights (speed does not depend on weight values; the
  real checkpoints are not downloadable here). They carry SmolLM2's tokenizer: Qwen2.5's is not on
  this machine, and the prompt ids it makes (< 49,152) are valid in Qwen's 151,936-entry vocabulary.
  Quality figures are not computed for them (random weights have no text to be faithful to).
"""
from __future__ import annotations

from pathlib import Path

SMOLLM2_360M = dict(  # HuggingFaceTB/SmolLM2-360M-Instruct config.json
    model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
    num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2)
QWEN25_05B = dict(  # Qwen/Qwen2.5-0.5B-Instruct config.json
    model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643, eos_token_id=151645, use_sliding_window=False)

MODELS = {  # name -> (description, real weights?)
    "smollm2-135m": ("SmolLM2-135M-Instruct (bundled GGUF, dequantized)", True),
    "smollm2-360m-random": ("SmolLM2-360M shape, random weights", False),
    "qwen2.5-0.5b-random": ("Qwen2.5-0.5B shape, random weights", False),
}


def label(name: str) -> str:
    """The model's name in the results: a built-in name, or a user folder's own name."""
    return name if name in MODELS else Path(name).name


def hf_folder(name: str, root: Path) -> tuple[Path, bool]:
    """(Hugging Face folder, has real weights): a built-in model made once under root, or the user's folder."""
    if name not in MODELS:
        if not (Path(name) / "config.json").is_file():
            raise SystemExit(f"unknown benchmark model '{name}': choose from {', '.join(MODELS)} or give a model folder")
        return Path(name), True
    out = Path(root) / name
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out, MODELS[name][1]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slm_export.loading import load

    base = load(None)  # the bundled GGUF: the 135M model itself, and the tokenizer for all three
    if name == "smollm2-135m":
        # transformers refuses to save a model it read from a GGUF ("quantized with gguf"): copy its
        # dequantized weights into a plain model of the same config.
        config = base.model.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(base.model.state_dict())
    else:
        cfg = dict(SMOLLM2_360M if name.startswith("smollm2") else QWEN25_05B)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, torch_dtype="float32")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    tmp = out.with_name(out.name + ".tmp")  # rename into place: no half-written folder under the real name
    model.save_pretrained(tmp, safe_serialization=True)
    base.tokenizer.save_pretrained(tmp)
    legacy_config_keys(tmp / "config.json")
    tmp.rename(out)
    return out, MODELS[name][1]


def legacy_config_keys(path: Path) -> None:
    """Add the transformers 4.x spellings beside the 5.x ones, for peers pinned to transformers < 5.

    transformers 5 writes `rope_parameters` and `dtype`; 4.x reads `rope_theta` and `torch_dtype`
    and, without them, silently uses rope_theta=10000 (a different model).
    """
    import json

    cfg = json.loads(path.read_text())
    if "rope_parameters" in cfg:
        cfg.setdefault("rope_theta", cfg["rope_parameters"]["rope_theta"])
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    path.write_text(json.dumps(cfg, indent=2))
