// Matrix products with vector-codebook weights (formats/vector.py), computed from the codes.
//
// A weight row is V = K / d vectors of d inputs; vector v of row o is the sum over stages s of
// codeword books[s][codes[o, s, v]], times the scale of its group of vectors. For a few input
// rows x (decode), every vector's dot product with every codeword is computed once per input row,
//
//     table[s][v][c] = x[v d : v d + d] . books[s][c],
//
// and each output is a sum of table entries picked by the codes:
//
//     y[o] = sum over groups of  scale[o, g] * sum over s and v in g of  table[s][v][codes[o, s, v]]
//
// so the weight matrix is never formed: a row reads one code per vector and stage. The table costs
// K * 2^bits multiply-adds per input row and stage (a dense product n * K), and stays in cache (for the
// default model's shapes at most a few hundred KiB).
// Codes are uint8 (indices of up to 8 bits) or uint16 (up to 16), [n, S * V], stage-major.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MIXBITS_AVX2 1
#endif

namespace {

#ifdef MIXBITS_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename Code>
inline __m256i load8(const Code* codes) {  // 8 codes as 8 int32
  if constexpr (sizeof(Code) == 1) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  } else {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  }
}
#endif

// The sum of table entries of vectors [v0, v1) of one stage: table holds that stage's [V, count] entries.
template <typename Code>
inline float gather_sum(const float* table, const Code* codes, int64_t v0, int64_t v1, int64_t count) {
  int64_t v = v0;
  float sum = 0.f;
#ifdef MIXBITS_AVX2
  if (v1 - v0 >= 8) {
    const __m256i step = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(count));
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (; v + 16 <= v1; v += 16) {  // two gathers in flight
      const __m256i i0 = _mm256_add_epi32(load8(codes + v), step);
      const __m256i i1 = _mm256_add_epi32(load8(codes + v + 8), step);
      acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(table + v * count, i0, 4));
      acc1 = _mm256_add_ps(acc1, _mm256_i32gather_ps(table + (v + 8) * count, i1, 4));
    }
    for (; v + 8 <= v1; v += 8) {
      acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(table + v * count, _mm256_add_epi32(load8(codes + v), step), 4));
    }
    sum = hsum(_mm256_add_ps(acc0, acc1));
  }
#endif
  for (; v < v1; ++v) sum += table[v * count + codes[v]];
  return sum;
}

template <typename Code>
at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& books, const at::Tensor& scales,
                  int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous float32 matrix");
  TORCH_CHECK(books.dim() == 3 && books.scalar_type() == at::kFloat && books.is_contiguous(),
              "books must be contiguous float32 [stages, codewords, d]");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous(), "codes must be a contiguous matrix");
  const int64_t rows = x.size(0), k = x.size(1), stages = books.size(0), count = books.size(1), d = books.size(2);
  const int64_t n = codes.size(0), vectors = k / d;
  TORCH_CHECK(k % d == 0 && codes.size(1) == stages * vectors, "codes must be [out, stages * in / d] for ", k,
              " inputs in vectors of ", d);
  TORCH_CHECK(group % d == 0 && group > 0, "the group must be a multiple of the vector size");
  const int64_t per_group = group / d, groups = (vectors + per_group - 1) / per_group;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
              scales.size(0) == n && scales.size(1) == groups, "scales must be contiguous float32 [out, groups]");
  TORCH_CHECK(count <= (int64_t(1) << (8 * sizeof(Code))), "more codewords than the codes can index");

  // table[m][s][v][c], built in parallel over (input row, stage, vector): the codewords transposed to [s][j][c] so
  // the innermost loop runs over codewords.
  const float* bp = books.data_ptr<float>();
  std::vector<float> transposed(stages * d * count);
  for (int64_t s = 0; s < stages; ++s)
    for (int64_t c = 0; c < count; ++c)
      for (int64_t j = 0; j < d; ++j) transposed[(s * d + j) * count + c] = bp[(s * count + c) * d + j];
  std::vector<float> table(rows * stages * vectors * count);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, rows * stages * vectors, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = t / (stages * vectors), s = (t / vectors) % stages, v = t % vectors;
      float* out = table.data() + t * count;
      const float* xv = xp + m * k + v * d;
      const float* book = transposed.data() + s * d * count;
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) out[c] = xv[0] * book[c];
      for (int64_t j = 1; j < d; ++j) {
        const float xj = xv[j];
        const float* column = book + j * count;
#pragma omp simd
        for (int64_t c = 0; c < count; ++c) out[c] += xj * column[c];
      }
    }
  });

  at::Tensor y = at::empty({rows, n}, x.options());
  float* yp = y.data_ptr<float>();
  const Code* cp = reinterpret_cast<const Code*>(codes.data_ptr());
  const float* sp = scales.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const Code* row = cp + o * stages * vectors;
      for (int64_t m = 0; m < rows; ++m) {
        const float* tm = table.data() + m * stages * vectors * count;
        float total = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t v0 = g * per_group, v1 = std::min(v0 + per_group, vectors);
          float sum = 0.f;
          for (int64_t s = 0; s < stages; ++s)
            sum += gather_sum(tm + s * vectors * count, row + s * vectors, v0, v1, count);
          total += sp[o * groups + g] * sum;
        }
        yp[m * n + o] = total;
      }
    }
  });
  return y;
}

}  // namespace

at::Tensor vector_linear(at::Tensor x, at::Tensor codes, at::Tensor books, at::Tensor scales, int64_t group) {
  if (codes.scalar_type() == at::kByte) return linear<uint8_t>(x, codes, books, scales, group);
  TORCH_CHECK(codes.scalar_type() == at::kShort, "codes must be uint8, or int16 holding 16-bit unsigned codes");
  return linear<uint16_t>(x, codes, books, scales, group);
}
