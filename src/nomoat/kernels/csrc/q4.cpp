// y = x W^T (+ bias) over 4-bit weights in blocks of 32 input channels (GGUF's Q4_0 and Q4_1), for any number of
// rows: the op `linear_q4`. The layout and the kernels are q4_rows.h's: activations are quantized to int8 per block
// of 32 once per call, then panels of 64 output channels are shared among the threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "q4_rows.h"

using namespace q4k;

namespace {

// Row quantization of activations (M x K, row stride ldx) into xq, dx, sq (`Q4Rows` layout), blocks in parallel.
void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* xq, float* dx, int32_t* sq) {
  const int64_t nb = K / QK;
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_blocks(x, ldx, i / nb, i % nb, i % nb + 1, Q4Rows{xq, dx, sq, K});
  });
}

}  // namespace

at::Tensor linear_q4(const at::Tensor& x_in, const at::Tensor& wp, const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x: 2-D fp32");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  TORCH_CHECK(wp.dim() == 3 && wp.is_contiguous() && wp.scalar_type() == at::kByte, "w: (P, K / 32, BB) uint8");
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0), nb = wp.size(1), BB = wp.size(2);
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  TORCH_CHECK(K == nb * QK && P * QP >= N, "w: q4 panel shape does not match x or N");
  TORCH_CHECK(BB == CODE_BYTES + 2 * QP || BB == CODE_BYTES + 4 * QP, "w: blocks of 1152 (Q4_0) or 1280 (Q4_1) bytes");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= N, "bias: fp32 (N,)");
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * nb);
  std::vector<int32_t> sq(M * nb);
  quantize_rows(x.data_ptr<float>(), ldx, M, K, xq.data(), dx.data(), sq.data());
  const Q4Rows rows{xq.data(), dx.data(), sq.data(), K};
  float* yp = y.data_ptr<float>();
  const uint8_t* wb = wp.data_ptr<uint8_t>();
  const int64_t panel_bytes = nb * BB;
  const bool small = P * panel_bytes * std::max<int64_t>(1, M / 4) < (int64_t(1) << 20);
  const int nt = small ? 1 : (int)std::min<int64_t>(at::get_num_threads(), P);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t p = 0; p < P; ++p) {
    alignas(64) float buf[QROWS * QP];
    const uint8_t* w = wb + p * panel_bytes;
    const int64_t n0 = p * QP, nn = std::min<int64_t>(QP, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += QROWS) {
      const int mm = (int)std::min<int64_t>(QROWS, M - m0);
      q4_panel(rows.rows(m0), mm, w, BB, buf);
      for (int m = 0; m < mm; ++m) {
        float* dst = yp + (m0 + m) * N + n0;
        const float* src = buf + m * QP;
        for (int j = 0; j < nn; ++j) dst[j] = bp ? src[j] + bp[n0 + j] : src[j];
      }
    }
  }
  return y;
}
