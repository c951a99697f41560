// Panel GEMV templates: out (M x 64) = x (M x K) times one panel of a weight matrix, for M = 1..8 rows.
//
// Weight layout ("panels"): the (N, K) matrix is cut into panels of PANEL (64) consecutive output channels, each
// stored k-major: panel[p, k, j] = W[p * 64 + j, k] (N padded with zero rows to a multiple of 64). A panel is one
// contiguous stream; the kernel walks it k by k, broadcasting x[m, k] and accumulating 64 outputs per row in vector
// registers: no horizontal sums, one FMA per weight vector per row, and the M rows share each weight load. Where M
// rows times the panel's vectors would spill registers, a panel is swept in column halves or quarters (the panel
// stays in L2 between sweeps, so memory still sees each weight once). int8 panels hold codes with an fp16 scale per
// block of 32 input channels per output channel (GGUF Q8_0's blocks: w[n, k] = d[n, k / 32] * q[n, k]), the scales
// beside the codes as (P, ceil(K / 32), 64) in the order of the integer dot kernel (`i8_scale_pos`, int8_dot.h); here
// each block's 64 scales are loaded once and every code is widened to fp32 and multiplied by its scale (exact: an
// fp16 scale times a code of 8 bits fits fp32's mantissa), so the sums are those of the dequantized weight.
#pragma once

#include <algorithm>

#include "vec.h"

constexpr int PANEL = 64, NV = PANEL / W;  // vectors per panel row
constexpr int MAX_ROWS = 8;                // rows one sweep holds in registers; callers loop over row blocks
#ifndef SERIAL_BYTES_LOG2
#define SERIAL_BYTES_LOG2 21
#endif

constexpr int I8_BLOCK = 32;  // input channels per int8 block scale (GGUF's QK8_0)

// Where block scales (P, nb, 64) keep the scale of channel `ch` of a panel: the integer dot kernel accumulates channel
// 16 L + 4 i + q in lane 4 L + q of its vector i (int8_dot.h), so it stores at 16 i + 4 L + q (an involution).
static inline int i8_scale_pos(int ch) { return 16 * ((ch >> 2) & 3) + 4 * (ch >> 4) + (ch & 3); }

// An IEEE half as fp32 (any ISA).
static inline float half_to_f(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
  uint32_t u;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
    float r = (float)m * 5.9604644775390625e-8f;
    std::memcpy(&u, &r, 4);
    u |= sign;
  } else {
    u = sign | (e == 31 ? 0x7f800000u : (e + 112) << 23) | (m << 13);
  }
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// The fp32 scales of channels ch0 .. ch0 + W - 1 (ch0 a multiple of W) from one block's 64 fp16 scales `s` (stored
// at `i8_scale_pos`: each run of four channels is four consecutive halves).
static inline vf load_scales(const uint16_t* s, int ch0) {
#if defined(__AVX512F__)
  uint64_t g[4];  // W = 16, ch0 = 16 L: channels 16 L + 4 i + q at 16 i + 4 L + q
  for (int i = 0; i < 4; ++i) std::memcpy(&g[i], s + 16 * i + 4 * (ch0 >> 4), 8);
  return (vf)_mm512_cvtph_ps(_mm256_set_epi64x((long long)g[3], (long long)g[2], (long long)g[1], (long long)g[0]));
#elif defined(__AVX__) && defined(__F16C__)
  uint64_t g[2];  // W = 8: two runs of four
  for (int i = 0; i < 2; ++i) std::memcpy(&g[i], s + i8_scale_pos(ch0 + 4 * i), 8);
  return (vf)_mm256_cvtph_ps(_mm_set_epi64x((long long)g[1], (long long)g[0]));
#elif defined(__ARM_NEON) && defined(__aarch64__)
  return (vf)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + i8_scale_pos(ch0))));  // W = 4: one run
#else
  vf r;
  for (int j = 0; j < W; ++j) r[j] = half_to_f(s[i8_scale_pos(ch0 + j)]);
  return r;
#endif
}

template <bool I8>
static inline vf load_w(const void* base, int64_t off) {
  if constexpr (I8) {
    // Intrinsics here: GCC 12 scalarises `__builtin_convertvector` from char to float vectors (measured 4x slower).
    const signed char* p = (const signed char*)base + off;
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#elif defined(__ARM_NEON) && defined(__aarch64__)
    int32_t four;
    std::memcpy(&four, p, 4);  // exactly W = 4 codes: never read past the panel
    const int16x8_t wide = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
    return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
#else
    vf r;
    for (int i = 0; i < W; ++i) r[i] = (float)p[i];
    return r;
#endif
  } else {
    return *(const vfu*)((const float*)base + off);
  }
}

// A paced read-ahead: strided byte ranges a caller will read soon (rows of `width` bytes, `stride` apart), asked for
// one cache line at a time while a sweep computes (`sweep` takes one step per k). Prefetches issued in one
// burst fill the core's miss buffers, and the ones past them get no line (measured: a burst ahead of a panel
// product overlapped none of its reads); spread over the product's FMAs they stream while it computes.
struct Ahead {
  static constexpr int CAP = 64;
  struct Range {
    const char* p;
    int64_t stride, width;
    int rows;
  };
  Range r[CAP];
  int n = 0, i = 0, row = 0, must = 0;  // flush() issues the first `must` ranges only (the rest may wait or drop)
  int64_t off = 0;

  void add(const void* p, int64_t stride, int rows, int64_t width) {
    if (n < CAP && rows > 0 && width > 0) r[n++] = {(const char*)p, stride, width, rows};
  }
  int per = 1, cap = 1;  // lines asked for per step, and at most (`pace`)
  inline void step() {
    for (int q = 0; q < per; ++q) {
      if (i >= n) return;
      const Range& g = r[i];
      __builtin_prefetch(g.p + row * g.stride + off, 0, 2);
      if ((off += 64) >= g.width) {
        off = 0;
        if (++row >= g.rows) {
          row = 0;
          ++i;
        }
      }
    }
  }
  // Spreads what is queued over `steps` steps, at most `cap` lines a step: one line a step suits the next panel's
  // weights, which the step's other products also stream (more was measured 5% slower over 32 rows); adapter factors
  // (`lora_ahead`, decode_stack.cpp) allow four, else a product of 8 rows drops part of the next adapter phase's A.
  void pace(int64_t steps) {
    int64_t lines = 0;
    for (int j = i; j < n; ++j) lines += r[j].rows * ((r[j].width + 63) / 64);
    per = (int)std::max<int64_t>(1, std::min<int64_t>(cap, (lines + steps - 1) / std::max<int64_t>(1, steps)));
  }
  void flush() {
    while (i < must) step();
  }
  void clear() { n = i = row = must = 0, off = 0, per = cap = 1; }
};

// Keeps a loaded weight vector in a register: without it GCC folds the load into every row's FMA as a memory operand
// (x86), so M rows would read each weight M times from L2 and many-row sweeps run at about half the FMA rate. One or
// two rows keep the folded form (memory-bound: the weights stream from DRAM, and the folded loop issues faster).
template <int M>
static inline void pin_w(vf& v) {
#if defined(__AVX512F__)
  if constexpr (M >= 3) asm("" : "+v"(v));
#elif defined(__SSE2__)
  if constexpr (M >= 3) asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// acc[m][c] += x[m, k] * w[k, c0 + c*W ...] over all k, for M rows and C vectors of one panel; writes out[m][...].
// int8 panels (I8): `ds` the panel's block scales (nb, 64); each code is widened and multiplied by its block's scale,
// or, where the registers hold a second set of accumulators (few rows), each block's sums are scaled once.
template <bool I8, int M, int C, bool AH = false>
static void sweep(const float* x, int64_t ldx, const void* w, const uint16_t* ds, int64_t K, int c0,
                  float* out /* M x PANEL */, Ahead* ah = nullptr) {
  vf acc[M][C];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[m][c] = vf{};
  if constexpr (!I8) {  // fp32: the plain loop over k (inside the block loop below it compiles ~20% slower at 8 rows)
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (AH) ah->step();  // a loop of its own: no test per k where there is no read-ahead
      vf wv[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        wv[c] = load_w<false>(w, k * PANEL + c0 + c * W);
        pin_w<M>(wv[c]);
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const float xs = x[m * ldx + k];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[m][c] += xs * wv[c];
      }
    }
  }
  for (int64_t k0 = 0; I8 && k0 < K; k0 += I8_BLOCK) {
    vf sv[C];
    if constexpr (I8) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) sv[c] = load_scales(ds + (k0 / I8_BLOCK) * PANEL, c0 + c * W);
    }
    const int64_t k1 = std::min<int64_t>(K, k0 + I8_BLOCK);
    if constexpr (I8 && 2 * M * C + C + 1 <= NREG) {
      // Few rows: the block's sums unscaled in registers of their own, scaled once per block (no multiply per k).
      vf bacc[M][C];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) bacc[m][c] = vf{};
      for (int64_t k = k0; k < k1; ++k) {
        if constexpr (AH) ah->step();
        vf wv[C];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) wv[c] = load_w<true>(w, k * PANEL + c0 + c * W);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const float xs = x[m * ldx + k];
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) bacc[m][c] += xs * wv[c];
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[m][c] += bacc[m][c] * sv[c];
      continue;
    }
    for (int64_t k = k0; k < k1; ++k) {
      if constexpr (AH) ah->step();  // a loop of its own: no test per k where there is no read-ahead
      vf wv[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) wv[c] = load_w<I8>(w, k * PANEL + c0 + c * W) * sv[c];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const float xs = x[m * ldx + k];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[m][c] += xs * wv[c];
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) std::memcpy(out + m * PANEL + c0 + c * W, &acc[m][c], sizeof(vf));
}

// Largest C dividing NV with M*C accumulators + C weight vectors + 1 broadcast in the register file (one or two rows
// fold each weight load into the FMA, `pin_w`: no weight registers; with AVX2's 16 registers one row thus sweeps the
// whole panel at once, where two half sweeps would fetch each k row's cache lines apart).
template <int M>
constexpr int cols() {
  constexpr int wv = M >= 3 ? 1 : 0;  // weight registers per vector of the sweep
  return (M * NV + wv * NV + 1 <= NREG) ? NV : (M * (NV / 2) + wv * NV / 2 + 1 <= NREG) ? NV / 2
       : (M * (NV / 4) + wv * NV / 4 + 1 <= NREG) ? NV / 4 : 1;
}

// Column sweeps (fewer registers than a panel row's vectors times the rows) each read a part of every k row of the
// panel, so the panel's cache lines would come from memory in a strided order, once per sweep: they first read the
// whole panel in order (into L2), one load per cache line, then sweep it from cache.
static inline void read_in_order(const void* w, int64_t bytes) {
  const char* p = (const char*)w;
  uint32_t sink = 0, line;
  for (int64_t o = 0; o < bytes; o += 64) {
    std::memcpy(&line, p + o, 4);
    sink |= line;
  }
  asm volatile("" : : "r"(sink));
}

template <bool I8, int M>
static void panel_rows(const float* x, int64_t ldx, const void* w, const uint16_t* ds, int64_t K, float* out,
                       Ahead* ah = nullptr) {
  // Over 6 rows (or where M rows do not fit at full width), blocks of 4 rows at full panel width: they beat column
  // sweeps, and 4 + 3 or 4 + 4 rows beat 6 + 1 or 6 + 2 (a one- or two-row sweep is load-bound).
  if constexpr (M > 4 && cols<4>() == NV && (M > 6 || cols<M>() < NV)) {
    panel_rows<I8, 4>(x, ldx, w, ds, K, out, ah);
    panel_rows<I8, M - 4>(x + 4 * ldx, ldx, w, ds, K, out + 4 * PANEL, ah);
  } else if constexpr (M == 2 && cols<2>() < NV) {  // AVX2: two whole-panel one-row sweeps, the second from cache
    panel_rows<I8, 1>(x, ldx, w, ds, K, out, ah);
    panel_rows<I8, 1>(x + ldx, ldx, w, ds, K, out + PANEL);
  } else {
    constexpr int C = cols<M>();
    if constexpr (C < NV) read_in_order(w, K * PANEL * (I8 ? 1 : 4));
    for (int c0 = 0; c0 < PANEL; c0 += C * W)
      if (ah != nullptr) sweep<I8, M, C, true>(x, ldx, w, ds, K, c0, out, ah);
      else sweep<I8, M, C>(x, ldx, w, ds, K, c0, out);
  }
}

// out (m x 64) for 1 <= m <= 8 rows; `ds`: an int8 panel's block scales (nb, 64) fp16 (nullptr for fp32 panels);
// `ah`: a read-ahead to pace over the product.
template <bool I8>
static void panel_any(int m, const float* x, int64_t ldx, const void* w, const uint16_t* ds, int64_t K, float* out,
                      Ahead* ah = nullptr) {
  switch (m) {
    case 1: panel_rows<I8, 1>(x, ldx, w, ds, K, out, ah); break;
    case 2: panel_rows<I8, 2>(x, ldx, w, ds, K, out, ah); break;
    case 3: panel_rows<I8, 3>(x, ldx, w, ds, K, out, ah); break;
    case 4: panel_rows<I8, 4>(x, ldx, w, ds, K, out, ah); break;
    case 5: panel_rows<I8, 5>(x, ldx, w, ds, K, out, ah); break;
    case 6: panel_rows<I8, 6>(x, ldx, w, ds, K, out, ah); break;
    case 7: panel_rows<I8, 7>(x, ldx, w, ds, K, out, ah); break;
    default: panel_rows<I8, 8>(x, ldx, w, ds, K, out, ah); break;
  }
}

// bf16 panels: pairs of input channels interleaved, panel[p, k / 2, j, k % 2] = W[p * 64 + j, k] (bf16; K padded
// to even with zeros). One W-lane vector of 32-bit words holds one k pair of W columns: its low halves (k even)
// widen to fp32 by a 16-bit shift, its high halves (k odd) by masking the low ones off; accumulation is fp32. The
// same source serves AVX-512, AVX2, SSE, NEON and portable builds (vector extensions only).
typedef unsigned int vu __attribute__((vector_size(W * 4)));
typedef unsigned int vuu __attribute__((vector_size(W * 4), aligned(4)));

// Largest C dividing NV with M*C accumulators + 2 weight vectors + 2 broadcasts in the register file.
template <int M>
constexpr int cols_bf16() {
  return (M * NV + 4 <= NREG) ? NV : (M * (NV / 2) + 4 <= NREG) ? NV / 2 : (M * (NV / 4) + 4 <= NREG) ? NV / 4 : 1;
}

template <int M, int C>
static void sweep_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t K, int c0, float* out) {
  vf acc[M][C];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[m][c] = vf{};
  const int64_t K2 = K / 2;
  const vu hi = vu{} + 0xffff0000u;
  for (int64_t kp = 0; kp < K2; ++kp) {
    const uint16_t* row = w + (kp * PANEL + c0) * 2;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const vu u = *(const vuu*)(row + c * W * 2);
      const vf ev = (vf)(u << 16), od = (vf)(u & hi);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m][c] += x[m * ldx + 2 * kp] * ev + x[m * ldx + 2 * kp + 1] * od;
    }
  }
  if (K & 1) {  // the last channel alone (its pair's second half is padding)
    const uint16_t* row = w + (K2 * PANEL + c0) * 2;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const vf ev = (vf)(*(const vuu*)(row + c * W * 2) << 16);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m][c] += x[m * ldx + K - 1] * ev;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) std::memcpy(out + m * PANEL + c0 + c * W, &acc[m][c], sizeof(vf));
}

template <int M>
static void panel_rows_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
  if constexpr (M > 4 && cols_bf16<4>() == NV) {
    panel_rows_bf16<4>(x, ldx, w, K, out);
    panel_rows_bf16<M - 4>(x + 4 * ldx, ldx, w, K, out + 4 * PANEL);
  } else if constexpr (M == 2 && cols_bf16<2>() < NV) {  // AVX2: as panel_rows
    panel_rows_bf16<1>(x, ldx, w, K, out);
    panel_rows_bf16<1>(x + ldx, ldx, w, K, out + PANEL);
  } else {
    constexpr int C = cols_bf16<M>();
    if constexpr (C < NV) read_in_order(w, (K + 1) / 2 * PANEL * 4);
    for (int c0 = 0; c0 < PANEL; c0 += C * W) sweep_bf16<M, C>(x, ldx, w, K, c0, out);
  }
}

// out (m x 64) for 1 <= m <= 8 rows over one bf16 panel (K input channels, stored as (K + 1) / 2 pairs).
static inline void panel_any_bf16(int m, const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
  switch (m) {
    case 1: panel_rows_bf16<1>(x, ldx, w, K, out); break;
    case 2: panel_rows_bf16<2>(x, ldx, w, K, out); break;
    case 3: panel_rows_bf16<3>(x, ldx, w, K, out); break;
    case 4: panel_rows_bf16<4>(x, ldx, w, K, out); break;
    case 5: panel_rows_bf16<5>(x, ldx, w, K, out); break;
    case 6: panel_rows_bf16<6>(x, ldx, w, K, out); break;
    case 7: panel_rows_bf16<7>(x, ldx, w, K, out); break;
    default: panel_rows_bf16<8>(x, ldx, w, K, out); break;
  }
}

#if defined(__AVX512BF16__)
// With AVX-512-BF16 (many-row calls: prefill): each row's input channels are rounded to bf16 pairs (one 32-bit word
// per k pair, `bf16_pairs`) and `vdpbf16ps` adds x[2k] w[2k] + x[2k+1] w[2k+1] per column in one instruction (products
// exact, sums fp32): half the instructions of the widening path, at bf16 activations.
template <int M, int C>
static void sweep_dpbf16(const uint32_t* xp, int64_t K2, const uint16_t* w, int c0, float* out) {
  __m512 acc[M][C];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    const uint16_t* row = w + (kp * PANEL + c0) * 2;
    __m512bh wv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_loadu_si512((const void*)(row + c * W * 2));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[m * K2 + kp]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], xv, wv[c]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + m * PANEL + c0 + c * W, acc[m][c]);
}

template <int M>
static void panel_rows_dpbf16(const uint32_t* xp, int64_t K2, const uint16_t* w, float* out) {
  if constexpr (M > 4) {
    panel_rows_dpbf16<4>(xp, K2, w, out);
    panel_rows_dpbf16<M - 4>(xp + 4 * K2, K2, w, out + 4 * PANEL);
  } else {
    constexpr int C = cols<M>();
    for (int c0 = 0; c0 < PANEL; c0 += C * W) sweep_dpbf16<M, C>(xp, K2, w, c0, out);
  }
}

static inline void panel_any_dpbf16(int m, const uint32_t* xp, int64_t K2, const uint16_t* w, float* out) {
  switch (m) {
    case 1: panel_rows_dpbf16<1>(xp, K2, w, out); break;
    case 2: panel_rows_dpbf16<2>(xp, K2, w, out); break;
    case 3: panel_rows_dpbf16<3>(xp, K2, w, out); break;
    case 4: panel_rows_dpbf16<4>(xp, K2, w, out); break;
    case 5: panel_rows_dpbf16<5>(xp, K2, w, out); break;
    case 6: panel_rows_dpbf16<6>(xp, K2, w, out); break;
    case 7: panel_rows_dpbf16<7>(xp, K2, w, out); break;
    default: panel_rows_dpbf16<8>(xp, K2, w, out); break;
  }
}
#endif

// Rows of x (M x K, row stride ldx) as bf16 pairs (M x ceil(K / 2) words; round to nearest even; odd K: zero pad).
static inline void bf16_pairs(const float* x, int64_t ldx, int64_t M, int64_t K, uint32_t* out) {
  const int64_t K2 = (K + 1) / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t kp = 0; kp < K2; ++kp) {
      uint32_t h[2] = {0, 0};
      for (int i = 0; i < 2 && 2 * kp + i < K; ++i) {
        uint32_t u;
        std::memcpy(&u, x + m * ldx + 2 * kp + i, 4);
        h[i] = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      }
      out[m * K2 + kp] = h[0] | (h[1] << 16);
    }
}
