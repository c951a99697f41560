// The `nomoat` torch library: every op's schema and its CPU kernel (torch.ops.nomoat.*), and the decode stack's
// plan class (torch.classes.nomoat.StackPlan). Fake (meta) implementations, for torch.compile, are registered in
// Python (nomoat/kernels/ops.py) once this library is loaded.
#include "ops.h"
#include "vec.h"

// Ops cannot return strings: `isa` returns an index into ("portable", "sse", "avx2", "avx512", "neon").
static int64_t isa_index() {
  const std::string s = compiled_isa();
  const char* names[] = {"portable", "sse", "avx2", "avx512", "neon"};
  for (int64_t i = 0; i < 5; ++i)
    if (s == names[i]) return i;
  return 0;
}

TORCH_LIBRARY(nomoat, m) {
  m.def("linear_f32(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor");
  m.def("linear_bf16_rows(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_i8(Tensor x, Tensor panels, Tensor scale, Tensor? bias, int n, bool exact=False) -> Tensor");
  m.def("linear_q4(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, int row0, Tensor positions, int kv_len, int window, float scale) -> Tensor");
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor gate, Tensor up, Tensor(a!) grad, Tensor(b!)? p_out) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor");
  m.def("softmax_xent_(Tensor(a!) logits, Tensor targets) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("isa() -> int", &isa_index);
  register_decode_stack(m);
}

TORCH_LIBRARY_IMPL(nomoat, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_i8", &linear_i8);
  m.impl("linear_bf16_rows", &linear_bf16_rows);
  m.impl("linear_q4", &linear_q4);
  m.impl("decode_attention", &decode_attention);
  m.impl("swiglu_forward", &swiglu_forward);
  m.impl("swiglu_backward", &swiglu_backward);
  m.impl("rope", &rope);
  m.impl("softmax_xent_", &softmax_xent_);
  m.impl("argmax_rows", &argmax_rows);
}
