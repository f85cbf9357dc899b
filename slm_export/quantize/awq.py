"""AWQ: activation-aware per-channel scales, folded exactly into the op before each weight group.

For any positive per-input-channel vector s, x @ W^T = (x / s) @ (W * s)^T. Folding 1/s into the op
that produces x (an RMSNorm's weight, or the rows of v or up) leaves the float model's outputs as
they were (up to float rounding) while moving magnitude between activations and weights: a weight
column that meets large activations is made larger, so int4 rounds it relatively more finely, and an
activation channel with outliers is made smaller, so a token's int8 grid (8da4w) loses less of the
others (SmoothQuant's migration). Following AWQ (Lin et al. 2024, as AutoAWQ computes it):

    s = mean|x|^alpha / max|w|^(1 - alpha), normalised so that sqrt(max(s) * min(s)) = 1,

with alpha chosen per group on the calibration text from a grid (and "no rescaling" as a candidate):
the one whose output error x @ W^T against the target's own rounding of both sides is least,
weights rounded as planned (rtn on the planned grid, group and scale precision: bfloat16 on XNNPACK)
and activations as the target's kernels round them (int8 per token on ExecuTorch, per block of the
weight's group on ONNX, none on weight-only targets). The planned method (GPTQ) then rounds the rescaled weights.

The groups, per layer (unit names as the quantizer's):
  layers.i.qkv      attn_norm -> the columns of q, k, v
  layers.i.o        the rows of v -> the columns of o (one scale per kv channel, shared by the q heads reading
                    it); not where q, k, v have biases (Qwen2), whose v bias the PyTorch model would need too
  layers.i.gate_up  ffn_norm -> the columns of gate, up
  layers.i.down     the rows of up -> the columns of down
  lm_head           final_norm -> the columns of the lm_head, only where its codes are its own
                    (not a table the embedding reads its rows from)
A group whose weights are not all quantized is left as it is. The chosen alphas are recorded
(`plan.calibration["awq"]`), so `verify` rebuilds exactly the same rescaled model from them.
"""
from __future__ import annotations

import numpy as np

from ..errors import SlmExportError
from ..stored import mapped
from .calibration import DecoderForward, chunks

ALPHAS = tuple(round(float(a), 2) for a in np.linspace(0.0, 1.0, 11))  # AWQ's grid (AutoAWQ: 20 steps)
SEARCH_TOKENS = 512  # calibration tokens each group's output error is measured on
HEAD_SEARCH_TOKENS = 256  # the lm_head's (49k rows: its matmul is the costly one)


def cannot_rescale(dec) -> str | None:
    """Why this model's norms cannot be rescaled and given back to PyTorch (Gemma's (1 + w)), or None."""
    if not dec.norm_sources:
        return (f"{dec.architecture} stores its RMSNorm weights as (w - 1) (its norm multiplies by 1 + w), which "
                "this rescaling does not handle yet")
    return None


def check_decoder(dec, method: str = "awq") -> None:
    """Refuse a model whose norms cannot be rescaled and given back to PyTorch."""
    why = cannot_rescale(dec)
    if why:
        raise SlmExportError(f"--quant-method {method} rescales the RMSNorm weights, and {why}; "
                             "use --quant-method gptq for this model")


def activation_rounding(limits, spec) -> str:
    """How the target rounds activations on the fly: "per-token", "per-block" or "none"."""
    return limits.activation_rounding if spec.activations == "int8" else "none"


def round_activations(x, rounding: str, block: int = 32):
    """x [n, k] as the target's int8 activation quantization leaves it (torch, float32); "per-block":
    in blocks of `block` values of a row (MatMulNBits': the weight's group)."""
    import torch

    if rounding == "per-token":  # torchao's INT8_ASYM_PER_TOKEN (XNNPACK's qd8)
        lo = torch.clamp(x.amin(-1, keepdim=True), max=0.0)
        hi = torch.clamp(x.amax(-1, keepdim=True), min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=torch.finfo(torch.float32).eps)
        zero = torch.clamp(torch.round(-128 - lo / scale), -128, 127)
        return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale
    if rounding == "per-block":  # MatMulNBits accuracy_level 4: symmetric int8 per block of a row
        n, k = x.shape
        pad = -k % block
        xb = torch.nn.functional.pad(x, (0, pad)).view(n, -1, block)
        scale = xb.abs().amax(-1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (torch.round(xb / scale) * scale).view(n, -1)[:, :k]
    return x


def fake_quant(w, plan):
    """Torch weight `w` [out, in] rounded as `plan` stores it, for the search: rtn's symmetric scales at
    the plan's scale precision (round half to even here; the search needs the error's size, not the codes)."""
    import torch

    from .codes import grid
    from .methods import METHODS

    if not plan.symmetric:
        return torch.from_numpy(METHODS.get("rtn")(w.numpy(), plan).dequantize())
    out, k = w.shape
    group = plan.group_for(k)
    wg = torch.nn.functional.pad(w, (0, -k % group)).view(out, -1, group)
    qmin, qmax = grid(plan.bits, True)
    ext = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))
    s = ext / qmin if plan.signed_scales else torch.where(ext < 0, ext / qmin, ext / qmax)
    s = torch.where(ext == 0, torch.ones_like(s), s)
    s = s.to({"bfloat16": torch.bfloat16, "float16": torch.float16}.get(plan.scale_dtype, torch.float32)).float()
    return (torch.clamp(torch.round(wg / s), qmin, qmax) * s).view(out, -1)[:, :k]


def _scales(x_mean: np.ndarray, w_max: np.ndarray, alpha: float | None) -> np.ndarray:
    """AWQ's per-channel scales (float32) for one alpha; None: no rescaling (all ones)."""
    if alpha is None:
        return np.ones_like(x_mean, dtype=np.float32)
    s = np.maximum(x_mean ** alpha / (w_max ** (1.0 - alpha) + 1e-4), 1e-4)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


class _Group:
    """One rescalable group: the input its weights read, the weights, and how its scales fold back.

    `heads` = (q heads, kv heads): the input is attention output (o's), whose channels come from v's
    rows: one scale per kv channel, pooled over the q heads that read it, expanded to o's columns."""

    def __init__(self, unit: str, x, consumers, fold, heads: tuple[int, int] | None = None):
        self.unit, self.consumers, self.fold, self.heads = unit, consumers, fold, heads
        self.x = x.reshape(-1, x.shape[-1])  # [tokens, k]
        x_mean = np.abs(self.x.numpy()).astype(np.float64).mean(0)
        w_max = np.max([np.abs(np.asarray(w)).max(0) for _, w in consumers], axis=0).astype(np.float64)
        if heads:
            x_mean, w_max = self._pool(x_mean, np.mean), self._pool(w_max, np.max)
        self.x_mean, self.w_max = x_mean, w_max

    def _pool(self, v: np.ndarray, how) -> np.ndarray:
        """[heads * head_dim] -> [kv_heads * head_dim], the heads sharing a kv head pooled."""
        heads, kv_heads = self.heads
        return how(v.reshape(kv_heads, heads // kv_heads, -1), axis=1).reshape(-1)

    def scales(self, alpha: float | None) -> np.ndarray:
        """The group's scales at `alpha` (per kv channel for o's group)."""
        return _scales(self.x_mean, self.w_max, alpha)

    def expand(self, s: np.ndarray) -> np.ndarray:
        """Scales per input channel of the consumers (a kv channel's for every q head reading it)."""
        if not self.heads:
            return s
        heads, kv_heads = self.heads
        return np.repeat(s.reshape(kv_heads, 1, -1), heads // kv_heads, axis=1).reshape(-1)

    def search(self, rounding: str, tokens: int) -> float | None:
        """The alpha (or None: no rescaling) with the least output error, the target's rounding simulated."""
        import torch

        x = self.x[:tokens]
        ws = [(p, torch.from_numpy(np.asarray(w))) for p, w in self.consumers]
        ref = x @ torch.cat([w for _, w in ws]).T
        best, best_err = None, np.inf
        for alpha in (None, *ALPHAS):
            s = torch.from_numpy(self.expand(self.scales(alpha)))
            wq = torch.cat([fake_quant(w * s[None], p) for p, w in ws])
            y = round_activations(x / s, rounding, ws[0][0].group_for(x.shape[-1])) @ wq.T
            err = float(((y - ref) ** 2).mean())
            if err < best_err:
                best, best_err = alpha, err
        return best


def _columns_times(w, s: np.ndarray):
    """w [out, in] with column c times s[c] (a weight still in its checkpoint: when it is read)."""
    return mapped(w, lambda a, _: (a * s[None]).astype(np.float32), "x awq scales")


def _rows_over(w, start: int, stop: int, s: np.ndarray):
    """w with rows start..stop divided by s (a weight still in its checkpoint: when it is read)."""
    def divide(a, r0):
        lo, hi = max(start, r0), min(stop, r0 + len(a))
        if lo >= hi:
            return a
        a = a.copy()
        a[lo - r0:hi - r0] = a[lo - r0:hi - r0] / s[lo - start:hi - start, None]
        return a.astype(np.float32)
    return mapped(w, divide, "/ awq scales")


def _plan_of(plan, lin):
    from .quantizer import linear_plan

    p = linear_plan(plan, lin)
    return p if p.quantized else None


def _layer_groups(dec, plan, i: int, seen: dict) -> list[_Group]:
    """The rescalable groups of layer i, from the inputs `seen` of its weight groups (float model)."""
    layer = dec.layers[i]
    q_size, kv_size = dec.num_heads * dec.head_dim, dec.num_kv_heads * dec.head_dim
    inter = layer.gate_up.weight.shape[0] // 2
    groups = []

    def norm_fold(attr, lin):
        def fold(s):
            setattr(layer, attr, (getattr(layer, attr) / s).astype(np.float32))
            lin.weight = _columns_times(lin.weight, s)
        return fold

    def rows_fold(src, start, stop, dst, s_dst):
        def fold(s):
            src.weight = _rows_over(src.weight, start, stop, s)
            if src.bias is not None:
                b = src.bias.copy()
                b[start:stop] = b[start:stop] / s
                src.bias = b.astype(np.float32)
            dst.weight = _columns_times(dst.weight, s_dst(s))
        return fold

    p = _plan_of(plan, layer.qkv)
    if p is not None:
        groups.append(_Group(f"layers.{i}.qkv", seen["qkv"], [(p, layer.qkv.weight)], norm_fold("attn_norm", layer.qkv)))
    p_o = _plan_of(plan, layer.o)
    if p is not None and p_o is not None and layer.qkv.bias is None:  # Qwen2's v bias would change: not done
        g = _Group(f"layers.{i}.o", seen["o"], [(p_o, layer.o.weight)], None, (dec.num_heads, dec.num_kv_heads))
        g.fold = rows_fold(layer.qkv, q_size + kv_size, q_size + 2 * kv_size, layer.o, g.expand)
        groups.append(g)
    p = _plan_of(plan, layer.gate_up)
    if p is not None:
        groups.append(_Group(f"layers.{i}.gate_up", seen["gate_up"], [(p, layer.gate_up.weight)],
                             norm_fold("ffn_norm", layer.gate_up)))
    p_d = _plan_of(plan, layer.down)
    if p is not None and p_d is not None:
        groups.append(_Group(f"layers.{i}.down", seen["down"], [(p_d, layer.down.weight)],
                             rows_fold(layer.gate_up, inter, 2 * inter, layer.down, lambda s: s)))
    return groups


def _head_group(dec, plan, x) -> _Group | None:
    """final_norm -> lm_head, where the lm_head's codes are its own (no table reads rows out of them)."""
    from .plan import LM_HEAD

    p = plan.get(LM_HEAD)
    if p is None or not p.quantized or any(w.shares == LM_HEAD for w in plan.weights):
        return None

    def fold(s):
        dec.final_norm = (dec.final_norm / s).astype(np.float32)
        dec.lm_head = _columns_times(dec.lm_head, s)  # a new array: a tied embedding keeps its own

    return _Group("lm_head", x, [(p, dec.lm_head)], fold)


def equalize(dec, plan, calibration_ids: list[int], rounding: str, alphas: dict | None = None) -> dict:
    """Rescale `dec` in place (module docstring); returns {unit: alpha or None} as chosen, or as given
    in `alphas` (what an export recorded: nothing is searched then)."""
    import torch

    from .. import progress

    check_decoder(dec)
    if not calibration_ids:
        raise ValueError("awq chooses its scales on calibration token ids")
    chosen: dict = {}

    def settle(groups, tokens):
        for g in groups:
            alpha = alphas.get(g.unit) if alphas is not None else g.search(rounding, tokens)
            chosen[g.unit] = alpha
            if alpha is not None:
                g.fold(g.scales(alpha))

    forward = DecoderForward(dec)
    seqs = torch.tensor(chunks(calibration_ids, dec.max_context))
    count = progress.Count("choosing AWQ scales" if alphas is None else "rescaling as recorded (AWQ)", dec.num_layers)
    with torch.no_grad():
        x = forward.embed(seqs)
        for i, layer in enumerate(dec.layers):
            seen = {}
            # `forward` keeps the float weights it was made with: the rescaled model computes the same
            x = forward.layer(layer, x, lambda unit, inputs: seen.__setitem__(unit, inputs))
            settle(_layer_groups(dec, plan, i, seen), SEARCH_TOKENS)
            forward.release_layer(layer)  # weights still in the checkpoint: read again when next used
            count.step()
        head = _head_group(dec, plan, forward.norm(x, dec.final_norm))
        if head is not None:
            settle([head], HEAD_SEARCH_TOKENS)
    return chosen


def rescaled_norms(dec) -> dict[str, np.ndarray]:
    """The decoder's norm weights by PyTorch parameter name (for a PyTorch model to compute as the rescaled one)."""
    vectors = {"final_norm": dec.final_norm}
    for i, layer in enumerate(dec.layers):
        vectors |= {f"layers.{i}.attn_norm": layer.attn_norm, f"layers.{i}.ffn_norm": layer.ffn_norm}
    return {dec.norm_sources[slot]: v for slot, v in vectors.items()}


def rescaled(manifest: dict) -> bool:
    """Whether the artifact of `manifest` was rescaled by awq (its norms are not the source model's)."""
    return bool((manifest["quant"].get("calibration") or {}).get("awq"))
