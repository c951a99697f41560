// The elementwise parts of LoRA training in one pass each: SwiGLU forward and backward, rotary embeddings (and
// their gradient), and softmax cross-entropy whose gradient replaces the logits in place. fp32 throughout, `exp` by
// the Cephes single-precision polynomial (about 1 ulp), so results agree with torch's to ~1e-7 relative.
#include <ATen/Parallel.h>

#include <algorithm>

#include "ops.h"
#include "vec.h"

// p = silu(gate) * up, one pass.
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes(), "gate/up: contiguous");
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat, "fp32 expected");
  auto out = at::empty_like(gate);
  const float *g = gate.data_ptr<float>(), *u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = gate.numel();
  at::parallel_for(0, (n + W - 1) / W, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b * W; i < std::min(e * W, n); i += W) {
      if (i + W <= n) {
        const vf gv = ld(g + i);
        st(o + i, gv / (1.0f + vexp(-gv)) * ld(u + i));
      } else {
        for (int64_t j = i; j < n; ++j) o[j] = g[j] / (1.0f + sexp(-g[j])) * u[j];
      }
    }
  });
  return out;
}

// SwiGLU backward in one pass. grad (dL/dp) becomes dL/dgate in place; returns dL/dup; writes p = silu(gate) * up
// into p_out when given (for the LoRA-A gradient of the layer that consumed p).
at::Tensor swiglu_backward(const at::Tensor& gate, const at::Tensor& up, at::Tensor grad,
                           const std::optional<at::Tensor>& p_out) {
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && grad.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.sizes() == grad.sizes(), "gate, up and grad: same shape");
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat &&
              grad.scalar_type() == at::kFloat, "fp32 expected");
  const bool want_p = p_out.has_value() && p_out->defined();
  if (want_p)
    TORCH_CHECK(p_out->is_contiguous() && p_out->numel() == gate.numel() && p_out->scalar_type() == at::kFloat,
                "p_out: fp32, contiguous, gate's size");
  auto grad_up = at::empty_like(gate);
  const float *g = gate.data_ptr<float>(), *u = up.data_ptr<float>();
  float *gp = grad.data_ptr<float>(), *gu = grad_up.data_ptr<float>(), *p = want_p ? p_out->data_ptr<float>() : nullptr;
  const int64_t n = gate.numel();
  at::parallel_for(0, (n + W - 1) / W, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b * W; i < std::min(e * W, n); i += W) {
      if (i + W <= n) {
        const vf gv = ld(g + i), uv = ld(u + i), dv = ld(gp + i);
        const vf sig = 1.0f / (1.0f + vexp(-gv));
        const vf act = gv * sig;
        st(gu + i, dv * act);
        st(gp + i, dv * uv * sig * (1.0f + gv * (1.0f - sig)));
        if (p) st(p + i, act * uv);
      } else {
        for (int64_t j = i; j < n; ++j) {
          const float sig = 1.0f / (1.0f + sexp(-g[j])), act = g[j] * sig, d = gp[j];
          gu[j] = d * act;
          gp[j] = d * u[j] * sig * (1.0f + g[j] * (1.0f - sig));
          if (p) p[j] = act * u[j];
        }
      }
    }
  });
  return grad_up;
}

// Rotary embedding (Hugging Face's rotate_half convention) of x (B, H, T, hd) with any strides but a unit last one,
// by cos/sin (B, T, rd) contiguous: the first rd channels rotate, the rest are copied. backward=true applies the
// transposed rotation (the gradient of the forward one). The output has x's shape, contiguous as (B, T, H, hd).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in, bool backward) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.scalar_type() == at::kFloat, "x: (B, H, T, hd) fp32");
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "cos/sin: fp32");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3, "cos/sin");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), hd = x.size(3), rd = cos.size(2), half = rd / 2;
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == T && rd <= hd && rd % 2 == 0, "cos/sin: (B, T, rd), rd <= hd");
  auto out = at::empty({B, T, H, hd}, x.options()).transpose(1, 2);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  at::parallel_for(0, B * T, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t bt = lo; bt < hi; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const float *c = cp + bt * rd, *s = sp + bt * rd;
      for (int64_t h = 0; h < H; ++h) {
        const float* xi = xp + b * sb + h * sh + t * st;
        float* o = op + ((b * T + t) * H + h) * hd;
        if (!backward) {
          for (int64_t i = 0; i < half; ++i) {
            o[i] = xi[i] * c[i] - xi[i + half] * s[i];
            o[i + half] = xi[i + half] * c[i + half] + xi[i] * s[i + half];
          }
        } else {
          for (int64_t i = 0; i < half; ++i) {
            o[i] = xi[i] * c[i] + xi[i + half] * s[i + half];
            o[i + half] = xi[i + half] * c[i + half] - xi[i] * s[i];
          }
        }
        for (int64_t i = rd; i < hd; ++i) o[i] = xi[i];
      }
    }
  });
  return out;
}

// Cross-entropy of each row of logits (c, V) against targets (c,): returns the per-row loss lse - logit[y] and turns
// the logits, in place, into the gradient softmax - onehot(y). One row at a time: max, exp and sum, scale.
at::Tensor softmax_xent_(at::Tensor logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "logits: (c, V) fp32");
  TORCH_CHECK(targets.dim() == 1 && targets.scalar_type() == at::kLong && targets.size(0) == logits.size(0),
              "targets: int64 (c,)");
  const int64_t c = logits.size(0), V = logits.size(1);
  auto tc = targets.contiguous();
  const int64_t* y = tc.data_ptr<int64_t>();
  for (int64_t r = 0; r < c; ++r) TORCH_CHECK(y[r] >= 0 && y[r] < V, "target outside the vocabulary");
  auto loss = at::empty({c}, logits.options());
  float *L = logits.data_ptr<float>(), *out = loss.data_ptr<float>();
  const int64_t vend = V / W * W;
  at::parallel_for(0, c, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* x = L + r * V;
      vf m = splat(-INFINITY);
      for (int64_t i = 0; i < vend; i += W) { const vf v = ld(x + i); m = v > m ? v : m; }
      float mx = -INFINITY;
      for (int k = 0; k < W; ++k) mx = std::max(mx, m[k]);
      for (int64_t i = vend; i < V; ++i) mx = std::max(mx, x[i]);
      const float ly = x[y[r]];
      vf s = vf{};
      for (int64_t i = 0; i < vend; i += W) { const vf v = vexp(ld(x + i) - mx); st(x + i, v); s += v; }
      float sum = 0.f;
      for (int k = 0; k < W; ++k) sum += s[k];
      for (int64_t i = vend; i < V; ++i) { x[i] = sexp(x[i] - mx); sum += x[i]; }
      out[r] = mx + std::log(sum) - ly;
      const float inv = 1.0f / sum;
      for (int64_t i = 0; i < vend; i += W) st(x + i, ld(x + i) * inv);
      for (int64_t i = vend; i < V; ++i) x[i] *= inv;
      x[y[r]] -= 1.0f;
    }
  });
  return loss;
}
