// Matrix products with integer-coded weights, computed from the codes.
//
// A weight row holds K codes q in groups of g inputs; each group has a float
// scale s and offset m, and w = q * s + m (an integer zero point z is the
// offset m = -z * s; a symmetric code c is stored as q = c + 2^(bits-1)).
// Then, for an input row x,
//
//     y = sum over groups of  s * (sum_k x_k q_k)  +  m * (sum_k x_k)
//
// so the inner loop is a dot product of floats with small integers: codes are
// widened to floats in registers and never written back as a float matrix.
// Two code layouts:
//   nibbles: two 4-bit codes per byte; in each run of 32 codes, byte j holds
//            code j in its low nibble and code j + 16 in its high nibble;
//   bytes:   one code per byte.
// K and g must be multiples of 32 (the last group of a row may be shorter).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MIXBITS_AVX2 1
#endif

namespace {

constexpr int64_t kRun = 32;   // codes per inner step
constexpr int64_t kTile = 4;   // input rows that share one widening of the codes

#ifdef MIXBITS_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 widen8(__m128i bytes) {  // the low 8 unsigned bytes as 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// The 32 codes of one run as four vectors of 8 floats, in input order.
template <bool Nibbles>
inline void load_run(const uint8_t* codes, __m256 w[4]) {
  if (Nibbles) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(packed, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    w[0] = widen8(low);
    w[1] = widen8(_mm_srli_si128(low, 8));
    w[2] = widen8(high);
    w[3] = widen8(_mm_srli_si128(high, 8));
  } else {
    for (int i = 0; i < 4; ++i) {
      w[i] = widen8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * i)));
    }
  }
}
#endif

template <bool Nibbles>
inline uint8_t code_at(const uint8_t* row, int64_t k) {
  if (!Nibbles) return row[k];
  const uint8_t byte = row[(k / kRun) * (kRun / 2) + (k % (kRun / 2))];
  return (k % kRun) < kRun / 2 ? (byte & 0x0F) : (byte >> 4);
}

// sum_k x[m, k] q[n, k] for one group [k0, k1) of one weight row, for `Rows` input rows.
// Rows is a template parameter so that the accumulators stay in registers.
template <bool Nibbles, int Rows>
inline void group_dots(const uint8_t* row, const float* x, int64_t ldx, int64_t k0, int64_t k1, float* dots) {
#ifdef MIXBITS_AVX2
  __m256 acc[Rows];
  for (int m = 0; m < Rows; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += kRun) {
    __m256 w[4];
    load_run<Nibbles>(row + (Nibbles ? k / 2 : k), w);
    for (int m = 0; m < Rows; ++m) {
      const float* xk = x + m * ldx + k;
      acc[m] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xk), acc[m]);
      acc[m] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xk + 8), acc[m]);
      acc[m] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xk + 16), acc[m]);
      acc[m] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xk + 24), acc[m]);
    }
  }
  for (int m = 0; m < Rows; ++m) dots[m] = hsum(acc[m]);
#else
  for (int m = 0; m < Rows; ++m) {
    float sum = 0.f;
    for (int64_t k = k0; k < k1; ++k) sum += x[m * ldx + k] * code_at<Nibbles>(row, k);
    dots[m] = sum;
  }
#endif
}

// One output of `Rows` input rows: sum over groups of s * dot + m * (sum of x over the group).
template <bool Nibbles, int Rows>
inline void output_tile(const uint8_t* row, const float* x, int64_t k, int64_t group, int64_t groups,
                        const float* scale, const float* offset, const float* sums, float* out) {
  float dots[Rows];
  for (int m = 0; m < Rows; ++m) out[m] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * group, k1 = std::min(k0 + group, k);
    group_dots<Nibbles, Rows>(row, x, k, k0, k1, dots);
    for (int m = 0; m < Rows; ++m) out[m] += scale[g] * dots[m] + offset[g] * sums[m * groups + g];
  }
}

void check(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
           int64_t group, int64_t codes_per_byte) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous float32 matrix");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes must be contiguous uint8");
  const int64_t n = codes.size(0), k = codes.size(1) * codes_per_byte;
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " features, the weight ", k);
  TORCH_CHECK(k % kRun == 0 && group % kRun == 0, "inputs and group size must be multiples of 32");
  const int64_t groups = (k + group - 1) / group;
  for (const at::Tensor* t : {&scales, &offsets}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == n && t->size(1) == groups,
                "scales and offsets must be contiguous float32 [out_features, groups]");
  }
}

template <bool Nibbles>
at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
                  int64_t group) {
  check(x, codes, scales, offsets, group, Nibbles ? 2 : 1);
  const int64_t rows = x.size(0), k = x.size(1), n = codes.size(0), groups = scales.size(1);
  const int64_t row_bytes = codes.size(1);
  at::Tensor y = at::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  std::vector<float> sums(rows * groups, 0.f);  // sum of each input row over each group, for the offsets
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t kk = 0; kk < k; ++kk) sums[m * groups + kk / group] += xp[m * k + kk];
  }
  const float* sp = sums.data();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* scale = scales.data_ptr<float>();
  const float* offset = offsets.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    float out[kTile];
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = cp + o * row_bytes;
      const float* so = scale + o * groups;
      const float* oo = offset + o * groups;
      for (int64_t m0 = 0; m0 < rows; m0 += kTile) {
        const int64_t tile = std::min(kTile, rows - m0);
        const float* xm = xp + m0 * k;
        const float* sm = sp + m0 * groups;
        switch (tile) {
          case 1: output_tile<Nibbles, 1>(row, xm, k, group, groups, so, oo, sm, out); break;
          case 2: output_tile<Nibbles, 2>(row, xm, k, group, groups, so, oo, sm, out); break;
          case 3: output_tile<Nibbles, 3>(row, xm, k, group, groups, so, oo, sm, out); break;
          default: output_tile<Nibbles, 4>(row, xm, k, group, groups, so, oo, sm, out); break;
        }
        for (int64_t m = 0; m < tile; ++m) yp[(m0 + m) * n + o] = out[m];
      }
    }
  });
  return y;
}

template <bool Nibbles>
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets, int64_t group) {
  const int64_t n = codes.size(0), k = codes.size(1) * (Nibbles ? 2 : 1), groups = scales.size(1);
  at::Tensor w = at::empty({n, k}, scales.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* scale = scales.data_ptr<float>();
  const float* offset = offsets.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = cp + o * codes.size(1);
      for (int64_t kk = 0; kk < k; ++kk) {
        const int64_t g = kk / group;
        wp[o * k + kk] = code_at<Nibbles>(row, kk) * scale[o * groups + g] + offset[o * groups + g];
      }
    }
  });
  return w;
}

}  // namespace

at::Tensor nibble_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t group) {
  return linear<true>(x, codes, scales, offsets, group);
}
at::Tensor byte_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t group) {
  return linear<false>(x, codes, scales, offsets, group);
}
at::Tensor nibble_dequantize(at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t group) {
  return dequantize<true>(codes, scales, offsets, group);
}
at::Tensor byte_dequantize(at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t group) {
  return dequantize<false>(codes, scales, offsets, group);
}
bool vectorized() {
#ifdef MIXBITS_AVX2
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nibble_linear", &nibble_linear, "x @ W.T for 4-bit codes");
  m.def("byte_linear", &byte_linear, "x @ W.T for 8-bit codes");
  m.def("nibble_dequantize", &nibble_dequantize, "W from 4-bit codes");
  m.def("byte_dequantize", &byte_dequantize, "W from 8-bit codes");
  m.def("vectorized", &vectorized, "whether the AVX2 path was compiled");
}
