"""Two ops for an fp16 KV cache: `slm::update_cache` and `slm::sdpa`, defined here for export.

ExecuTorch's `llama::update_cache` and `llama::custom_sdpa` take one dtype for the query, the new
rows and the cache, so an fp16 cache would need casts around them; measured with such casts (the
wheel's `_to_copy` kernels convert one value at a time) SmolLM2-135M decoded 288/130 tok/s at
32/512 context instead of 404/285 and prefilled 6x slower. These two take fp32 activations and an
fp16 (or fp32) cache and convert inside the kernel: the cache is half the memory and half the
bytes each decode step reads, and nothing is cast outside.

Their runtime kernels are ours (runtimes/native/llama_ops.cpp), so a .pte that uses them runs in
slm-export's runner and in an app that compiles that file beside ExecuTorch; ExecuTorch's stock
builds (its Python bindings, the prebuilt Android AAR) do not have them. Here they get a PyTorch
implementation (eager, for checks) and fake-tensor shapes (for torch.export); the `.out` overloads
are what ExecuTorch's emitter names in the program.
"""
from __future__ import annotations

import torch

_LIB = None


def register() -> None:
    """Define torch.ops.slm.update_cache / sdpa once per process."""
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("slm", "DEF")
    lib.define("update_cache(Tensor value, Tensor(a!) cache, SymInt start_pos) -> Tensor")
    lib.define("update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out) -> Tensor(b!)")
    lib.define("sdpa(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, float scale) -> Tensor")
    lib.define("sdpa.out(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, float scale, *, "
               "Tensor(a!) out) -> Tensor(a!)")

    lib.impl("update_cache", _update_cache, "CPU")
    lib.impl("update_cache", _update_cache_fake, "Meta")
    lib.impl("update_cache.out", _update_cache_out, "CPU")
    lib.impl("sdpa", _sdpa, "CPU")
    lib.impl("sdpa", _sdpa_fake, "Meta")
    lib.impl("sdpa.out", _sdpa_out, "CPU")
    _LIB = lib


def _check(value, cache, start_pos) -> None:
    # What the C++ kernel checks too; torch._check keeps these usable with symbolic sizes.
    torch._check(value.dim() == 4 and cache.dim() == 4)
    torch._check(value.shape[2] == cache.shape[2] and value.shape[3] == cache.shape[3])
    torch._check(start_pos >= 0)
    torch._check(start_pos + value.shape[1] <= cache.shape[1])


def _update_cache(value, cache, start_pos):
    """Write value [1, S, Hkv, D] into cache [1, T, Hkv, D] at rows start_pos.., in the cache's dtype."""
    _check(value, cache, start_pos)
    cache[:, start_pos:start_pos + value.shape[1]] = value.to(cache.dtype)
    return torch.empty(1, dtype=value.dtype)


def _update_cache_fake(value, cache, start_pos):
    _check(value, cache, start_pos)
    return torch.empty(1, dtype=value.dtype, device=value.device)


def _update_cache_out(value, cache, start_pos, *, out):
    _update_cache(value, cache, start_pos)
    return out


def _sdpa(q, k_cache, v_cache, start_pos, scale):
    """Causal grouped-query attention of q [1, S, H, D] (positions start_pos..) over cache rows
    0..start_pos+S-1, computed in fp32 whatever the cache's dtype; [1, S, H, D] fp32."""
    seq, heads = q.shape[1], q.shape[2]
    end = start_pos + seq
    group = heads // k_cache.shape[2]
    k = k_cache[:, :end].float().transpose(1, 2).repeat_interleave(group, dim=1)
    v = v_cache[:, :end].float().transpose(1, 2).repeat_interleave(group, dim=1)
    allowed = torch.arange(end).unsqueeze(0) <= (torch.arange(seq).unsqueeze(1) + start_pos)
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2).float(), k, v, attn_mask=allowed,
                                                         scale=scale)
    return y.transpose(1, 2).contiguous().to(q.dtype)


def _sdpa_fake(q, k_cache, v_cache, start_pos, scale):
    return torch.empty_like(q)


def _sdpa_out(q, k_cache, v_cache, start_pos, scale, *, out):
    out.copy_(_sdpa(q, k_cache, v_cache, start_pos, scale))
    return out
