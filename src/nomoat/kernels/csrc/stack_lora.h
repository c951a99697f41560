// Per-row LoRA adapters inside the decode stack (`decode_stack.cpp`): a row's delta on a projection is
// sum over its adapters of coef * scale * (x A^T) Bt.
//
// A step lists its adapter entries (row, slot, coefficient; nonzero coefficients only), sorted by slot then row, and
// cuts them into blocks of up to MAX_ROWS entries of one slot. Before each projection phase of a layer, an adapter
// phase whose units are runs of those blocks (about four units a thread: one-row blocks of 32 distinct adapters as
// units of their own ran 1% slower over 2 threads) computes the low-rank products c * scale * (x A^T) of every
// projection of the next phase once (each row of A read once per block, its rows' dot products together) into the
// layer's product buffer; each panel unit then adds (products) Bt for its 64 columns (`lora_expand`). Reads ahead: each
// entry's slice of Bt is r short rows far apart (read when needed, every one a cache miss), and the adapter phase has
// no compute to hide its reads of A behind, so for each row block a panel unit queues the block's Bt columns
// (`lora_rows_queue`) and a share of the A factors of the next adapter phase (`lora_a_queue`) on a read-ahead the
// block's own panel product paces over its FMAs (`Ahead`, gemv.h). (Asking for the first block's Bt in one burst before
// the product and pacing each next block's behind the block before it was measured 6% slower with 32 distinct adapters:
// a burst fills the core's miss buffers and stalls the product's own loads.) Products are stored whole (a unit may run
// twice, see decode_stack.cpp), in one buffer per layer: entry t, projection p at ((t * 7) + p) * R.
// Factors are fp32 or bf16 (half the bytes a step streams; widened exactly to fp32 in registers, fp32 sums).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemv.h"
#include "rows_bf16.h"

// One adapter's LoRA factors on one projection: delta(x) = coef[row][slot] * scale * (x A^T) Bt.
struct Lora {
  int64_t slot = 0, r = 0, in = 0, out = 0;
  float scale = 1.f;
  bool bf16 = false;          // factors in bf16 (else fp32)
  const void* A = nullptr;    // (r, in)
  const void* Bt = nullptr;   // (r, out)
};

// W factor values from p as fp32 (bf16 widened exactly), and one value.
static inline vf ld_factor(const float* p) { return ld(p); }
static inline vf ld_factor(const uint16_t* p) { return widen_bf16(p); }
static inline float factor_at(const float* p, int64_t i) { return p[i]; }
static inline float factor_at(const uint16_t* p, int64_t i) { return bf16_to_f(p[i]); }
constexpr int MAX_LORA_RANK = 256;

// A layer's adapters on its seven projections (q, k, v, o, gate, up, down), and each slot's entry per projection.
struct LayerLoras {
  std::vector<Lora> lora[7];
  std::vector<int> by_slot[7];  // slot -> index into lora[p], or -1

  void add(int proj, const Lora& e) {
    if ((int64_t)by_slot[proj].size() <= e.slot) by_slot[proj].resize(e.slot + 1, -1);
    by_slot[proj][e.slot] = (int)lora[proj].size();
    lora[proj].push_back(e);
  }
  const Lora* find(int proj, int64_t slot) const {
    if (slot >= (int64_t)by_slot[proj].size() || by_slot[proj][slot] < 0) return nullptr;
    return &lora[proj][by_slot[proj][slot]];
  }
};

// The step's adapter entries (see the top of this file).
struct LoraStep {
  int64_t E = 0;
  std::vector<int64_t> row, slot, block, row_ptr, row_ent, distinct;  // distinct: the step's slots, in order
  std::vector<int64_t> unit;  // adapter unit u: blocks unit[u] .. unit[u + 1] (whole blocks; `build`)
  std::vector<float> coef;

  // From coef (M, ncf): the entries with a nonzero coefficient among the first `slots` columns; their adapter units
  // for `threads` threads.
  void build(const float* cf, int64_t M, int64_t ncf, int64_t slots, int threads) {
    for (int64_t s = 0; s < slots; ++s)
      for (int64_t m = 0; m < M; ++m)
        if (cf[m * ncf + s] != 0.f) {
          if (row.empty() || slot.back() != s || (int64_t)row.size() - block.back() >= MAX_ROWS)
            block.push_back((int64_t)row.size());
          if (distinct.empty() || distinct.back() != s) distinct.push_back(s);
          row.push_back(m);
          slot.push_back(s);
          coef.push_back(cf[m * ncf + s]);
        }
    E = (int64_t)row.size();
    block.push_back(E);
    const int64_t want = std::max<int64_t>(1, E / (4 * threads));  // entries per unit: about four units a thread
    unit.assign(1, 0);
    for (int64_t b = 0; b < blocks(); ++b)
      if (block[b + 1] - block[unit.back()] >= want || b + 1 == blocks()) unit.push_back(b + 1);
    row_ptr.assign(M + 1, 0);
    for (int64_t t = 0; t < E; ++t) ++row_ptr[row[t] + 1];
    for (int64_t m = 0; m < M; ++m) row_ptr[m + 1] += row_ptr[m];
    row_ent.resize(E);
    std::vector<int64_t> fill(row_ptr.begin(), row_ptr.end() - 1);
    for (int64_t t = 0; t < E; ++t) row_ent[fill[row[t]]++] = t;
  }
  int64_t blocks() const { return (int64_t)block.size() - 1; }
  int64_t units() const { return (int64_t)unit.size() - 1; }
};

// out[j][i] = c[j] * a.scale * dot(x_j, A_i) for the N rows x_j of one block: each row of A is read once.
template <int N, typename T>
static inline void lora_shrink_rows(const Lora& a, const float* const* xs, const float* c, float* const* out) {
  const T* A = (const T*)a.A;
  for (int64_t i = 0; i < a.r; ++i) {
    const T* ai = A + i * a.in;
    vf acc[N];
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) acc[j] = vf{};
    int64_t k = 0;
    for (; k + W <= a.in; k += W) {
      const vf av = ld_factor(ai + k);
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) acc[j] += ld(xs[j] + k) * av;
    }
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      float s = hsum(acc[j]);
      for (int64_t kk = k; kk < a.in; ++kk) s += xs[j][kk] * factor_at(ai, kk);
      out[j][i] = s * c[j] * a.scale;
    }
  }
}

// G rows of A (from a0) against one row x: G independent sums (G streams from memory in flight), each x vector
// loaded once for them; out[q] = c * a.scale * dot(x, A_q).
template <int G, typename T>
static inline void lora_shrink_group(const Lora& a, const T* a0, const float* x, float c, float* out) {
  vf s[G] = {};
  int64_t k = 0;
  for (; k + W <= a.in; k += W) {
    const vf xv = ld(x + k);
#pragma GCC unroll 8
    for (int q = 0; q < G; ++q) s[q] += xv * ld_factor(a0 + q * a.in + k);
  }
  for (int q = 0; q < G; ++q) {
    float t = hsum(s[q]);
    for (int64_t kk = k; kk < a.in; ++kk) t += x[kk] * factor_at(a0 + q * a.in, kk);
    out[q] = t * c * a.scale;
  }
}

// The same for one row: eight rows of A at a time (measured 1% less CPU time a step with 32 distinct adapters than
// four at a time, and the same as sixteen), then four, then one.
template <typename T>
static inline void lora_shrink_one(const Lora& a, const float* x, float c, float* out) {
  const T* A = (const T*)a.A;
  int64_t i = 0;
  for (; i + 8 <= a.r; i += 8) lora_shrink_group<8, T>(a, A + i * a.in, x, c, out + i);
  for (; i + 4 <= a.r; i += 4) lora_shrink_group<4, T>(a, A + i * a.in, x, c, out + i);
  if (i < a.r) {  // the last r % 4 rows of A, one at a time
    Lora tail = a;
    tail.A = A + i * a.in, tail.r = a.r - i;
    float* rest = out + i;
    lora_shrink_rows<1, T>(tail, &x, &c, &rest);
  }
}

template <typename T>
static inline void lora_shrink_t(const Lora& a, int n, const float* const* xs, const float* c, float* const* out) {
  switch (n) {
    case 1: lora_shrink_one<T>(a, xs[0], c[0], out[0]); break;
    case 2: lora_shrink_rows<2, T>(a, xs, c, out); break;
    case 3: lora_shrink_rows<3, T>(a, xs, c, out); break;
    case 4: lora_shrink_rows<4, T>(a, xs, c, out); break;
    case 5: lora_shrink_rows<5, T>(a, xs, c, out); break;
    case 6: lora_shrink_rows<6, T>(a, xs, c, out); break;
    case 7: lora_shrink_rows<7, T>(a, xs, c, out); break;
    default: lora_shrink_rows<8, T>(a, xs, c, out); break;
  }
}

static inline void lora_shrink(const Lora& a, int n, const float* const* xs, const float* c, float* const* out) {
  if (a.bf16) lora_shrink_t<uint16_t>(a, n, xs, c, out);
  else lora_shrink_t<float>(a, n, xs, c, out);
}

// d[0..nn) += t (a.r products) times columns n0..n0+nn of a.Bt; a whole panel's 64 columns stay in registers.
template <typename T>
static inline void lora_expand_t(const float* t, const Lora& a, int64_t n0, int64_t nn, float* d) {
  const T* b = (const T*)a.Bt + n0;
  if (nn == PANEL) {
    vf acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = ld(d + v * W);
    for (int64_t i = 0; i < a.r; ++i, b += a.out) {
      const vf ti = splat(t[i]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] += ti * ld_factor(b + v * W);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) st(d + v * W, acc[v]);
    return;
  }
  for (int64_t i = 0; i < a.r; ++i, b += a.out)
    for (int64_t j = 0; j < nn; ++j) d[j] += t[i] * factor_at(b, j);
}

static inline void lora_expand(const float* t, const Lora& a, int64_t n0, int64_t nn, float* d) {
  if (a.bf16) lora_expand_t<uint16_t>(t, a, n0, nn, d);
  else lora_expand_t<float>(t, a, n0, nn, d);
}

// The projections of phase kind ph (0 q/k/v, 2 o, 3 gate/up, 4 down): p0 .. p0 + np.
static inline int phase_p0(int ph) { return ph == 0 ? 0 : ph == 2 ? 3 : ph == 3 ? 4 : 6; }
static inline int phase_np(int ph) { return ph == 0 ? 3 : ph == 3 ? 2 : 1; }

// Adapter unit u (block u of `ls`) before phase kind ph (0 q/k/v, 2 o, 3 gate/up, 4 down): the products of the
// phase's projections for the block's rows xs, into the layer's product buffer xa (E, 7, R).
static inline void lora_products(const LayerLoras& ad, const LoraStep& ls, int64_t u, int ph, const float* const* xs,
                                 float* xa, int64_t R) {
  const int64_t e0 = ls.block[u], slot = ls.slot[e0];
  const int n = (int)(ls.block[u + 1] - e0);
  const int p0 = phase_p0(ph), np = phase_np(ph);
  float* outs[MAX_ROWS];
  for (int proj = p0; proj < p0 + np; ++proj) {
    const Lora* a = ad.find(proj, slot);
    if (a == nullptr) continue;
    for (int j = 0; j < n; ++j) outs[j] = xa + ((e0 + j) * 7 + proj) * R;
    lora_shrink(*a, n, xs, ls.coef.data() + e0, outs);
  }
}

// Columns n0..n0+nn of Bt of every adapter entry of rows m0..m0+mm on projection `proj`, queued on a paced
// read-ahead (the rows' panel product asks for them while it computes).
static inline void lora_rows_queue(const LayerLoras& ad, const LoraStep& ls, int proj, int64_t n0, int64_t nn,
                                   int64_t m0, int mm, Ahead& ah) {
  if (ad.lora[proj].empty()) return;
  const Lora* last = nullptr;  // rows of one adapter (adjacent) ask for its columns once
  for (int64_t m = m0; m < m0 + mm; ++m)
    for (int64_t q = ls.row_ptr[m]; q < ls.row_ptr[m + 1]; ++q)
      if (const Lora* a = ad.find(proj, ls.slot[ls.row_ent[q]]); a != nullptr && a != last) {
        const int64_t esz = a->bf16 ? 2 : 4;
        ah.add((const char*)a->Bt + n0 * esz, a->out * esz, (int)a->r, nn * esz);
        last = a;
      }
}

// The A factors every adapter phase of a step reads, in the order `lora_a_queue` shares them out: per layer and phase
// (q/k/v, o, gate/up, down), each distinct slot of the step on each of the phase's projections, in that order, with
// its byte offset in the phase. Built once per step: a panel unit queues its share with a binary search, not a walk.
struct AQueue {
  std::vector<const char*> ptr;
  std::vector<int64_t> off, len, first{0};  // ranges of layer l, phase p: first[4l + p] .. first[4l + p + 1]
  static int index(int ph) { return ph == 0 ? 0 : ph == 2 ? 1 : ph == 3 ? 2 : 3; }

  template <typename Layers>
  void build(const Layers& layers, const LoraStep& ls) {
    for (const auto& ly : layers)
      for (int ph : {0, 2, 3, 4}) {
        int64_t at = 0;
        for (int proj = phase_p0(ph); proj < phase_p0(ph) + phase_np(ph); ++proj)
          for (int64_t s : ls.distinct)
            if (const Lora* a = ly.ad.find(proj, s)) {
              const int64_t bytes = a->r * a->in * (a->bf16 ? 2 : 4);
              ptr.push_back((const char*)a->A), off.push_back(at), len.push_back(bytes);
              at += bytes;
            }
        first.push_back((int64_t)ptr.size());
      }
  }
};

// Part i of n of the A factors of layer l's adapter phase before phase kind ph, queued on a read-ahead: the panel
// units of the phase before it ask for them while they compute, so the adapter phase (nothing to overlap its reads
// with) finds them in cache.
static inline void lora_a_queue(const AQueue& q, int64_t l, int ph, int64_t i, int64_t n, Ahead& ah) {
  const int64_t j = 4 * l + AQueue::index(ph), r0 = q.first[j], r1 = q.first[j + 1];
  if (r0 == r1) return;
  const int64_t total = q.off[r1 - 1] + q.len[r1 - 1];
  const int64_t lo = (total * i / n) & ~(int64_t)63, hi = total * (i + 1) / n;
  int64_t k = std::upper_bound(q.off.begin() + r0, q.off.begin() + r1, lo) - q.off.begin() - 1;
  for (; k < r1 && q.off[k] < hi; ++k) {
    const int64_t b0 = std::max(lo, q.off[k]), b1 = std::min(hi, q.off[k] + q.len[k]);
    if (b0 < b1) ah.add(q.ptr[k] + (b0 - q.off[k]), 0, 1, b1 - b0);
  }
}

// dl (mm x 64) = the adapters' delta on columns n0.. (nn of them) of projection `proj` for rows m0..m0+mm of the
// step, from the layer's products xa (E, 7, R); false when no adapter applies to them (dl untouched).
static inline bool lora_rows_delta(const LayerLoras& ad, const LoraStep& ls, const float* xa, int64_t R, int proj,
                                   int64_t n0, int64_t nn, int64_t m0, int mm, float* dl) {
  if (ad.lora[proj].empty()) return false;
  bool any = false;
  for (int64_t m = m0; m < m0 + mm; ++m)
    for (int64_t q = ls.row_ptr[m]; q < ls.row_ptr[m + 1]; ++q) {
      const int64_t t = ls.row_ent[q];
      const Lora* a = ad.find(proj, ls.slot[t]);
      if (a == nullptr) continue;
      if (!any) {
        std::memset(dl, 0, sizeof(float) * MAX_ROWS * PANEL);
        any = true;
      }
      lora_expand(xa + (t * 7 + proj) * R, *a, n0, nn, dl + (m - m0) * PANEL);
    }
  return any;
}
