"""Fused CPU kernels, compiled once per machine on first use: paged-attention decode, and the
row-wise ops of a decoder layer.

Row-wise ops (`rms_norm`, `add_rms_norm`, `rope_write_kv`, `silu_mul`): a decoder layer in torch
is ~30 small ops, each a dispatch and, on 2+ threads, an OpenMP fork/join; at decode batch
sizes those cost more than the arithmetic. One call each for the norm, the residual add with
the next norm, rotary with the KV-cache write, and SiLU * up leaves a layer 4 matmuls, the
attention and 4 of these (decode step -15%, prefill -14% at batch 32 here). They round to the
model dtype where the torch ops round, so they agree with them to the last bit or nearly.

Attention: the torch path gathers every decode's KV blocks into a padded batch, then runs two
bmm calls: the KV bytes cross memory three times and short sequences pay for the longest one's
padding.
This kernel walks each sequence's block table in place: one pass over its K and V per
(sequence, kv head), an online softmax, the query heads of a GQA group sharing each K/V read.
Each sequence is computed on its own, so results do not depend on the batch.

Where the compiler targets AVX-512 (`-march=native`) and head_dim is 64 or 128, a
(sequence, kv head) runs in fp32 vector registers: scores 16 positions at a time with one
transposed reduction (`sum16`) instead of a horizontal sum per position, bf16 K read as pairs by
`vdpbf16ps` where the CPU has AVX512_BF16, and V accumulated for up to 16/NV query heads per
pass. On this 2-core Zen 4 that is 2-3x the generic loop at batch 32
(benchmarks/attention_kernel.py). Other shapes and CPUs take the generic loop.

It is built with torch's cpp_extension (g++ and ninja, both pip/apt-installable) into
$TORCH_EXTENSIONS_DIR; if the build fails, `load()` returns None and the engine keeps the torch
path. TIDESERVE_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

template <typename T>
static inline float to_f(T x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
#include <immintrin.h>
#define TS_AVX512 1

// 16 values as fp32 (bf16 widens by a shift, fp16 by vcvtph2ps).
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
static inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lane i of the result is the sum of the 16 lanes of v[i] (a transposed reduction: ~3
// instructions per vector instead of ~8 for a horizontal sum each).
static inline __m512 sum16(__m512 v[16]) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                       _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// Prefetches rows [from, to) of a paged K or V (the hardware prefetcher cannot guess the jump
// from one block to the next; the KV of a batch is far larger than the caches).
template <typename T>
static inline void prefetch_rows(const T* base, const int64_t* slot_of, int64_t from, int64_t to,
                                 int64_t D) {
  for (int64_t i = from; i < to; ++i) {
    const char* row = reinterpret_cast<const char*>(base + slot_of[i] * D);
    for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
      _mm_prefetch(row + off, _MM_HINT_T0);
  }
}

// One (sequence, kv head) task with head_dim = 16 * NV, in fp32 registers.
template <typename T, int NV>
static void decode_task_avx512(const T* qp, const T* kp, const T* vp, const int64_t* slot_of,
                               int64_t L, int64_t G, int64_t D, float sc, float* qf,
                               float* scores, float* out_f) {
  for (int64_t g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j)
      _mm512_storeu_ps(qf + g * D + 16 * j,
                       _mm512_mul_ps(load16(qp + g * D + 16 * j), _mm512_set1_ps(sc)));
  // pass 1: scores [G, L], 16 positions at a time
  prefetch_rows(kp, slot_of, 0, std::min<int64_t>(L, 32), D);
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 pairs multiply exactly into fp32 (vdpbf16ps): no widening of K, half the FMAs
    constexpr int NP = NV / 2;  // 32 bf16 per vector
    __m512bh qb[16][NP];
    const __m512 scv = _mm512_set1_ps(sc);
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
      const int64_t gn = std::min<int64_t>(16, G - g0);
      for (int64_t g = 0; g < gn; ++g)
        for (int j = 0; j < NP; ++j)
          qb[g][j] = (__m512bh)_mm512_loadu_si512(qp + (g0 + g) * D + 32 * j);
      for (int64_t p0 = 0; p0 < L; p0 += 16) {
        const int64_t n = std::min<int64_t>(16, L - p0);
        prefetch_rows(kp, slot_of, std::min(L, p0 + 32), std::min(L, p0 + 48), D);
        prefetch_rows(vp, slot_of, p0, p0 + n, D);  // pass 3 then reads V from the cache
        __m512bh kb[16][NP];
        for (int64_t i = 0; i < 16; ++i)
          for (int j = 0; j < NP; ++j)
            kb[i][j] = i < n ? (__m512bh)_mm512_loadu_si512(kp + slot_of[p0 + i] * D + 32 * j)
                             : (__m512bh)_mm512_setzero_si512();
        for (int64_t g = 0; g < gn; ++g) {
          __m512 part[16];
          for (int64_t i = 0; i < 16; ++i) {
            __m512 a = _mm512_setzero_ps();
            for (int j = 0; j < NP; ++j) a = _mm512_dpbf16_ps(a, qb[g][j], kb[i][j]);
            part[i] = a;
          }
          _mm512_mask_storeu_ps(scores + (g0 + g) * L + p0, (__mmask16)((1u << n) - 1),
                                _mm512_mul_ps(sum16(part), scv));
        }
      }
    }
  } else
#endif
  for (int64_t p0 = 0; p0 < L; p0 += 16) {
    const int64_t n = std::min<int64_t>(16, L - p0);
    prefetch_rows(kp, slot_of, std::min(L, p0 + 32), std::min(L, p0 + 48), D);
    prefetch_rows(vp, slot_of, p0, p0 + n, D);
    __m512 kv[16][NV];
    for (int64_t i = 0; i < 16; ++i)
      for (int j = 0; j < NV; ++j)
        kv[i][j] = i < n ? load16(kp + slot_of[p0 + i] * D + 16 * j) : _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 part[16];
      for (int64_t i = 0; i < 16; ++i) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qf + g * D), kv[i][0]);
        for (int j = 1; j < NV; ++j)
          a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + 16 * j), kv[i][j], a);
        part[i] = a;
      }
      _mm512_mask_storeu_ps(scores + g * L + p0, (__mmask16)((1u << n) - 1), sum16(part));
    }
  }
  // pass 2: softmax over each row
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores + g * L;
    float mx = row[0];
    for (int64_t i = 1; i < L; ++i) mx = std::max(mx, row[i]);
    float sum = 0.f;
#pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < L; ++i) { row[i] = std::exp(row[i] - mx); sum += row[i]; }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) row[i] *= inv;
  }
  // pass 3: weighted sum of V, up to 16 / NV query heads per pass over V
  constexpr int GB = NV >= 16 ? 1 : 16 / NV;
  for (int64_t g0 = 0; g0 < G; g0 += GB) {
    const int64_t gn = std::min<int64_t>(GB, G - g0);
    __m512 acc[GB][NV];
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int64_t pos = 0; pos < L; ++pos) {
      const T* vr = vp + slot_of[pos] * D;
      __m512 v[NV];
      for (int j = 0; j < NV; ++j) v[j] = load16(vr + 16 * j);
      for (int g = 0; g < GB; ++g) {
        if (g >= gn) break;
        const __m512 p = _mm512_set1_ps(scores[(g0 + g) * L + pos]);
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
      }
    }
    for (int g = 0; g < GB && g < gn; ++g)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out_f + (g0 + g) * D + 16 * j, acc[g][j]);
  }
}
#endif

template <typename T>
static void decode_attention_impl(
    const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& tables,
    const torch::Tensor& lens, torch::Tensor& out, int64_t block_size, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = cache.size(1), S = cache.size(2);
  const int64_t G = H / KVH, NB = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = cache.data_ptr<T>();            // [2, KVH, S, D]
  const T* vp = kp + KVH * S * D;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), sc_buf;
    std::vector<int64_t> slot_of;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, kh = task % KVH, L = lp[b];
      sc_buf.resize(G * L);
      slot_of.resize(L);
      for (int64_t blk = 0, pos = 0; pos < L; ++blk) {
        const int64_t base = tp[b * NB + blk] * block_size;
        for (int64_t i = 0; i < block_size && pos < L; ++i, ++pos) slot_of[pos] = base + i;
      }
#ifdef TS_AVX512
      if constexpr (!std::is_same_v<T, double>) if (D == 64 || D == 128) {
        const T* qh = qp + (b * H + kh * G) * D;
        const T* kh_p = kp + kh * S * D;
        const T* vh_p = vp + kh * S * D;
        if (D == 64)
          decode_task_avx512<T, 4>(qh, kh_p, vh_p, slot_of.data(), L, G, D, sc, qf.data(),
                                   sc_buf.data(), acc.data());
        else
          decode_task_avx512<T, 8>(qh, kh_p, vh_p, slot_of.data(), L, G, D, sc, qf.data(),
                                   sc_buf.data(), acc.data());
        for (int64_t g = 0; g < G; ++g) {
          T* oh = op + (b * H + kh * G + g) * D;
          for (int64_t d = 0; d < D; ++d) oh[d] = static_cast<T>(acc[g * D + d]);
        }
        continue;
      }
#endif
      for (int64_t g = 0; g < G; ++g) {
        const T* qh = qp + (b * H + kh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(qh[d]) * sc;
      }
      // pass 1: scores [G, L]
      for (int64_t pos = 0; pos < L; ++pos) {
        const T* kr = kp + (kh * S + slot_of[pos]) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+:dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_f(kr[d]);
          sc_buf[g * L + pos] = dot;
        }
      }
      // pass 2: softmax over each row (vectorized exp)
      for (int64_t g = 0; g < G; ++g) {
        float* row = sc_buf.data() + g * L;
        float mx = row[0];
        for (int64_t i = 1; i < L; ++i) mx = std::max(mx, row[i]);
        float sum = 0.f;
#pragma omp simd reduction(+:sum)
        for (int64_t i = 0; i < L; ++i) { row[i] = std::exp(row[i] - mx); sum += row[i]; }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t i = 0; i < L; ++i) row[i] *= inv;
      }
      // pass 3: weighted sum of V
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < L; ++pos) {
        const T* vr = vp + (kh * S + slot_of[pos]) * D;
        for (int64_t g = 0; g < G; ++g) {
          float* ag = acc.data() + g * D;
          const float p = sc_buf[g * L + pos];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * to_f(vr[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* oh = op + (b * H + kh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) oh[d] = static_cast<T>(acc[g * D + d]);
      }
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor cache, torch::Tensor tables,
                                     torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.is_contiguous() && cache.is_contiguous(), "q and cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "q and cache dtypes differ");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_attention_impl<scalar_t>(q, cache, tables.contiguous(), lens.contiguous(), out,
                                    block_size, scale);
  });
  return out;
}

// ---- fused row-wise ops of a decoder layer (RMSNorm, residual add, rotary + KV write, SiLU*up).
// Each output element is rounded to the model dtype wherever the torch ops it replaces round
// (an fp32 op, then the cast), so the results match torch's to the last bit or nearly: only
// the fp32 sum of squares and exp differ in their last bits. Rows are independent.

template <typename T> static inline float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}
template <> inline float ld<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = reinterpret_cast<const uint16_t*>(p)[i];
  return __builtin_bit_cast(float, bits << 16);
}
// f rounded (to nearest even) to T's precision, as a float
template <typename T> static inline float rnd(float f) {
  return static_cast<float>(static_cast<T>(f));
}
template <> inline float rnd<float>(float f) { return f; }
template <> inline float rnd<c10::BFloat16>(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return __builtin_bit_cast(float, u);
}
// stores f, already rounded by rnd<T>
template <typename T> static inline void st(T* p, int64_t i, float f) { p[i] = static_cast<T>(f); }
template <> inline void st<c10::BFloat16>(c10::BFloat16* p, int64_t i, float f) {
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(__builtin_bit_cast(uint32_t, f) >> 16);
}

// rows per task: ~32k elements, so a decode-sized batch stays on one thread
static inline int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1));
}

// h = x + r (when r is given), n = w * rms_norm(h)
template <typename T>
static void rms_rows(const T* x, const T* r, const T* w, T* h, T* n, int64_t rows, int64_t D,
                     float eps) {
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(D);
    for (int64_t t = begin; t < end; ++t) {
      const T* xr = x + t * D;
      float ss = 0.f;
      if (r != nullptr) {
        const T* rr = r + t * D;
        T* hr = h + t * D;
#pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < D; ++j) {
          const float v = rnd<T>(ld(xr, j) + ld(rr, j));
          buf[j] = v;
          st(hr, j, v);
          ss += v * v;
        }
      } else {
#pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < D; ++j) {
          const float v = ld(xr, j);
          buf[j] = v;
          ss += v * v;
        }
      }
      const float rstd = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      T* nr = n + t * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) st(nr, j, rnd<T>(ld(w, j) * rnd<T>(buf[j] * rstd)));
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == w.scalar_type(),
              "rms_norm: contiguous x and weight of one dtype");
  auto n = torch::empty_like(x);
  const int64_t D = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, w.data_ptr<scalar_t>(), nullptr,
                       n.data_ptr<scalar_t>(), x.numel() / D, D, static_cast<float>(eps));
  });
  return n;
}

std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor r, torch::Tensor w,
                                        double eps) {
  TORCH_CHECK(x.is_contiguous() && r.is_contiguous() && w.is_contiguous() &&
              x.sizes() == r.sizes() && x.scalar_type() == r.scalar_type() &&
              x.scalar_type() == w.scalar_type(), "add_rms_norm: contiguous, same shape and dtype");
  auto h = torch::empty_like(x);
  auto n = torch::empty_like(x);
  const int64_t D = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                       h.data_ptr<scalar_t>(), n.data_ptr<scalar_t>(), x.numel() / D, D,
                       static_cast<float>(eps));
  });
  return {h, n};
}

// qkv [T, (H + 2K) * D]: rotates q (returned, [T, H, D]) and k (HF half-split convention), and
// writes k and v into cache [2, K, S, D] at slots [T].
template <typename T>
static void rope_rows(const T* qkv, const T* cs, const T* sn, const int64_t* slots, T* q, T* cache,
                      int64_t rows, int64_t H, int64_t K, int64_t D, int64_t S) {
  const int64_t W = (H + 2 * K) * D, half = D / 2;
  at::parallel_for(0, rows, row_grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = qkv + t * W;
      const T* c = cs + t * D;
      const T* s = sn + t * D;
      const int64_t slot = slots[t];
      for (int64_t hd = 0; hd < H + K; ++hd) {
        const T* x = row + hd * D;
        T* o = hd < H ? q + (t * H + hd) * D : cache + ((hd - H) * S + slot) * D;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j)
          st(o, j, rnd<T>(rnd<T>(ld(x, j) * ld(c, j)) + rnd<T>(-ld(x, j + half) * ld(s, j))));
#pragma omp simd
        for (int64_t j = half; j < D; ++j)
          st(o, j, rnd<T>(rnd<T>(ld(x, j) * ld(c, j)) + rnd<T>(ld(x, j - half) * ld(s, j))));
      }
      for (int64_t kv = 0; kv < K; ++kv)
        std::memcpy(cache + ((K + kv) * S + slot) * D, row + (H + K + kv) * D, D * sizeof(T));
    }
  });
}

torch::Tensor rope_write_kv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor cache, torch::Tensor slots, int64_t H, int64_t K) {
  const int64_t D = cache.size(3), rows = qkv.size(0);
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
              cache.is_contiguous() && slots.is_contiguous(), "rope_write_kv: contiguous inputs");
  TORCH_CHECK(qkv.numel() == rows * (H + 2 * K) * D && cos.numel() == rows * D &&
              sin.numel() == rows * D && slots.numel() == rows && D % 2 == 0,
              "rope_write_kv: shapes");
  TORCH_CHECK(qkv.scalar_type() == cache.scalar_type() && cos.scalar_type() == qkv.scalar_type() &&
              sin.scalar_type() == qkv.scalar_type() && slots.scalar_type() == at::kLong,
              "rope_write_kv: dtypes");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t)  // a bad slot must raise, not write past the cache
    TORCH_CHECK(sp[t] >= 0 && sp[t] < cache.size(2), "rope_write_kv: slot out of range");
  auto q = torch::empty({rows, H, D}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_kv", [&] {
    rope_rows<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                        sin.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
                        q.data_ptr<scalar_t>(), cache.data_ptr<scalar_t>(), rows, H, K, D,
                        cache.size(2));
  });
  return q;
}

// gate_up [T, 2I] -> silu(gate) * up [T, I]
template <typename T>
static void silu_rows(const T* gu, T* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, row_grain(2 * I), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(I);
    for (int64_t t = begin; t < end; ++t) {
      const T* g = gu + t * 2 * I;
      const T* u = g + I;
      T* o = out + t * I;
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) buf[j] = std::exp(-ld(g, j));
#pragma omp simd
      for (int64_t j = 0; j < I; ++j)
        st(o, j, rnd<T>(rnd<T>(ld(g, j) / (1.f + buf[j])) * ld(u, j)));
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.is_contiguous() && gu.size(-1) % 2 == 0, "silu_mul: contiguous [T, 2I]");
  const int64_t I = gu.size(-1) / 2, rows = gu.numel() / (2 * I);
  auto out = torch::empty({rows, I}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_mul", [&] {
    silu_rows<scalar_t>(gu.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, I);
  });
  return out;
}

// argmax of each row of [N, V] logits (the first index of the maximum, as torch.argmax), read
// in the model dtype: greedy decoding then needs no float32 copy of the logits.
template <typename T>
static void argmax_rows_impl(const T* x, int64_t* out, int64_t rows, int64_t V) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = x + t * V;
      float mx = ld(row, 0);
#pragma omp simd reduction(max:mx)
      for (int64_t j = 1; j < V; ++j) mx = std::max(mx, ld(row, j));
      int64_t idx = 0;
      for (int64_t j = 0; j < V; ++j)
        if (ld(row, j) == mx) { idx = j; break; }
      out[t] = idx;
    }
  });
}

torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.size(1) > 0, "argmax_rows: contiguous [N, V]");
  auto out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "argmax_rows", [&] {
    argmax_rows_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), x.size(0),
                               x.size(1));
  });
  return out;
}
"""

_lock = threading.Lock()
_module = None
_tried = False


def load():
    """The compiled module, or None when disabled or unbuildable (the caller falls back)."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("TIDESERVE_CPU_KERNELS", "1") == "0":
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            _module = load_inline(
                name="tideserve_cpu_kernels_v12",
                cpp_sources=[_SOURCE],
                functions=[
                    "paged_decode_attention",
                    "rms_norm",
                    "add_rms_norm",
                    "rope_write_kv",
                    "silu_mul",
                    "argmax_rows",
                ],
                # NOTE: -ffast-math lets the exp loop use glibc's vector exp (libmvec); the
                # kernel keeps no infinities or NaNs in flight, which fast-math assumes away.
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                extra_ldflags=["-lmvec", "-fopenmp"],
                verbose=False,
            )
        except Exception as e:  # a missing compiler or ninja: the torch path still works
            log.warning("CPU attention kernel unavailable (%s); using the torch path", e)
            _module = None
        return _module
