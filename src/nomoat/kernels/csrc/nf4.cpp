// NF4 (QLoRA's 4-bit NormalFloat) weights decoded to bf16 for the frozen products of QLoRA training: one tile of
// the weight at a time, straight from the packed codes, so the products that follow run on bf16 (oneDNN) and no
// dequantized copy of the whole weight ever exists. Registered as torch.ops.nomoat.nf4_decode_bf16 (fake in ops.py)
// and nf4_decode_bf16_out (into a caller's buffer, reused from product to product).
//
// Each value is bf16(bf16(codebook[code]) * bf16(absmax)), both products rounded to nearest even: exactly what
// `nomoat.lora.nf4._decode` computes in torch for a bf16 tile, so the compiled and plain paths agree bit for bit.
// Per block the 16 possible values are computed once; AVX-512 (BW) then looks up 32 codes per instruction (vpermw),
// every other ISA runs the portable loop over a 16-entry table.
#include <ATen/Parallel.h>

#include <algorithm>

#include "ops.h"
#include "vec.h"

namespace {

constexpr float kCodebook[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// fp32 -> bf16 bits, round to nearest even (torch's rounding for finite values; NaN stays NaN).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The codebook rounded to bf16, as torch's bf16 quad table holds it.
struct Book {
  float v[16];
  Book() {
    for (int i = 0; i < 16; ++i) v[i] = bf16_float(bf16_bits(kCodebook[i]));
  }
};

// One row: `bytes` packed codes (high nibble first), one absmax per `block` codes, into `out` (2 * bytes values).
void decode_row(const uint8_t* q, const float* a, uint16_t* out, int64_t bytes, int64_t block, const Book& book) {
  const int64_t per = block / 2;  // bytes per block
  for (int64_t b = 0; b * per < bytes; ++b) {
    const float s = bf16_float(bf16_bits(a[b]));
    const uint8_t* qb = q + b * per;
    uint16_t* ob = out + b * block;
#if defined(__AVX512BW__)
    if (per % 16 == 0) {
      const __m512 prod = _mm512_mul_ps(_mm512_loadu_ps(book.v), _mm512_set1_ps(s));
      __m512i u = _mm512_castps_si512(prod);  // round to nearest even (values are finite)
      u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                               _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
      const __m512i table = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
      for (int64_t i = 0; i < per; i += 16) {
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + i)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4),
                                            _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(15)), 16));
        _mm512_storeu_si512(ob + 2 * i, _mm512_permutexvar_epi16(idx, table));
      }
      continue;
    }
#endif
    uint16_t t[16];
    for (int c = 0; c < 16; ++c) t[c] = bf16_bits(book.v[c] * s);
    for (int64_t i = 0; i < per; ++i) {
      ob[2 * i] = t[qb[i] >> 4];
      ob[2 * i + 1] = t[qb[i] & 15];
    }
  }
}

}  // namespace

namespace {

// Checks the tiles (uint8 (R, C / 2) codes and fp32 (R, C / block) absmax values, each with unit stride along its
// last dimension, any row stride: a tile of a larger weight) and decodes them into `out`, bf16 (R, C) contiguous.
void decode_into(const at::Tensor& qweight, const at::Tensor& absmax, int64_t block, const at::Tensor& out) {
  TORCH_CHECK(qweight.dim() == 2 && absmax.dim() == 2 && qweight.size(0) == absmax.size(0), "nf4: 2-D tiles");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && absmax.scalar_type() == at::kFloat, "nf4: uint8 codes, fp32 absmax");
  TORCH_CHECK(block > 0 && block % 2 == 0 && qweight.size(1) * 2 == absmax.size(1) * block, "nf4: block size");
  TORCH_CHECK(qweight.stride(1) == 1 && absmax.stride(1) == 1, "nf4: unit stride along rows");
  const int64_t rows = qweight.size(0), bytes = qweight.size(1);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) == 2 * bytes,
              "nf4: out must be a contiguous bf16 (R, C) tensor");
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t qs = qweight.stride(0), as = absmax.stride(0);
  static const Book book;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, bytes));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) decode_row(q + r * qs, a + r * as, o + r * 2 * bytes, bytes, block, book);
  });
}

}  // namespace

// Returns the bf16 (R, C) tile of the codes `qweight` uint8 (R, C / 2) with `absmax` fp32 (R, C / block).
at::Tensor nf4_decode_bf16(const at::Tensor& qweight, const at::Tensor& absmax, int64_t block) {
  TORCH_CHECK(qweight.dim() == 2, "nf4: 2-D tiles");
  auto out = at::empty({qweight.size(0), 2 * qweight.size(1)}, qweight.options().dtype(at::kBFloat16));
  decode_into(qweight, absmax, block, out);
  return out;
}

// The same tile written into `out` (contiguous bf16 (R, C)): a caller's reused buffer, so that decoding a tile for
// every product allocates nothing.
void nf4_decode_bf16_out(const at::Tensor& qweight, const at::Tensor& absmax, int64_t block, at::Tensor& out) {
  decode_into(qweight, absmax, block, out);
}

TORCH_LIBRARY_FRAGMENT(nomoat, m) {
  m.def("nf4_decode_bf16(Tensor qweight, Tensor absmax, int block) -> Tensor");
  m.def("nf4_decode_bf16_out(Tensor qweight, Tensor absmax, int block, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(nomoat, CPU, m) {
  m.impl("nf4_decode_bf16", &nf4_decode_bf16);
  m.impl("nf4_decode_bf16_out", &nf4_decode_bf16_out);
}
