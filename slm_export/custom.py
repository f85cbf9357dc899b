"""Your own model as a plain `nn.Module`: the documented contract, and its conversion.

Contract (a Llama-style decoder, the layout most small LMs trained from scratch use):
  * `module.config` is a dict with: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta, tie_word_embeddings
    (optional: head_dim, max_position_embeddings).
  * parameters are named like transformers' Llama: model.embed_tokens.weight,
    model.layers.{i}.input_layernorm.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
    model.layers.{i}.post_attention_layernorm.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight,
    model.norm.weight, lm_head.weight (may be tied to the embedding); no biases.
  * math: RMSNorm (x * rsqrt(mean(x^2) + eps) * w), rotary embedding on q and k in the
    rotate-half layout with base rope_theta, causal grouped-query attention scaled by
    1/sqrt(head_dim), SiLU-gated MLP, pre-norm residual blocks.
  * `forward(input_ids: LongTensor[batch, seq]) -> logits FloatTensor[batch, seq, vocab]`
    (or an object with `.logits`). `verify` runs this forward as the reference, so a module that
    does not follow the math above fails parity instead of exporting silently wrong.
"""
from __future__ import annotations

from .errors import SlmExportError

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings")


def is_plain_module(module) -> bool:
    return isinstance(getattr(module, "config", None), dict)


def as_transformers_llama(module):
    """A transformers LlamaForCausalLM holding `module`'s weights (strict name and shape check)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(module.config)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise SlmExportError(f"{type(module).__name__}.config lacks {', '.join(missing)}; see the plain nn.Module contract in docs/architecture.md, 'Your own model'")
    theta = cfg.pop("rope_theta")
    known = set(REQUIRED) | {"head_dim", "max_position_embeddings"}
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k in known},
                         rope_parameters={"rope_type": "default", "rope_theta": float(theta)})
    hf = LlamaForCausalLM(hf_cfg).eval()
    state = {k: v.detach().float() for k, v in module.state_dict().items()}
    if hf_cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in hf.state_dict() if not (hf_cfg.tie_word_embeddings and k == "lm_head.weight")}
    absent, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if absent or extra:
        what = f"missing {absent[0]}" if absent else f"unexpected {extra[0]}"
        raise SlmExportError(f"{type(module).__name__} does not follow the Llama parameter layout ({what}); "
                             "see the plain nn.Module contract in docs/architecture.md, 'Your own model'")
    try:
        with torch.no_grad():
            hf.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SlmExportError(f"{type(module).__name__}: a parameter has the wrong shape for its config: "
                             f"{str(e).splitlines()[-1].strip()}") from None
    if hf_cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf
