// bf16 weights in their own (N, K) row-major layout (a bf16 `nn.Linear`'s weight, or a tied embedding, read in place:
// no second copy of any weight): out (M x 64) = x (M x K, fp32) times rows n0..n0+nn (nn <= 64) of W, fp32 sums.
//
// Each weight row is a contiguous stream; R rows are walked together, 2W values at a time: one load of W 32-bit lanes
// gives the even values (a 16-bit shift) and the odd ones (a mask) as fp32, exactly, against the activations split
// into even and odd lanes once per step; up to 4 activation rows share every weight load; one horizontal sum per
// output. Each sweep prefetches the next sweep's rows into L2 (every row restarts the hardware prefetchers).
// AVX-512-BF16 builds instead round the activations to bf16 (`bf16_dot_mode`, on by default) and take the products
// of each (even, odd) pair with one instruction (vdpbf16ps), fp32 sums.
// More activation rows run in blocks of 4 over the same R weight rows (still in L1/L2). The same source serves
// AVX-512, AVX2, SSE, NEON and portable builds (vector extensions only). Also: bf16 <-> fp32 scalars.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

#include "vec.h"

typedef unsigned short vh __attribute__((vector_size(W * 2)));
typedef unsigned short vhu __attribute__((vector_size(W * 2), aligned(2)));
typedef unsigned int vw __attribute__((vector_size(W * 4)));

static inline float bf16_to_f(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even (NaN stays NaN).
static inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// W consecutive bf16 values widened to fp32.
static inline vf widen_bf16(const uint16_t* p) {
  const vh h = *(const vhu*)p;
  return (vf)(__builtin_convertvector(h, vw) << 16);
}

// 2W consecutive bf16 values as two fp32 vectors without widening: one 32-bit lane holds an (even, odd) pair, so
// `u << 16` is the even values and `u & 0xffff0000` the odd ones (little-endian), exactly.
typedef unsigned int vwu __attribute__((vector_size(W * 4), aligned(2)));
static inline void split_bf16(const uint16_t* p, vf& even, vf& odd) {
  const vw u = *(const vwu*)p;
  even = (vf)(u << 16);
  odd = (vf)(u & 0xffff0000u);
}

// x[0..2W) deinterleaved: even = x[0], x[2], ..., odd = x[1], x[3], ... (to meet `split_bf16`'s halves).
static inline void split_f32(const float* p, vf& even, vf& odd) {
  const vf a = ld(p), b = ld(p + W);
#if defined(__AVX512F__)
#define NOMOAT_EVEN 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define NOMOAT_ODD 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#elif defined(__AVX__)
#define NOMOAT_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define NOMOAT_ODD 1, 3, 5, 7, 9, 11, 13, 15
#else
#define NOMOAT_EVEN 0, 2, 4, 6
#define NOMOAT_ODD 1, 3, 5, 7
#endif
#if defined(__clang__)
  even = __builtin_shufflevector(a, b, NOMOAT_EVEN);
  odd = __builtin_shufflevector(a, b, NOMOAT_ODD);
#else
  even = __builtin_shuffle(a, b, vi{NOMOAT_EVEN});
  odd = __builtin_shuffle(a, b, vi{NOMOAT_ODD});
#endif
#undef NOMOAT_EVEN
#undef NOMOAT_ODD
}

// Whether rows_any_bf16 rounds activations to bf16 and takes hardware bf16 dot products (the precision of the bf16
// model's own torch layers): 1 by default in AVX-512-BF16 builds (`NOMOAT_BF16_DOT=0` in the environment: 0), always
// 0 elsewhere; one setting for the process, changed by the `bf16_dot` op.
#if defined(__AVX512BF16__)
constexpr bool HAS_BF16_DOT = true;
#else
constexpr bool HAS_BF16_DOT = false;
#endif
static inline int bf16_dot_default() {
  const char* env = std::getenv("NOMOAT_BF16_DOT");
  return HAS_BF16_DOT && !(env != nullptr && env[0] == '0') ? 1 : 0;
}
inline std::atomic<int> bf16_dot_mode{bf16_dot_default()};

// Read-ahead of weight rows into L2 (each row is its own stream: the hardware prefetchers restart at every row).
static inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// Weight rows walked together for M activation rows: M*R accumulators + R weight vectors + 2M activation vectors fit.
template <int M>
constexpr int rows_per_sweep() {
  return (M * 8 + 8 + 2 * M <= NREG) ? 8 : (M * 4 + 4 + 2 * M <= NREG) ? 4 : (M * 2 + 2 + 2 * M <= NREG) ? 2 : 1;
}

// out[m * 64 + r] = x[m] . W[r] for M activation rows and R weight rows (row stride K), 2W values of each row per
// step (`split_bf16`). Each step also prefetches the same offset of row r + `ahead` (the next sweep's rows; 0: none).
// DOT: the activations rounded to bf16 (to nearest even) and hardware bf16 dot products of pairs, fp32 sums.
// xb (DOT, M = 1): x already rounded to bf16 (`round_bf16`), read instead of rounding x at every step.
template <int M, int R, bool DOT>
static inline void rows_sweep(const float* x, int64_t ldx, const uint16_t* w, int64_t K, int64_t ahead, float* out,
                              const uint16_t* xb = nullptr) {
  vf acc[M][R];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = vf{};
  const int64_t pf = ahead * K;
  int64_t k = 0;
  for (; k + 2 * W <= K; k += 2 * W) {
#if defined(__AVX512BF16__)
    if constexpr (DOT) {
      __m512bh wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        prefetch_l2(w + r * K + k + pf);
        wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * ldx + k;
        const __m512bh xv = M == 1 && xb != nullptr ? (__m512bh)_mm512_loadu_si512(xb + k)
                                                    : _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xm + W), _mm512_loadu_ps(xm));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[m][r] = (vf)_mm512_dpbf16_ps((__m512)acc[m][r], xv, wv[r]);
      }
      continue;
    }
#endif
    vf we[R], wo[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      prefetch_l2(w + r * K + k + pf);
      split_bf16(w + r * K + k, we[r], wo[r]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      vf xe, xo;
      split_f32(x + m * ldx + k, xe, xo);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[m][r] += xe * we[r];  // two fused multiply-adds
        acc[m][r] += xo * wo[r];
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = k; t < K; ++t) {
        const float xt = DOT ? bf16_to_f(f_to_bf16(x[m * ldx + t])) : x[m * ldx + t];
        s += xt * bf16_to_f(w[r * K + t]);
      }
      out[m * 64 + r] = s;
    }
}

// Rows 0..nn-1 of w for M activation rows; `more`: rows nn.. exist and this call is the first over these weight rows
// (so the last sweep reads them ahead too).
template <int M, bool DOT>
static void rows_block(const float* x, int64_t ldx, const uint16_t* w, int64_t K, int nn, bool first, bool more,
                       float* out) {
  constexpr int R = rows_per_sweep<M>();
  int r = 0;
  for (; r + R <= nn; r += R) {
    const int64_t ahead = !first ? 0 : (r + 2 * R <= nn || more) ? R : 0;
    rows_sweep<M, R, DOT>(x, ldx, w + r * K, K, ahead, out + r);
  }
  for (; r < nn; ++r) rows_sweep<M, 1, DOT>(x, ldx, w + r * K, K, 0, out + r);
}

#if defined(__AVX512BF16__)
// x (K values) rounded to bf16 (to nearest even, as vcvtne2ps2bf16 rounds it) into xb.
static inline void round_bf16(const float* x, int64_t K, uint16_t* xb) {
  int64_t k = 0;
  for (; k + 2 * W <= K; k += 2 * W)
    _mm512_storeu_si512(xb + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + W), _mm512_loadu_ps(x + k)));
  for (; k < K; ++k) xb[k] = f_to_bf16(x[k]);
}

// One bf16 activation row xb . w (K values) in four sums, 128 values a step; PF: also asks for the line 2 KiB ahead
// of each line read into L2 (the next row's when this one ends: a unit's rows are one contiguous stream).
template <bool PF>
static inline float row_dot_bf16(const uint16_t* xb, const uint16_t* w, int64_t K) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 8 * W <= K; k += 8 * W) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (PF) prefetch_l2(w + k + 2 * W * j + 1024);
      a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)_mm512_loadu_si512(xb + k + 2 * W * j),
                              (__m512bh)_mm512_loadu_si512(w + k + 2 * W * j));
    }
  }
  for (; k + 2 * W <= K; k += 2 * W)
    a[0] = _mm512_dpbf16_ps(a[0], (__m512bh)_mm512_loadu_si512(xb + k), (__m512bh)_mm512_loadu_si512(w + k));
  float s = hsum((vf)_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  for (; k < K; ++k) s += bf16_to_f(xb[k]) * bf16_to_f(w[k]);
  return s;
}

// One activation row (batch-1 decode) with bf16 dot products: x rounded to bf16 once; rows of up to 4096 values are
// read one after another (one stream; none read ahead past row nn), longer ones 8 at a time (`rows_block`), where
// the activations outgrow what L1 keeps beside the stream. Measured on one Zen 4 core (2048-value rows, huge pages):
// 34 GB/s one row at a time against 29 GB/s for 8-row sweeps rounding x at every step (8192 values: 32 against 29).
static inline void rows1_bf16_dot(const float* x, const uint16_t* w, int64_t K, int nn, float* out) {
  thread_local std::vector<uint16_t> xb;
  if ((int64_t)xb.size() < K) xb.resize(K);
  round_bf16(x, K, xb.data());
  if (K <= 4096) {
    for (int r = 0; r < nn; ++r)  // read ahead while it stays within the rows
      out[r] = (int64_t)(nn - 1 - r) * K >= 1024 ? row_dot_bf16<true>(xb.data(), w + r * K, K)
                                                 : row_dot_bf16<false>(xb.data(), w + r * K, K);
    return;
  }
  constexpr int R = rows_per_sweep<1>();
  int r = 0;
  for (; r + R <= nn; r += R)
    rows_sweep<1, R, true>(x, 0, w + r * K, K, r + 2 * R <= nn ? R : 0, out + r, xb.data());
  for (; r < nn; ++r) rows_sweep<1, 1, true>(x, 0, w + r * K, K, 0, out + r, xb.data());
}
#endif

template <bool DOT>
static inline void rows_any_bf16_as(int m, const float* x, int64_t ldx, const uint16_t* w, int64_t K, int nn,
                                    float* out) {
  for (int r0 = 0; r0 < nn; r0 += 8) {
    const int rn = std::min(8, nn - r0);
    const bool more = r0 + 8 < nn;
    for (int m0 = 0; m0 < m; m0 += 4) {
      const float* xm = x + m0 * ldx;
      float* om = out + m0 * 64 + r0;
      const uint16_t* wr = w + r0 * K;
      const bool first = m0 == 0;
      switch (std::min(4, m - m0)) {
        case 1: rows_block<1, DOT>(xm, ldx, wr, K, rn, first, more, om); break;
        case 2: rows_block<2, DOT>(xm, ldx, wr, K, rn, first, more, om); break;
        case 3: rows_block<3, DOT>(xm, ldx, wr, K, rn, first, more, om); break;
        default: rows_block<4, DOT>(xm, ldx, wr, K, rn, first, more, om); break;
      }
    }
  }
}

// out (m x 64, row stride 64) for any m >= 1: columns 0..nn-1 = x (m x K) times rows 0..nn-1 of w (row stride K).
// Weight rows go 8 at a time, every block of 4 activation rows over them before the next 8 (so they stay in L1/L2);
// the first block reads the next 8 rows ahead (none past row nn: the caller's next unit may be another thread's).
// Exact fp32 activations, or bf16 dot products where `bf16_dot_mode` is set (and the build has them).
static inline void rows_any_bf16(int m, const float* x, int64_t ldx, const uint16_t* w, int64_t K, int nn,
                                 float* out) {
#if defined(__AVX512BF16__)
  if (m == 1 && nn > 0 && bf16_dot_mode.load(std::memory_order_relaxed) != 0) return rows1_bf16_dot(x, w, K, nn, out);
#endif
  if (HAS_BF16_DOT && bf16_dot_mode.load(std::memory_order_relaxed) != 0)
    rows_any_bf16_as<HAS_BF16_DOT>(m, x, ldx, w, K, nn, out);
  else
    rows_any_bf16_as<false>(m, x, ldx, w, K, nn, out);
}
