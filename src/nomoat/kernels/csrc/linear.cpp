// y = x W^T (+ bias) for a few rows of activations over weights in panels (gemv.h), fp32, bf16 (fp32 accumulation) or
// int8 codes with fp16 scales per block of 32 input channels (GGUF Q8_0's blocks): the decode-time matmul, bound by
// how fast the weights stream from memory. Where the build has VNNI, int8 panels take the rows rounded to int8 per
// block of 32 and integer dot products by default (int8_dot.h; `i8_dot` op, `NOMOAT_I8_DOT=0`: the exact fp32 path).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gemv.h"
#include "int8_dot.h"
#include "ops.h"

enum Kind { F32 = 0, I8 = 1, BF16 = 2 };
// Above this many rows a bf16 call is a prefill: with AVX-512-BF16 its activations are rounded to bf16 (as a bf16
// model's are) for hardware dot products; up to it (decode) they stay fp32 and the weights are widened.
constexpr int64_t BF16_DOT_MIN_ROWS = 16;

template <int T>
static inline void panel_of(int m, const float* x, int64_t ldx, const char* w, const uint16_t* ds, int64_t K,
                            float* out) {
  if constexpr (T == BF16) panel_any_bf16(m, x, ldx, (const uint16_t*)w, K, out);
  else panel_any<T == I8>(m, x, ldx, w, ds, K, out);
}

// `dp`: int8 panels' block scales (P, ceil(K / 32), 64) fp16, nullptr for the other kinds.
// `exact`: int8 panels take fp32 activations whatever the process's mode (`i8_dot`).
template <int T>
static at::Tensor linear_impl(const at::Tensor& x_in, const at::Tensor& wp, const uint16_t* dp,
                              const std::optional<at::Tensor>& bias, int64_t N, bool exact = false) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x: 2-D fp32");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  TORCH_CHECK(wp.dim() == 3 && wp.is_contiguous(), "w: (P, K, 64) contiguous panels");
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0), ldx = M > 1 ? x.stride(0) : K;
  const int64_t kstored = T == BF16 ? (K + 1) / 2 : K, width = T == BF16 ? 2 * PANEL : PANEL;
  TORCH_CHECK(wp.size(1) == kstored && wp.size(2) == width && P * PANEL >= N, "w: panel shape does not match x or N");
  const float* xp = x.data_ptr<float>();
  const char* wb = (const char*)wp.data_ptr();
  const int64_t panel_bytes = kstored * width * (T == F32 ? 4 : T == I8 ? 1 : 2);
  const int64_t panel_scales = (K + I8_BLOCK - 1) / I8_BLOCK * PANEL;  // int8: fp16 block scales per panel
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= N, "bias: fp32 (N,)");
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  // bf16 weights, many rows (prefill) and AVX-512-BF16: rows rounded to bf16 pairs once, dot products in hardware
  std::vector<uint32_t> xpairs;
#if defined(__AVX512BF16__)
  if (T == BF16 && M > BF16_DOT_MIN_ROWS) {
    xpairs.resize(M * kstored);
    bf16_pairs(xp, ldx, M, K, xpairs.data());
  }
#endif
  // int8 panels with integer dot products: the rows rounded per block of 32 once (to int8, or 16-bit codes in two
  // int8 digits, int8_dot.h)
  std::vector<int8_t> xq, xl;
  std::vector<float> xd;
  std::vector<int32_t> xs;
  if (T == I8 && !exact && i8_dot_on(K)) {
    xq.resize(M * K);
    if (i8_dot_16()) xl.resize(M * K);
    xd.resize(M * K / q4k::QK);
    xs.resize(M * K / q4k::QK);
    const q4k::Q4Rows dst{xq.data(), xd.data(), xs.data(), K, xl.empty() ? nullptr : xl.data()};
    for (int64_t m = 0; m < M; ++m) q4k::quantize_blocks(xp, ldx, m, 0, K / q4k::QK, dst);
  }
  const q4k::Q4Rows xrows{xq.data(), xd.data(), xs.data(), K, xl.empty() ? nullptr : xl.data()};
  // Dynamic scheduling, one panel at a time: on a shared 2-core VM one thread is often descheduled, and a static
  // split would make the other wait for its whole half. Small matrices run on the calling thread: waking a sleeping
  // OpenMP worker costs tens of microseconds, about what the second core saves on 2 MB of weights.
  const bool small = P * panel_bytes * std::max<int64_t>(1, M / 4) < (int64_t(1) << SERIAL_BYTES_LOG2);
  const int nt = small ? 1 : (int)std::min<int64_t>(at::get_num_threads(), P);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t p = 0; p < P; ++p) {
    alignas(64) float buf[MAX_ROWS * PANEL];
    const char* w = wb + p * panel_bytes;
    const uint16_t* ds = dp != nullptr ? dp + p * panel_scales : nullptr;
    const int64_t n0 = p * PANEL, nn = std::min<int64_t>(PANEL, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {  // the panel stays in L2 across row blocks
      const int mm = (int)std::min<int64_t>(MAX_ROWS, M - m0);
#if defined(__AVX512BF16__)
      if (!xpairs.empty())
        panel_any_dpbf16(mm, xpairs.data() + m0 * kstored, kstored, (const uint16_t*)w, buf);
      else
#endif
      if (!xq.empty())
        i8k::panel_any(mm, xrows.rows(m0), (const int8_t*)w, ds, buf);
      else
        panel_of<T>(mm, xp + m0 * ldx, ldx, w, ds, K, buf);
      for (int m = 0; m < mm; ++m) {
        float* dst = yp + (m0 + m) * N + n0;
        const float* src = buf + m * PANEL;
        for (int j = 0; j < nn; ++j) dst[j] = bp ? src[j] + bp[n0 + j] : src[j];
      }
    }
  }
  return y;
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                      int64_t n) {
  TORCH_CHECK(panels.scalar_type() == at::kFloat, "fp32 panels expected");
  return linear_impl<F32>(x, panels, nullptr, bias, n);
}

at::Tensor linear_i8(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, int64_t n, bool exact) {
  TORCH_CHECK(panels.scalar_type() == at::kChar, "int8 panels expected");
  TORCH_CHECK(panels.dim() == 3, "int8 panels: (P, K, 64)");
  const int64_t nb = (panels.size(1) + I8_BLOCK - 1) / I8_BLOCK;
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 3 &&
              scale.size(0) == panels.size(0) && scale.size(1) == nb && scale.size(2) == PANEL,
              "scale: fp16 block scales (P, ceil(K / 32), 64)");
  return linear_impl<I8>(x, panels, (const uint16_t*)scale.data_ptr(), bias, n, exact);
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                       int64_t n) {
  TORCH_CHECK(panels.scalar_type() == at::kBFloat16, "bf16 panels expected");
  return linear_impl<BF16>(x, panels, nullptr, bias, n);
}

// Sets (mode 0: exact fp32 activations, int8 weights widened; 1: activations rounded to int8 per block of 32,
// integer dot products; 2, the default where the build has VNNI: rounded to 16-bit codes per block, integer dot
// products in two passes) or with -1 only reads the mode of every int8 panel kernel of the process (linear_i8 and the
// decode stack); returns the mode in effect (always 0 without VNNI).
static int64_t i8_dot(int64_t mode) {
  if (mode >= 0) i8_dot_mode.store(HAS_I8_DOT ? (int)std::min<int64_t>(mode, 2) : 0);
  return i8_dot_mode.load();
}

TORCH_LIBRARY_FRAGMENT(nomoat, m) { m.def("i8_dot(int mode) -> int", &i8_dot); }
