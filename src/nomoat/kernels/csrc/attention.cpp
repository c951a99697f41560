// One decode step of attention for B rows (one new token each) in one call: rotate q and k, write k and v into the
// cache rows row0.. at each row's position, attend over the cached keys 0..pos (within `window` when > 0, below
// kv_len). Replaces about 40 small torch ops per layer (rope, the cache's indexed writes, masked softmax attention).
#include <algorithm>
#include <vector>

#include "attend.h"
#include "ops.h"

// q (B,1,H,hd), k and v (B,1,nkv,hd) with unit last stride; cos/sin (B,1,rd); kc/vc (rows, nkv, S, hd) contiguous.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_in,
                            const at::Tensor& sin_in, at::Tensor kc, at::Tensor vc, int64_t row0,
                            const at::Tensor& positions, int64_t kv_len, int64_t window, double scale) {
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const int64_t B = q.size(0), H = q.size(2), hd = q.size(3), nkv = k.size(2), S = kc.size(2), rd = cos.size(-1);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat, "fp32 tensors expected");
  TORCH_CHECK(q.size(1) == 1 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q/k/v: one token");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.size(3) == hd && kc.size(1) == nkv, "cache layout");
  TORCH_CHECK(row0 >= 0 && row0 + B <= kc.size(0) && kv_len <= S && H % nkv == 0, "cache rows");
  TORCH_CHECK(rd <= hd && rd % 2 == 0, "rope tables");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == B, "positions: int64 (B, 1)");
  auto pos_c = positions.contiguous();
  const int64_t* pos = pos_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "position outside the cache");
  auto qr = at::empty({B, H, hd}, q.options());
  auto out = at::empty({B, 1, H * hd}, q.options());
  float *qrp = qr.data_ptr<float>(), *op = out.data_ptr<float>();
  float *kcp = kc.data_ptr<float>(), *vcp = vc.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float *c = cp + b * rd, *s = sp + b * rd;
    for (int64_t h = 0; h < nkv; ++h) {
      const int64_t at = (((row0 + b) * nkv + h) * S + pos[b]) * hd;
      rope_head(kp + b * k.stride(0) + h * k.stride(2), c, s, rd, hd, kcp + at);
      std::memcpy(vcp + at, vp + b * v.stride(0) + h * v.stride(2), hd * sizeof(float));
    }
    for (int64_t h = 0; h < H; ++h)
      rope_head(qp + b * q.stride(0) + h * q.stride(2), c, s, rd, hd, qrp + (b * H + h) * hd);
  }
  const int64_t rep = H / nkv;
  const float sc = (float)scale;
  // Threads only when there is enough work to pay for waking them (long contexts, big batches).
#pragma omp parallel for schedule(static) if (B * H * kv_len * hd > (1 << 18))
  for (int64_t bg = 0; bg < B * nkv; ++bg) {  // a row's key/value head and its query heads (each key read once)
    const int64_t b = bg / nkv, g = bg % nkv, h0 = b * H + g * rep;
    const int64_t hi = std::min(pos[b], kv_len - 1), lo = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0;
    const float* kb = kcp + ((row0 + b) * nkv + g) * S * hd;
    const float* vb = vcp + ((row0 + b) * nkv + g) * S * hd;
    const int64_t ws = std::max<int64_t>(hi - lo + 1, 1);
    std::vector<float> w(rep * ws);
    attend_heads(rep, qrp + h0 * hd, kb, vb, lo, hi, pos[b], (const float*)nullptr, (const float*)nullptr, hd, sc,
                 w.data(), ws, op + h0 * hd);
  }
  return out;
}
