// Causal grouped-query attention over a KV cache, in plain C++ (no ExecuTorch types), so that
// llama_ops.cpp wraps it as a kernel and attention_bench.cpp times it alone.
//
// q [S, H, D] (rows at positions start..start+S-1) attends to cache rows 0..start+s of
// k, v [T, Hkv, D]; query head h reads kv head h / (H / Hkv); out [S, H, D].
//
// The work is split into items of (kv head, block of query rows, chunk of keys), each an exact
// softmax over its chunk with its own max, merged afterwards (the flash-decoding scheme): a decode
// step still spreads over every thread, which a split by heads alone would not do (3 kv heads on
// 2 threads leaves one idle half the time). Within an item, each key and value row is read once
// for all the query vectors that share it. The cache is float or fp16 (KV). An fp16 key or
// value row is widened into registers as it is loaded (vcvtph2ps) where the CPU has AVX-512 or
// AVX2+F16C and the head size is a multiple of the vector width; elsewhere (ARM, odd sizes) the
// item's rows are widened into an fp32 tile first. Both measured on SmolLM2-135M: GCC 12 makes
// scalar code of a plain `float(h)` in the dot product (13x slower than fp32 at 512 keys), and
// the tile, fast alone, stalled on its stores inside the runner (1024 keys: 132 vs 160 tok/s).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace slm_export {

// IEEE fp16 as stored in the cache. GCC 12 knows _Float16 in C++ on x86 but not on aarch64, where
// its ARM storage type __fp16 (same bits, converted by fcvt) does the job.
#if defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__)
using fp16 = __fp16;
#else
using fp16 = _Float16;
#endif

// dst[i] = src[i] for n values, fp16 -> fp32.
inline void widen(const fp16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[i] = src[i] for n values, fp32 -> fp16 (round to nearest even).
inline void narrow(const float* src, fp16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = static_cast<fp16>(src[i]);
}

#if defined(__AVX512F__)
#define SLM_FP16_SIMD 16
using vecf = __m512;
inline vecf load_h(const fp16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vecf load_f(const float* p) { return _mm512_loadu_ps(p); }
inline void store_f(float* p, vecf v) { _mm512_storeu_ps(p, v); }
inline vecf fmadd(vecf a, vecf b, vecf c) { return _mm512_fmadd_ps(a, b, c); }
inline vecf splat(float x) { return _mm512_set1_ps(x); }
inline float hsum(vecf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__F16C__) && defined(__FMA__) && defined(__AVX2__)
#define SLM_FP16_SIMD 8
using vecf = __m256;
inline vecf load_h(const fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vecf load_f(const float* p) { return _mm256_loadu_ps(p); }
inline void store_f(float* p, vecf v) { _mm256_storeu_ps(p, v); }
inline vecf fmadd(vecf a, vecf b, vecf c) { return _mm256_fmadd_ps(a, b, c); }
inline vecf splat(float x) { return _mm256_set1_ps(x); }
inline float hsum(vecf v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

#ifdef SLM_FP16_SIMD
// item_scores / item_values below for an fp16 cache and a head size of DIM (a multiple of the
// vector width): each key or value row is widened into DIM / width registers once, then used
// for every query vector of the item.
template <int DIM>
inline void item_scores_f16(const float* __restrict qs, int64_t nvec, const fp16* __restrict k, int64_t ks,
                            int64_t n, float* __restrict sc) {
  constexpr int V = DIM / SLM_FP16_SIMD;
  for (int64_t j = 0; j < n; ++j) {
    vecf kr[V];
    for (int t = 0; t < V; ++t) kr[t] = load_h(k + j * ks + t * SLM_FP16_SIMD);
    for (int64_t i = 0; i < nvec; ++i) {
      const float* qv = qs + i * DIM;
      vecf acc = splat(0.f);
      for (int t = 0; t < V; ++t) acc = fmadd(load_f(qv + t * SLM_FP16_SIMD), kr[t], acc);
      sc[i * n + j] = hsum(acc);
    }
  }
}

template <int DIM>
inline void item_values_f16(const float* __restrict p, int64_t nvec, const fp16* __restrict v, int64_t vs,
                            int64_t n, float* __restrict acc) {
  constexpr int V = DIM / SLM_FP16_SIMD;
  std::fill(acc, acc + nvec * DIM, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    vecf vr[V];
    for (int t = 0; t < V; ++t) vr[t] = load_h(v + j * vs + t * SLM_FP16_SIMD);
    for (int64_t i = 0; i < nvec; ++i) {
      const vecf w = splat(p[i * n + j]);
      float* a = acc + i * DIM;
      for (int t = 0; t < V; ++t) store_f(a + t * SLM_FP16_SIMD, fmadd(w, vr[t], load_f(a + t * SLM_FP16_SIMD)));
    }
  }
}
#endif

// The n rows of D values at `rows` (stride `stride`) as fp32: the rows themselves when the cache
// is fp32, else widened into `tile` (n x D, contiguous; the returned stride is then D).
inline const float* as_fp32(const float* rows, int64_t stride, int64_t, int64_t, std::vector<float>&, int64_t& out_stride) {
  out_stride = stride;
  return rows;
}
inline const float* as_fp32(const fp16* rows, int64_t stride, int64_t n, int64_t D, std::vector<float>& tile,
                            int64_t& out_stride) {
  if (tile.size() < static_cast<size_t>(n * D)) tile.resize(n * D);
  for (int64_t j = 0; j < n; ++j) widen(rows + j * stride, tile.data() + j * D, D);
  out_stride = D;
  return tile.data();
}

constexpr int64_t kKeyChunk = 128;  // keys per work item
constexpr int64_t kRowBlock = 4;    // query rows per work item (prefill)

struct Partial {  // one item's softmax state for one (query row, query head)
  float max;
  float sum;
};

// Scores of nvec query vectors (qs, pre-scaled, D apart) against n key rows (stride ks) into
// sc [nvec][n]. DIM > 0 fixes the head size at compile time, so the loops unroll into registers.
template <int DIM>
inline void item_scores(const float* __restrict qs, int64_t nvec, const float* __restrict k, int64_t ks,
                        int64_t n, int64_t dim, float* __restrict sc) {
  const int64_t D = DIM > 0 ? DIM : dim;
  for (int64_t j = 0; j < n; ++j) {
    const float* __restrict kr = k + j * ks;
    for (int64_t i = 0; i < nvec; ++i) {
      const float* __restrict qv = qs + i * D;
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += qv[d] * kr[d];
      sc[i * n + j] = dot;
    }
  }
}

// acc[i] = sum_j p[i][j] * v[j] for nvec rows of weights p [nvec][n] over n value rows (stride vs).
template <int DIM>
inline void item_values(const float* __restrict p, int64_t nvec, const float* __restrict v, int64_t vs,
                        int64_t n, int64_t dim, float* __restrict acc) {
  const int64_t D = DIM > 0 ? DIM : dim;
  std::fill(acc, acc + nvec * D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* __restrict vr = v + j * vs;
    for (int64_t i = 0; i < nvec; ++i) {
      const float w = p[i * n + j];
      float* __restrict a = acc + i * D;
      for (int64_t d = 0; d < D; ++d) a[d] += w * vr[d];
    }
  }
}

// Whether an fp16 cache with head size DIM takes the register-widening loops.
template <int DIM, typename KV>
constexpr bool fused_fp16() {
#ifdef SLM_FP16_SIMD
  return std::is_same_v<KV, fp16> && DIM > 0 && DIM % SLM_FP16_SIMD == 0;
#else
  return false;
#endif
}

template <int DIM, typename KV, typename ParallelFor>
void causal_attention_impl(const float* q, const KV* k, const KV* v, float* out, int64_t S, int64_t H,
                           int64_t Hkv, int64_t D, int64_t start, float scale, ParallelFor&& parallel_for) {
  const int64_t group = H / Hkv, keys = start + S, kv_row = Hkv * D;
  const int64_t row_blocks = (S + kRowBlock - 1) / kRowBlock;
  const int64_t chunks = (keys + kKeyChunk - 1) / kKeyChunk;
  const int64_t items = Hkv * row_blocks * chunks;
  // Scratch reused across calls (this runs once per layer per decoded token): grown, never shrunk.
  // The calling thread's buffers are shared with the workers through pointers (a thread_local named
  // inside the lambda would be each worker's own); the workers' own scratch is theirs.
  thread_local std::vector<Partial> partial_buf;
  thread_local std::vector<float> acc_buf;
  if (partial_buf.size() < static_cast<size_t>(chunks * S * H)) partial_buf.resize(chunks * S * H);
  if (acc_buf.size() < static_cast<size_t>(chunks * S * H * D)) acc_buf.resize(chunks * S * H * D);
  Partial* const partial = partial_buf.data();
  float* const acc = acc_buf.data();

  parallel_for(int64_t(0), items, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> qs, sc, part, tile;
    int64_t stride = 0;
    if (qs.size() < static_cast<size_t>(kRowBlock * group * D)) qs.resize(kRowBlock * group * D);
    if (sc.size() < static_cast<size_t>(kRowBlock * group * kKeyChunk)) sc.resize(kRowBlock * group * kKeyChunk);
    if (part.size() < static_cast<size_t>(kRowBlock * group * D)) part.resize(kRowBlock * group * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item % chunks, rb = (item / chunks) % row_blocks, hk = item / (chunks * row_blocks);
      const int64_t s0 = rb * kRowBlock, s1 = std::min(S, s0 + kRowBlock);
      const int64_t j0 = c * kKeyChunk, n = std::min(keys, j0 + kKeyChunk) - j0;
      const int64_t nvec = (s1 - s0) * group;
      for (int64_t i = 0; i < nvec; ++i) {  // vector i: row s0 + i / group, head hk * group + i % group
        const float* src = q + ((s0 + i / group) * H + hk * group + i % group) * D;
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] = src[d] * scale;
      }
      if constexpr (fused_fp16<DIM, KV>()) {
#ifdef SLM_FP16_SIMD
        item_scores_f16<DIM>(qs.data(), nvec, k + j0 * kv_row + hk * D, kv_row, n, sc.data());
#endif
      } else {
        const float* keys_f = as_fp32(k + j0 * kv_row + hk * D, kv_row, n, D, tile, stride);
        item_scores<DIM>(qs.data(), nvec, keys_f, stride, n, D, sc.data());
      }
      // Softmax numerators over the keys each row may see (causal); keys it may not see weigh 0.
      for (int64_t i = 0; i < nvec; ++i) {
        const int64_t s = s0 + i / group;
        const int64_t visible = std::max<int64_t>(0, std::min(n, start + s + 1 - j0));
        float* row = sc.data() + i * n;
        float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, row[j]);
        for (int64_t j = 0; j < visible; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        std::fill(row + visible, row + n, 0.f);
        partial[(c * S + s) * H + hk * group + i % group] = {mx, sum};
      }
      if constexpr (fused_fp16<DIM, KV>()) {
#ifdef SLM_FP16_SIMD
        item_values_f16<DIM>(sc.data(), nvec, v + j0 * kv_row + hk * D, kv_row, n, part.data());
#endif
      } else {
        const float* values_f = as_fp32(v + j0 * kv_row + hk * D, kv_row, n, D, tile, stride);
        item_values<DIM>(sc.data(), nvec, values_f, stride, n, D, part.data());
      }
      for (int64_t i = 0; i < nvec; ++i) {
        const int64_t s = s0 + i / group, h = hk * group + i % group;
        std::copy(part.data() + i * D, part.data() + (i + 1) * D, acc + ((c * S + s) * H + h) * D);
      }
    }
  });

  // Merge the chunks of each (row, head): rescale each to the common max, then normalise.
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) {
        const Partial& p = partial[(c * S + s) * H + h];
        if (p.sum > 0.f) mx = std::max(mx, p.max);
      }
      float* o = out + (s * H + h) * D;
      std::fill(o, o + D, 0.f);
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const Partial& p = partial[(c * S + s) * H + h];
        if (p.sum <= 0.f) continue;
        const float w = std::exp(p.max - mx);
        total += w * p.sum;
        const float* a = acc + ((c * S + s) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
}

// parallel_for(begin, end, fn(begin, end)) splits [begin, end) over the caller's threads.
template <typename KV, typename ParallelFor>
void causal_attention(const float* q, const KV* k, const KV* v, float* out, int64_t S, int64_t H, int64_t Hkv,
                      int64_t D, int64_t start, float scale, ParallelFor&& parallel_for) {
  switch (D) {  // the head sizes of the supported architectures, unrolled; any other size works too
    case 64: return causal_attention_impl<64>(q, k, v, out, S, H, Hkv, D, start, scale, parallel_for);
    case 96: return causal_attention_impl<96>(q, k, v, out, S, H, Hkv, D, start, scale, parallel_for);
    case 128: return causal_attention_impl<128>(q, k, v, out, S, H, Hkv, D, start, scale, parallel_for);
    default: return causal_attention_impl<0>(q, k, v, out, S, H, Hkv, D, start, scale, parallel_for);
  }
}

}  // namespace slm_export
