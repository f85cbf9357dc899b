// The two LLM ops our .pte files call outside the XNNPACK delegate, for the torch-free runner.
//
// ExecuTorch's own kernels for llama::update_cache and llama::custom_sdpa ship only inside
// libcustom_ops_aot_lib.so, which links libtorch (the wheel ships no runtime-only build of them),
// so this file implements the same schemas against the runtime headers the wheel does ship.
//
//   update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out)
//     value [1, S, Hkv, D] is copied into cache [1, T, Hkv, D] at rows start_pos..start_pos+S.
//   custom_sdpa.out(Tensor q, Tensor k, Tensor v, SymInt start_pos, Tensor? attn_mask,
//                   float dropout_p, bool is_causal, float? scale, *, Tensor(a!) out)
//     q [1, S, H, D] attends causally to cache rows 0..start_pos+s of k, v [1, T, Hkv, D]
//     (grouped-query: query head h reads kv head h / (H / Hkv)); out [1, S, H, D].
//     The attention itself is attention.h, spread over ExecuTorch's thread pool.
//
// And our own two for an fp16 cache (exporters/executorch/kv_ops.py defines them for export; alone
// with -DSLM_EXPORT_OWN_OPS_ONLY, see the end of this file):
//   slm::update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out)
//     as llama::update_cache, converting fp32 rows to the cache's dtype (fp16 or fp32);
//   slm::sdpa.out(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, float scale, *, Tensor(a!) out)
//     as llama::custom_sdpa (causal, no mask) with an fp16 or fp32 cache and fp32 q and out, or (an
//     fp16 program) fp16 q and out over an fp16 cache.
#include "attention.h"

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <cmath>
#include <cstring>

namespace slm_export {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;
template <typename T>
using optional = std::optional<T>;

bool is_contiguous_4d(const Tensor& t) {
  if (t.dim() != 4) return false;
  int64_t expected = 1;
  for (int d = 3; d >= 0; --d) {
    if (t.size(d) != 1 && t.strides()[d] != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// llama::update_cache (rows copied as they are, fp16 rows of an fp16 program too) and
// slm::update_cache (fp32 rows into an fp16 cache, narrowed on the way) in one kernel: the checks are the same, only the copy differs.
Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache,
                         const int64_t start_pos, Tensor& out) {
  const bool narrowing = cache.scalar_type() == ScalarType::Half && value.scalar_type() == ScalarType::Float;
  ET_KERNEL_CHECK_MSG(ctx, value.dim() == 4 && cache.dim() == 4 && value.size(0) == 1 && cache.size(0) == 1,
                      InvalidArgument, out, "update_cache: value and cache must be [1, seq, heads, dim]");
  ET_KERNEL_CHECK_MSG(ctx, value.size(2) == cache.size(2) && value.size(3) == cache.size(3) &&
                               (narrowing || value.element_size() == cache.element_size()),
                      InvalidArgument, out, "update_cache: value and cache rows differ in shape or dtype");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + value.size(1) <= cache.size(1), InvalidArgument, out,
                      "update_cache: start_pos + seq exceeds the cache length");
  ET_KERNEL_CHECK_MSG(ctx, is_contiguous_4d(value) && is_contiguous_4d(cache), InvalidArgument, out,
                      "update_cache: value and cache must be contiguous");
  const int64_t row = value.size(2) * value.size(3);
  if (narrowing) {
    narrow(value.const_data_ptr<float>(), reinterpret_cast<fp16*>(cache.mutable_data_ptr()) + start_pos * row,
           value.size(1) * row);
    return out;
  }
  const size_t row_bytes = static_cast<size_t>(row) * value.element_size();
  auto* dst = static_cast<uint8_t*>(cache.mutable_data_ptr()) + start_pos * row_bytes;
  std::memcpy(dst, value.const_data_ptr(), row_bytes * value.size(1));
  return out;
}

Tensor& sdpa(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const int64_t start_pos,
             const optional<double> scale, Tensor& out) {
  const ScalarType kv = k.scalar_type();
  const bool half_q = q.scalar_type() == ScalarType::Half;
  ET_KERNEL_CHECK_MSG(ctx, (q.scalar_type() == ScalarType::Float || (half_q && kv == ScalarType::Half)) &&
                               (kv == ScalarType::Float || kv == ScalarType::Half) && v.scalar_type() == kv &&
                               out.scalar_type() == q.scalar_type(),
                      InvalidArgument, out, "sdpa: float32 q with a float32 or float16 k, v cache, or float16 q with a "
                                            "float16 cache, only (an int8 KV cache needs ExecuTorch's "
                                            "custom_quantized_sdpa)");
  ET_KERNEL_CHECK_MSG(ctx, is_contiguous_4d(q) && is_contiguous_4d(k) && is_contiguous_4d(v) && q.size(0) == 1 &&
                               k.size(0) == 1 && k.size(3) == q.size(3) && v.size(3) == q.size(3) &&
                               q.size(2) % k.size(2) == 0,
                      InvalidArgument, out, "custom_sdpa: expected contiguous [1, S, H, D] q and [1, T, Hkv, D] k, v");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == Error::Ok, InvalidArgument, out);

  const int64_t S = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t T = k.size(1), Hkv = k.size(2);
  const int64_t keys = start_pos + S;  // keys the last query row sees
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && keys <= T, InvalidArgument, out,
                      "custom_sdpa: start_pos + seq exceeds the cache length");
  const float sm_scale = scale.has_value() ? static_cast<float>(scale.value()) : 1.0f / std::sqrt(float(D));

  auto parallel = [](int64_t begin, int64_t end, auto&& fn) { executorch::extension::parallel_for(begin, end, 1, fn); };
  if (half_q) {
    // An fp16 program (--compute-precision float16): the rows in and out are few (S x H x D), so
    // they are widened and narrowed here and the attention itself runs in fp32 over the fp16 cache.
    // The two buffers live as long as the calling thread: one decode step calls this once per layer,
    // and a prompt grows them once.
    const int64_t n = S * H * D;
    thread_local std::vector<float> q32, out32;
    q32.resize(n);
    out32.resize(n);
    widen(reinterpret_cast<const fp16*>(q.const_data_ptr()), q32.data(), n);
    causal_attention(q32.data(), reinterpret_cast<const fp16*>(k.const_data_ptr()),
                     reinterpret_cast<const fp16*>(v.const_data_ptr()), out32.data(), S, H, Hkv, D, start_pos,
                     sm_scale, parallel);
    narrow(out32.data(), reinterpret_cast<fp16*>(out.mutable_data_ptr()), n);
  } else if (kv == ScalarType::Half) {
    causal_attention(q.const_data_ptr<float>(), reinterpret_cast<const fp16*>(k.const_data_ptr()),
                     reinterpret_cast<const fp16*>(v.const_data_ptr()), out.mutable_data_ptr<float>(), S, H, Hkv, D,
                     start_pos, sm_scale, parallel);
  } else {
    causal_attention(q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                     out.mutable_data_ptr<float>(), S, H, Hkv, D, start_pos, sm_scale, parallel);
  }
  return out;
}

Tensor& custom_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const int64_t start_pos, const optional<Tensor>& attn_mask, const double dropout_p,
                        const bool is_causal, const optional<double> scale, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, !attn_mask.has_value() && is_causal && dropout_p == 0.0, InvalidArgument, out,
                      "custom_sdpa: only causal attention without a mask or dropout is implemented here");
  return sdpa(ctx, q, k, v, start_pos, scale, out);
}

Tensor& slm_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                     const int64_t start_pos, const double scale, Tensor& out) {
  return sdpa(ctx, q, k, v, start_pos, optional<double>(scale), out);
}

}  // namespace
}  // namespace slm_export

// Beside ExecuTorch's own LLM custom ops (its Android AAR, iOS frameworks, TextLLMRunner), which
// register the llama:: ops already (a second registration aborts at load), build with
// -DSLM_EXPORT_OWN_OPS_ONLY: then this file adds only our slm:: ops.
#ifndef SLM_EXPORT_OWN_OPS_ONLY
EXECUTORCH_LIBRARY(llama, "update_cache.out", slm_export::update_cache_out);
EXECUTORCH_LIBRARY(llama, "custom_sdpa.out", slm_export::custom_sdpa_out);
#endif
EXECUTORCH_LIBRARY(slm, "update_cache.out", slm_export::update_cache_out);
EXECUTORCH_LIBRARY(slm, "sdpa.out", slm_export::slm_sdpa_out);
