// Rotary embedding and single-query attention of one head, or of the query heads that share one key/value head
// (`attend_heads`, each cached key and value read once for the group): shared by the decode attention op and the
// decode stack.
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

// The same for R query heads that share one key/value head (a GQA group): q holds R rows of hd, `w` R rows of score
// scratch `ws` floats apart, out R rows of hd. Each key and value vector is loaded once for the R heads.
template <int NVH, int R, typename C>
static void attend_fixed_group(const float* q, const C* kb, const C* vb, int64_t lo, int64_t hi, int64_t p,
                               const float* knew, const float* vnew, float scale, float* w, int64_t ws, float* out) {
  constexpr int64_t hd = NVH * W;
  vf qv[R][NVH];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NVH; ++j) qv[r][j] = ld(q + r * hd + j * W) * scale;
  const int64_t T = hi - lo + 1;
  float mx[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) mx[r] = -INFINITY;
  // Scores: four positions at a time, their R dot products each as vectors summed across lanes together
  // (`hsum4`: one reduction tree for four sums; one tree per sum cost more than the products). A block holding the
  // new token's position (its key a private fp32 copy) goes one position at a time.
  int64_t t = lo;
  while (t <= hi) {
    if (t + 3 <= hi && !(knew && p >= t && p <= t + 3)) {
      vf acc[R][4];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) acc[r][i] = vf{};
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const C* kt = kb + (t + i) * hd;
#pragma GCC unroll 16
        for (int j = 0; j < NVH; ++j) {
          const vf kv = ld_cache(kt + j * W);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) acc[r][i] += qv[r][j] * kv;
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], w + r * ws + t - lo);
      t += 4;
      continue;
    }
    auto one = [&](const auto* kt) {
      vf acc[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = vf{};
#pragma GCC unroll 16
      for (int j = 0; j < NVH; ++j) {
        const vf kv = ld_cache(kt + j * W);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[r] += qv[r][j] * kv;
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) w[r * ws + t - lo] = hsum(acc[r]);
    };
    if (knew && t == p) one(knew);
    else one(kb + t * hd);
    ++t;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float* wr = w + r * ws;
    vf mv = splat(-INFINITY);
    int64_t i = 0;
    for (; i + W <= T; i += W) {
      const vf x = ld(wr + i);
      mv = x > mv ? x : mv;
    }
    for (int k = 0; k < W; ++k) mx[r] = std::max(mx[r], mv[k]);
    for (; i < T; ++i) mx[r] = std::max(mx[r], wr[i]);
  }
  float inv[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* wr = w + r * ws;
    vf vs = vf{};
    int64_t i = 0;
    for (; i + W <= T; i += W) {
      const vf e = vexp(ld(wr + i) - mx[r]);
      st(wr + i, e);
      vs += e;
    }
    float sum = hsum(vs);
    for (; i < T; ++i) sum += (wr[i] = sexp(wr[i] - mx[r]));
    inv[r] = 1.f / sum;
  }
  vf acc[R][NVH];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NVH; ++j) acc[r][j] = vf{};
  auto add = [&](const auto* vt, int64_t t) {
    vf vv[NVH];
#pragma GCC unroll 16
    for (int j = 0; j < NVH; ++j) vv[j] = ld_cache(vt + j * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vf e = splat(w[r * ws + t]);
#pragma GCC unroll 16
      for (int j = 0; j < NVH; ++j) acc[r][j] += e * vv[j];
    }
  };
  for (int64_t t = lo; t <= hi; ++t) {
    if (vnew && t == p) add(vnew, t - lo);
    else add(vb + t * hd, t - lo);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NVH; ++j) st(out + r * hd + j * W, acc[r][j] * inv[r]);
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

// Heads that fit in registers together: R heads of NVH vectors with R * NVH <= 16, at most 4.
template <int NVH>
constexpr int group_heads() {
  return NVH >= 16 ? 1 : std::min(4, 16 / NVH);
}

template <int NVH, typename C>
static void attend_group_fixed(int64_t n, const float* q, const C* kb, const C* vb, int64_t lo, int64_t hi, int64_t p,
                               const float* knew, const float* vnew, float scale, float* w, int64_t ws, float* out) {
  constexpr int G = group_heads<NVH>(), hd = NVH * W;
  int64_t h = 0;
  for (; h + G <= n; h += G)
    attend_fixed_group<NVH, G>(q + h * hd, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out + h * hd);
  switch (n - h) {  // the rest: fewer than G heads
    case 0: break;
    case 1: attend_fixed_group<NVH, 1>(q + h * hd, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out + h * hd); break;
    case 2:
      if constexpr (G > 2)
        attend_fixed_group<NVH, 2>(q + h * hd, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out + h * hd);
      break;
    default:
      if constexpr (G > 3)
        attend_fixed_group<NVH, 3>(q + h * hd, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out + h * hd);
      break;
  }
}

// Decode attention of n query heads (q: n rows of hd) over one key/value head, as `attend_head` for each, the heads
// taken together in groups that fit in registers so each key and value is read once per group. `w`: n rows of
// scratch, ws >= hi - lo + 1 floats apart; out: n rows of hd.
template <typename C>
static inline void attend_heads(int64_t n, const float* q, const C* kb, const C* vb, int64_t lo, int64_t hi, int64_t p,
                                const float* knew, const float* vnew, int64_t hd, float scale, float* w, int64_t ws,
                                float* out) {
  switch (hd == W * (hd / W) ? hd / W : 0) {
    case 1: attend_group_fixed<1>(n, q, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out); break;
    case 2: attend_group_fixed<2>(n, q, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out); break;
    case 4: attend_group_fixed<4>(n, q, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out); break;
    case 8: attend_group_fixed<8>(n, q, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out); break;
    case 16: attend_group_fixed<16>(n, q, kb, vb, lo, hi, p, knew, vnew, scale, w, ws, out); break;
    default:
      for (int64_t h = 0; h < n; ++h)
        attend_head(q + h * hd, kb, vb, lo, hi, p, knew, vnew, hd, scale, w, out + h * hd);
      break;
  }
}
