// Rotary embedding and single-query attention of one head: shared by the decode attention op and the decode stack.
// The cached keys and values are fp32 or bf16 (`T`: float or uint16_t holding bf16, widened in registers).
#pragma once

#include <algorithm>
#include <type_traits>

#include "rows_bf16.h"
#include "vec.h"

template <typename T>
static inline vf ld_cache(const T* p) {
  if constexpr (std::is_same_v<T, float>) return ld(p);
  else return widen_bf16(p);
}

template <typename T>
static inline float cache_at(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) return p[i];
  else return bf16_to_f(p[i]);
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
template <int NVH, typename C>
static void attend_fixed(const float* q, const C* kb, const C* vb, int64_t lo, int64_t hi, int64_t p,
                         const float* knew, const float* vnew, float scale, float* w, float* out) {
  vf qv[NVH];
#pragma GCC unroll 16
  for (int j = 0; j < NVH; ++j) qv[j] = ld(q + j * W) * scale;
  constexpr int64_t hd = NVH * W;
  const int64_t T = hi - lo + 1;
  float mx = -INFINITY;
  auto dot = [&](const auto* kt) {
    vf acc = qv[0] * ld_cache(kt);
#pragma GCC unroll 16
    for (int j = 1; j < NVH; ++j) acc += qv[j] * ld_cache(kt + j * W);
    return hsum(acc);
  };
  for (int64_t t = lo; t <= hi; ++t) {
    const float sc = (knew && t == p) ? dot(knew) : dot(kb + t * hd);
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
  auto add = [&](const auto* vt, const vf e) {
#pragma GCC unroll 16
    for (int j = 0; j < NVH; ++j) acc[j] += e * ld_cache(vt + j * W);
  };
  for (int64_t t = lo; t <= hi; ++t) {
    if (vnew && t == p) add(vnew, splat(w[t - lo]));
    else add(vb + t * hd, splat(w[t - lo]));
  }
  const float inv = 1.f / sum;
#pragma GCC unroll 16
  for (int j = 0; j < NVH; ++j) st(out + j * W, acc[j] * inv);
}

// The same for any head size (scalar loops; hd not a multiple of the vector width).
template <typename C>
static void attend_any(const float* q, const C* kb, const C* vb, int64_t lo, int64_t hi, int64_t p,
                       const float* knew, const float* vnew, int64_t hd, float scale, float* w, float* out) {
  float mx = -INFINITY;
  for (int64_t t = lo; t <= hi; ++t) {
    const bool own = knew && t == p;
    float acc = 0.f;
    for (int64_t i = 0; i < hd; ++i) acc += q[i] * scale * (own ? knew[i] : cache_at(kb + t * hd, i));
    w[t - lo] = acc;
    mx = std::max(mx, acc);
  }
  float sum = 0.f;
  for (int64_t t = lo; t <= hi; ++t) sum += (w[t - lo] = sexp(w[t - lo] - mx));
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
  const float inv = 1.f / sum;
  for (int64_t t = lo; t <= hi; ++t) {
    const bool own = vnew && t == p;
    for (int64_t i = 0; i < hd; ++i) out[i] += w[t - lo] * (own ? vnew[i] : cache_at(vb + t * hd, i));
  }
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

template <typename C>
static inline void attend_head(const float* q, const C* kb, const C* vb, int64_t lo, int64_t hi, int64_t p,
                               const float* knew, const float* vnew, int64_t hd, float scale, float* w, float* out) {
  switch (hd == W * (hd / W) ? hd / W : 0) {
    case 1: attend_fixed<1>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 2: attend_fixed<2>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 4: attend_fixed<4>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 8: attend_fixed<8>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 16: attend_fixed<16>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    case 32: attend_fixed<32>(q, kb, vb, lo, hi, p, knew, vnew, scale, w, out); break;
    default: attend_any(q, kb, vb, lo, hi, p, knew, vnew, hd, scale, w, out); break;
  }
}
