// Every layer of a Llama/Mistral/Qwen2-style pre-norm decoder stack for one decode step, in one call (fp32
// activations, fp32 or int8 panel weights (int8: fp16 scales per block of 32 input channels), optional per-row LoRA adapters), for any number of rows (one new token
// each); returns the hidden states before the final norm:
//
//   for each layer:  x_n = rmsnorm(x) * w_in;  qkv = x_n Wqkv^T (+ bias);  rope on q, k;  write k, v into the cache
//                    attention over the cached keys 0..pos (GQA, sliding window);  x += attn Wo^T (+ bias)
//                    x_n = rmsnorm(x) * w_post;  x += (silu(x_n Wg^T) * (x_n Wu^T)) Wd^T
//
// Threading: ONE OpenMP parallel region per step. Each layer is five phases (q/k/v panels; attention over (row,
// key/value head); output-projection panels added to the residual; gate/up panel pairs with SiLU; down panels added
// to the residual), each projection phase preceded by an adapter phase (no units in a step without adapters). A
// phase's units are claimed one at a time from an atomic counter, and a unit runs once the previous phase has
// finished all its units (per-unit done flags and a count, not a barrier of threads). A thread that needs a phase
// finished spins for SPIN_NS plus twice its own last time for such a unit, then runs the unfinished units itself (a
// descheduled thread must not stall the step). A unit may thus run twice, even concurrently, so every
// unit is idempotent: each intermediate has one buffer per layer (the residual one per half layer: x_next = x +
// projection, never x += ...), and every shared write stores a final value. A panel unit runs its rows in blocks of
// MAX_ROWS (the panel stays in L2 between blocks, so memory sees each weight once per step).
// bf16 models: each projection is the user's own (N, K) bf16 weight, read in place (`rows_bf16.h`: a unit is 64
// consecutive rows), norm weights and the KV cache may be bf16 (the cache holds keys and values rounded to bf16);
// activations stay fp32, except that where the CPU has bf16 dot products (AVX-512-BF16) a projection's input is
// rounded to bf16 in registers (`NOMOAT_BF16_DOT=0`: exact fp32).
// 4-bit layers (q4 panels, q4_rows.h), and int8 layers where the build has VNNI (int8_dot.h, `i8_dot_mode`, on by
// default): a projection's input is rounded per block of 32 once per step, as linear_q4 / linear_i8 round it (to int8;
// int8 projections in mode 2 to 16-bit codes, unless the model has 4-bit layers, whose int8 ones then take int8 codes):
// the normed input by each thread beside its norm, the attention and MLP outputs by the units that write them, into
// shared per-layer buffers.
// Adapters (`stack_lora.h`): an adapter phase computes the low-rank products c * (x A^T) of the next phase's
// projections once per step, in units of rows sharing an adapter; each panel unit adds (products) Bt for its columns.
// Output head (`set_head`, `run(..., head)`): the final norm and the head (fp32 / int8 panels, or bf16 rows) run as one
// more phase of the same region, so that a step's logits need no second region (a worker's wake-up) and no norm
// between calls: each thread norms the final hidden states beside its first head unit; a unit writes 64 logits.
// NOMOAT_STACK_PROFILE=1 (read when the plan is made) sums the CPU time of each phase kind's units and of the waits
// (`profile`; the head's units last).
#include <ATen/Parallel.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "attend.h"
#include "gemv.h"
#include "ops.h"
#include "q4_rows.h"
#include "rows_bf16.h"
#include "stack_lora.h"
#include "stack_parts.h"

#ifndef SPIN_NS
#define SPIN_NS 20000
#endif

// A layer's nine phases: the adapter phase (-1) before each projection phase, and the five phase kinds 0-4.
constexpr int NPH = 9;
constexpr int PH_KIND[NPH] = {-1, 0, 1, -1, 2, -1, 3, -1, 4};

struct StackPlan : torch::CustomClassHolder {
 public:
  StackPlan(int64_t D, int64_t H, int64_t nkv, int64_t hd, int64_t I, double eps, double scale)
      : D_(D), H_(H), nkv_(nkv), hd_(hd), I_(I), eps_(eps), scale_((float)scale) {
    TORCH_CHECK(H > 0 && nkv > 0 && H % nkv == 0 && hd > 0 && D > 0 && I > 0, "bad shapes");
    const char* prof = std::getenv("NOMOAT_STACK_PROFILE");
    profiling_ = prof != nullptr && prof[0] != '\0' && prof[0] != '0';
  }

  // t: w_in, w_post, then (panels, scale, bias) for q, k, v, o and (panels, scale) for gate, up, down (scale: int8
  // panels' fp16 block scales (P, ceil(K / 32), 64)); an absent scale or bias is an empty tensor. window: sliding window or 0; kind: index of the layer's rope table.
  void add_layer(std::vector<at::Tensor> t, int64_t window, int64_t kind) {
    TORCH_CHECK(t.size() == 20, "add_layer: 20 tensors expected");
    const int64_t Q = H_ * hd_, KV = nkv_ * hd_;
    for (int i = 0; i < 2; ++i)
      TORCH_CHECK(t[i].scalar_type() == t[0].scalar_type() && t[i].is_contiguous() && t[i].numel() == D_ &&
                  (t[i].scalar_type() == at::kFloat || t[i].scalar_type() == at::kBFloat16), "norm weight");
    LayerPlan L;
    L.w_in = t[0].data_ptr();
    L.w_post = t[1].data_ptr();
    L.norm16 = t[0].scalar_type() == at::kBFloat16;
    L.q = make_seg(t[2], t[3], t[4], D_, Q, "q_proj");
    L.k = make_seg(t[5], t[6], t[7], D_, KV, "k_proj");
    L.v = make_seg(t[8], t[9], t[10], D_, KV, "v_proj");
    L.o = make_seg(t[11], t[12], t[13], Q, D_, "o_proj");
    L.gate = make_seg(t[14], t[15], at::empty({0}), D_, I_, "gate_proj");
    L.up = make_seg(t[16], t[17], at::empty({0}), D_, I_, "up_proj");
    L.down = make_seg(t[18], t[19], at::empty({0}), I_, D_, "down_proj");
    TORCH_CHECK(L.gate.P == L.up.P, "gate/up panel counts differ");
    L.window = window;
    L.kind = kind;
    any_q4_ = any_q4_ || L.q.q4 || L.k.q4 || L.v.q4 || L.o.q4 || L.gate.q4 || L.up.q4 || L.down.q4;
    any_i8_ = any_i8_ || L.q.i8 || L.k.i8 || L.v.i8 || L.o.i8 || L.gate.i8 || L.up.i8 || L.down.i8;
    layers_.push_back(L);
    for (auto& x : t) keep_.push_back(x);
  }

  int64_t num_layers() const { return (int64_t)layers_.size(); }

  // Registers adapter `slot`'s factors on projection `proj` (0-6: q, k, v, o, gate, up, down) of layer `layer`:
  // A (r, in) and Bt (r, out) contiguous, both fp32 or both bf16; `scale` multiplies the per-row coefficient given
  // to `run`.
  void add_lora(int64_t layer, int64_t proj, int64_t slot, at::Tensor A, at::Tensor Bt, double scale) {
    TORCH_CHECK(layer >= 0 && layer < num_layers() && proj >= 0 && proj < 7 && slot >= 0, "add_lora: indices");
    TORCH_CHECK((A.scalar_type() == at::kFloat || A.scalar_type() == at::kBFloat16) &&
                Bt.scalar_type() == A.scalar_type() && A.is_contiguous() && Bt.is_contiguous() && A.dim() == 2 &&
                Bt.dim() == 2 && A.size(0) == Bt.size(0),
                "add_lora: A (r, in) and Bt (r, out), contiguous, both fp32 or both bf16");
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
    e.bf16 = A.scalar_type() == at::kBFloat16;
    e.A = A.data_ptr();
    e.Bt = Bt.data_ptr();
    layers_[layer].ad.add((int)proj, e);
    lora_slots_ = std::max(lora_slots_, slot + 1);
    lora_rank_ = std::max(lora_rank_, e.r);
    keep_.push_back(A);
    keep_.push_back(Bt);
  }

  // The output head `run(..., head)` ends with: logits = rmsnorm(h) * norm_w times w^T (+ bias), w fp32 or int8 panels
  // (P, D, 64) (int8: with fp16 block scales `scale`) or a bf16 (n, D) weight read in place (a tied embedding), of
  // `n` outputs; an absent scale or bias is an empty tensor.
  void set_head(at::Tensor norm_w, at::Tensor w, at::Tensor scale, at::Tensor bias, int64_t n) {
    TORCH_CHECK(norm_w.is_contiguous() && norm_w.numel() == D_ &&
                (norm_w.scalar_type() == at::kFloat || norm_w.scalar_type() == at::kBFloat16), "head: norm weight");
    TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kChar || w.scalar_type() == at::kBFloat16,
                "head: fp32 or int8 panels, or a bf16 weight");
    head_ = make_seg(w, scale, bias, D_, n, "lm_head");
    head_norm_ = norm_w.data_ptr();
    head_norm16_ = norm_w.scalar_type() == at::kBFloat16;
    has_head_ = true;
    for (auto& t : {norm_w, w, scale, bias}) keep_.push_back(t);
  }

  // With NOMOAT_STACK_PROFILE set: milliseconds spent since the last call (all threads) in the units of each phase
  // kind (adapter products, q/k/v, attention, o, gate/up, down), then waiting for phases, then in the head's units;
  // resets the sums.
  std::vector<double> profile() {
    std::vector<double> out;
    for (auto& p : prof_) out.push_back((double)p.exchange(0) * 1e-6);
    return out;
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

  // Runs every layer on x (M, 1, D) for one token per row; returns the new hidden states (M, 1, D), or with `head`
  // the logits (M, 1, n) of the final norm and the output head (`set_head`), run in the same region.
  at::Tensor run(at::Tensor x, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin, at::Tensor positions,
                 int64_t row0, int64_t kv_len, std::vector<at::Tensor> kcache, std::vector<at::Tensor> vcache,
                 at::Tensor coef, bool head) {
    TORCH_CHECK(!head || has_head_, "run: no head (set_head)");
    const int64_t L = num_layers(), D = D_, H = H_, nkv = nkv_, hd = hd_, I = I_;
    const int64_t Q = H * hd, KV = nkv * hd, NQKV = Q + 2 * KV, rep = H / nkv;
    TORCH_CHECK(L > 0, "no layers");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(1) == 1 && x.size(2) == D, "x: (M, 1, D)");
    const int64_t M = x.size(0);
    TORCH_CHECK(M >= 1, "at least one row");
    TORCH_CHECK((int64_t)kcache.size() == L && (int64_t)vcache.size() == L, "one key and value cache per layer");
    const RopeTables rt(cos, sin, M, hd);
    const int64_t rd = rt.rd;
    const std::vector<const float*>&cptr = rt.cptr, &sptr = rt.sptr;
    const int64_t S = kcache[0].size(2);
    const bool kv16 = kcache[0].scalar_type() == at::kBFloat16;  // else fp32
    std::vector<char*> kc(L), vc(L);
    for (int64_t l = 0; l < L; ++l) {
      for (auto* c : {&kcache[l], &vcache[l]}) {
        TORCH_CHECK(c->scalar_type() == (kv16 ? at::kBFloat16 : at::kFloat) && c->is_contiguous() && c->dim() == 4 && c->size(1) == nkv &&
                    c->size(2) == S && c->size(3) == hd && row0 >= 0 && row0 + M <= c->size(0), "cache layout");
      }
      TORCH_CHECK(layers_[l].kind >= 0 && layers_[l].kind < (int64_t)cptr.size(), "rope kind");
      kc[l] = (char*)kcache[l].data_ptr();
      vc[l] = (char*)vcache[l].data_ptr();
    }
    TORCH_CHECK(kv_len >= 1 && kv_len <= S, "kv_len");
    TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == M, "positions: int64 (M, 1)");
    auto pos_c = positions.contiguous();
    const int64_t* pos = pos_c.data_ptr<int64_t>();
    for (int64_t b = 0; b < M; ++b) TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "position outside the cache");
    // coef (M, slots): each row's weight for each registered adapter slot; empty: no adapter applies
    const float* cf = nullptr;
    at::Tensor coef_c;
    if (coef.numel() > 0) {
      TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.size(0) == M &&
                  coef.size(1) >= lora_slots_, "coef: fp32 (M, slots)");
      coef_c = coef.contiguous();
      cf = coef_c.data_ptr<float>();
    }
    const int64_t ncf = coef.numel() > 0 ? coef.size(1) : 0;

    std::lock_guard<std::mutex> lock(mu_);  // the workspace is the plan's: one call at a time
    const bool i8dot = i8_dot_on(q4k::QK);  // int8 segments (of whole blocks) read int8 inputs this step
    const bool x16 = i8dot && i8_dot_16() && !any_q4_, h16 = i8dot && i8_dot_16() && head_.i8;  // 16-bit codes
    auto qin = [&](const Seg& s) { return s.q4 || (i8dot && s.i8 && s.K % q4k::QK == 0); };  // int8-block input
    const int nt = std::max(1, at::get_num_threads());
    // Every intermediate has one buffer per layer (and the residual one per half-layer), so that running a unit
    // twice (a thread helping a descheduled one) writes the same values where the first run would have.
    LoraStep ls;  // the step's adapter entries, blocks and units (stack_lora.h)
    AQueue aq;    // the A factors each of the step's adapter phases reads
    if (cf != nullptr) ls.build(cf, M, ncf, lora_slots_, nt), aq.build(layers_, ls);
    const int64_t E = ls.E, R = lora_rank_;
    const int64_t ws = kv_len + 16;  // a query head's score scratch
    const int64_t per_thread = M * D + (2 * rep + 2) * hd + rep * ws + MAX_ROWS * D;
    const size_t need = (size_t)((2 * L + 1) * M * D + L * M * (NQKV + Q + I) + L * E * 7 * R + nt * per_thread);
    if (ws_.size() < need) ws_.resize(need);
    float* X = ws_.data();                    // (2L + 1) residual states (M, D)
    float* QKV = X + (2 * L + 1) * M * D;     // per layer (M, NQKV)
    float* ATT = QKV + L * M * NQKV;          // per layer (M, Q)
    float* ACT = ATT + L * M * Q;             // per layer (M, I)
    float* XA = ACT + L * M * I;              // per layer adapter products (E, 7, R)
    float* TLS = XA + L * E * 7 * R;          // per thread: normed input (M, D), rope and score scratch
    std::memcpy(X, x.contiguous().data_ptr<float>(), M * D * sizeof(float));
    // q4 layers: the o/down inputs quantized per block of 32 by the units that write them (shared, per layer).
    // Attention units write whole blocks when a key/value head's query heads span them; else each thread
    // quantizes the attention output itself.
    const bool att_blocks = (rep * hd) % q4k::QK == 0;
    const int64_t NQ = any_q4_ || (i8dot && any_i8_) ? L * M * (Q + I) : 0;
    if (q4_q_.size() < (size_t)NQ) {
      q4_q_.resize(NQ);
      q4_d_.resize(NQ / q4k::QK + 1);
      q4_s_.resize(NQ / q4k::QK + 1);
    }
    if (x16 && q4_l_.size() < (size_t)NQ) q4_l_.resize(NQ);
    auto q4_att = [&](int64_t l) -> q4k::Q4Rows {  // layer l's attention output (M, Q), then its MLP's (M, I)
      return {q4_q_.data() + l * M * Q, q4_d_.data() + l * M * Q / q4k::QK, q4_s_.data() + l * M * Q / q4k::QK, Q,
              x16 ? q4_l_.data() + l * M * Q : nullptr};
    };
    auto q4_act = [&](int64_t l) -> q4k::Q4Rows {
      const int64_t o = L * M * Q + l * M * I;
      return {q4_q_.data() + o, q4_d_.data() + o / q4k::QK, q4_s_.data() + o / q4k::QK, I, x16 ? q4_l_.data() + o : nullptr};
    };

    // phases: NPH per layer, then (head) the output head's panels
    const int64_t HP = L * NPH, NP = HP + (head ? 1 : 0), NA = E > 0 ? ls.units() : 0;
    const int64_t NV = head ? head_.N : 0;
    auto out = at::empty({M, 1, head ? NV : D}, x.options());
    float* logits = head ? out.data_ptr<float>() : nullptr;
    std::vector<int> total(NP);
    for (int64_t l = 0; l < L; ++l) {
      const LayerPlan& ly = layers_[l];
      const int64_t t9[NPH] = {NA, ly.q.P + ly.k.P + ly.v.P, M * nkv, NA, ly.o.P, NA, ly.gate.P, NA, ly.down.P};
      for (int ph = 0; ph < NPH; ++ph) total[l * NPH + ph] = (int)t9[ph];
    }
    if (head) total[HP] = (int)head_.P;
    Units un(total);

    auto body = [&](int tid) {
      float* xn = TLS + (int64_t)tid * per_thread;
      float* qrot = xn + M * D;  // a key/value head's query heads, rotated (rep, hd)
      float* knew = qrot + rep * hd;
      float* obuf = knew + hd;  // their attention outputs (rep, hd)
      float* vr = obuf + rep * hd;  // the new value rounded as a bf16 cache holds it
      float* w = vr + hd;  // scores (rep, ws)
      float* nrows = w + rep * ws;  // an adapter unit's normed rows (MAX_ROWS, D)
      int64_t xn_for = -1;          // the phase whose normed input xn holds
      std::vector<int8_t> xq, xl;   // q4 layers: xn (or the attention output) quantized per block (this thread's)
      std::vector<float> xq_d;
      std::vector<int32_t> xq_s;
      auto quantize_own = [&](const float* src, int64_t K, bool c16) -> q4k::Q4Rows {
        if ((int64_t)xq.size() < M * K) {
          xq.resize(M * K);
          xq_d.resize(M * K / q4k::QK);
          xq_s.resize(M * K / q4k::QK);
        }
        if (c16 && (int64_t)xl.size() < M * K) xl.resize(M * K);
        const q4k::Q4Rows r{xq.data(), xq_d.data(), xq_s.data(), K, c16 ? xl.data() : nullptr};
        for (int64_t m = 0; m < M; ++m) q4k::quantize_blocks(src, K, m, 0, K / q4k::QK, r);
        return r;
      };
      q4k::Q4Rows qn;  // what xq holds, for the phase xn_for (or xq_for)
      int64_t xq_for = -1;
      int64_t frontier = 0;         // every phase below it is known complete
      int64_t unit_ns[NPH + 1] = {};  // this thread's last duration of a unit, per phase of a layer (and the head's)
      alignas(64) float buf[MAX_ROWS * PANEL];
      alignas(64) float buf2[MAX_ROWS * PANEL];

      auto norm_into = [&](const float* src, const void* wt, bool bf) {
        for (int64_t m = 0; m < M; ++m) norm_row(src + m * D, wt, bf, D, eps_, xn + m * D);
      };

      // Block u of entries of one adapter (an adapter unit runs several) before phase kind ph of layer l: the
      // low-rank products of the phase's projections for the block's rows, into the layer's product buffer (whole).
      auto lora_block = [&](int64_t l, int ph, int64_t u) {
        const LayerPlan& ly = layers_[l];
        const int64_t e0 = ls.block[u];
        const int n = (int)(ls.block[u + 1] - e0);
        const float* xs[MAX_ROWS];
        for (int j = 0; j < n; ++j) {
          const int64_t m = ls.row[e0 + j];
          if (ph == 0 || ph == 3) {
            norm_row(X + (2 * l + (ph == 3)) * M * D + m * D, ph == 0 ? ly.w_in : ly.w_post, ly.norm16, D, eps_,
                     nrows + j * D);
            xs[j] = nrows + j * D;
          } else {
            xs[j] = ph == 2 ? ATT + (l * M + m) * Q : ACT + (l * M + m) * I;
          }
        }
        lora_products(ly.ad, ls, u, ph, xs, XA + l * E * 7 * R, R);
      };

      auto lora_delta = [&](int64_t l, int proj, int64_t n0, int64_t nn, float* dl, int64_t m0, int mm) -> bool {
        return E > 0 && lora_rows_delta(layers_[l].ad, ls, XA + l * E * 7 * R, R, proj, n0, nn, m0, mm, dl);
      };
      // Read-ahead of the Bt columns a panel unit's row block m0 adds, queued on `ah`, which the block's own panel
      // product paces over its FMAs (null: nothing to read); the lines arrive long before the product ends.
      // Then (unit u of phase idx, row block m0) its share of the A factors of the next adapter phase: q/k/v units
      // ask for the o projection's, o units for gate/up's, gate/up units for down's (`half` of it in each product:
      // 2.4% less CPU time with 32 distinct adapters than all in the gate product), down units for the next layer's
      // q/k/v; what a product has no time for is dropped (read when needed).
      Ahead ah_a, ah_b, ah_w;
      Ahead* wa = nullptr;  // over 8 rows: the weights of the unit u + nt a panel unit u reads ahead (`queue_ahead`)
      const int64_t nb = (M + MAX_ROWS - 1) / MAX_ROWS;
      auto lora_ahead = [&](int64_t l, int proj, int64_t n0, int64_t nn, int64_t m0, int mm, Ahead& ah,
                            int64_t idx = -1, int64_t u = 0, int half = -1) -> Ahead* {
        if (E == 0) return wa;
        ah.clear();
        ah.cap = 4;
        lora_rows_queue(layers_[l].ad, ls, proj, n0, nn, m0, mm, ah);
        ah.must = ah.n;
        if (idx >= 0) {
          const int ph = PH_KIND[idx % NPH], nxt = ph == 0 ? 2 : ph == 2 ? 3 : ph == 3 ? 4 : 0;
          const int64_t ln = ph == 4 ? l + 1 : l;
          const int64_t h = half < 0 ? 1 : 2, part = (u * nb + m0 / MAX_ROWS) * h + std::max(half, 0);
          if (ln < L) lora_a_queue(aq, ln, nxt, part, total[idx] * nb * h, ah);
        }
        return ah.n > 0 ? &ah : nullptr;
      };
      alignas(64) float dl[MAX_ROWS * PANEL], dl2[MAX_ROWS * PANEL];  // a row block's adapter deltas

      // Unit u of phase idx; its inputs (the previous phases) are complete. Idempotent.
      // Head unit u: 64 logits of every row from the final hidden states, normed by this thread once per step.
      auto head_unit = [&](int u) {
        const int64_t c0 = profiling_ ? cpu_ns() : 0, t0 = now_ns();
        if (xn_for != HP) {
          norm_into(X + 2 * L * M * D, head_norm_, head_norm16_);
          xn_for = HP;
        }
        const bool q = qin(head_);
        if (q && xq_for != HP) {
          qn = quantize_own(xn, D, h16);
          xq_for = HP;
        }
        head_panel(head_, u, M, xn, q ? qn : q4k::Q4Rows{}, buf, logits, nt);
        un.finish(HP, u);
        unit_ns[NPH] = now_ns() - t0;
        if (profiling_) prof_[7].fetch_add(cpu_ns() - c0, std::memory_order_relaxed);
      };

      bool whole = true;  // the last unit run ran all its row blocks
      auto run_unit = [&](int64_t idx, int u, bool claim = true) {
        if (idx == HP) return head_unit(u);
        bool fin = true;  // the unit is complete (not just this call's row blocks of it)
        whole = true;
        const int64_t l = idx / NPH;
        const int sub = (int)(idx % NPH), ph = PH_KIND[sub];
        const LayerPlan& ly = layers_[l];
        const int64_t t0 = now_ns(), c0 = profiling_ ? cpu_ns() : 0;
        wa = M > MAX_ROWS && (ph == 0 || ph >= 2) ? queue_ahead(layers_, PH_KIND, NPH, total, idx, u + nt, ah_w)
                                                  : nullptr;
        if ((ph == 0 || ph == 3) && xn_for != idx) {
          norm_into(X + (2 * l + (ph == 3)) * M * D, ph == 0 ? ly.w_in : ly.w_post, ly.norm16);
          xn_for = idx;
        }
        const bool own_q4 = ph == 0 ? qin(ly.q) || qin(ly.k) || qin(ly.v) : ph == 3 ? qin(ly.gate) || qin(ly.up)
                          : ph == 2 && qin(ly.o) && !att_blocks;  // inputs this thread quantizes itself
        if (own_q4 && xq_for != idx) {
          qn = ph == 2 ? quantize_own(ATT + l * M * Q, Q, x16) : quantize_own(xn, D, x16);
          xq_for = idx;
        }
        if (ph < 0) {  // an adapter phase: the next phase's low-rank products
          for (int64_t k = ls.unit[u]; k < ls.unit[u + 1]; ++k) lora_block(l, PH_KIND[sub + 1], k);
        } else if (ph == 0) {  // q/k/v panel -> qkv (M, NQKV)
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
          const int64_t n0 = p * PANEL, nn = std::min<int64_t>(PANEL, s->N - n0);
          const int proj = s == &ly.q ? 0 : s == &ly.k ? 1 : 2;
          fin = un.blocks(idx, u, nb, claim, whole, [&](int64_t m0) {  // row blocks: the panel stays in L2 between them
            const int mm = (int)std::min<int64_t>(MAX_ROWS, M - m0);
            Ahead* ah = lora_ahead(l, proj, n0, nn, m0, mm, ah_a, idx, u);
            panel_gemv(*s, p, mm, xn + m0 * D, D, buf, qin(*s) ? qn.rows(m0) : q4k::Q4Rows{}, ah);
            const bool has_d = lora_delta(l, proj, n0, nn, dl, m0, mm);
            for (int64_t m = 0; m < mm; ++m) {
              float* dst = QKV + (l * M + m0 + m) * NQKV + off + n0;
              const float* src = buf + m * PANEL;
              for (int64_t j = 0; j < nn; ++j) {
                float v = s->bias ? src[j] + s->bias[n0 + j] : src[j];
                dst[j] = has_d ? v + dl[m * PANEL + j] : v;
              }
            }
          });
        } else if (ph == 1) {  // attention of (row b, key/value head g) for the group's query heads
          const int64_t b = u / nkv, g = u % nkv, p = pos[b];
          const float* c = cptr[ly.kind] + b * rd;
          const float* sn = sptr[ly.kind] + b * rd;
          const float* row = QKV + (l * M + b) * NQKV;
          rope_head(row + Q + g * hd, c, sn, rd, hd, knew);
          const float* vnew = row + Q + KV + g * hd;
          const int64_t base = ((row0 + b) * nkv + g) * S * hd;
          if (kv16) {
            vnew = store_kv16(kc[l], vc[l], base + p * hd, knew, vnew, vr, hd);
          } else {
            std::memcpy((float*)kc[l] + base + p * hd, knew, hd * sizeof(float));
            std::memcpy((float*)vc[l] + base + p * hd, vnew, hd * sizeof(float));
          }
          const int64_t hi = std::min(p, kv_len - 1);
          const int64_t lo = ly.window > 0 ? std::max<int64_t>(0, p - ly.window + 1) : 0;
          for (int64_t h = 0; h < rep; ++h) rope_head(row + (g * rep + h) * hd, c, sn, rd, hd, qrot + h * hd);
          // the group's query heads together (each key and value read once); out: private, then stored whole (a
          // second run must never expose a partial sum); the new key and value come from this unit's own copies
          if (kv16)
            attend_heads(rep, qrot, (const uint16_t*)kc[l] + base, (const uint16_t*)vc[l] + base, lo, hi, p, knew,
                         vnew, hd, scale_, w, ws, obuf);
          else
            attend_heads(rep, qrot, (const float*)kc[l] + base, (const float*)vc[l] + base, lo, hi, p, knew, vnew, hd,
                         scale_, w, ws, obuf);
          std::memcpy(ATT + (l * M + b) * Q + g * rep * hd, obuf, rep * hd * sizeof(float));
          if (qin(ly.o) && att_blocks) {
            q4k::quantize_blocks(ATT + l * M * Q, Q, b, g * rep * hd / q4k::QK, (g + 1) * rep * hd / q4k::QK, q4_att(l));
          }
        } else if (ph == 2 || ph == 4) {  // o_proj / down_proj panel: next residual = residual + projection
          const Seg& s = ph == 2 ? ly.o : ly.down;
          const float* in = ph == 2 ? ATT + l * M * Q : ACT + l * M * I;
          const int64_t K = ph == 2 ? Q : I;
          const float* xin = X + (2 * l + (ph == 4)) * M * D;
          float* xout = X + (2 * l + 1 + (ph == 4)) * M * D;
          const int64_t n0 = (int64_t)u * PANEL, nn = std::min<int64_t>(PANEL, D - n0);
          fin = un.blocks(idx, u, nb, claim, whole, [&](int64_t m0) {
            const int mm = (int)std::min<int64_t>(MAX_ROWS, M - m0);
            const q4k::Q4Rows xq_in = !qin(s) ? q4k::Q4Rows{} : ph == 4 ? q4_act(l) : att_blocks ? q4_att(l) : qn;
            Ahead* ah = lora_ahead(l, ph == 2 ? 3 : 6, n0, nn, m0, mm, ah_a, idx, u);
            panel_gemv(s, u, mm, in + m0 * K, K, buf, xq_in.rows(m0), ah);
            const bool has_d = lora_delta(l, ph == 2 ? 3 : 6, n0, nn, dl, m0, mm);
            for (int64_t m = 0; m < mm; ++m) {
              const float* src = buf + m * PANEL;
              const int64_t r = (m0 + m) * D + n0;
              for (int64_t j = 0; j < nn; ++j) {
                float v = s.bias ? src[j] + s.bias[n0 + j] : src[j];
                if (has_d) v += dl[m * PANEL + j];
                xout[r + j] = xin[r + j] + v;
              }
            }
          });
        } else {  // gate and up panel u -> silu(gate) * up
          const int64_t n0 = (int64_t)u * PANEL, nn = std::min<int64_t>(PANEL, I - n0);
          fin = un.blocks(idx, u, nb, claim, whole, [&](int64_t m0) {
            const int mm = (int)std::min<int64_t>(MAX_ROWS, M - m0);
            const float* x = xn + m0 * D;
            const q4k::Q4Rows qx = qin(ly.gate) || qin(ly.up) ? qn.rows(m0) : q4k::Q4Rows{};
            panel_gemv(ly.gate, u, mm, x, D, buf, qin(ly.gate) ? qx : q4k::Q4Rows{},
                       lora_ahead(l, 4, n0, nn, m0, mm, ah_a, idx, u, 0));
            panel_gemv(ly.up, u, mm, x, D, buf2, qin(ly.up) ? qx : q4k::Q4Rows{},
                       lora_ahead(l, 5, n0, nn, m0, mm, ah_b, idx, u, 1));
            const bool has_g = lora_delta(l, 4, n0, nn, dl, m0, mm);
            const bool has_u = lora_delta(l, 5, n0, nn, dl2, m0, mm);
            for (int64_t m = 0; m < mm; ++m) {
              float* dst = ACT + (l * M + m0 + m) * I + n0;
              for (int64_t j = 0; j < nn; ++j) {
                float gv = buf[m * PANEL + j], uv = buf2[m * PANEL + j];
                if (has_g) gv += dl[m * PANEL + j];
                if (has_u) uv += dl2[m * PANEL + j];
                buf[m * PANEL + j] = gv;
                buf2[m * PANEL + j] = uv;
              }
              silu_mul(buf + m * PANEL, buf2 + m * PANEL, nn, dst);
              if (qin(ly.down)) {  // this panel's blocks of the down projection's input
                q4k::quantize_blocks(ACT + l * M * I, I, m0 + m, n0 / q4k::QK, (n0 + nn) / q4k::QK, q4_act(l));
              }
            }
          });
        }
        if (fin) un.finish(idx, u);
        if (whole) unit_ns[sub] = now_ns() - t0;  // a joined unit's few blocks would shorten the wait for others
        if (profiling_) prof_[ph + 1].fetch_add(cpu_ns() - c0, std::memory_order_relaxed);
      };

      // Returns once every phase up to idx is complete: waits briefly for the units other threads hold, then
      // runs the ones still unfinished itself (a descheduled thread must not stall the step).
      auto ensure = [&](int64_t idx) {
        for (; frontier <= idx; ++frontier) {
          const int64_t j = frontier;
          if (spin_ns_ < 0) {  // test mode: every unit runs again (all must be idempotent)
            while (!un.complete(j)) cpu_relax();
            for (int u = 0; u < total[j]; ++u) run_unit(j, u, false);
            helped_.fetch_add(total[j], std::memory_order_relaxed);
            continue;
          }
          if (j != HP && PH_KIND[j % NPH] != 1 && PH_KIND[j % NPH] >= 0)  // panels: join the units still running
            for (int u = 0; u < total[j]; ++u)
              if (un.open(j, u, nb)) run_unit(j, u);
          if (un.complete(j)) continue;
          const int64_t budget = spin_ns_ + unit_factor_ * unit_ns[j == HP ? NPH : j % NPH];
          const int64_t t0 = now_ns(), c0 = profiling_ ? cpu_ns() : 0;
          bool ok = false;
          while (!ok && budget > 0) {
            for (int i = 0; i < 32 && !ok; ++i) {
              cpu_relax();
              ok = un.complete(j);
            }
            if (now_ns() - t0 > budget) break;
          }
          if (profiling_) prof_[6].fetch_add(cpu_ns() - c0, std::memory_order_relaxed);
          if (ok) continue;
          for (int u = 0; u < total[j]; ++u)  // help: run what is not finished yet (maybe a second time)
            if (!un.finished(j, u)) {
              run_unit(j, u, false);
              helped_.fetch_add(1, std::memory_order_relaxed);
            }
        }
      };

      for (int64_t idx = 0; idx < NP; ++idx) {
        int u;
        while ((u = un.claim(idx)) < total[idx]) {
          if (idx > 0) ensure(idx - 1);
          if (!un.finished(idx, u)) run_unit(idx, u);  // else: helped
        }
      }
    };
    if (nt > 1) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
      body(omp_get_thread_num());
#else
      body(0);
#endif
    } else {
      body(0);
    }
    if (!head) std::memcpy(out.data_ptr<float>(), X + 2 * L * M * D, M * D * sizeof(float));
    return out;
  }

 private:
  int64_t D_, H_, nkv_, hd_, I_;
  double eps_;
  float scale_;
  std::vector<LayerPlan> layers_;
  std::vector<at::Tensor> keep_;
  std::vector<float> ws_;
  bool any_q4_ = false, any_i8_ = false;
  std::vector<int8_t> q4_q_, q4_l_;  // q4 layers: quantized o/down inputs, per layer (`run`; q4_l_: low digits)
  std::vector<float> q4_d_;
  std::vector<int32_t> q4_s_;
  std::mutex mu_;
  std::atomic<int64_t> helped_{0};
  int64_t spin_ns_ = SPIN_NS, unit_factor_ = 2;
  int64_t lora_slots_ = 0, lora_rank_ = 0;
  bool profiling_ = false;
  std::atomic<int64_t> prof_[8] = {};
  Seg head_;  // the output head (`set_head`)
  const void* head_norm_ = nullptr;
  bool head_norm16_ = false, has_head_ = false;
};

// torch.classes.nomoat.StackPlan: built once per decode model (add_layer per layer, add_lora per adapter
// projection), then `run` once per decode step.
void register_decode_stack(torch::Library& m) {
  m.class_<StackPlan>("StackPlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &StackPlan::add_layer)
      .def("add_lora", &StackPlan::add_lora)
      .def("num_layers", &StackPlan::num_layers)
      .def("helped", &StackPlan::helped)
      .def("set_spin", &StackPlan::set_spin)
      .def("profile", &StackPlan::profile)
      .def("set_head", &StackPlan::set_head)
      .def("run", &StackPlan::run);
}
