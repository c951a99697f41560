// Vector helpers shared by every nomoat kernel: a W-lane fp32 vector type (GCC/Clang vector extensions, so one source
// compiles to AVX-512, AVX2, SSE or NEON), loads and stores, a vectorised exp and SwiGLU product, a horizontal sum, a
// spin-wait pause.
// Every ISA-specific intrinsic sits behind a feature macro; without any, the portable code below is used.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__AVX512F__)
constexpr int W = 16, NREG = 32;
#elif defined(__AVX__)
constexpr int W = 8, NREG = 16;
#elif defined(__ARM_NEON)
constexpr int W = 4, NREG = 32;
#else
constexpr int W = 4, NREG = 16;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int vi __attribute__((vector_size(W * 4)));
typedef float vfu __attribute__((vector_size(W * 4), aligned(4)));

static inline vf ld(const float* p) { return *(const vfu*)p; }
static inline void st(float* p, vf v) { *(vfu*)p = v; }
static inline vf splat(float x) { return vf{} + x; }

// exp(x) for W lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial), about 1 ulp on [-88, 88].
static inline vf vexp(vf x) {
  const vf hi = splat(88.3762626647949f), lo = splat(-88.3762626647949f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);  // toward zero
  n += (vi)(__builtin_convertvector(n, vf) > fx);  // floor: minus one where truncation rounded up
  const vf t = __builtin_convertvector(n, vf);
  x = x - t * 0.693359375f + t * 2.12194440e-4f;
  const vf z = x * x;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  return y * (vf)((n + 127) << 23);
}

static inline float sexp(float x) {
  vf v = splat(x);
  return vexp(v)[0];
}

// out[j] = silu(g[j]) * u[j] = g[j] / (1 + exp(-g[j])) * u[j] for n values (the SwiGLU product; out may be g or u).
static inline void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf gv = ld(g + j);
    st(out + j, gv / (1.f + vexp(-gv)) * ld(u + j));
  }
  for (; j < n; ++j) out[j] = g[j] / (1.f + sexp(-g[j])) * u[j];
}

static inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__aarch64__) && defined(__ARM_NEON)
  return vaddvq_f32((float32x4_t)v);
#else
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
#endif
}

// The lane sums of four vectors into out[0..3], by one reduction tree for the four (a quarter of four `hsum`s).
static inline void hsum4(vf a, vf b, vf c, vf d, float* out) {
#if defined(__AVX512F__)
  auto half = [](vf v) {
    const __m512 x = (__m512)v;
    return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  };
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#elif defined(__AVX__)
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a, (__m256)b), _mm256_hadd_ps((__m256)c, (__m256)d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#elif defined(__aarch64__) && defined(__ARM_NEON)
  const float32x4_t ab = vpaddq_f32((float32x4_t)a, (float32x4_t)b), cd = vpaddq_f32((float32x4_t)c, (float32x4_t)d);
  vst1q_f32(out, vpaddq_f32(ab, cd));
#else
  out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
#endif
}

// A pause inside a spin-wait loop (lets the sibling hyperthread run, saves power).
static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The instruction set this translation unit was compiled for.
static inline const char* compiled_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__x86_64__) || defined(__i386__)
  return "sse";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "portable";
#endif
}
