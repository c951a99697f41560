// Kernels of x W^T over 4-bit weights in blocks of 32 input channels (GGUF's Q4_0 and Q4_1), for any number of
// rows: activations are quantized to int8 per block of 32 (llama.cpp's Q8 activations), and each block's dot
// products run on integers (AVX-512-VNNI `vpdpbusd`, or AVX-512BW / AVX2 `vpmaddubsw` + `vpmaddwd`), scaled to fp32
// once per block.
//
// Weight layout ("q4 panels", uint8 (P, K / 32, BB)): panels of 64 consecutive output channels (N padded with zero
// rows), each a run of K / 32 blocks of BB bytes, one block per 32 input channels:
//   1024 bytes of codes: for kk in 0..3 (8 input channels each), for o in 0..63, for j in 0..3: the byte
//     code[o][8 kk + j] | code[o][8 kk + 4 + j] << 4  (at kk * 256 + o * 4 + j);
//   128 bytes: the 64 fp16 scales d[o];  Q4_1 only: 128 bytes: the 64 fp16 minimums m[o].
// Q4_0: w = d (code - 8); Q4_1: w = d code + m (BB = 1152 or 1280). One 32-bit lane of a vector thus holds four
// input channels of one output channel, so a broadcast of four activation bytes multiplies all the lanes at once:
// no horizontal sums, and the panel streams once per call (row blocks of 8 reread it from L2).
//
// Shared by linear_q4 (q4.cpp) and the decode stack (decode_stack.cpp): quantize activation blocks (`Q4Rows`), then
// `q4_panel` per panel of 64 output channels. Everything lives in namespace `q4k`.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace q4k {


constexpr int QK = 32, QP = 64, CODE_BYTES = QP * QK / 2, QROWS = 8;

// The largest 16-bit activation code: v = 256 hi + lo with both digits int8 (lo in -128..127) needs
// |v| <= 127 * 256 + 127.
constexpr int Q16_MAX = 32639;

// One block of 32 activations to codes v = round(x / d): int8 ones in q (d = max |x| / 127, llama.cpp's Q8
// activations) or, given `lo`, 16-bit ones (d = max |x| / Q16_MAX) as two int8 digits v = 256 q + lo, so that byte
// dot-product instructions multiply them in two passes (int8_dot.h: int8 weights times 16-bit activations, whose
// rounding error is 1/257 of int8 activations'). Returns d; *s = sum of v.
static inline float quantize_block(const float* xs, int8_t* q, int32_t* s, int8_t* lo = nullptr) {
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xs[j]));
  const float d = amax / (lo != nullptr ? (float)Q16_MAX : 127.f), id = d != 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int j = 0; j < QK; ++j) {
    const int v = (int)std::nearbyint(xs[j] * id);  // round half to even, as torch.round
    if (lo != nullptr) {
      const int l = ((v + 128) & 255) - 128;
      lo[j] = (int8_t)l;
      q[j] = (int8_t)((v - l) / 256);
    } else {
      q[j] = (int8_t)v;
    }
    sum += v;
  }
  *s = sum;
  return d;
}

// Rows of activations quantized per block: xq (M x K) int8, dx and sq (M x K / 32) per block scale and code sum.
// With `xl` (int8 weights only): 16-bit codes, xq their high digits and xl their low ones (`quantize_block`).
struct Q4Rows {
  const int8_t* xq = nullptr;
  const float* dx = nullptr;
  const int32_t* sq = nullptr;
  int64_t K = 0;
  const int8_t* xl = nullptr;
  Q4Rows rows(int64_t m0) const {
    return xq == nullptr ? *this
                         : Q4Rows{xq + m0 * K, dx + m0 * (K / QK), sq + m0 * (K / QK), K, xl ? xl + m0 * K : nullptr};
  }
};

// Quantizes blocks [b0, b1) of row m of x (row stride ldx) into the row-major buffers of `q` (K = its row width):
// int8 codes, or 16-bit ones where q.xl is set.
static inline void quantize_blocks(const float* x, int64_t ldx, int64_t m, int64_t b0, int64_t b1, const Q4Rows& q) {
  const int64_t K = q.K, nb = K / QK;
  int8_t *xq = (int8_t*)q.xq, *xl = (int8_t*)q.xl;
  float* dx = (float*)q.dx;
  int32_t* sq = (int32_t*)q.sq;
  for (int64_t b = b0; b < b1; ++b) {
    int8_t* lo = xl != nullptr ? xl + m * K + b * QK : nullptr;
    dx[m * nb + b] = quantize_block(x + m * ldx + b * QK, xq + m * K + b * QK, sq + m * nb + b, lo);
  }
}

#if defined(__AVX512BW__) || defined(__AVX2__)
#if defined(__AVX512BW__)
typedef __m512i vq;
constexpr int QV = 16;  // output channels per integer vector
static inline vq q_load(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
static inline vq q_lo(vq v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
static inline vq q_hi(vq v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15)); }
static inline vq q_bcast(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
static inline vq q_zero() { return _mm512_setzero_si512(); }
// acc + sum over each lane's 4 bytes of w (unsigned, 0..15) times x (signed)
static inline vq q_dot(vq acc, vq w, vq x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
#endif
}
static inline __m512 q_float(vq v, int32_t sub) { return _mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(sub))); }
static inline __m512 q_half(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
typedef __m512 vqf;
static inline vqf f_zero() { return _mm512_setzero_ps(); }
static inline vqf f_fma(vqf a, vqf b, vqf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vqf f_mul(vqf a, float s) { return _mm512_mul_ps(a, _mm512_set1_ps(s)); }
static inline vqf f_set(float s) { return _mm512_set1_ps(s); }
static inline void f_store(float* p, vqf v) { _mm512_storeu_ps(p, v); }
constexpr int QREG = 32;
#else
typedef __m256i vq;
constexpr int QV = 8;
static inline vq q_load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline vq q_lo(vq v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
static inline vq q_hi(vq v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
static inline vq q_bcast(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
static inline vq q_zero() { return _mm256_setzero_si256(); }
static inline vq q_dot(vq acc, vq w, vq x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
static inline __m256 q_float(vq v, int32_t sub) { return _mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(sub))); }
static inline __m256 q_half(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
typedef __m256 vqf;
static inline vqf f_zero() { return _mm256_setzero_ps(); }
static inline vqf f_fma(vqf a, vqf b, vqf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vqf f_mul(vqf a, float s) { return _mm256_mul_ps(a, _mm256_set1_ps(s)); }
static inline vqf f_set(float s) { return _mm256_set1_ps(s); }
static inline void f_store(float* p, vqf v) { _mm256_storeu_ps(p, v); }
constexpr int QREG = 16;
#endif
constexpr int QNV = QP / QV;  // integer vectors per panel row

// out[m][c0 * QV .. (c0 + C) * QV) for M rows over all blocks of one panel.
template <bool ASYM, int M, int C>
static void sweep_q4(const int8_t* xq, int64_t K, const float* dx, const int32_t* sq, int64_t nb, const uint8_t* w,
              int64_t BB, int c0, float* out) {
  vqf acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = f_zero();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * BB;
    vq ai[M][C];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < C; ++c) ai[m][c] = q_zero();
#pragma GCC unroll 4
    for (int kk = 0; kk < 4; ++kk) {
      vq lo[C], hi[C];
      for (int c = 0; c < C; ++c) {
        const vq v = q_load(blk + kk * 256 + (c0 + c) * QV * 4);
        lo[c] = q_lo(v);
        hi[c] = q_hi(v);
      }
      for (int m = 0; m < M; ++m) {
        const int8_t* xs = xq + m * K + b * QK + kk * 8;
        const vq x0 = q_bcast(xs), x1 = q_bcast(xs + 4);
        for (int c = 0; c < C; ++c) ai[m][c] = q_dot(q_dot(ai[m][c], lo[c], x0), hi[c], x1);
      }
    }
    for (int c = 0; c < C; ++c) {
      const vqf d = q_half(blk + CODE_BYTES + (c0 + c) * QV * 2);
      vqf mn;
      if constexpr (ASYM) mn = q_half(blk + CODE_BYTES + 2 * QP + (c0 + c) * QV * 2);
      for (int m = 0; m < M; ++m) {
        const float xd = dx[m * nb + b];
        // Q4_0: sum (code - 8) x = sum code x - 8 sum x, exact in integers
        acc[m][c] = f_fma(q_float(ai[m][c], ASYM ? 0 : 8 * sq[m * nb + b]), f_mul(d, xd), acc[m][c]);
        if constexpr (ASYM) acc[m][c] = f_fma(mn, f_set(xd * (float)sq[m * nb + b]), acc[m][c]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) f_store(out + m * QP + (c0 + c) * QV, acc[m][c]);
}

template <int M>
constexpr int cols_q4() {
  return (2 * M * QNV + 2 * QNV + 4 <= QREG) ? QNV : (2 * M * (QNV / 2) + QNV + 4 <= QREG) ? QNV / 2
       : (2 * M * (QNV / 4) + QNV / 2 + 4 <= QREG) ? QNV / 4 : 1;
}

template <bool ASYM, int M>
static void panel_rows_q4(const int8_t* xq, int64_t K, const float* dx, const int32_t* sq, int64_t nb, const uint8_t* w,
                   int64_t BB, float* out) {
  if constexpr (M > 4) {
    panel_rows_q4<ASYM, 4>(xq, K, dx, sq, nb, w, BB, out);
    panel_rows_q4<ASYM, M - 4>(xq + 4 * K, K, dx + 4 * nb, sq + 4 * nb, nb, w, BB, out + 4 * QP);
  } else {
    constexpr int C = cols_q4<M>();
    for (int c0 = 0; c0 < QNV; c0 += C) sweep_q4<ASYM, M, C>(xq, K, dx, sq, nb, w, BB, c0, out);
  }
}
#endif

// Any ISA: plain integer loops over the same layout.
template <bool ASYM>
static void panel_portable(int M, const int8_t* xq, int64_t K, const float* dx, const int32_t* sq, int64_t nb,
                    const uint8_t* w, int64_t BB, float* out) {
  for (int m = 0; m < M; ++m)
    for (int o = 0; o < QP; ++o) out[m * QP + o] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * BB;
    for (int m = 0; m < M; ++m) {
      const int8_t* xs = xq + m * K + b * QK;
      const float xd = dx[m * nb + b];
      const int32_t s = sq[m * nb + b];
      for (int o = 0; o < QP; ++o) {
        int32_t acc = 0;
        for (int kk = 0; kk < 4; ++kk)
          for (int j = 0; j < 4; ++j) {
            const uint8_t v = blk[kk * 256 + o * 4 + j];
            acc += (v & 15) * xs[kk * 8 + j] + (v >> 4) * xs[kk * 8 + 4 + j];
          }
        at::Half d, mn;
        std::memcpy(&d, blk + CODE_BYTES + 2 * o, 2);
        float r = (float)(ASYM ? acc : acc - 8 * s) * ((float)d * xd);
        if (ASYM) {
          std::memcpy(&mn, blk + CODE_BYTES + 2 * QP + 2 * o, 2);
          r += (float)mn * (xd * (float)s);
        }
        out[m * QP + o] += r;
      }
    }
  }
}

template <bool ASYM>
static void panel_q4(int M, const int8_t* xq, int64_t K, const float* dx, const int32_t* sq, int64_t nb, const uint8_t* w,
              int64_t BB, float* out) {
#if defined(__AVX512BW__) || defined(__AVX2__)
  switch (M) {
    case 1: panel_rows_q4<ASYM, 1>(xq, K, dx, sq, nb, w, BB, out); return;
    case 2: panel_rows_q4<ASYM, 2>(xq, K, dx, sq, nb, w, BB, out); return;
    case 3: panel_rows_q4<ASYM, 3>(xq, K, dx, sq, nb, w, BB, out); return;
    case 4: panel_rows_q4<ASYM, 4>(xq, K, dx, sq, nb, w, BB, out); return;
    case 5: panel_rows_q4<ASYM, 5>(xq, K, dx, sq, nb, w, BB, out); return;
    case 6: panel_rows_q4<ASYM, 6>(xq, K, dx, sq, nb, w, BB, out); return;
    case 7: panel_rows_q4<ASYM, 7>(xq, K, dx, sq, nb, w, BB, out); return;
    default: panel_rows_q4<ASYM, 8>(xq, K, dx, sq, nb, w, BB, out); return;
  }
#else
  panel_portable<ASYM>(M, xq, K, dx, sq, nb, w, BB, out);
#endif
}


// out (M x 64) = rows of x times one q4 panel (`BB` bytes per block: 1152 Q4_0, 1280 Q4_1), for M = 1..8 rows.
static inline void q4_panel(const Q4Rows& x, int M, const uint8_t* w, int64_t BB, float* out) {
  const int64_t nb = x.K / QK;
  if (BB == CODE_BYTES + 4 * QP) panel_q4<true>(M, x.xq, x.K, x.dx, x.sq, nb, w, BB, out);
  else panel_q4<false>(M, x.xq, x.K, x.dx, x.sq, nb, w, BB, out);
}

}  // namespace q4k
