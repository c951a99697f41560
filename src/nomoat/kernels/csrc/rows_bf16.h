// bf16 weights in their own (N, K) row-major layout (a bf16 `nn.Linear`'s weight, or a tied embedding, read in place:
// no second copy of any weight): out (M x 64) = x (M x K, fp32) times rows n0..n0+nn (nn <= 64) of W, fp32 sums.
//
// Each weight row is a contiguous stream; R rows are walked together, W lanes at a time (each lane widened from bf16
// to fp32 by a 16-bit shift), for up to 4 activation rows sharing every weight load; one horizontal sum per output.
// More activation rows run in blocks of 4 over the same R weight rows (still in L1/L2). The same source serves
// AVX-512, AVX2, SSE, NEON and portable builds (vector extensions only). Also: bf16 <-> fp32 scalars.
#pragma once

#include <algorithm>

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

// Weight rows walked together for M activation rows: M*R accumulators + R weight vectors + 1 activation vector fit.
template <int M>
constexpr int rows_per_sweep() {
  return (M * 8 + 8 + 1 <= NREG) ? 8 : (M * 4 + 4 + 1 <= NREG) ? 4 : (M * 2 + 2 + 1 <= NREG) ? 2 : 1;
}

// out[m * PANEL + r] = x[m] . W[r] for M activation rows and R weight rows (row stride K).
template <int M, int R>
static inline void rows_sweep(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
  vf acc[M][R];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = vf{};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = widen_bf16(w + r * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const vf xv = ld(x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += x[m * ldx + t] * bf16_to_f(w[r * K + t]);
      out[m * 64 + r] = s;
    }
}

template <int M>
static void rows_block(const float* x, int64_t ldx, const uint16_t* w, int64_t K, int nn, float* out) {
  constexpr int R = rows_per_sweep<M>();
  int r = 0;
  for (; r + R <= nn; r += R) rows_sweep<M, R>(x, ldx, w + r * K, K, out + r);
  for (; r < nn; ++r) rows_sweep<M, 1>(x, ldx, w + r * K, K, out + r);
}

// out (m x 64, row stride 64) for any m >= 1: columns 0..nn-1 = x (m x K) times rows 0..nn-1 of w (row stride K).
// Weight rows go 8 at a time, every block of 4 activation rows over them before the next 8 (so they stay in L1/L2).
static inline void rows_any_bf16(int m, const float* x, int64_t ldx, const uint16_t* w, int64_t K, int nn,
                                 float* out) {
  for (int r0 = 0; r0 < nn; r0 += 8) {
    const int rn = std::min(8, nn - r0);
    for (int m0 = 0; m0 < m; m0 += 4) {
      const float* xm = x + m0 * ldx;
      float* om = out + m0 * 64 + r0;
      const uint16_t* wr = w + r0 * K;
      switch (std::min(4, m - m0)) {
        case 1: rows_block<1>(xm, ldx, wr, K, rn, om); break;
        case 2: rows_block<2>(xm, ldx, wr, K, rn, om); break;
        case 3: rows_block<3>(xm, ldx, wr, K, rn, om); break;
        default: rows_block<4>(xm, ldx, wr, K, rn, om); break;
      }
    }
  }
}
