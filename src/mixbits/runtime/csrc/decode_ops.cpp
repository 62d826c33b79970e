// The small steps of a LLaMA-style decoder block between its matrix products,
// for float32 and one sequence. Each would be several PyTorch operators (about
// 5 to 10 us each on a small VM); here each is one call.
//
//   rms_norm:  y = w * (x / sqrt(mean(x^2) + eps)), per row.
//   attend:    for the new tokens' q/k/v (one row each, heads side by side),
//              rotate q and k (rotate-half RoPE with the given cos/sin rows),
//              append k and v to the cache at `start`, and attend causally over
//              the cache: out = softmax(scale * q K^T) V, grouped-query heads.
//   silu_mul:  for [gate | up] side by side, silu(gate) * up.
#include "ops.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

#ifdef __AVX2__
// e^x for 8 floats, within about 2 ulp of expf: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by a degree-6
// polynomial (Cephes' coefficients), times 2^n built in the exponent bits. x is clamped to [-87.3, 88.3],
// where e^x is a normal float (silu's gate / (1 + e^-gate) beyond it is 0 or gate to float precision anyway).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts, for an exact r
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// RoPE as transformers' rotate_half: the first and second halves of a head form the rotated pairs.
inline void rotate(const float* in, const float* cos, const float* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = in[i] * cos[i] - in[i + half] * sin[i];
    out[i + half] = in[i + half] * cos[i + half] + in[i] * sin[i + half];
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be contiguous float32");
}

}  // namespace

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_float(x, "x");
  check_float(weight, "weight");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK(weight.numel() == dim, "weight has ", weight.numel(), " values, x rows ", dim);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * dim;
    const float inv = 1.f / std::sqrt(dot(xr, xr, dim) / dim + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) yp[r * dim + i] = wp[i] * (xr[i] * inv);
  }
  return y;
}

at::Tensor attend(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor keys, at::Tensor values, int64_t start,
                  int64_t heads, int64_t kv_heads, double scale) {
  for (auto* t : {&qkv, &cos, &sin, &keys, &values}) check_float(*t, "attend's inputs");
  const int64_t n = qkv.size(0), dim = keys.size(2), capacity = keys.size(1);
  TORCH_CHECK(keys.size(0) == kv_heads && values.sizes() == keys.sizes(), "cache must be [kv_heads, length, head_dim]");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv row must hold q, k and v heads");
  TORCH_CHECK(cos.size(0) == n && sin.size(0) == n && cos.size(1) == dim, "cos/sin must be [new tokens, head_dim]");
  TORCH_CHECK(start + n <= capacity, "the cache holds ", capacity, " positions; ", start + n, " needed");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of key/value heads");
  const int64_t width = qkv.size(1), group = heads / kv_heads, end = start + n;
  const float* in = qkv.data_ptr<float>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  at::Tensor out = at::empty({n, heads * dim}, qkv.options());
  at::Tensor queries = at::empty({n, heads * dim}, qkv.options());
  float* qp = queries.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t) {
    const float* row = in + t * width;
    const float* c = cos.data_ptr<float>() + t * dim;
    const float* s = sin.data_ptr<float>() + t * dim;
    for (int64_t h = 0; h < heads; ++h) rotate(row + h * dim, c, s, dim, qp + (t * heads + h) * dim);
    for (int64_t g = 0; g < kv_heads; ++g) {
      float* k = kp + (g * capacity + start + t) * dim;
      rotate(row + (heads + g) * dim, c, s, dim, k);
      const float* v = row + (heads + kv_heads + g) * dim;
      std::copy(v, v + dim, vp + (g * capacity + start + t) * dim);
    }
  }
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n * heads, n > 1 ? 1 : heads, [&](int64_t begin, int64_t stop) {
    std::vector<float> scores(end);
    for (int64_t job = begin; job < stop; ++job) {
      const int64_t t = job / heads, h = job % heads, g = h / group, visible = start + t + 1;
      const float* q = qp + job * dim;
      const float* kg = kp + g * capacity * dim;
      const float* vg = vp + g * capacity * dim;
      float top = -INFINITY;
      for (int64_t j = 0; j < visible; ++j) {
        scores[j] = static_cast<float>(scale) * dot(q, kg + j * dim, dim);
        top = std::max(top, scores[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < visible; ++j) total += (scores[j] = std::exp(scores[j] - top));
      float* o = op + job * dim;
      std::fill(o, o + dim, 0.f);
      for (int64_t j = 0; j < visible; ++j) {
        const float p = scores[j] / total;
        const float* v = vg + j * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] += p * v[i];
      }
    }
  });
  return out;
}

at::Tensor silu_mul(at::Tensor gate_up) {
  check_float(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * width);
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = in + r * 2 * width;
    const float* up = gate + width;
    float* o = op + r * width;
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= width; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < width; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  }
  return out;
}
