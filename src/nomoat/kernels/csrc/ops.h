// The operators of the `nomoat` torch library (registered in registration.cpp), one declaration per op.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

// linear.cpp: y = x W^T (+ bias) over fp32, bf16 or int8 panels, for any number of rows (blocks of 8 share each panel).
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias, int64_t n);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias, int64_t n);
at::Tensor linear_i8(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, int64_t n, bool exact);

// linear_rows.cpp: y = x W^T (+ bias) over a bf16 weight in its own (N, K) layout (read in place), fp32 sums.
at::Tensor linear_bf16_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);
// q4.cpp: y = x W^T (+ bias) over 4-bit panels in blocks of 32 input channels (GGUF Q4_0 / Q4_1), any rows.
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias, int64_t n);

// attention.cpp: one decode step of attention (rope, KV-cache write, attention over the cached keys).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t row0,
                            const at::Tensor& positions, int64_t kv_len, int64_t window, double scale);

// fused_ops.cpp: the elementwise parts of LoRA training.
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up);
at::Tensor swiglu_backward(const at::Tensor& gate, const at::Tensor& up, at::Tensor grad,
                           const std::optional<at::Tensor>& p_out);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward);
at::Tensor softmax_xent_(at::Tensor logits, const at::Tensor& targets);

// argmax.cpp: each row's argmax, as torch.argmax(dim=-1) (first maximum; NaN the largest).
at::Tensor argmax_rows(const at::Tensor& x);

// decode_stack.cpp: the StackPlan class (every layer of a decode step in one call).
void register_decode_stack(torch::Library& m);
