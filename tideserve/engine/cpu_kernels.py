"""A fused paged-attention decode kernel for the CPU, compiled once per machine on first use.

The torch path gathers every decode's KV blocks into a padded batch, then runs two bmm calls:
the KV bytes cross memory three times and short sequences pay for the longest one's padding.
This kernel walks each sequence's block table in place: one pass over its K and V per
(sequence, kv head), an online softmax, the query heads of a GQA group sharing each K/V read.
Each sequence is computed on its own, so results do not depend on the batch.

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
#include <vector>

template <typename T>
static inline float to_f(T x) { return static_cast<float>(x); }

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
                name="tideserve_cpu_kernels_v3",
                cpp_sources=[_SOURCE],
                functions=["paged_decode_attention"],
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
