// y = x W^T (+ bias) for a few fp32 rows of activations over a bf16 weight in its own (N, K) row-major layout (a bf16
// `nn.Linear`'s weight or a tied embedding, read in place): the decode-time matmul of bf16 models, fp32 sums; and the
// process's choice between exact fp32 activations and hardware bf16 dot products for it (`bf16_dot`).
#include <ATen/Parallel.h>

#include <algorithm>

#include "ops.h"
#include "rows_bf16.h"

#ifndef SERIAL_BYTES_LOG2
#define SERIAL_BYTES_LOG2 21
#endif

at::Tensor linear_bf16_rows(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x: 2-D fp32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w: (N, K) bf16 contiguous");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = M > 1 ? x.stride(0) : K;
  TORCH_CHECK(w.size(1) == K, "w: K does not match x");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: fp32 (N,)");
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = (const uint16_t*)w.data_ptr();
  const int64_t P = (N + 63) / 64;
  // Dynamic scheduling, 64 rows of W at a time (a descheduled thread on a shared VM must not hold half the matrix);
  // small matrices on the calling thread (waking an OpenMP worker costs about what a second core saves on 2 MB).
  const bool small = N * K * 2 * std::max<int64_t>(1, M / 4) < (int64_t(1) << SERIAL_BYTES_LOG2);
  const int nt = small ? 1 : (int)std::min<int64_t>(at::get_num_threads(), P);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t p = 0; p < P; ++p) {
    alignas(64) float buf[8 * 64];
    const int64_t n0 = p * 64;
    const int nn = (int)std::min<int64_t>(64, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int mm = (int)std::min<int64_t>(8, M - m0);
      rows_any_bf16(mm, xp + m0 * ldx, ldx, wp + n0 * K, K, nn, buf);
      for (int m = 0; m < mm; ++m) {
        float* dst = yp + (m0 + m) * N + n0;
        for (int j = 0; j < nn; ++j) dst[j] = bp ? buf[m * 64 + j] + bp[n0 + j] : buf[m * 64 + j];
      }
    }
  }
  return y;
}

// Sets (mode 0: exact fp32 activations; 1: activations rounded to bf16, hardware bf16 dot products, where the build
// has them) or with -1 only reads the mode of every bf16 row kernel of the process (this op and the decode stack);
// returns the mode in effect.
static int64_t bf16_dot(int64_t mode) {
  if (mode >= 0) bf16_dot_mode.store(HAS_BF16_DOT && mode > 0 ? 1 : 0);
  return bf16_dot_mode.load();
}

TORCH_LIBRARY_FRAGMENT(nomoat, m) { m.def("bf16_dot(int mode) -> int", &bf16_dot); }
