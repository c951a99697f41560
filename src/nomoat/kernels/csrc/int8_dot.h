// int8 panels (gemv.h's layout: (P, K, 64) int8 codes with fp16 scales per block of 32 input channels per output
// channel, GGUF Q8_0's w = d[n, b] * q) against activations rounded per block of 32 input channels (q4k::Q4Rows), with
// integer dot products: AVX-512-VNNI `vpdpbusd` adds four byte products per 32-bit lane in one instruction.
//
// Two roundings of the activations (`i8_dot_mode`): mode 1 rounds them to int8 (llama.cpp's q8_0 activations, as the
// 4-bit kernels take them: this is llama.cpp's q8_0 x q8_0 arithmetic); mode 2, the default, to 16-bit codes
// (q4k::quantize_block), each split into two int8 digits v = 256 hi + lo, and takes one `vpdpbusd` per digit: the
// block's integer sum (256 S_hi + S_lo) is the exact product of the weight codes and the 16-bit codes (at most
// 32 * 255 * 32639 in magnitude: no overflow). Mode 2's activation rounding error is 1/257 of mode 1's, so its
// perplexity loss is the weights' alone (measured in benchmarks/bench_quality.py: below llama.cpp's q8_0, whose
// activations are int8); the second `vpdpbusd` shares the weight loads and unpacks, so at a few rows, where the
// weights' streaming from memory bounds the product, it costs about nothing (about 1.4x the compute at many rows).
//
// The panel is k-major (64 channels per k), while `vpdpbusd` wants four consecutive k of one channel in a lane: four
// k rows (4 x 64 bytes) are interleaved in registers by two rounds of byte and word unpacks into four vectors whose
// lane 4 L + q (L: the 128-bit lane) holds channel 16 L + 4 i + q of vector i; the block scales are stored in that
// order (`i8_scale_pos`), so each block's weight scales are four vector loads, and the lane order is undone once per
// panel. `vpdpbusd` multiplies unsigned by signed bytes: the codes are offset by 128 (an XOR of the sign bit), and
// 128 times the block's sum of activation codes (`sq`) is taken off each block's integer sum, exactly. Each block's
// sum is scaled by the product of the block's activation scale and its weight scales, in fp32.
//
// `NOMOAT_I8_DOT` (0, 1 or 2; or the `i8_dot` op, `i8_dot_mode`) sets the mode; mode 0, which builds without VNNI
// always take, is the exact path of fp32 activations and widened weights (gemv.h). Only inputs of a multiple of 32
// channels take the integer path.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "gemv.h"
#include "q4_rows.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool HAS_I8_DOT = true;
#else
constexpr bool HAS_I8_DOT = false;
#endif

static inline int i8_dot_default() {
  const char* env = std::getenv("NOMOAT_I8_DOT");
  const int asked = env != nullptr && (env[0] == '0' || env[0] == '1') ? env[0] - '0' : 2;
  return HAS_I8_DOT ? asked : 0;
}
// How int8 panels take their activations (see the top of this file): one setting for the process.
inline std::atomic<int> i8_dot_mode{i8_dot_default()};

// Whether an int8 projection of K input channels takes the integer path now.
static inline bool i8_dot_on(int64_t K) {
  return HAS_I8_DOT && K % q4k::QK == 0 && i8_dot_mode.load(std::memory_order_relaxed) != 0;
}
// Whether the integer path rounds activations to 16-bit codes (mode 2) rather than int8.
static inline bool i8_dot_16() { return HAS_I8_DOT && i8_dot_mode.load(std::memory_order_relaxed) == 2; }

namespace i8k {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Four k rows of a panel (p: row k, 64 bytes each) as four vectors of (k, k+1, k+2, k+3) byte quads, offset by 128.
static inline void quads(const int8_t* p, __m512i v[4]) {
  const __m512i r0 = _mm512_loadu_si512((const void*)p), r1 = _mm512_loadu_si512((const void*)(p + PANEL));
  const __m512i r2 = _mm512_loadu_si512((const void*)(p + 2 * PANEL));
  const __m512i r3 = _mm512_loadu_si512((const void*)(p + 3 * PANEL));
  const __m512i a = _mm512_unpacklo_epi8(r0, r1), b = _mm512_unpackhi_epi8(r0, r1);
  const __m512i c = _mm512_unpacklo_epi8(r2, r3), d = _mm512_unpackhi_epi8(r2, r3);
  const __m512i off = _mm512_set1_epi8((char)0x80);
  v[0] = _mm512_xor_si512(_mm512_unpacklo_epi16(a, c), off);
  v[1] = _mm512_xor_si512(_mm512_unpackhi_epi16(a, c), off);
  v[2] = _mm512_xor_si512(_mm512_unpacklo_epi16(b, d), off);
  v[3] = _mm512_xor_si512(_mm512_unpackhi_epi16(b, d), off);
}

// out (M x 64) = M rows of quantized activations times one int8 panel with block scales `ds` (nb, 64); X2: 16-bit
// activation codes in two digits (x.xq high, x.xl low).
template <int M, bool X2>
static void panel_rows(const q4k::Q4Rows& x, const int8_t* w, const uint16_t* ds, float* out) {
  const int64_t K = x.K, nb = K / q4k::QK;
  __m512 acc[M][4];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i s[M][4], s2[X2 ? M : 1][4];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        s[m][i] = _mm512_setzero_si512();
        if constexpr (X2) s2[m][i] = _mm512_setzero_si512();
      }
#pragma GCC unroll 8
    for (int g = 0; g < q4k::QK / 4; ++g) {
      const int64_t k = b * q4k::QK + 4 * g;
      __m512i v[4];
      quads(w + k * PANEL, v);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        int32_t four;
        std::memcpy(&four, x.xq + m * K + k, 4);
        const __m512i xb = _mm512_set1_epi32(four);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) s[m][i] = _mm512_dpbusd_epi32(s[m][i], v[i], xb);
        if constexpr (X2) {
          std::memcpy(&four, x.xl + m * K + k, 4);
          const __m512i xl = _mm512_set1_epi32(four);
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) s2[m][i] = _mm512_dpbusd_epi32(s2[m][i], v[i], xl);
        }
      }
    }
    __m512 dw[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) dw[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ds + b * PANEL + 16 * i)));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512i corr = _mm512_set1_epi32(128 * x.sq[m * nb + b]);
      const __m512 d = _mm512_set1_ps(x.dx[m * nb + b]);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        __m512i si = s[m][i];
        if constexpr (X2) si = _mm512_add_epi32(_mm512_slli_epi32(si, 8), s2[m][i]);  // 256 S_hi + S_lo
        acc[m][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(si, corr)), _mm512_mul_ps(dw[i], d), acc[m][i]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    alignas(64) float t[4][16];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) _mm512_store_ps(t[i], acc[m][i]);
    for (int i = 0; i < 4; ++i)
      for (int L = 0; L < 4; ++L)
        for (int q = 0; q < 4; ++q) out[m * PANEL + 16 * L + 4 * i + q] = t[i][4 * L + q];
  }
}

// out (m x 64) for 1 <= m <= 8 rows: blocks of at most 2 rows (their sums and the four weight quads fit the
// register file); the panel stays in L1/L2 between blocks.
static inline void panel_any(int m, const q4k::Q4Rows& x, const int8_t* w, const uint16_t* ds, float* out) {
  for (int m0 = 0; m0 < m; m0 += 2) {
    const bool two = m - m0 >= 2;
    if (x.xl != nullptr) {
      if (two) panel_rows<2, true>(x.rows(m0), w, ds, out + m0 * PANEL);
      else panel_rows<1, true>(x.rows(m0), w, ds, out + m0 * PANEL);
    } else {
      if (two) panel_rows<2, false>(x.rows(m0), w, ds, out + m0 * PANEL);
      else panel_rows<1, false>(x.rows(m0), w, ds, out + m0 * PANEL);
    }
  }
}
#else
// Builds without VNNI never take the integer path (`i8_dot_on`); plain loops keep the call well-defined.
static inline void panel_any(int m, const q4k::Q4Rows& x, const int8_t* w, const uint16_t* ds, float* out) {
  const int64_t K = x.K, nb = K / q4k::QK;
  for (int r = 0; r < m; ++r)
    for (int o = 0; o < PANEL; ++o) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t s = 0;
        for (int64_t k = b * q4k::QK; k < (b + 1) * q4k::QK; ++k) {
          const int32_t v = x.xl != nullptr ? 256 * x.xq[r * K + k] + x.xl[r * K + k] : x.xq[r * K + k];
          s += v * w[k * PANEL + o];
        }
        acc += (float)s * (half_to_f(ds[b * PANEL + i8_scale_pos(o)]) * x.dx[r * nb + b]);
      }
      out[r * PANEL + o] = acc;
    }
}
#endif

}  // namespace i8k
