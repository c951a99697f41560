// The decode stack's building blocks (`decode_stack.cpp`): one projection's weights (`Seg`: fp32, int8 or q4
// panels, or a bf16 row-major weight, read in place), a layer's plan, the normed row, one panel's product and the
// store of a new key and value into a bf16 cache.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <vector>

#include "gemv.h"
#include "int8_dot.h"
#include "q4_rows.h"
#include "rows_bf16.h"
#include "stack_lora.h"

static inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// This thread's CPU time (the profile's clock: a loaded machine's preemptions do not count).
static inline int64_t cpu_ns() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

struct alignas(64) Counter {
  std::atomic<int> v{0};
};

// A step's units: phase j has total[j], claimed in turn from its counter `next[j]`. A unit is done once (its flag)
// however often it runs. A panel unit's row blocks are claimed one at a time too, so a thread that waits for the
// phase to end takes blocks of the units still running (`open`, `blocks`) instead of idling: with two threads, a
// phase of 9 panels (SmolLM2's o and down) otherwise leaves one thread a whole panel's time (~60 us) to wait.
struct Units {
  std::vector<int> total;
  std::vector<int64_t> first;  // phase j's units: first[j] ..
  std::unique_ptr<Counter[]> next, done;
  std::unique_ptr<std::atomic<int>[]> flag, bnext, bdone;  // per unit: done, row blocks claimed, row blocks run

  explicit Units(std::vector<int> t) : total(std::move(t)), first(total.size() + 1, 0) {
    for (size_t i = 0; i < total.size(); ++i) first[i + 1] = first[i] + total[i];
    const int64_t n = first.back();
    next.reset(new Counter[total.size()]);
    done.reset(new Counter[total.size()]);
    flag.reset(new std::atomic<int>[n]);
    bnext.reset(new std::atomic<int>[n]);
    bdone.reset(new std::atomic<int>[n]);
    for (int64_t i = 0; i < n; ++i) flag[i] = bnext[i] = bdone[i] = 0;
  }
  int claim(int64_t j) { return next[j].v.fetch_add(1, std::memory_order_acq_rel); }
  bool complete(int64_t j) const { return done[j].v.load(std::memory_order_acquire) >= total[j]; }
  bool finished(int64_t j, int u) const { return flag[first[j] + u].load(std::memory_order_acquire) != 0; }
  void finish(int64_t j, int u) {
    if (flag[first[j] + u].exchange(1, std::memory_order_acq_rel) == 0) done[j].v.fetch_add(1, std::memory_order_release);
  }
  // Whether unit u of phase j (nb row blocks) has blocks nobody has claimed yet.
  bool open(int64_t j, int u, int64_t nb) const {
    return !finished(j, u) && bnext[first[j] + u].load(std::memory_order_relaxed) < nb;
  }
  // Runs f(m0) for the row blocks of unit u of phase j this call claims, or for all nb of them (claim false: a help
  // run, which must redo what a descheduled thread holds); `whole`: whether it ran all nb. Returns whether the unit
  // is complete once this call has run its blocks.
  template <class F>
  bool blocks(int64_t j, int u, int64_t nb, bool claim, bool& whole, F&& f) {
    int64_t n = 0;
    if (!claim) {
      for (; n < nb; ++n) f(n * MAX_ROWS);
    } else {
      for (int64_t b; (b = bnext[first[j] + u].fetch_add(1, std::memory_order_acq_rel)) < nb; ++n) f(b * MAX_ROWS);
    }
    whole = n == nb;
    return !claim || bdone[first[j] + u].fetch_add((int)n, std::memory_order_acq_rel) + n == nb;
  }
};

// A step's rope tables, one (M, 1, rd) fp32 cos and sin per layer kind (contiguous copies held while the step runs).
struct RopeTables {
  std::vector<at::Tensor> cs, ss;
  std::vector<const float*> cptr, sptr;
  int64_t rd = 0;
  RopeTables(const std::vector<at::Tensor>& cos, const std::vector<at::Tensor>& sin, int64_t M, int64_t hd) {
    TORCH_CHECK(cos.size() == sin.size() && !cos.empty(), "rope tables");
    rd = cos[0].size(-1);
    TORCH_CHECK(rd <= hd && rd % 2 == 0, "rope width");
    for (size_t i = 0; i < cos.size(); ++i) {
      cs.push_back(cos[i].contiguous());
      ss.push_back(sin[i].contiguous());
      TORCH_CHECK(cs[i].scalar_type() == at::kFloat && ss[i].scalar_type() == at::kFloat &&
                  cs[i].numel() == M * rd && ss[i].numel() == M * rd, "rope tables: fp32 (M, 1, rd)");
      cptr.push_back(cs[i].data_ptr<float>());
      sptr.push_back(ss[i].data_ptr<float>());
    }
  }
};

// One matrix: panels (P, K, 64) fp32 or int8 (with fp16 block scales (P, ceil(K / 32), 64)), or a bf16 (N, K)
// row-major weight; optional bias.
struct Seg {
  const char* w = nullptr;
  bool i8 = false, bf16 = false;
  int64_t P = 0, K = 0, N = 0;
  bool q4 = false;  // 4-bit panels (P, K / 32, BB) (q4_rows.h): read from the input's int8 blocks, `q4in`
  int64_t BB = 0;
  const uint16_t* ds = nullptr;  // int8: block scales
  const float* bias = nullptr;
  // int8: the block scales of panel p
  const uint16_t* ds_of(int64_t p) const { return ds + p * ((K + I8_BLOCK - 1) / I8_BLOCK) * PANEL; }
};

struct LayerPlan {
  const void* w_in = nullptr;  // norm weights, fp32 or (norm16) bf16
  const void* w_post = nullptr;
  bool norm16 = false;
  Seg q, k, v, o, gate, up, down;
  int64_t window = 0, kind = 0;
  LayerLoras ad;  // adapters per projection: q, k, v, o, gate, up, down
};

// The normed row: out = rmsnorm(r) * w (D channels; w fp32 or, norm16, bf16).
// The sum of squares in double, in eight independent sums (one chain of dependent adds cost a quarter of a many-row
// step's q/k/v phase).
static inline void norm_row(const float* r, const void* w, bool norm16, int64_t D, double eps, float* out) {
  double acc[8] = {};
  int64_t i0 = 0;
  for (; i0 + 8 <= D; i0 += 8)
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] += (double)r[i0 + j] * (double)r[i0 + j];
  for (; i0 < D; ++i0) acc[0] += (double)r[i0] * (double)r[i0];
  const double ss2 = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  const float rstd = (float)(1.0 / std::sqrt(ss2 / (double)D + eps));
  if (norm16)
    for (int64_t i = 0; i < D; ++i) out[i] = bf16_to_f(((const uint16_t*)w)[i]) * (r[i] * rstd);
  else
    for (int64_t i = 0; i < D; ++i) out[i] = ((const float*)w)[i] * (r[i] * rstd);
}

// buf (M x 64) = x (M x K, row stride ldx) times panel p of `s`.
// A q4 segment reads `q4in`, the same rows quantized per block of 32 (q4_rows.h), instead of x; so does an int8 one
// given `q4in` (integer dot products, int8_dot.h). `ah`: a read-ahead paced over the product (fp32 and int8 panels of
// the exact path); what it has not asked for of its required part (`Ahead::must`) is asked for at the end (all of it
// for the other kinds).
static inline void panel_gemv(const Seg& s, int64_t p, int M, const float* x, int64_t ldx, float* buf,
                              const q4k::Q4Rows& q4in = {}, Ahead* ah = nullptr) {
  if (ah != nullptr) ah->pace(s.K * (M > 4 ? 2 : 1));  // K steps a sweep, 2 sweeps over 4 rows
  if (s.q4) q4k::q4_panel(q4in, M, (const uint8_t*)s.w + p * (s.K / q4k::QK) * s.BB, s.BB, buf);
  else if (s.bf16)
    rows_any_bf16(M, x, ldx, (const uint16_t*)s.w + p * PANEL * s.K, s.K, (int)std::min<int64_t>(PANEL, s.N - p * PANEL),
                  buf);
  else if (s.i8 && q4in.xq != nullptr) i8k::panel_any(M, q4in, (const int8_t*)s.w + p * s.K * PANEL, s.ds_of(p), buf);
  else if (s.i8) panel_any<true>(M, x, ldx, s.w + p * s.K * PANEL, s.ds_of(p), s.K, buf, ah);
  else panel_any<false>(M, x, ldx, s.w + p * s.K * PANEL * 4, nullptr, s.K, buf, ah);
  if (ah != nullptr) ah->flush();
}

// Queues panel p of `s` (fp32 or int8 panels, with the int8 block scales) on `ah`, to be read ahead into L2 while
// another panel's product runs (nothing for other kinds or past the last panel); none of it required (`Ahead::must`).
static inline void queue_panel(const Seg& s, int64_t p, Ahead& ah) {
  if (s.q4 || s.bf16 || s.w == nullptr || p < 0 || p >= s.P) return;
  const int64_t bytes = s.K * PANEL * (s.i8 ? 1 : 4);
  ah.add(s.w + p * bytes, 0, 1, bytes);
  if (s.i8) ah.add(s.ds_of(p), 0, 1, (s.K + I8_BLOCK - 1) / I8_BLOCK * PANEL * 2);
}

// The same for unit u of a layer's projection phase kind ph (0: panel u of q, then of k, then of v; 2: o; 3: gate
// and up; 4: down).
static inline void queue_unit(const LayerPlan& ly, int ph, int64_t u, Ahead& ah) {
  if (ph == 0) {
    const Seg* s = u < ly.q.P ? &ly.q : u < ly.q.P + ly.k.P ? &ly.k : &ly.v;
    queue_panel(*s, s == &ly.q ? u : s == &ly.k ? u - ly.q.P : u - ly.q.P - ly.k.P, ah);
  } else if (ph == 2 || ph == 4) {
    queue_panel(ph == 2 ? ly.o : ly.down, u, ah);
  } else if (ph == 3) {
    queue_panel(ly.gate, u, ah);
    queue_panel(ly.up, u, ah);
  }
}

// Queues on `ah` (cleared) the weights of the projection unit t of phase j, or of the following projection phases
// (t counted on over their units; `kinds`: each phase's kind in a layer of nph phases); returns &ah, or null where
// there is nothing to read (past the last layer). A panel unit u of a many-row step (whose panel stays in L2 over its
// row blocks, so that it computes more than it reads) reads ahead unit u + nt, the one its thread likely runs next,
// paced over its products: that unit's first row block then finds its weights in L2 instead of waiting on memory.
static inline Ahead* queue_ahead(const std::vector<LayerPlan>& layers, const int* kinds, int nph,
                                 const std::vector<int>& total, int64_t j, int64_t t, Ahead& ah) {
  ah.clear();
  for (const int64_t end = (int64_t)layers.size() * nph; j < end; ++j) {
    const int k = kinds[j % nph];
    if (k == 0 || k >= 2) {
      if (t < total[j]) {
        queue_unit(layers[j / nph], k, t, ah);
        break;
      }
      t -= total[j];
    }
  }
  return ah.n > 0 ? &ah : nullptr;
}

static Seg make_seg(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias, int64_t K,
                    int64_t N, const char* what) {
  Seg s;
  if (w.scalar_type() == at::kBFloat16) {  // the (N, K) weight itself
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(0) == N && w.size(1) == K, what,
                ": bf16 (N, K) contiguous expected");
    s.bf16 = true;
    s.w = (const char*)w.data_ptr();
    s.P = (N + PANEL - 1) / PANEL;
    s.K = K;
    s.N = N;
    if (bias.numel() > 0) {
      TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == N, what, ": bias fp32");
      s.bias = bias.data_ptr<float>();
    }
    return s;
  }
  if (w.scalar_type() == at::kByte) {  // 4-bit panels
    TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && K % q4k::QK == 0 && w.size(1) * q4k::QK == K &&
                w.size(0) * PANEL >= N && (w.size(2) == q4k::CODE_BYTES + 2 * PANEL ||
                w.size(2) == q4k::CODE_BYTES + 4 * PANEL), what, ": q4 panels (P, K / 32, 1152 | 1280) expected");
    s.q4 = true;
    s.w = (const char*)w.data_ptr();
    s.P = w.size(0);
    s.BB = w.size(2);
    s.K = K;
    s.N = N;
    if (bias.numel() > 0) {
      TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() >= N, what, ": bias fp32");
      s.bias = bias.data_ptr<float>();
    }
    return s;
  }
  TORCH_CHECK(w.dim() == 3 && w.size(2) == PANEL && w.is_contiguous() && w.size(1) == K && w.size(0) * PANEL >= N,
              what, ": panels (P, K, 64) contiguous expected");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kChar, what, ": fp32 or int8 panels");
  s.i8 = w.scalar_type() == at::kChar;
  s.w = (const char*)w.data_ptr();
  s.P = w.size(0);
  s.K = K;
  s.N = N;
  if (s.i8) {
    TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 3 &&
                scale.size(0) == s.P && scale.size(1) == (K + I8_BLOCK - 1) / I8_BLOCK && scale.size(2) == PANEL,
                what, ": int8 panels need fp16 block scales (P, ceil(K / 32), 64)");
    s.ds = (const uint16_t*)scale.data_ptr();
  }
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() >= N,
                what, ": bias fp32 (N,)");
    s.bias = bias.data_ptr<float>();
  }
  return s;
}

// Writes the new key and value (hd each) at element `at` of bf16 caches, rounded; `knew` becomes the rounded key and
// the rounded value is returned (in `vr`), so the step attends to what later steps will read.
static inline const float* store_kv16(char* kc, char* vc, int64_t at, float* knew, const float* vnew, float* vr,
                                      int64_t hd) {
  uint16_t* kd = (uint16_t*)kc + at;
  uint16_t* vd = (uint16_t*)vc + at;
  for (int64_t i = 0; i < hd; ++i) {
    const uint16_t k16 = f_to_bf16(knew[i]), v16 = f_to_bf16(vnew[i]);
    kd[i] = k16;
    vd[i] = v16;
    knew[i] = bf16_to_f(k16);
    vr[i] = bf16_to_f(v16);
  }
  return vr;
}

// Panel u of an output head `s` (fp32 / int8 panels or bf16 rows of s.N outputs) for M normed rows xn (M, s.K): logits (M, s.N)
// columns u * 64 ... (biased); `q`: the rows quantized per block (int8 dot products) or empty; buf: scratch. Over 8
// rows, panel u + ahead is read ahead (`queue_ahead`).
static inline void head_panel(const Seg& s, int64_t u, int64_t M, const float* xn, const q4k::Q4Rows& q, float* buf,
                              float* logits, int64_t ahead = 0) {
  Ahead ah;
  if (M > MAX_ROWS && ahead > 0) queue_panel(s, u + ahead, ah);
  const int64_t n0 = u * PANEL, nn = std::min<int64_t>(PANEL, s.N - n0);
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    const int mm = (int)std::min<int64_t>(MAX_ROWS, M - m0);
    panel_gemv(s, u, mm, xn + m0 * s.K, s.K, buf, q.rows(m0), ah.n > 0 ? &ah : nullptr);
    for (int64_t m = 0; m < mm; ++m) {
      float* dst = logits + (m0 + m) * s.N + n0;
      const float* src = buf + m * PANEL;
      for (int64_t j = 0; j < nn; ++j) dst[j] = s.bias ? src[j] + s.bias[n0 + j] : src[j];
    }
  }
}
