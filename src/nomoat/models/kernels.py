"""Compiled CPU kernels for decode-time matmuls: `y = x W^T (+ b)` for a few rows of activations (M = 1..8).

At decode a linear layer is a matrix-vector product: it is bound by how fast the weights stream from memory. Torch's
M=1 paths (MKL `F.linear`, oneDNN) read fp32 weights at 11-19 GB/s on the 2-core machines nomoat targets, of the
~30 GB/s the memory gives. These kernels read them once per call at memory speed, for every row of the call.

Weight layout ("panels"), chosen once at load time: the (N, K) matrix is cut into panels of `PANEL` (64) consecutive
output channels, each stored k-major: `panel[p, k, j] = W[p * 64 + j, k]` (N padded with zero rows to a multiple of
64). One panel is a single contiguous stream; the kernel walks it k by k, broadcasting `x[m, k]` and accumulating 64
outputs per row in vector registers (4 zmm with AVX-512, 8 ymm with AVX2): no horizontal sums, one FMA per weight
vector per row, and M rows share each weight load. Where M rows times the panel's vectors would spill registers,
a panel is swept in column halves or quarters (the panel, at most a few hundred KB, stays in L2 between sweeps, so
memory still sees each weight once). OpenMP splits the panels over the threads torch uses.
int8: the same layout with int8 codes (`w = q * scale[n]`, symmetric per output channel); each 16-code slice is
sign-extended and converted to fp32 in registers, accumulated in fp32, and scaled once per output.

The code uses GCC/Clang vector extensions instead of intrinsics, so one source compiles to AVX-512, AVX2 or SSE
under `-march=native` (it is built on the machine that runs it). It is compiled with `torch.utils.cpp_extension`
at first use (about a minute, once; cached in `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`). When
no compiler is present or the build fails, `get()` returns None (logged once) and callers keep their torch paths.
`NOMOAT_KERNELS=0` disables the kernels (for A/B measurements).

Measured on the 2-core AMD EPYC (AVX-512) VM, shared with other jobs (so 2 threads often get about one core):
- the 211 matrices of SmolLM2-135M at one row, one thread: fp32 23-24 GB/s of weights (F.linear 11, oneDNN 10-13);
  int8 6.9 ms for all of them (19.5 GB/s of int8 codes); at 8 rows, fp32 32 ms (oneDNN 40-43, F.linear 72-81);
- whole-model decode at batch 1, 2 threads (benchmarks/bench_decode_kernels.py): fp32 14.8 -> 32.4 tok/s against
  oneDNN with torch attention, int8 27.3 -> 56.3 tok/s against fbgemm;
- `decode_attention` (rope, cache write and attention in one call) took the non-matmul part of a decode step from
  10 to 5 ms.
At 5-8 rows a panel is swept as a block of 4 rows then the rest, each at full panel width: sweeping column halves
with all 8 rows at once (fewer registers per row) was 1.6x slower (52 vs 32 ms for the 211 matrices at 8 rows).
These per-layer calls are what a decode step uses when `decode_stack.py` (every layer of a step in one call, built
on the same GEMV templates: SmolLM2-135M batch 1 fp32 31 -> 47 tok/s, int8 60 -> 110) does not apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from typing import Any

import torch
import torch.nn.functional as F

from nomoat.models import hugepages

logger = logging.getLogger(__name__)

PANEL = 64  # output channels per panel (4 AVX-512 vectors / 8 AVX2 vectors of fp32)
MAX_ROWS = 8  # activation rows the kernel holds in registers at once; more rows are processed 8 at a time

# The panel GEMV templates (`panel_any<I8>` and what it uses) and `rope_head`, shared with `decode_stack.py`'s
# extension.
_VEC_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <vector>

#if defined(__AVX512F__)
constexpr int W = 16, NREG = 32;
#elif defined(__AVX__)
constexpr int W = 8, NREG = 16;
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

static inline float sexp(float x) { vf v = splat(x); return vexp(v)[0]; }

static inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
#endif
}
"""

# The panel GEMV templates (`panel_any<I8>` and what it uses), `rope_head` and `attend_head`, shared with
# `decode_stack.py`'s extension.
_GEMV_SOURCE = _VEC_SOURCE + r"""
constexpr int PANEL = 64, NV = PANEL / W;  // vectors per panel row
#ifndef SERIAL_BYTES_LOG2
#define SERIAL_BYTES_LOG2 21
#endif

template <bool I8> static inline vf load_w(const void* base, int64_t off) {
  if constexpr (I8) {
    // Intrinsics here: GCC 12 scalarises `__builtin_convertvector` from char to float vectors (measured 4x slower).
    const signed char* p = (const signed char*)base + off;
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
    vf r;
    for (int i = 0; i < W; ++i) r[i] = (float)p[i];
    return r;
#endif
  } else {
    return *(const vfu*)((const float*)base + off);
  }
}

// acc[m][c] += x[m, k] * w[k, c0 + c*W ...] over all k, for M rows and C vectors of one panel; writes out[m][...].
template <bool I8, int M, int C>
static void sweep(const float* x, int64_t ldx, const void* w, int64_t K, int c0, float* out /* M x PANEL */) {
  vf acc[M][C];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[m][c] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf wv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) wv[c] = load_w<I8>(w, k * PANEL + c0 + c * W);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float xs = x[m * ldx + k];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[m][c] += xs * wv[c];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) std::memcpy(out + m * PANEL + c0 + c * W, &acc[m][c], sizeof(vf));
}

// Largest C dividing NV with M*C accumulators + C weight vectors + 1 broadcast in the register file.
template <int M> constexpr int cols() {
  return (M * NV + NV + 1 <= NREG) ? NV : (M * (NV / 2) + NV / 2 + 1 <= NREG) ? NV / 2
       : (M * (NV / 4) + NV / 4 + 1 <= NREG) ? NV / 4 : 1;
}

template <bool I8, int M>
static void panel_rows(const float* x, int64_t ldx, const void* w, int64_t K, float* out) {
  if constexpr (M > 4 && cols<4>() == NV) {  // two row blocks at full panel width beat column sweeps
    panel_rows<I8, 4>(x, ldx, w, K, out);
    panel_rows<I8, M - 4>(x + 4 * ldx, ldx, w, K, out + 4 * PANEL);
  } else {
    constexpr int C = cols<M>();
    for (int c0 = 0; c0 < PANEL; c0 += C * W) sweep<I8, M, C>(x, ldx, w, K, c0, out);
  }
}

template <bool I8>
static void panel_any(int m, const float* x, int64_t ldx, const void* w, int64_t K, float* out) {
  switch (m) {
    case 1: panel_rows<I8, 1>(x, ldx, w, K, out); break;
    case 2: panel_rows<I8, 2>(x, ldx, w, K, out); break;
    case 3: panel_rows<I8, 3>(x, ldx, w, K, out); break;
    case 4: panel_rows<I8, 4>(x, ldx, w, K, out); break;
    case 5: panel_rows<I8, 5>(x, ldx, w, K, out); break;
    case 6: panel_rows<I8, 6>(x, ldx, w, K, out); break;
    case 7: panel_rows<I8, 7>(x, ldx, w, K, out); break;
    default: panel_rows<I8, 8>(x, ldx, w, K, out); break;
  }
}

// Rotary embedding (Hugging Face's rotate_half convention) of one head: the first rd channels, the rest copied.
static inline void rope_head(const float* x, const float* c, const float* s, int64_t rd, int64_t hd, float* out) {
  const int64_t half = rd / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * c[i] - x[i + half] * s[i];
    out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
  }
  for (int64_t i = rd; i < hd; ++i) out[i] = x[i];
}
// Decode attention of one query head over positions lo..hi of one key/value head (keys and values at kb/vb +
// t * hd); the key and value at position `p` are knew/vnew instead when those are non-null (a private copy of the
// new token's). Scores in `w` (hi - lo + 1 floats of scratch), softmax with the max subtracted, vectorised exp;
// out (hd) = sum_t exp(s_t - max) v_t / sum_t exp(s_t - max), written once with final values.
template <int NVH>
static void attend_fixed(const float* q, const float* kb, const float* vb, int64_t lo, int64_t hi, int64_t p,
                         const float* knew, const float* vnew, float scale, float* w, float* out) {
  vf qv[NVH];
#pragma GCC unroll 16
  for (int j = 0; j < NVH; ++j) qv[j] = ld(q + j * W) * scale;
  constexpr int64_t hd = NVH * W;
  const int64_t T = hi - lo + 1;
  float mx = -INFINITY;
  for (int64_t t = lo; t <= hi; ++t) {
    const float* kt = (knew && t == p) ? knew : kb + t * hd;
    vf acc = qv[0] * ld(kt);
#pragma GCC unroll 16
    for (int j = 1; j < NVH; ++j) acc += qv[j] * ld(kt + j * W);
    const float sc = hsum(acc);
    w[t - lo] = sc;
    mx = sc > mx ? sc : mx;
  }
  vf vs = vf{};
  int64_t i = 0;
  for (; i + W <= T; i += W) {
    const vf e = vexp(ld(w + i) - mx);
    st(w + i, e);
    vs += e;
  }
  float sum = hsum(vs);
  for (; i < T; ++i) sum += (w[i] = sexp(w[i] - mx));
  vf acc[NVH];
#pragma GCC unroll 16
  for (int j = 0; j < NVH; ++j) acc[j] = vf{};
  for (int64_t t = lo; t <= hi; ++t) {
    const float* vt = (vnew && t == p) ? vnew : vb + t * hd;
    const vf e = splat(w[t - lo]);
#pragma GCC unroll 16
    for (int j = 0; j < NVH; ++j) acc[j] += e * ld(vt + j * W);
  }
  const float inv = 1.f / sum;
#pragma GCC unroll 16
  for (int j = 0; j < NVH; ++j) st(out + j * W, acc[j] * inv);
}

// The same for any head size (scalar loops; hd not a multiple of the vector width).
static void attend_any(const float* q, const float* kb, const float* vb, int64_t lo, int64_t hi, int64_t p,
                       const float* knew, const float* vnew, int64_t hd, float scale, float* w, float* out) {
  float mx = -INFINITY;
  for (int64_t t = lo; t <= hi; ++t) {
    const float* kt = (knew && t == p) ? knew : kb + t * hd;
    float acc = 0.f;
    for (int64_t i = 0; i < hd; ++i) acc += q[i] * scale * kt[i];
    w[t - lo] = acc;
    mx = std::max(mx, acc);
  }
  float sum = 0.f;
  for (int64_t t = lo; t <= hi; ++t) sum += (w[t - lo] = sexp(w[t - lo] - mx));
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
  const float inv = 1.f / sum;
  for (int64_t t = lo; t <= hi; ++t) {
    const float* vt = (vnew && t == p) ? vnew : vb + t * hd;
    for (int64_t i = 0; i < hd; ++i) out[i] += w[t - lo] * vt[i];
  }
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

static void attend_head(const float* q, const float* kb, const float* vb, int64_t lo, int64_t hi, int64_t p,
                        const float* knew, const float* vnew, int64_t hd, float scale, float* w, float* out) {
  switch (hd == W * (hd / W) ? hd / W : 0) {
    case 1: attend_fixed<1>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 2: attend_fixed<2>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 4: attend_fixed<4>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 8: attend_fixed<8>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 16: attend_fixed<16>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    default: attend_any(q, kb, vb, lo, hi, p, knew, vnew, hd, scale, w, out); break;
  }
}
"""

_OPS_SOURCE = r"""template <bool I8>
static torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& wp,
                                 const c10::optional<torch::Tensor>& scale, const c10::optional<torch::Tensor>& bias,
                                 int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1, "x: 2-D fp32 with unit stride");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == PANEL && wp.is_contiguous(), "w: (P, K, 64) contiguous panels");
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0), ldx = M > 1 ? x.stride(0) : K;
  TORCH_CHECK(wp.size(1) == K && P * PANEL >= N, "w: panel shape does not match x or N");
  const float* xp = x.data_ptr<float>();
  const char* wb = (const char*)wp.data_ptr();
  const int64_t esize = I8 ? 1 : 4;
  const float* sp = (scale.has_value() && scale->defined()) ? scale->data_ptr<float>() : nullptr;
  const float* bp = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  // Dynamic scheduling, one panel at a time: on a shared 2-core VM one thread is often descheduled, and a static
  // split would make the other wait for its whole half (measured 3x slower under a busy neighbour).
  // Small matrices run on the calling thread: waking a sleeping OpenMP worker (OMP_WAIT_POLICY=PASSIVE) costs tens
  // of microseconds, about what the second core saves on 2 MB of weights (one core streams 23 GB/s, two about 30).
  // On the shared VM, 2 MB vs 8 MB vs always-parallel measured the same within noise (30-34 tok/s).
  const bool small = P * K * PANEL * esize * std::max<int64_t>(1, M / 4) < (int64_t(1) << SERIAL_BYTES_LOG2);
  const int nt = small ? 1 : (int)std::min<int64_t>(at::get_num_threads(), P);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t p = 0; p < P; ++p) {
    alignas(64) float buf[8 * PANEL];
    {  // one panel
      const void* w = wb + p * K * PANEL * esize;
      const int64_t n0 = p * PANEL, nn = std::min<int64_t>(PANEL, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += 8) {  // the panel stays in L2 across row blocks
        const int mm = (int)std::min<int64_t>(8, M - m0);
        panel_any<I8>(mm, xp + m0 * ldx, ldx, w, K, buf);
        for (int m = 0; m < mm; ++m) {
          float* dst = yp + (m0 + m) * N + n0;
          const float* src = buf + m * PANEL;
          for (int j = 0; j < nn; ++j) {
            float v = sp ? src[j] * sp[n0 + j] : src[j];
            dst[j] = bp ? v + bp[n0 + j] : v;
          }
        }
      }
    }
  }
  return y;
}

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias, int64_t n) {
  TORCH_CHECK(wp.scalar_type() == torch::kFloat, "fp32 panels expected");
  return linear_impl<false>(x, wp, c10::nullopt, bias, n);
}

torch::Tensor linear_i8(torch::Tensor x, torch::Tensor wp, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                        int64_t n) {
  TORCH_CHECK(wp.scalar_type() == torch::kChar, "int8 panels expected");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() >= n, "scale: fp32 (n,)");
  return linear_impl<true>(x, wp, scale, bias, n);
}

// One decode step of attention for B rows (one new token each): rotate q and k, write k and v into the cache rows
// row0.. at each row's position, attend over the cached keys 0..pos (within `window` when > 0, below kv_len).
// q (B,1,H,hd), k and v (B,1,nkv,hd) with unit last stride; cos/sin (B,1,rd); kc/vc (rows, nkv, S, hd) contiguous.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                               torch::Tensor sin, torch::Tensor kc, torch::Tensor vc, int64_t row0,
                               torch::Tensor positions, int64_t kv_len, int64_t window, double scale) {
  const int64_t B = q.size(0), H = q.size(2), hd = q.size(3), nkv = k.size(2), S = kc.size(2), rd = cos.size(-1);
  TORCH_CHECK(q.size(1) == 1 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q/k/v: one token");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.size(3) == hd && kc.size(1) == nkv, "cache layout");
  TORCH_CHECK(row0 >= 0 && row0 + B <= kc.size(0) && kv_len <= S && H % nkv == 0, "cache rows");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && rd <= hd && rd % 2 == 0, "rope tables");
  TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.numel() == B, "positions: int64 (B, 1)");
  auto pos_c = positions.contiguous();
  const int64_t* pos = pos_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "position outside the cache");
  auto qr = torch::empty({B, H, hd}, q.options());
  auto out = torch::empty({B, 1, H * hd}, q.options());
  float *qrp = qr.data_ptr<float>(), *op = out.data_ptr<float>();
  float *kcp = kc.data_ptr<float>(), *vcp = vc.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float *c = cp + b * rd, *s = sp + b * rd;
    for (int64_t h = 0; h < nkv; ++h) {
      const int64_t at = (((row0 + b) * nkv + h) * S + pos[b]) * hd;
      rope_head(kp + b * k.stride(0) + h * k.stride(2), c, s, rd, hd, kcp + at);
      std::memcpy(vcp + at, vp + b * v.stride(0) + h * v.stride(2), hd * sizeof(float));
    }
    for (int64_t h = 0; h < H; ++h)
      rope_head(qp + b * q.stride(0) + h * q.stride(2), c, s, rd, hd, qrp + (b * H + h) * hd);
  }
  const int64_t rep = H / nkv;
  const float sc = (float)scale;
  // Threads only when there is enough work to pay for waking them (long contexts, big batches).
#pragma omp parallel for schedule(static) if (B * H * kv_len * hd > (1 << 18))
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H, g = h / rep;
    const int64_t hi = std::min(pos[b], kv_len - 1), lo = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0;
    const float* kb = kcp + ((row0 + b) * nkv + g) * S * hd;
    const float* vb = vcp + ((row0 + b) * nkv + g) * S * hd;
    std::vector<float> w(std::max<int64_t>(hi - lo + 1, 1));
    attend_head(qrp + bh * hd, kb, vb, lo, hi, pos[b], nullptr, nullptr, hd, sc, w.data(), op + bh * hd);
  }
  return out;
}

std::string isa() { return W == 16 ? "avx512" : W == 8 ? "avx2" : "sse"; }
"""
_SOURCE = _GEMV_SOURCE + _OPS_SOURCE

_FUNCTIONS = ["linear_f32", "linear_i8", "decode_attention", "isa"]
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _cpu_tag() -> str:
    """A short name for this CPU's instruction sets, part of the build's name.

    `-march=native` code from an AVX-512 machine crashes on an AVX2 one: a home directory (and so the build cache)
    shared between machines must not hand one's build to the other.
    """
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    words = sorted(set(flags.partition(":")[2].split()))
    digest = hashlib.sha1(" ".join(words).encode()).hexdigest()[:8]
    return f"{platform.machine()}_{digest}".replace("-", "_")


def _ninja_on_path() -> None:
    """Put the `ninja` of the `ninja` Python package (a dependency) on PATH when none is there.

    torch's extension builder runs `ninja` from PATH; in a virtualenv that is not activated (`.venv/bin/nomoat`),
    the package's binary is not on it.
    """
    if shutil.which("ninja") is not None:
        return
    with contextlib.suppress(ImportError, AttributeError):
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_extension(prefix: str, what: str, fallback: str, source: str, functions: list[str] | None = None) -> Any:
    """Compile (or load the cached build of) one of nomoat's C++ extensions for this CPU; None where not possible.

    The build is named `{prefix}_{cpu tag}` (see `_cpu_tag`), compiled with `-O3 -march=native -fopenmp` by
    `torch.utils.cpp_extension.load_inline` and cached by torch. Without a compiler, with `NOMOAT_KERNELS=0` or on
    any build or load failure it returns None and logs a warning ending in `fallback` (what runs instead).

    Args:
        prefix: The extension's name without the CPU tag.
        what: What it is, for the log ("decode kernels").
        fallback: What callers do without it, for the log ("using torch's kernels (slower)").
        source: The C++ source.
        functions: Functions to bind (None: the source has its own `PYBIND11_MODULE`).
    """
    if os.environ.get("NOMOAT_KERNELS", "1") == "0":
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        logger.warning("no C++ compiler found for nomoat's %s: %s", what, fallback)
        return None
    _ninja_on_path()
    try:
        from torch.utils.cpp_extension import load_inline

        name = f"{prefix}_{_cpu_tag()}"
        with contextlib.suppress(Exception):  # a private torch helper: only used to say that a build is coming
            from torch.utils.cpp_extension import _get_build_directory

            if not os.path.exists(os.path.join(_get_build_directory(name, False), f"{name}.so")):
                logger.warning("compiling nomoat's %s for this CPU (once, about a minute)...", what)
        flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
        module = load_inline(name=name, cpp_sources=source, functions=functions,
                             extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip
        logger.info("nomoat %s loaded", what)
        return module
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: the torch paths
        logger.warning("could not build nomoat's %s (%s: %s); %s", what, type(exc).__name__,
                       str(exc).splitlines()[0] if str(exc) else "", fallback)  # fmt: skip
        return None


def build_once(state: dict[str, Any], lock: threading.Lock, build: Any) -> Any:
    """`state["module"]`, set by calling `build()` the first time (thread-safe); a None result is kept too."""
    if "module" not in state:
        with lock:
            if "module" not in state:
                state["module"] = build()
    return state["module"]


def get() -> Any:
    """The compiled kernel module, building it on first call; None where unavailable (logged once)."""
    return build_once(_state, _lock, lambda: build_extension(
        "nomoat_decode_kernels", "decode kernels", "decode matmuls use torch's kernels (slower)", _SOURCE, _FUNCTIONS))


def available() -> bool:
    """Whether the compiled kernels can be used (builds them on first call)."""
    return get() is not None


def _panels(w_t: torch.Tensor) -> torch.Tensor:
    """(K, N) k-major weights -> (P, K, PANEL) panels, N zero-padded to a multiple of PANEL."""
    k, n = w_t.shape
    pad = -n % PANEL
    if pad:
        w_t = F.pad(w_t, (0, pad))
    return hugepages.copy(w_t.reshape(k, -1, PANEL).permute(1, 0, 2))  # streamed every token: huge pages


def pack_fp32(weight: torch.Tensor) -> torch.Tensor:
    """Panels (P, K, 64) fp32 of an (N, K) fp32 weight, for `linear_fp32`."""
    return _panels(weight.detach().float().t())


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """Panels (P, K, 64) int8 of (K, N) int8 codes (the transposed weight), for `linear_int8`."""
    return _panels(q.to(torch.int8))


def linear_fp32(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for 2-D fp32 `x` (M, K) and `panels = pack_fp32(W)`; returns (M, n).

    Raises:
        RuntimeError: The kernels are not available (check `available()` first).
    """
    mod = get()
    if mod is None:
        raise RuntimeError("nomoat decode kernels are not available")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return mod.linear_f32(x, panels, bias, n)


def linear_int8(
    x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, n: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ (q * scale[:, None]).T + bias` for 2-D fp32 `x` (M, K) and `panels = pack_int8(q.T)`; returns (M, n).

    Raises:
        RuntimeError: The kernels are not available (check `available()` first).
    """
    mod = get()
    if mod is None:
        raise RuntimeError("nomoat decode kernels are not available")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return mod.linear_i8(x, panels, scale, bias, n)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row0: int,
    positions: torch.Tensor,
    kv_len: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """One decode step of attention in one call (fp32, CPU): rope, KV-cache write, attention over the cached keys.

    Replaces about 40 small torch ops per layer (rope, the cache's indexed writes, masked softmax attention), which
    cost 5 us each in dispatch: measured 10 ms of a 36 ms SmolLM2-135M decode step outside the matmuls.

    Args:
        q: New queries (B, 1, H, hd), unit stride on the last dimension (not rotated yet).
        k: New keys (B, 1, n_kv, hd), not rotated.
        v: New values (B, 1, n_kv, hd).
        cos: Rotary cosines (B, 1, rd), `rd <= hd` (the first `rd` channels rotate).
        sin: Rotary sines (B, 1, rd).
        k_cache: One layer's key cache (max_batch, n_kv, S, hd), contiguous; row `row0 + b` gets row b's key.
        v_cache: The layer's value cache, same shape.
        row0: First cache row of the batch.
        positions: int64 (B, 1): where each row's token is written; it attends to keys `0..position`.
        kv_len: Keys beyond `kv_len - 1` are never read.
        window: Sliding window (keys `> position - window`), or 0 for none.
        scale: Query scale.

    Returns:
        Attention outputs (B, 1, H * hd), ready for the output projection.
    """
    mod = get()
    if mod is None:
        raise RuntimeError("nomoat decode kernels are not available")
    return mod.decode_attention(q, k, v, cos.contiguous(), sin.contiguous(), k_cache, v_cache, row0,
                                positions, kv_len, window, scale)  # fmt: skip


class FusedDecodeLinear:
    """Linear layers that read the same input (q/k/v, gate/up), run at decode as one kernel call over shared panels.

    One call instead of three (or two) halves the parallel regions and Python dispatch of a decode step's
    projections. The layers keep their own (views of the same) panels and their own prefill paths, so fusing costs
    no memory. It applies only while the layers are the very modules it was built from (an adapter that replaces
    one, as LoRA injection does, turns it off), with gradients off, on fp32 CPU inputs of at most `max_rows` rows.

    Args:
        modules: The fused layers, in output order.
        panels: Their panels concatenated along the panel axis (every layer's width a multiple of `PANEL`).
        scale: Concatenated per-channel scales for int8 panels; None for fp32.
        max_rows: Rows per call up to which the kernels are used.
        check: Called with no argument before each use; False means the layers' weights changed (do not use).
    """

    def __init__(
        self,
        modules: list[torch.nn.Module],
        panels: torch.Tensor,
        scale: torch.Tensor | None,
        max_rows: int,
        check: Any = None,
    ) -> None:
        self.modules = modules
        self.panels = panels
        self.scale = scale
        self.max_rows = max_rows
        self.sizes = [m.out_features for m in modules]
        self.n = sum(self.sizes)
        self.check = check

    def __call__(self, x: torch.Tensor, modules: tuple[torch.nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
        """The layers' outputs (each (..., out_features)) for `x` (..., in_features), or None where not applicable."""
        if len(modules) != len(self.modules) or any(a is not b for a, b in zip(modules, self.modules)):
            return None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > self.max_rows or x2.dtype != torch.float32 or x2.device.type != "cpu":
            return None
        if torch.is_grad_enabled() or (self.check is not None and not self.check()):
            return None
        biases = [m.bias for m in self.modules]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else x2.new_zeros(n) for b, n in zip(biases, self.sizes)]).float()
        if self.scale is None:
            y = linear_fp32(x2, self.panels, self.n, bias)
        else:
            y = linear_int8(x2, self.panels, self.scale, self.n, bias)
        return tuple(t.view(*lead, t.shape[-1]) for t in y.split(self.sizes, dim=-1))


# Attribute of the owning module -> the projections fused there (Hugging Face names, as in transformer.py).
FUSED_GROUPS = {"_decode_qkv": ("q_proj", "k_proj", "v_proj"), "_decode_gate_up": ("gate_proj", "up_proj")}


def fusable_groups(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, list[torch.nn.Module]]]:
    """(owner, attribute, layers) for every q/k/v and gate/up group of `model` whose widths are whole panels."""
    out = []
    for owner in model.modules():
        for attr, names in FUSED_GROUPS.items():
            layers = [getattr(owner, n, None) for n in names]
            if hasattr(type(owner), attr) and all(m is not None for m in layers):
                if all(getattr(m, "out_features", 1) % PANEL == 0 for m in layers):
                    out.append((owner, attr, layers))
    return out
