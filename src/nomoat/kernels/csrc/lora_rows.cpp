// Many LoRA adapters over the rows of one activation matrix in one call (the CPU form of Punica's SGMV / S-LoRA's
// segmented kernels): for every entry e (a token row and one adapter of its selection),
//
//   y[rows[e]] += coef[e] * (x[rows[e]] A[which[e]]^T) Bt[which[e]]
//
// with A (G, r, in) and Bt (G, r, out) an adapter stack (ranks zero-padded to r). Entries come sorted by adapter, so
// consecutive entries share their factors. Two passes, each one parallel region: the shrink (t = c * x A^T, (E, r))
// runs over blocks of entries that share an adapter (each row of A read once per block, dot products for up to
// four rows at a time); the expand runs over blocks of 64 output columns (a thread adds every entry's t Bt to its
// columns only, so a row listed twice, a stack of adapters, is never written by two threads). Small calls (decode
// with a few rows) run on the calling thread. The factors are fp32 or bf16 (widened exactly to fp32 in registers; x, y
// and every sum fp32).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "rows_bf16.h"
#include "vec.h"

namespace {

constexpr int64_t COLS = 64;          // output columns per expand unit
constexpr int ROWS = 4;               // entries sharing one pass over an adapter's A
constexpr int64_t SERIAL_FMA = 1 << 20;  // below this many multiply-adds, no second thread is woken

inline vf ld_w(const float* p) { return ld(p); }
inline vf ld_w(const uint16_t* p) { return widen_bf16(p); }
inline float at_w(const float* p, int64_t i) { return p[i]; }
inline float at_w(const uint16_t* p, int64_t i) { return bf16_to_f(p[i]); }

// t[j][i] = c[j] * dot(x_j, a_i) for the n (<= ROWS) rows x_j and the r rows a_i of one adapter's A.
template <typename T>
inline void shrink_block(int n, const float* const* xs, const T* a, int64_t r, int64_t in, const float* c,
                         float* const* t) {
  for (int64_t i = 0; i < r; ++i) {
    const T* ai = a + i * in;
    vf acc[ROWS] = {};
    int64_t k = 0;
    for (; k + W <= in; k += W) {
      const vf av = ld_w(ai + k);
      for (int j = 0; j < n; ++j) acc[j] += ld(xs[j] + k) * av;
    }
    for (int j = 0; j < n; ++j) {
      float s = hsum(acc[j]);
      for (int64_t kk = k; kk < in; ++kk) s += xs[j][kk] * at_w(ai, kk);
      t[j][i] = s * c[j];
    }
  }
}

// y[c0..c0+nn) += t (r values) times rows c0..c0+nn) of Bt (r, out).
template <typename T>
inline void expand_cols(const float* t, const T* bt, int64_t r, int64_t out, int64_t c0, int64_t nn, float* y) {
  constexpr int NVEC = COLS / W;
  if (nn == COLS) {
    vf acc[NVEC] = {};
    for (int64_t i = 0; i < r; ++i) {
      const vf ti = splat(t[i]);
      const T* b = bt + i * out + c0;
      for (int v = 0; v < NVEC; ++v) acc[v] += ti * ld_w(b + v * W);
    }
    for (int v = 0; v < NVEC; ++v) st(y + c0 + v * W, ld(y + c0 + v * W) + acc[v]);
    return;
  }
  float acc[COLS] = {};
  for (int64_t i = 0; i < r; ++i) {
    const T* b = bt + i * out + c0;
    for (int64_t j = 0; j < nn; ++j) acc[j] += t[i] * at_w(b, j);
  }
  for (int64_t j = 0; j < nn; ++j) y[c0 + j] += acc[j];
}

// The two passes of `lora_rows_` over factors of type T (float or bf16 bits).
template <typename T>
void lora_rows_run(float* yp, int64_t ldy, const float* xp, int64_t ldx, const T* ap, const T* bp, int64_t E,
                   int64_t r, int64_t in, int64_t out, const int64_t* rp, const int64_t* wp, const float* cp) {
  // blocks of up to ROWS consecutive entries of one adapter: the shrink's units
  std::vector<int64_t> starts;
  for (int64_t e = 0; e < E;) {
    starts.push_back(e);
    const int64_t g = wp[e];
    int64_t n = 0;
    while (e < E && wp[e] == g && n < ROWS) ++e, ++n;
  }
  starts.push_back(E);
  const int64_t nb = (int64_t)starts.size() - 1, ncols = (out + COLS - 1) / COLS;
  std::vector<float> t(E * r);
  const bool serial = E * r * (in + out) < SERIAL_FMA;
  const int nt = serial ? 1 : std::max(1, at::get_num_threads());

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t e0 = starts[b];
      const int n = (int)(starts[b + 1] - e0);
      const float* xs[ROWS];
      float* ts[ROWS];
      for (int j = 0; j < n; ++j) {
        xs[j] = xp + rp[e0 + j] * ldx;
        ts[j] = t.data() + (e0 + j) * r;
      }
      shrink_block(n, xs, ap + wp[e0] * r * in, r, in, cp + e0, ts);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t cb = 0; cb < ncols; ++cb) {
      const int64_t c0 = cb * COLS, nn = std::min<int64_t>(COLS, out - c0);
      for (int64_t e = 0; e < E; ++e)
        expand_cols(t.data() + e * r, bp + wp[e] * r * out, r, out, c0, nn, yp + rp[e] * ldy);
    }
  }
}

}  // namespace

// y (N, out) += per entry e: coef[e] * (x[rows[e]] a[which[e]]^T) bt[which[e]]; entries sorted by `which`.
// a and bt fp32 or bf16.
void lora_rows_(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const at::Tensor& rows,
                const at::Tensor& which, const at::Tensor& coef) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0), "lora_rows_: y (N, out) and x (N, in)");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && coef.scalar_type() == at::kFloat &&
              (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
              bt.scalar_type() == a.scalar_type(), "lora_rows_: fp32 y, x and coef; a and bt both fp32 or both bf16");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1, "lora_rows_: unit stride along y's and x's rows");
  TORCH_CHECK(a.dim() == 3 && bt.dim() == 3 && a.is_contiguous() && bt.is_contiguous() && a.size(0) == bt.size(0) &&
              a.size(1) == bt.size(1) && a.size(2) == x.size(1) && bt.size(2) == y.size(1),
              "lora_rows_: a (G, r, in) and bt (G, r, out) contiguous");
  TORCH_CHECK(rows.scalar_type() == at::kLong && which.scalar_type() == at::kLong && rows.dim() == 1 &&
              which.dim() == 1 && coef.dim() == 1 && rows.numel() == which.numel() &&
              rows.numel() == coef.numel(), "lora_rows_: rows, which (int64) and coef (fp32), one per entry");
  const int64_t E = rows.numel(), N = x.size(0), G = a.size(0), r = a.size(1), in = a.size(2), out = bt.size(2);
  if (E == 0 || r == 0) return;
  const auto rows_c = rows.contiguous(), which_c = which.contiguous(), coef_c = coef.contiguous();
  const int64_t* rp = rows_c.data_ptr<int64_t>();
  const int64_t* wp = which_c.data_ptr<int64_t>();
  const float* cp = coef_c.data_ptr<float>();
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(rp[e] >= 0 && rp[e] < N && wp[e] >= 0 && wp[e] < G, "lora_rows_: an entry out of range");
    TORCH_CHECK(e == 0 || wp[e] >= wp[e - 1], "lora_rows_: entries must be sorted by adapter");
  }
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  if (a.scalar_type() == at::kBFloat16)
    lora_rows_run(yp, ldy, xp, ldx, (const uint16_t*)a.data_ptr(), (const uint16_t*)bt.data_ptr(), E, r, in, out, rp,
                  wp, cp);
  else
    lora_rows_run(yp, ldy, xp, ldx, a.data_ptr<float>(), bt.data_ptr<float>(), E, r, in, out, rp, wp, cp);
}

TORCH_LIBRARY_FRAGMENT(nomoat, m) {
  m.def("lora_rows_(Tensor(a!) y, Tensor x, Tensor a, Tensor bt, Tensor rows, Tensor which, Tensor coef) -> ()");
}

TORCH_LIBRARY_IMPL(nomoat, CPU, m) { m.impl("lora_rows_", &lora_rows_); }
