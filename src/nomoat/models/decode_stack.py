"""One decode step of the whole decoder stack in one compiled call (fp32 activations, CPU, 1-8 rows).

With `kernels.py`, a decode step of a SmolLM2-135M-shaped model still made about 7 kernel calls and 15 torch ops
per layer from Python (5 ms of a 33 ms token in dispatch), and each kernel call opened its own OpenMP parallel
region: under `OMP_WAIT_POLICY=PASSIVE` every region wakes a sleeping worker thread (about 120 wake-ups a token,
a quarter of the step). Here one C++ call runs every layer of a Llama/Mistral/Qwen2-style pre-norm block stack for
M <= 8 rows, one new token each, and returns the hidden states before the final norm:

    for each layer:  x_n = rmsnorm(x) * w_in;  qkv = x_n Wqkv^T (+ bias);  rope on q, k;  write k, v into the cache
                     attention over the cached keys 0..pos (GQA, sliding window);  x += attn Wo^T (+ bias)
                     x_n = rmsnorm(x) * w_post;  x += (silu(x_n Wg^T) * (x_n Wu^T)) Wd^T

Weights are the layers' own panels (`PackedLinear.panels`, int8 `QuantizedLinear` panels with their per-channel
scales; the fused q/k/v and gate/up tensors of `pack_model` / `quantize_model` are views of them), so the plan costs
no weight memory. The matmuls use `kernels.py`'s panel GEMV templates (compiled again into this extension).

Threading: ONE OpenMP parallel region per step. Each layer is five phases (q/k/v panels; attention over (row,
key/value head); output-projection panels added to the residual; gate/up panel pairs with SiLU; down panels added to
the residual). A phase's work units are claimed one at a time from an atomic counter, and a unit runs once the
previous phase has *finished all its units* (per-unit done flags and a count, not a barrier of threads). A thread
that finds a phase fully claimed skips it without waiting, so a thread that the shared VM deschedules holds nobody
back unless it holds a unit. And even then only briefly: a thread that needs a phase finished spins (`_mm_pause`)
for 20 us plus twice its own last time for such a unit, then runs the unfinished units itself. A unit may thus run
twice, even concurrently, so every unit is idempotent: each step's intermediates have one buffer per layer (and the
residual one per half layer: `x_next = x + projection`, never `x += ...`), and every shared write stores a final
value (attention accumulates in private scratch). Measured with a busy-loop process and another job sharing the 2
cores, a SmolLM2-135M step took 92-116 ms on 2 threads that waited for each other (spinning, then yielding or
sleeping), 35-42 on 1 thread, and 30-32 on 2 threads with helping (about 5 of the step's 2,000 units helped; when
idle, 2 threads take 16 ms, 1 thread 21). No thread ever sleeps inside the region; only its end waits for a
descheduled thread (OpenMP's join). The workspace (a few MB at 8 rows) belongs to the plan; a mutex serialises
calls. The RMSNorm of a phase's input is computed by each thread that runs a unit of it (M x hidden values: cheaper
than synchronising). An attention unit is a (row, key/value head): it rotates the new key, writes it and the new
value into the cache, and attends each query head of the group (`attend_head`: vectorised scores, exp and weighted
sum) reading the new key and value from its own copies, so attention needs no extra phase.

Numerics follow the unfused path (`Transformer` layers with `kernels.py`): the same GEMV code and accumulation order,
RMSNorm's mean of squares in double (F.rms_norm's fp32 result to rounding), rotate-half rope, fp32 softmax. Logits
agree with the unfused path to about 1e-6 relative.

Where it applies (else `Transformer.forward` runs its layers as before): a cached forward of one token per row,
rows a slice, at most `MAX_ROWS` rows, fp32 on CPU, gradients off, not under `torch.compile`; every layer a plain
pre-norm `Block` (no sandwich norm, q/k norm, soft-capping, Gemma norm offset or MLP bias; SiLU), every projection a
`PackedLinear` with panels or an int8 `QuantizedLinear`, and every module and weight still the one the plan was built
from (LoRA injection replaces modules, which turns it off: `DecodeStack.fallbacks` counts those calls). An adapter
bank's layers (`nomoat.lora.bank`) are seen through: the plan takes their base layers and each adapter's factors
(`add_lora`), and a step gets each row's adapter weights (`coef`, from the bank's current row-group plan), adding
`weight * scaling * (x A^T) B^T` to every projection's output panel by panel (x A^T is recomputed per panel: a
unit stays self-contained, and it costs 16 x 576 FMAs against the panel's 576 x 64 at rank 16). Measured
(SmolLM2-135M shape, one r=16 adapter on all linear layers, batch 1): adapter requests 23 -> 46-53 tok/s, base
requests on an engine with adapters loaded 29-31 -> 48-57. `NOMOAT_KERNELS=0` disables it with the other kernels,
`NOMOAT_DECODE_STACK=0` disables only it (for A/B).

Measured on the 2-core AMD EPYC (AVX-512) VM while its neighbours were idle, 2 threads, OMP_WAIT_POLICY=PASSIVE,
random weights; `benchmarks/bench_decode_kernels.py --kernels-only [--shape S] [--batch B]` (64 greedy steps after a
32-token prefill, best of 3 interleaved runs), tokens/s of all rows, layer by layer (`NOMOAT_DECODE_STACK=0`) ->
stack:
    SmolLM2-135M  batch 1: fp32 30.9 -> 46.6, int8 59.9 -> 109.6;  batch 8: fp32 178 -> 276, int8 225 -> 356
    Qwen2.5-0.5B  batch 1: fp32 13.9 -> 17.8, int8 32.5 -> 50.6;   batch 8: fp32 71 -> 93,   int8 103 -> 134
The layers' fp32 weights then stream at 26-27 GB/s (the machine reads about 26-29): the stack's part of a SmolLM2
step is about 16 ms of 21, the output head (outside the stack) 4. Through the engine (`bench_generate.py --quick`):
SmolLM2 fp32 decode 29.2 -> 47.7 tok/s (transformers 13.9: 3.4x), int8 47.5 -> 112.6 (llama.cpp q8_0 112.4).
Machine speed drifts by 10-30% over minutes here, so compare only interleaved runs.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import threading
from typing import Any

import torch

from nomoat.models import kernels

logger = logging.getLogger(__name__)

MAX_ROWS = 8  # rows per call (the GEMV templates hold at most 8 rows in registers)

_STACK_SOURCE = r"""
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <omp.h>

#ifndef SPIN_NS
#define SPIN_NS 20000
#endif

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

static inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct alignas(64) Counter {
  std::atomic<int> v{0};
};

// One matrix: panels (P, K, 64) fp32 or int8, optional per-channel scale (int8) and bias.
struct Seg {
  const char* w = nullptr;
  bool i8 = false;
  int64_t P = 0, K = 0, N = 0;
  const float* scale = nullptr;
  const float* bias = nullptr;
};

// One adapter's LoRA factors on one projection: delta(x) = coef[row][slot] * scale * (x A^T) Bt.
struct Lora {
  int64_t slot = 0, r = 0, in = 0, out = 0;
  float scale = 1.f;
  const float* A = nullptr;   // (r, in)
  const float* Bt = nullptr;  // (r, out)
};
constexpr int MAX_LORA_RANK = 256;

struct LayerPlan {
  const float* w_in = nullptr;
  const float* w_post = nullptr;
  Seg q, k, v, o, gate, up, down;
  int64_t window = 0, kind = 0;
  std::vector<Lora> lora[7];  // per projection: q, k, v, o, gate, up, down
};

// buf (M x 64) = x (M x K, row stride ldx) times panel p of `s` (unscaled).
static inline void panel_gemv(const Seg& s, int64_t p, int M, const float* x, int64_t ldx, float* buf) {
  if (s.i8) panel_any<true>(M, x, ldx, s.w + p * s.K * PANEL, s.K, buf);
  else panel_any<false>(M, x, ldx, s.w + p * s.K * PANEL * 4, s.K, buf);
}

static Seg make_seg(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& bias, int64_t K,
                    int64_t N, const char* what) {
  Seg s;
  TORCH_CHECK(w.dim() == 3 && w.size(2) == PANEL && w.is_contiguous() && w.size(1) == K && w.size(0) * PANEL >= N,
              what, ": panels (P, K, 64) contiguous expected");
  TORCH_CHECK(w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kChar, what, ": fp32 or int8 panels");
  s.i8 = w.scalar_type() == torch::kChar;
  s.w = (const char*)w.data_ptr();
  s.P = w.size(0);
  s.K = K;
  s.N = N;
  if (s.i8) {
    TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() >= N,
                what, ": int8 panels need fp32 scales (N,)");
    s.scale = scale.data_ptr<float>();
  }
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() >= N,
                what, ": bias fp32 (N,)");
    s.bias = bias.data_ptr<float>();
  }
  return s;
}

class StackPlan {
 public:
  StackPlan(int64_t D, int64_t H, int64_t nkv, int64_t hd, int64_t I, double eps, double scale)
      : D_(D), H_(H), nkv_(nkv), hd_(hd), I_(I), eps_(eps), scale_((float)scale) {
    TORCH_CHECK(H > 0 && nkv > 0 && H % nkv == 0 && hd > 0 && D > 0 && I > 0, "bad shapes");
  }

  // t: w_in, w_post, then (panels, scale, bias) for q, k, v, o and (panels, scale) for gate, up, down; an absent
  // scale or bias is an empty tensor. window: sliding window or 0; kind: index of the layer's rope table.
  void add_layer(std::vector<torch::Tensor> t, int64_t window, int64_t kind) {
    TORCH_CHECK(t.size() == 20, "add_layer: 20 tensors expected");
    const int64_t Q = H_ * hd_, KV = nkv_ * hd_;
    for (int i = 0; i < 2; ++i)
      TORCH_CHECK(t[i].scalar_type() == torch::kFloat && t[i].is_contiguous() && t[i].numel() == D_, "norm weight");
    LayerPlan L;
    L.w_in = t[0].data_ptr<float>();
    L.w_post = t[1].data_ptr<float>();
    L.q = make_seg(t[2], t[3], t[4], D_, Q, "q_proj");
    L.k = make_seg(t[5], t[6], t[7], D_, KV, "k_proj");
    L.v = make_seg(t[8], t[9], t[10], D_, KV, "v_proj");
    L.o = make_seg(t[11], t[12], t[13], Q, D_, "o_proj");
    L.gate = make_seg(t[14], t[15], torch::empty({0}), D_, I_, "gate_proj");
    L.up = make_seg(t[16], t[17], torch::empty({0}), D_, I_, "up_proj");
    L.down = make_seg(t[18], t[19], torch::empty({0}), I_, D_, "down_proj");
    TORCH_CHECK(L.gate.P == L.up.P, "gate/up panel counts differ");
    L.window = window;
    L.kind = kind;
    layers_.push_back(L);
    for (auto& x : t) keep_.push_back(x);
  }

  int64_t num_layers() const { return (int64_t)layers_.size(); }

  // Registers adapter `slot`'s factors on projection `proj` (0-6: q, k, v, o, gate, up, down) of layer `layer`:
  // A (r, in) and Bt (r, out) fp32 contiguous; `scale` multiplies the per-row coefficient given to `run`.
  void add_lora(int64_t layer, int64_t proj, int64_t slot, torch::Tensor A, torch::Tensor Bt, double scale) {
    TORCH_CHECK(layer >= 0 && layer < num_layers() && proj >= 0 && proj < 7 && slot >= 0, "add_lora: indices");
    TORCH_CHECK(A.scalar_type() == torch::kFloat && Bt.scalar_type() == torch::kFloat && A.is_contiguous() &&
                Bt.is_contiguous() && A.dim() == 2 && Bt.dim() == 2 && A.size(0) == Bt.size(0),
                "add_lora: A (r, in) and Bt (r, out), fp32 contiguous");
    TORCH_CHECK(A.size(0) <= MAX_LORA_RANK, "add_lora: rank above ", MAX_LORA_RANK);
    const LayerPlan& L = layers_[layer];
    const Seg* segs[7] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
    TORCH_CHECK(A.size(1) == segs[proj]->K && Bt.size(1) == segs[proj]->N, "add_lora: shapes do not match the layer");
    Lora e;
    e.slot = slot;
    e.r = A.size(0);
    e.in = A.size(1);
    e.out = Bt.size(1);
    e.scale = (float)scale;
    e.A = A.data_ptr<float>();
    e.Bt = Bt.data_ptr<float>();
    layers_[layer].lora[proj].push_back(e);
    lora_slots_ = std::max(lora_slots_, slot + 1);
    keep_.push_back(A);
    keep_.push_back(Bt);
  }

  // Units run by a thread that gave up waiting for the thread holding them (so twice, or first by the helper).
  int64_t helped() const { return helped_.load(); }

  // How long a thread waits for a unit another thread holds before running it itself: spin_ns plus unit_factor
  // times its own last duration of such a unit (defaults SPIN_NS and 2; 0 and 0 help at once). For tests, a
  // negative spin_ns makes every thread run every unit of every phase again once it is complete.
  void set_spin(int64_t spin_ns, int64_t unit_factor) {
    spin_ns_ = spin_ns;
    unit_factor_ = unit_factor;
  }

  // Runs every layer on x (M, 1, D) for one token per row; returns the new hidden states (M, 1, D).
  torch::Tensor run(torch::Tensor x, std::vector<torch::Tensor> cos, std::vector<torch::Tensor> sin,
                    torch::Tensor positions, int64_t row0, int64_t kv_len, std::vector<torch::Tensor> kcache,
                    std::vector<torch::Tensor> vcache, torch::Tensor coef) {
    const int64_t L = num_layers(), D = D_, H = H_, nkv = nkv_, hd = hd_, I = I_;
    const int64_t Q = H * hd, KV = nkv * hd, NQKV = Q + 2 * KV, rep = H / nkv;
    TORCH_CHECK(L > 0, "no layers");
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 3 && x.size(1) == 1 && x.size(2) == D, "x: (M, 1, D)");
    const int64_t M = x.size(0);
    TORCH_CHECK(M >= 1 && M <= 8, "1 to 8 rows");
    TORCH_CHECK((int64_t)kcache.size() == L && (int64_t)vcache.size() == L, "one key and value cache per layer");
    TORCH_CHECK(cos.size() == sin.size() && !cos.empty(), "rope tables");
    std::vector<torch::Tensor> cs, ss;
    std::vector<const float*> cptr, sptr;
    const int64_t rd = cos[0].size(-1);
    TORCH_CHECK(rd <= hd && rd % 2 == 0, "rope width");
    for (size_t i = 0; i < cos.size(); ++i) {
      cs.push_back(cos[i].contiguous());
      ss.push_back(sin[i].contiguous());
      TORCH_CHECK(cs[i].scalar_type() == torch::kFloat && ss[i].scalar_type() == torch::kFloat &&
                  cs[i].numel() == M * rd && ss[i].numel() == M * rd, "rope tables: fp32 (M, 1, rd)");
      cptr.push_back(cs[i].data_ptr<float>());
      sptr.push_back(ss[i].data_ptr<float>());
    }
    const int64_t S = kcache[0].size(2);
    std::vector<float*> kc(L), vc(L);
    for (int64_t l = 0; l < L; ++l) {
      for (auto* c : {&kcache[l], &vcache[l]}) {
        TORCH_CHECK(c->scalar_type() == torch::kFloat && c->is_contiguous() && c->dim() == 4 && c->size(1) == nkv &&
                    c->size(2) == S && c->size(3) == hd && row0 >= 0 && row0 + M <= c->size(0), "cache layout");
      }
      TORCH_CHECK(layers_[l].kind >= 0 && layers_[l].kind < (int64_t)cs.size(), "rope kind");
      kc[l] = kcache[l].data_ptr<float>();
      vc[l] = vcache[l].data_ptr<float>();
    }
    TORCH_CHECK(kv_len >= 1 && kv_len <= S, "kv_len");
    TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.numel() == M, "positions: int64 (M, 1)");
    auto pos_c = positions.contiguous();
    const int64_t* pos = pos_c.data_ptr<int64_t>();
    for (int64_t b = 0; b < M; ++b) TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "position outside the cache");
    // coef (M, slots): each row's weight for each registered adapter slot; empty: no adapter applies
    const float* cf = nullptr;
    torch::Tensor coef_c;
    if (coef.numel() > 0) {
      TORCH_CHECK(coef.scalar_type() == torch::kFloat && coef.dim() == 2 && coef.size(0) == M &&
                  coef.size(1) >= lora_slots_, "coef: fp32 (M, slots)");
      coef_c = coef.contiguous();
      cf = coef_c.data_ptr<float>();
    }
    const int64_t ncf = coef.numel() > 0 ? coef.size(1) : 0;

    std::lock_guard<std::mutex> lock(mu_);  // the workspace is the plan's: one call at a time
    const int nt = std::max(1, at::get_num_threads());
    // Every intermediate has one buffer per layer (and the residual one per half-layer), so that running a unit
    // twice (a thread helping a descheduled one) writes the same values where the first run would have.
    const int64_t per_thread = M * D + kv_len + 3 * hd + 16;
    const size_t need = (size_t)((2 * L + 1) * M * D + L * M * (NQKV + Q + I) + nt * per_thread);
    if (ws_.size() < need) ws_.resize(need);
    float* X = ws_.data();                    // (2L + 1) residual states (M, D)
    float* QKV = X + (2 * L + 1) * M * D;     // per layer (M, NQKV)
    float* ATT = QKV + L * M * NQKV;          // per layer (M, Q)
    float* ACT = ATT + L * M * Q;             // per layer (M, I)
    float* TLS = ACT + L * M * I;             // per thread: normed input (M, D), rope and score scratch
    std::memcpy(X, x.contiguous().data_ptr<float>(), M * D * sizeof(float));

    const int64_t NP = L * 5;
    std::vector<int> total(NP);
    std::vector<int64_t> first(NP + 1, 0);
    for (int64_t l = 0; l < L; ++l) {
      const LayerPlan& ly = layers_[l];
      const int64_t t5[5] = {ly.q.P + ly.k.P + ly.v.P, M * nkv, ly.o.P, ly.gate.P, ly.down.P};
      for (int ph = 0; ph < 5; ++ph) total[l * 5 + ph] = (int)t5[ph];
    }
    for (int64_t i = 0; i < NP; ++i) first[i + 1] = first[i] + total[i];
    std::unique_ptr<Counter[]> next(new Counter[NP]), done(new Counter[NP]);
    std::unique_ptr<std::atomic<unsigned char>[]> flag(new std::atomic<unsigned char>[first[NP]]);
    for (int64_t i = 0; i < first[NP]; ++i) flag[i].store(0, std::memory_order_relaxed);

    auto body = [&](int tid) {
      float* xn = TLS + (int64_t)tid * per_thread;
      float* qrot = xn + M * D;
      float* knew = qrot + hd;
      float* obuf = knew + hd;
      float* w = obuf + hd;
      int64_t xn_for = -1;          // the phase whose normed input xn holds
      int64_t frontier = 0;         // every phase below it is known complete
      int64_t unit_ns[5] = {0, 0, 0, 0, 0};  // this thread's last duration of a unit, per phase kind
      alignas(64) float buf[8 * PANEL];
      alignas(64) float buf2[8 * PANEL];

      auto norm_into = [&](const float* src, const float* wt) {
        for (int64_t m = 0; m < M; ++m) {
          const float* r = src + m * D;
          double ss2 = 0.0;
          for (int64_t i = 0; i < D; ++i) ss2 += (double)r[i] * (double)r[i];
          const float rstd = (float)(1.0 / std::sqrt(ss2 / (double)D + eps_));
          for (int64_t i = 0; i < D; ++i) xn[m * D + i] = wt[i] * (r[i] * rstd);
        }
      };

      // dl (M x 64) = the adapters' delta on columns n0.. (nn of them) of projection `proj` for input x (M x K,
      // row stride ldx); false when no adapter applies to any row (dl untouched).
      alignas(64) float xa[MAX_LORA_RANK];
      auto lora_delta = [&](const LayerPlan& ly, int proj, const float* x, int64_t ldx, int64_t n0, int64_t nn,
                            float* dl) -> bool {
        if (cf == nullptr || ly.lora[proj].empty()) return false;
        bool any = false;
        for (const Lora& e : ly.lora[proj]) {
          for (int64_t m = 0; m < M; ++m) {
            const float c = cf[m * ncf + e.slot] * e.scale;
            if (c == 0.f) continue;
            if (!any) {
              std::memset(dl, 0, sizeof(float) * M * PANEL);
              any = true;
            }
            const float* xm = x + m * ldx;
            for (int64_t i = 0; i < e.r; ++i) {
              const float* a = e.A + i * e.in;
              vf acc = vf{};
              int64_t k = 0;
              for (; k + W <= e.in; k += W) acc += ld(xm + k) * ld(a + k);
              float sum = hsum(acc);
              for (; k < e.in; ++k) sum += xm[k] * a[k];
              xa[i] = sum * c;
            }
            float* d = dl + m * PANEL;
            for (int64_t i = 0; i < e.r; ++i) {
              const float* b = e.Bt + i * e.out + n0;
              const float w = xa[i];
              for (int64_t j = 0; j < nn; ++j) d[j] += w * b[j];
            }
          }
        }
        return any;
      };
      alignas(64) float dl[8 * PANEL];
      alignas(64) float dl2[8 * PANEL];

      // Unit u of phase idx; its inputs (the previous phases) are complete. Idempotent.
      auto run_unit = [&](int64_t idx, int u) {
        const int64_t l = idx / 5;
        const int ph = (int)(idx % 5);
        const LayerPlan& ly = layers_[l];
        const int64_t t0 = now_ns();
        if ((ph == 0 || ph == 3) && xn_for != idx) {
          norm_into(X + (2 * l + (ph == 3)) * M * D, ph == 0 ? ly.w_in : ly.w_post);
          xn_for = idx;
        }
        if (ph == 0) {  // q/k/v panel -> qkv (M, NQKV)
          const Seg* s = &ly.q;
          int64_t p = u, off = 0;
          if (p >= ly.q.P) {
            p -= ly.q.P;
            s = &ly.k;
            off = Q;
            if (p >= ly.k.P) {
              p -= ly.k.P;
              s = &ly.v;
              off = Q + KV;
            }
          }
          panel_gemv(*s, p, (int)M, xn, D, buf);
          const int64_t n0 = p * PANEL, nn = std::min<int64_t>(PANEL, s->N - n0);
          const bool has_d = lora_delta(ly, s == &ly.q ? 0 : s == &ly.k ? 1 : 2, xn, D, n0, nn, dl);
          for (int64_t m = 0; m < M; ++m) {
            float* dst = QKV + (l * M + m) * NQKV + off + n0;
            const float* src = buf + m * PANEL;
            for (int64_t j = 0; j < nn; ++j) {
              float v = s->scale ? src[j] * s->scale[n0 + j] : src[j];
              v = s->bias ? v + s->bias[n0 + j] : v;
              dst[j] = has_d ? v + dl[m * PANEL + j] : v;
            }
          }
        } else if (ph == 1) {  // attention of (row b, key/value head g) for the group's query heads
          const int64_t b = u / nkv, g = u % nkv, p = pos[b];
          const float* c = cptr[ly.kind] + b * rd;
          const float* sn = sptr[ly.kind] + b * rd;
          const float* row = QKV + (l * M + b) * NQKV;
          rope_head(row + Q + g * hd, c, sn, rd, hd, knew);
          const float* vnew = row + Q + KV + g * hd;
          const int64_t base = ((row0 + b) * nkv + g) * S * hd;
          std::memcpy(kc[l] + base + p * hd, knew, hd * sizeof(float));
          std::memcpy(vc[l] + base + p * hd, vnew, hd * sizeof(float));
          const int64_t hi = std::min(p, kv_len - 1);
          const int64_t lo = ly.window > 0 ? std::max<int64_t>(0, p - ly.window + 1) : 0;
          for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
            rope_head(row + h * hd, c, sn, rd, hd, qrot);
            // out: private, then stored whole (a second run must never expose a partial sum); the new key and
            // value come from this unit's own copies
            attend_head(qrot, kc[l] + base, vc[l] + base, lo, hi, p, knew, vnew, hd, scale_, w, obuf);
            std::memcpy(ATT + (l * M + b) * Q + h * hd, obuf, hd * sizeof(float));
          }
        } else if (ph == 2 || ph == 4) {  // o_proj / down_proj panel: next residual = residual + projection
          const Seg& s = ph == 2 ? ly.o : ly.down;
          const float* in = ph == 2 ? ATT + l * M * Q : ACT + l * M * I;
          panel_gemv(s, u, (int)M, in, ph == 2 ? Q : I, buf);
          const float* xin = X + (2 * l + (ph == 4)) * M * D;
          float* xout = X + (2 * l + 1 + (ph == 4)) * M * D;
          const int64_t n0 = (int64_t)u * PANEL, nn = std::min<int64_t>(PANEL, D - n0);
          const bool has_d = lora_delta(ly, ph == 2 ? 3 : 6, in, ph == 2 ? Q : I, n0, nn, dl);
          for (int64_t m = 0; m < M; ++m) {
            const float* src = buf + m * PANEL;
            for (int64_t j = 0; j < nn; ++j) {
              float v = s.scale ? src[j] * s.scale[n0 + j] : src[j];
              v = s.bias ? v + s.bias[n0 + j] : v;
              if (has_d) v += dl[m * PANEL + j];
              xout[m * D + n0 + j] = xin[m * D + n0 + j] + v;
            }
          }
        } else {  // gate and up panel u -> silu(gate) * up
          panel_gemv(ly.gate, u, (int)M, xn, D, buf);
          panel_gemv(ly.up, u, (int)M, xn, D, buf2);
          const int64_t n0 = (int64_t)u * PANEL, nn = std::min<int64_t>(PANEL, I - n0);
          const bool has_g = lora_delta(ly, 4, xn, D, n0, nn, dl);
          const bool has_u = lora_delta(ly, 5, xn, D, n0, nn, dl2);
          for (int64_t m = 0; m < M; ++m) {
            float* dst = ACT + (l * M + m) * I + n0;
            for (int64_t j = 0; j < nn; ++j) {
              float gv = ly.gate.scale ? buf[m * PANEL + j] * ly.gate.scale[n0 + j] : buf[m * PANEL + j];
              float uv = ly.up.scale ? buf2[m * PANEL + j] * ly.up.scale[n0 + j] : buf2[m * PANEL + j];
              if (has_g) gv += dl[m * PANEL + j];
              if (has_u) uv += dl2[m * PANEL + j];
              dst[j] = gv / (1.f + std::exp(-gv)) * uv;
            }
          }
        }
        if (flag[first[idx] + u].exchange(1, std::memory_order_acq_rel) == 0)
          done[idx].v.fetch_add(1, std::memory_order_release);
        unit_ns[ph] = now_ns() - t0;
      };

      // Returns once every phase up to idx is complete: waits briefly for the units other threads hold, then
      // runs the ones still unfinished itself (a descheduled thread must not stall the step).
      auto ensure = [&](int64_t idx) {
        for (; frontier <= idx; ++frontier) {
          const int64_t j = frontier;
          if (spin_ns_ < 0) {  // test mode: every unit runs again (all must be idempotent)
            while (done[j].v.load(std::memory_order_acquire) < total[j]) cpu_relax();
            for (int u = 0; u < total[j]; ++u) run_unit(j, u);
            helped_.fetch_add(total[j], std::memory_order_relaxed);
            continue;
          }
          if (done[j].v.load(std::memory_order_acquire) >= total[j]) continue;
          const int64_t budget = spin_ns_ + unit_factor_ * unit_ns[j % 5];
          const int64_t t0 = now_ns();
          bool ok = false;
          while (!ok && budget > 0) {
            for (int i = 0; i < 32 && !ok; ++i) {
              cpu_relax();
              ok = done[j].v.load(std::memory_order_acquire) >= total[j];
            }
            if (now_ns() - t0 > budget) break;
          }
          if (ok) continue;
          for (int u = 0; u < total[j]; ++u)  // help: run what is not finished yet (maybe a second time)
            if (flag[first[j] + u].load(std::memory_order_acquire) == 0) {
              run_unit(j, u);
              helped_.fetch_add(1, std::memory_order_relaxed);
            }
        }
      };

      for (int64_t idx = 0; idx < NP; ++idx) {
        int u;
        while ((u = next[idx].v.fetch_add(1, std::memory_order_acq_rel)) < total[idx]) {
          if (idx > 0) ensure(idx - 1);
          if (flag[first[idx] + u].load(std::memory_order_acquire) == 0) run_unit(idx, u);  // else: helped
        }
      }
    };
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
      body(omp_get_thread_num());
    } else {
      body(0);
    }
    auto out = torch::empty({M, 1, D}, x.options());
    std::memcpy(out.data_ptr<float>(), X + 2 * L * M * D, M * D * sizeof(float));
    return out;
  }

 private:
  int64_t D_, H_, nkv_, hd_, I_;
  double eps_;
  float scale_;
  std::vector<LayerPlan> layers_;
  std::vector<torch::Tensor> keep_;
  std::vector<float> ws_;
  std::mutex mu_;
  std::atomic<int64_t> helped_{0};
  int64_t spin_ns_ = SPIN_NS, unit_factor_ = 2;
  int64_t lora_slots_ = 0;
};

// The plan's guards, checked before every step: each slot (a dict and key: a module's parameters, buffers,
// submodules or instance dict) still holds the object the plan was built from, each tensor's in-place write counter
// is unchanged, and each parameter still has its storage. About 1,300 checks for SmolLM2-135M int8: 0.45 ms a token
// as Python `map`s, a few microseconds here.
class Guards {
 public:
  Guards(pybind11::list dicts, pybind11::list keys, pybind11::list expected, std::vector<torch::Tensor> tensors,
         std::vector<int64_t> versions, std::vector<torch::Tensor> params)
      : tensors_(std::move(tensors)), versions_(std::move(versions)), params_(std::move(params)) {
    TORCH_CHECK(dicts.size() == keys.size() && keys.size() == expected.size(), "guards: parallel lists");
    TORCH_CHECK(tensors_.size() == versions_.size(), "guards: one version per tensor");
    for (size_t i = 0; i < dicts.size(); ++i) {
      TORCH_CHECK(PyDict_Check(dicts[i].ptr()), "guards: a slot's holder must be a dict");
      slots_.emplace_back(pybind11::reinterpret_borrow<pybind11::object>(dicts[i]),
                          pybind11::reinterpret_borrow<pybind11::object>(keys[i]),
                          pybind11::reinterpret_borrow<pybind11::object>(expected[i]));
    }
    for (auto& p : params_) ptrs_.push_back(p.data_ptr());
  }

  bool valid() const {  // with the GIL (dict lookups)
    for (const auto& s : slots_) {
      PyObject* now = PyDict_GetItem(std::get<0>(s).ptr(), std::get<1>(s).ptr());  // borrowed; NULL if absent
      if (now != std::get<2>(s).ptr()) return false;
    }
    for (size_t i = 0; i < tensors_.size(); ++i)
      if ((int64_t)tensors_[i]._version() != versions_[i]) return false;
    for (size_t i = 0; i < params_.size(); ++i)
      if (params_[i].data_ptr() != ptrs_[i]) return false;
    return true;
  }

 private:
  std::vector<std::tuple<pybind11::object, pybind11::object, pybind11::object>> slots_;
  std::vector<torch::Tensor> tensors_;
  std::vector<int64_t> versions_;
  std::vector<torch::Tensor> params_;
  std::vector<void*> ptrs_;
};

std::string isa() { return W == 16 ? "avx512" : W == 8 ? "avx2" : "sse"; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Guards>(m, "Guards", pybind11::module_local())
      .def(pybind11::init<pybind11::list, pybind11::list, pybind11::list, std::vector<torch::Tensor>,
                          std::vector<int64_t>, std::vector<torch::Tensor>>())
      .def("valid", &Guards::valid);
  pybind11::class_<StackPlan>(m, "StackPlan", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &StackPlan::add_layer)
      .def("add_lora", &StackPlan::add_lora)
      .def("num_layers", &StackPlan::num_layers)
      .def("helped", &StackPlan::helped)
      .def("set_spin", &StackPlan::set_spin)
      .def("run", &StackPlan::run, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("isa", &isa);
}
"""

_lock = threading.Lock()
_state: dict[str, Any] = {}


def get() -> Any:
    """The compiled stack extension, building it on first call; None where unavailable (logged once)."""
    return kernels.build_once(_state, _lock, lambda: kernels.build_extension(
        "nomoat_decode_stack", "decode stack kernel", "decoding layer by layer (slower)",
        kernels._GEMV_SOURCE + _STACK_SOURCE))


def available() -> bool:
    """Whether the stack kernel (and the panel kernels it needs) can be used; builds them on first call."""
    return kernels.available() and get() is not None


def config_eligible(cfg: Any) -> bool:
    """Whether a `ModelConfig` describes blocks the stack kernel computes (Llama/Mistral/Qwen2-style, SiLU)."""
    return (
        not cfg.sandwich_norm
        and not cfg.qk_norm
        and cfg.attn_logit_softcap is None
        and cfg.hidden_act == "silu"
        and not cfg.norm_offset
        and not cfg.mlp_bias
    )


def attach(model: torch.nn.Module) -> bool:
    """Give a packed or int8-quantized `Transformer` a `DecodeStack` (its `_decode_stack`); False where not eligible.

    Called by `pack_model` and `quantize_model`. The plan is built at the first eligible decode step.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(type(model), "_decode_stack") or not config_eligible(cfg):
        return False
    if not kernels.available():
        return False
    if not isinstance(getattr(model, "_decode_stack", None), DecodeStack):
        model._decode_stack = DecodeStack()
    return True


_EMPTY = torch.empty(0)
_VERSION = torch.Tensor._version.__get__  # a tensor's in-place write counter, callable from map()
_DATA_PTR = torch.Tensor.data_ptr


def _slot(obj: torch.nn.Module, name: str) -> tuple[dict[str, Any], str]:
    """The dict that holds `obj.name` (parameters, buffers, submodules or the instance dict), for identity guards."""
    for store in ("_parameters", "_buffers", "_modules"):
        d = obj.__dict__.get(store)
        if d is not None and name in d:
            return d, name
    return obj.__dict__, name


class _Plan:
    """The compiled plan of one model plus the guards that say whether it still describes the model."""

    def __init__(self, native: Any, guards: list[tuple[dict[str, Any], str, Any]], versions: list[tuple[Any, int]],
                 params: list[torch.Tensor], kinds: list[str], sources: list[Any] | None = None,
                 slots: dict[str, int] | None = None) -> None:  # fmt: skip
        self.native = native
        self.kinds = kinds
        self.sources = tuple(sources or ())  # adapter banks whose current row-group plans the steps apply
        self.slots = dict(slots or {})  # adapter name -> coefficient column
        dicts, keys, expected = (list(c) for c in zip(*guards))
        # Checked in C++ before every step (`Guards`): the same checks as `valid_py`, 0.45 ms a token there.
        self._guards = get().Guards(dicts, keys, expected, [t for t, _ in versions], [v for _, v in versions],
                                    list(params))  # fmt: skip
        # The Python form, kept for tests that check both agree.
        self._dicts, self._keys, self._expected = tuple(dicts), tuple(keys), tuple(expected)
        self._tensors = tuple(t for t, _ in versions)
        self._versions = tuple(v for _, v in versions)
        self._params = tuple(params)  # parameters whose storage can be swapped under them (`p.data = ...`)
        self._ptrs = tuple(map(_DATA_PTR, params))

    def coefficients(self, batch: int) -> torch.Tensor | None:
        """The (batch, slots) weight of each adapter for each row, from the banks' current row-group plans.

        None when a plan names an adapter the plan has no factors for.
        """
        coef = torch.zeros(batch, max(len(self.slots), 1))
        for source in self.sources:
            for rows, selection in source.current:
                for name, weight in selection:
                    slot = self.slots.get(name)
                    if slot is None:
                        return None
                    coef[rows, slot] += weight
        return coef

    def valid(self) -> bool:
        """Every module and weight is still the one the plan points at (and int8 codes unchanged in place)."""
        return self._guards.valid()

    def valid_py(self) -> bool:
        """`valid`, computed in Python (a reference for tests)."""
        if not all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._expected)):
            return False
        return (
            tuple(map(_VERSION, self._tensors)) == self._versions and tuple(map(_DATA_PTR, self._params)) == self._ptrs
        )


def _linear(
    m: torch.nn.Module, guards: list, versions: list, params: list, sources: list | None = None
) -> list[torch.Tensor] | None:
    """[panels, scale, bias] of a packed fp32 or int8-quantized layer (empty tensors where absent), or None.

    A wrapper with `decode_passthrough()` (an adapter bank's layer) gives its base layer and the object whose
    `current` says whether adapters apply to this step: the plan uses the base and steps aside while they do
    (the object is added to `sources`).
    """
    from nomoat.models.packed import PackedLinear
    from nomoat.models.quantize import QuantizedLinear

    passthrough = getattr(m, "decode_passthrough", None)
    if passthrough is not None and sources is not None:
        base, source = passthrough()
        guards.append((*_slot(m, "base"), base))
        guards += [(*_slot(m, n), getattr(m, n)) for n in ("a_stack", "bt_stack", "layout")]  # replaced on rebuild
        if all(s is not source for s in sources):
            sources.append(source)
        return _linear(base, guards, versions, params)
    empty = torch.empty(0)
    if type(m) is PackedLinear:
        if m.panels is None or m.panels.dtype != torch.float32:
            return None
        guards += [(*_slot(m, "panels"), m.panels), (*_slot(m, "bias"), m.bias)]
        bias = m.bias
    elif type(m) is QuantizedLinear and m.mode == "int8":
        panels = m._kernel_panels(torch.empty(1, m.in_features))
        if panels is None or m.qweight.device.type != "cpu":
            return None
        guards += [(*_slot(m, n), getattr(m, n)) for n in ("qweight", "scale", "bias", "_panels")]
        for t in (m.qweight, m.scale):
            with contextlib.suppress(RuntimeError):  # inference tensors keep no version counter
                versions.append((t, t._version))
        bias = m.bias
        if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
            return None
        if bias is not None:
            params.append(bias)
        return [panels, m.scale, empty if bias is None else bias.detach()]
    else:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    return [m.panels, empty, empty if bias is None else bias]


def build_plan(model: torch.nn.Module) -> _Plan | None:
    """The stack plan of a `Transformer` whose layers all qualify (see the module docstring), else None."""
    from nomoat.models.transformer import MLP, Attention, Block, RMSNorm

    mod = get()
    cfg = model.config
    if mod is None or not config_eligible(cfg):
        return None
    guards: list[tuple[dict[str, Any], str, Any]] = []
    versions: list[tuple[Any, int]] = []
    params: list[torch.Tensor] = []
    sources: list[Any] = []  # adapter banks whose layers the plan sees through
    slots: dict[str, int] = {}  # adapter name -> column of the per-step coefficients
    loras: list[tuple[int, int, int, torch.Tensor, torch.Tensor, float]] = []  # (layer, projection, slot, A, Bt, s)
    decoder = model.model
    layers = decoder.layers
    guards.append((*_slot(decoder, "layers"), layers))
    kinds = sorted(set(cfg.layer_types))
    native = mod.StackPlan(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                           float(cfg.rms_norm_eps), float(cfg.query_scale))  # fmt: skip
    for i, block in enumerate(layers):
        if type(block) is not Block or block.sandwich or block._forward_hooks or block._forward_pre_hooks:
            return None
        attn, mlp = block.self_attn, block.mlp
        n_in, n_post = block.input_layernorm, block.post_attention_layernorm
        if type(attn) is not Attention or type(mlp) is not MLP or mlp.act != "silu":
            return None
        if type(n_in) is not RMSNorm or type(n_post) is not RMSNorm or n_in.offset or n_post.offset:
            return None
        if n_in.eps != cfg.rms_norm_eps or n_post.eps != cfg.rms_norm_eps:
            return None
        if any(n.weight.dtype != torch.float32 or n.weight.device.type != "cpu" for n in (n_in, n_post)):
            return None
        guards.append((*_slot(layers, str(i)), block))
        for owner, names in ((block, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
                             (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (mlp, ("gate_proj", "up_proj", "down_proj"))):  # fmt: skip
            guards += [(*_slot(owner, n), getattr(owner, n)) for n in names]
        guards += [(*_slot(n, "weight"), n.weight) for n in (n_in, n_post)]
        params += [n_in.weight, n_post.weight]
        tensors = [n_in.weight.detach(), n_post.weight.detach()]
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for j, m in enumerate(projections):
            parts = _linear(m, guards, versions, params, sources)
            if parts is None:
                return None
            tensors += parts
            for name, a, bt, scaling in m.decode_adapters() if hasattr(m, "decode_adapters") else ():
                if a.dtype != torch.float32 or bt.dtype != torch.float32 or a.device.type != "cpu":
                    return None
                loras.append((i, j, slots.setdefault(name, len(slots)), a, bt, float(scaling)))
        if any(t.numel() for t in (tensors[16], tensors[19], tensors[22])):
            return None  # an MLP bias (mlp_bias is off in the config, but a layer could carry one)
        tensors = tensors[:16] + tensors[17:19] + tensors[20:22]  # gate, up, down: panels and scales only
        kind = cfg.layer_types[i]
        window = (cfg.sliding_window or 0) if kind == "sliding_attention" else 0
        native.add_layer(tensors, int(window), kinds.index(kind))
    for i, j, slot, a, bt, scaling in loras:
        native.add_lora(i, j, slot, a, bt, scaling)
    return _Plan(native, guards, versions, params, kinds, sources, slots)


class DecodeStack:
    """Runs a decode step's layers in one compiled call where possible (see the module docstring).

    Set on a model as `model._decode_stack` by `attach`; `Transformer.forward` calls it and runs its own layer
    loop when it returns None. `used` and `fallbacks` count the calls it took and declined; `reason` says why the
    last one was declined.
    """

    def __init__(self) -> None:
        self.plan: _Plan | None = None
        self.used = 0
        self.fallbacks = 0
        self.reason: str | None = None

    def _decline(self, reason: str) -> None:
        self.fallbacks += 1
        self.reason = reason

    def __call__(
        self,
        model: torch.nn.Module,
        h: torch.Tensor,
        ropes: dict[str, tuple[torch.Tensor, torch.Tensor]],
        cache_args: tuple[Any, Any, torch.Tensor, int],
    ) -> torch.Tensor | None:
        """Hidden states (B, 1, D) after every layer (before the final norm), or None where the stack does not apply.

        Args:
            model: The `Transformer`.
            h: Input hidden states (B, 1, D) (the embeddings).
            ropes: Rotary (cos, sin) tables (B, 1, rd) per layer type.
            cache_args: `(cache, rows, positions, kv_len)` as the layers get them.
        """
        if os.environ.get("NOMOAT_DECODE_STACK", "1") == "0":
            self._decline("disabled by NOMOAT_DECODE_STACK=0")
            return None
        kv, rows, positions, kv_len = cache_args
        if (
            h.dim() != 3
            or h.shape[1] != 1
            or h.shape[0] > MAX_ROWS
            or h.dtype != torch.float32
            or h.device.type != "cpu"
            or torch.is_grad_enabled()
            or not isinstance(rows, slice)
            or rows.step not in (None, 1)
            or positions.dtype != torch.int64
            or kv.k[0].dtype != torch.float32
            or torch.compiler.is_compiling()
        ):
            self._decline("inputs not eligible")
            return None
        plan = self.plan
        if plan is None or not plan.valid():
            self.plan = None  # drop references to replaced modules' tensors
            plan = self.plan = build_plan(model)
            if plan is None:
                self._decline("layers not eligible (adapters, unsupported modules, or no kernels)")
                return None
        coef = _EMPTY
        if plan.sources and any(source.current for source in plan.sources):
            coef = plan.coefficients(h.shape[0])
            if coef is None:
                self._decline("an adapter of this step is not in the plan")
                return None
        self.used += 1
        cos = [ropes[k][0] for k in plan.kinds]
        sin = [ropes[k][1] for k in plan.kinds]
        return plan.native.run(h, cos, sin, positions, rows.start or 0, int(kv_len), kv.k, kv.v, coef)

    def __deepcopy__(self, memo: dict[int, Any]) -> DecodeStack:
        """A copied model gets a fresh stack (the plan points at the original's tensors)."""
        return DecodeStack()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the plan (a compiled object; rebuilt at the next decode step)."""
        return {**self.__dict__, "plan": None}
