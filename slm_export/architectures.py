"""Supported architectures: each turns a transformers model into one neutral `Decoder` description.

Exporters only ever see a `Decoder` (numpy weights in PyTorch's [out, in] layout plus the few numbers
that differ between families), so a new architecture is one adapter function here and no exporter
changes. Adding a family: write `_adapter(model) -> Decoder` and register it by `config.model_type`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .errors import SlmExportError
from .registry import Registry
from .stored import Stored, materialize, rows, stacked

ARCHITECTURES: Registry = Registry("architecture")


@dataclass
class Linear:
    weight: np.ndarray  # [out_features, in_features], float32
    bias: np.ndarray | None
    sources: list[str]  # PyTorch parameter names, several when we fuse (q|k|v, gate|up)
    split: list[int] = field(default_factory=list)  # out sizes of each source when fused
    rows: tuple[int, int] | None = None  # the rows of its one source it holds (a part of Phi-3's qkv_proj)

    def parts(self) -> list[Linear]:
        """Undo a fusion: one Linear per part of `split` (q, k, v or gate, up). A part of one fused
        PyTorch parameter (Phi-3's qkv_proj) keeps that parameter as its source, and its rows in it."""
        if not self.split:
            return [self]
        if isinstance(self.weight, Stored):  # still in the checkpoint: parts that read only their own rows
            return self._stored_parts()
        bounds = np.cumsum(self.split)[:-1]
        weights = np.split(self.weight, bounds)
        biases = np.split(self.bias, bounds) if self.bias is not None else [None] * len(weights)
        if len(self.sources) == len(weights):
            return [Linear(np.ascontiguousarray(w), b, [src]) for w, b, src in zip(weights, biases, self.sources)]
        starts = np.concatenate([[0], bounds]).tolist()
        return [Linear(np.ascontiguousarray(w), b, [self.sources[0]], rows=(s, s + len(w)))
                for w, b, s in zip(weights, biases, starts)]

    def _stored_parts(self) -> list[Linear]:
        starts = np.concatenate([[0], np.cumsum(self.split)]).tolist()
        biases = [None if self.bias is None else self.bias[a:b] for a, b in zip(starts, starts[1:])]
        if len(self.sources) == len(self.split):
            return [Linear(w, b, [src]) for w, b, src in zip(self.weight.parts, biases, self.sources)]
        return [Linear(rows(self.weight, a, b), bias, [self.sources[0]], rows=(a, b))
                for a, b, bias in zip(starts, starts[1:], biases)]


@dataclass
class Layer:
    attn_norm: np.ndarray
    qkv: Linear  # fused q|k|v: one MatMul per layer instead of three
    o: Linear
    ffn_norm: np.ndarray
    gate_up: Linear  # fused gate|up
    down: Linear
    post_attn_norm: np.ndarray | None = None  # Gemma-2 normalises each branch output too
    post_ffn_norm: np.ndarray | None = None
    sliding_window: int | None = None


@dataclass
class Decoder:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    activation: str  # "silu" or "gelu_tanh"
    embed: np.ndarray  # [vocab, hidden]
    embed_scale: float
    final_norm: np.ndarray
    lm_head: np.ndarray  # [vocab, hidden]; the same array as `embed` when tied
    tied_embeddings: bool
    attn_scale: float
    attn_softcap: float
    final_softcap: float
    rope_cos: np.ndarray  # [max_context, rotary_dim // 2]
    rope_sin: np.ndarray
    layers: list[Layer]
    # PyTorch parameter name of each RMSNorm weight stored as the scale it multiplies by, keyed
    # "layers.{i}.attn_norm", "layers.{i}.ffn_norm", "final_norm" (empty for Gemma's (1 + w) norms):
    # where a rescaled norm (quantize/awq.py) goes back into the PyTorch model.
    norm_sources: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_context(self) -> int:
        return int(self.rope_cos.shape[0])

    @property
    def streamed(self) -> bool:
        """Whether its weight matrices are still in the checkpoint (slm_export/stored.py)."""
        return isinstance(self.embed, Stored)

    def materialized(self) -> Decoder:
        """This decoder with every stored weight read into memory (for code that needs arrays)."""
        if not self.streamed:
            return self

        def lin(x: Linear) -> Linear:
            return dataclasses.replace(x, weight=materialize(x.weight))

        layers = [dataclasses.replace(layer, qkv=lin(layer.qkv), o=lin(layer.o), gate_up=lin(layer.gate_up),
                                      down=lin(layer.down)) for layer in self.layers]
        embed = materialize(self.embed)
        lm_head = embed if self.tied_embeddings else materialize(self.lm_head)
        return dataclasses.replace(self, embed=embed, lm_head=lm_head, layers=layers)


def supported() -> list[str]:
    return ARCHITECTURES.names()


def to_decoder(model, max_context: int) -> Decoder:
    """Describe a loaded transformers causal LM as a `Decoder` (raises for unsupported families)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise SlmExportError(
            f"{type(model).__name__} has no transformers `config.model_type`; pass a transformers causal LM "
            f"of a supported architecture ({', '.join(supported())}) or a plain nn.Module that follows the "
            "contract in slm_export/custom.py (a `config` dict and Llama parameter names)"
        )
    check_supported(model_type)
    return ARCHITECTURES.get(model_type)(model, max_context)


def check_supported(model_type: str) -> None:
    """Refuse a family no adapter describes (also read from a folder's config.json before its weights load)."""
    if model_type not in ARCHITECTURES:
        raise SlmExportError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(supported())}"
        )


# ---------------------------------------------------------------- helpers shared by the adapters

def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


class _Params:
    """A model's parameters by name: copied out of a loaded model, or, for a model whose weights are
    still in its checkpoint (a skeleton on the meta device, `model.slm_checkpoint`), matrices as
    `Stored` weights read when used and vectors (norms, biases) read now."""

    def __init__(self, model):
        self.model = model
        self.checkpoint = getattr(model, "slm_checkpoint", None)

    def matrix(self, name: str):
        if self.checkpoint is None:
            return _np(self.model.get_parameter(name))
        ckpt = self.checkpoint
        return Stored(lambda: ckpt.read(name), ckpt.shape(name), name, lambda a, b: ckpt.read(name, rows=(a, b)))

    def vector(self, name: str) -> np.ndarray:
        return _np(self.model.get_parameter(name)) if self.checkpoint is None else self.checkpoint.read(name)

    def linear(self, module, name: str) -> Linear:
        bias = getattr(module, "bias", None)
        return Linear(self.matrix(f"{name}.weight"), None if bias is None else self.vector(f"{name}.bias"),
                      [f"{name}.weight"])


def _fuse(parts: list[Linear]) -> Linear:
    biases = [p.bias for p in parts]
    if any(b is not None for b in biases):
        biases = [b if b is not None else np.zeros(p.weight.shape[0], np.float32) for b, p in zip(biases, parts)]
        bias = np.concatenate(biases)
    else:
        bias = None
    weights = [p.weight for p in parts]
    return Linear(
        stacked(weights) if any(isinstance(w, Stored) for w in weights) else np.concatenate(weights),
        bias,
        [s for p in parts for s in p.sources],
        [p.weight.shape[0] for p in parts],
    )


def _rope_tables(model, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin for positions [0, max_context) from the model's own rotary module.

    Using the model's module covers every rope variant transformers knows (llama3 scaling, yarn,
    attention scaling) without re-deriving them here. HF duplicates the half-tables; keep one half.
    """
    import torch

    rotary = model.model.rotary_emb
    if any(b.is_meta for b in rotary.buffers()):  # a skeleton's (weights still in the checkpoint): make its tables
        rotary = type(rotary)(config=model.config)
    pos = torch.arange(max_context, dtype=torch.long)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2
    return _np(cos[0, :, :half]), _np(sin[0, :, :half])


MIN_CONTEXT = 16  # the smallest KV cache an export makes (tokens)


def check_min_context(max_context: int | None) -> None:
    if max_context is not None and max_context < MIN_CONTEXT:
        raise SlmExportError(f"--max-context {max_context} is too small; use at least {MIN_CONTEXT}")


def _check_context(config, max_context: int) -> None:
    check_min_context(max_context)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max_context > limit:
        raise SlmExportError(
            f"--max-context {max_context} exceeds the model's max_position_embeddings ({limit})"
        )


def _window(config, layer_idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def _llama_like(model, max_context: int, *, fused_qkv: bool = False, gemma: bool = False) -> Decoder:
    config = model.config
    _check_context(config, max_context)
    inner = model.model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = _Params(model)
    # Gemma stores RMSNorm scales as (w - 1): its norm multiplies by (1 + w). Fold the 1 in here.
    norm = (lambda name: params.vector(f"{name}.weight") + 1.0) if gemma else (lambda name: params.vector(f"{name}.weight"))
    layers = []
    for i, block in enumerate(inner.layers):
        p = f"model.layers.{i}"
        attn, mlp = block.self_attn, block.mlp
        if fused_qkv:  # Phi-3 ships q|k|v and gate|up fused already
            qkv = params.linear(attn.qkv_proj, f"{p}.self_attn.qkv_proj")
            q = config.num_attention_heads * head_dim
            kv = config.num_key_value_heads * head_dim
            qkv.split = [q, kv, kv]
            gate_up = params.linear(mlp.gate_up_proj, f"{p}.mlp.gate_up_proj")
            gate_up.split = [config.intermediate_size] * 2
        else:
            qkv = _fuse([params.linear(getattr(attn, n), f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")])
            gate_up = _fuse([params.linear(getattr(mlp, n), f"{p}.mlp.{n}") for n in ("gate_proj", "up_proj")])
        layer = Layer(
            attn_norm=norm(f"{p}.input_layernorm"),
            qkv=qkv,
            o=params.linear(attn.o_proj, f"{p}.self_attn.o_proj"),
            ffn_norm=norm(f"{p}.pre_feedforward_layernorm" if gemma else f"{p}.post_attention_layernorm"),
            gate_up=gate_up,
            down=params.linear(mlp.down_proj, f"{p}.mlp.down_proj"),
            sliding_window=_window(config, i),
        )
        if gemma:
            layer.post_attn_norm = norm(f"{p}.post_attention_layernorm")
            layer.post_ffn_norm = norm(f"{p}.post_feedforward_layernorm")
        if getattr(attn.o_proj, "bias", None) is not None or getattr(mlp.down_proj, "bias", None) is not None:
            raise SlmExportError(f"{config.model_type}: output-projection biases are not supported")
        layers.append(layer)

    norm_sources = {} if gemma else {"final_norm": "model.norm.weight"} | {
        f"layers.{i}.{slot}": f"model.layers.{i}.{name}.weight" for i in range(len(layers))
        for slot, name in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"))}
    embed = params.matrix("model.embed_tokens.weight")
    tied = model.lm_head.weight is inner.embed_tokens.weight or (
        not inner.embed_tokens.weight.is_meta and model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr())
    cos, sin = _rope_tables(model, max_context)
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if act not in activations:
        raise SlmExportError(f"{config.model_type}: activation '{act}' is not supported")
    return Decoder(
        architecture=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        rms_eps=float(config.rms_norm_eps),
        activation=activations[act],
        embed=embed,
        # Gemma multiplies embeddings by sqrt(hidden) rounded to the activation dtype (fp32 here).
        embed_scale=float(np.float32(config.hidden_size**0.5)) if gemma else 1.0,
        final_norm=norm("model.norm"),
        lm_head=embed if tied else params.matrix("lm_head.weight"),
        tied_embeddings=tied,
        attn_scale=(config.query_pre_attn_scalar**-0.5) if gemma else head_dim**-0.5,
        attn_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0) if gemma else 0.0,
        final_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0) if gemma else 0.0,
        rope_cos=cos,
        rope_sin=sin,
        layers=layers,
        norm_sources=norm_sources,
    )


@ARCHITECTURES.register("llama")  # SmolLM2, Llama-3.2, TinyLlama, MobileLLM-style deep-thin
def _llama(model, max_context):
    if getattr(model.config, "mlp_bias", False):
        raise SlmExportError("llama: mlp_bias=True is not supported")
    return _llama_like(model, max_context)


@ARCHITECTURES.register("mistral")
def _mistral(model, max_context):
    return _llama_like(model, max_context)


@ARCHITECTURES.register("qwen2")  # Qwen2 / Qwen2.5: q, k, v carry biases
def _qwen2(model, max_context):
    return _llama_like(model, max_context)


@ARCHITECTURES.register("phi3")
def _phi3(model, max_context):
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise SlmExportError("phi3: partial rotary embeddings are not supported yet")
    return _llama_like(model, max_context, fused_qkv=True)


@ARCHITECTURES.register("gemma2")
def _gemma2(model, max_context):
    return _llama_like(model, max_context, gemma=True)
