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
#include "ops.h"

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

// The 32 codes of one run as four vectors of 8 floats, in input order. Nibbles: the 16 bytes are
// broadcast to both 128-bit lanes and one byte shuffle puts byte i in the low byte of 32-bit lane i
// (bytes 0-7, then 8-15); the low nibbles are inputs 0-15, the high ones (shifted down) 16-31.
template <bool Nibbles>
inline void load_run(const uint8_t* codes, __m256 w[4]) {
  if (Nibbles) {
    const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    const __m256i first = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                           4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i second = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,
                                            12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i bytes0 = _mm256_shuffle_epi8(packed, first), bytes1 = _mm256_shuffle_epi8(packed, second);
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(bytes0, mask));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(bytes1, mask));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes0, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes1, 4));
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

// One weight row against `Rows` input rows: out[m] = sum over groups of s * (x . q) + m * (sum of x).
// Rows is a template parameter so that the accumulators stay in registers; with fewer rows, each row
// gets several accumulators, so that consecutive multiply-adds do not wait on each other.
template <bool Nibbles, int Rows>
inline void row_outputs(const uint8_t* row, const float* x, int64_t k, int64_t group, int64_t groups,
                        const float* scale, const float* offset, const float* sums, float* out) {
#ifdef MIXBITS_AVX2
  constexpr int kAcc = Rows == 1 ? 4 : (Rows == 2 ? 2 : 1);
  __m256 total[Rows];
  for (int m = 0; m < Rows; ++m) total[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * group, k1 = std::min(k0 + group, k);
    __m256 acc[Rows][kAcc];
    for (int m = 0; m < Rows; ++m)
      for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t kk = k0; kk < k1; kk += kRun) {
      __m256 w[4];
      load_run<Nibbles>(row + (Nibbles ? kk / 2 : kk), w);
      for (int m = 0; m < Rows; ++m) {
        const float* xk = x + m * k + kk;
        for (int i = 0; i < 4; ++i) acc[m][i % kAcc] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xk + 8 * i), acc[m][i % kAcc]);
      }
    }
    const __m256 s = _mm256_set1_ps(scale[g]);
    for (int m = 0; m < Rows; ++m) {
      __m256 dot = acc[m][0];
      for (int a = 1; a < kAcc; ++a) dot = _mm256_add_ps(dot, acc[m][a]);
      total[m] = _mm256_fmadd_ps(s, dot, total[m]);
    }
  }
  for (int m = 0; m < Rows; ++m) out[m] = hsum(total[m]);
#else
  for (int m = 0; m < Rows; ++m) {
    out[m] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group, k1 = std::min(k0 + group, k);
      float dot = 0.f;
      for (int64_t kk = k0; kk < k1; ++kk) dot += x[m * k + kk] * code_at<Nibbles>(row, kk);
      out[m] += scale[g] * dot;
    }
  }
#endif
  for (int m = 0; m < Rows; ++m)
    for (int64_t g = 0; g < groups; ++g) out[m] += offset[g] * sums[m * groups + g];
}

// Two weight rows against one input row (decode): the input is loaded once for both rows, which
// nearly halves the loads per multiply-add against one row at a time.
template <bool Nibbles>
inline void pair_outputs(const uint8_t* row0, const uint8_t* row1, const float* x, int64_t k, int64_t group,
                         int64_t groups, const float* scale0, const float* scale1, const float* offset0,
                         const float* offset1, const float* sums, float* out0, float* out1) {
#ifdef MIXBITS_AVX2
  __m256 total0 = _mm256_setzero_ps(), total1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * group, k1 = std::min(k0 + group, k);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t kk = k0; kk < k1; kk += kRun) {
      const __m256 x0 = _mm256_loadu_ps(x + kk), x1 = _mm256_loadu_ps(x + kk + 8);
      const __m256 x2 = _mm256_loadu_ps(x + kk + 16), x3 = _mm256_loadu_ps(x + kk + 24);
      __m256 w[4];
      load_run<Nibbles>(row0 + (Nibbles ? kk / 2 : kk), w);
      a0 = _mm256_fmadd_ps(w[0], x0, a0);
      a1 = _mm256_fmadd_ps(w[1], x1, a1);
      a0 = _mm256_fmadd_ps(w[2], x2, a0);
      a1 = _mm256_fmadd_ps(w[3], x3, a1);
      load_run<Nibbles>(row1 + (Nibbles ? kk / 2 : kk), w);
      b0 = _mm256_fmadd_ps(w[0], x0, b0);
      b1 = _mm256_fmadd_ps(w[1], x1, b1);
      b0 = _mm256_fmadd_ps(w[2], x2, b0);
      b1 = _mm256_fmadd_ps(w[3], x3, b1);
    }
    total0 = _mm256_fmadd_ps(_mm256_set1_ps(scale0[g]), _mm256_add_ps(a0, a1), total0);
    total1 = _mm256_fmadd_ps(_mm256_set1_ps(scale1[g]), _mm256_add_ps(b0, b1), total1);
  }
  *out0 = hsum(total0);
  *out1 = hsum(total1);
  for (int64_t g = 0; g < groups; ++g) {
    *out0 += offset0[g] * sums[g];
    *out1 += offset1[g] * sums[g];
  }
#else
  row_outputs<Nibbles, 1>(row0, x, k, group, groups, scale0, offset0, sums, out0);
  row_outputs<Nibbles, 1>(row1, x, k, group, groups, scale1, offset1, sums, out1);
#endif
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
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t kk = g * group; kk < std::min(k, (g + 1) * group); ++kk) sums[m * groups + g] += xp[m * k + kk];
    }
  }
  const float* sp = sums.data();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* scale = scales.data_ptr<float>();
  const float* offset = offsets.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    int64_t o = begin;
    if (rows == 1) {  // decode: weight rows in pairs
      for (; o + 1 < end; o += 2) {
#ifdef MIXBITS_AVX2
        if (o + 5 < end) {  // the weights stream from memory: ask for the pair after next now
          const char* ahead = reinterpret_cast<const char*>(cp + (o + 4) * row_bytes);
          for (int64_t line = 0; line < 2 * row_bytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        }
#endif
        pair_outputs<Nibbles>(cp + o * row_bytes, cp + (o + 1) * row_bytes, xp, k, group, groups, scale + o * groups,
                              scale + (o + 1) * groups, offset + o * groups, offset + (o + 1) * groups, sp,
                              yp + o, yp + o + 1);
      }
    }
    float out[kTile];
    for (; o < end; ++o) {
      const uint8_t* row = cp + o * row_bytes;
      const float* so = scale + o * groups;
      const float* oo = offset + o * groups;
      for (int64_t m0 = 0; m0 < rows; m0 += kTile) {
        const int64_t tile = std::min(kTile, rows - m0);
        const float* xm = xp + m0 * k;
        const float* sm = sp + m0 * groups;
        switch (tile) {
          case 1: row_outputs<Nibbles, 1>(row, xm, k, group, groups, so, oo, sm, out); break;
          case 2: row_outputs<Nibbles, 2>(row, xm, k, group, groups, so, oo, sm, out); break;
          case 3: row_outputs<Nibbles, 3>(row, xm, k, group, groups, so, oo, sm, out); break;
          default: row_outputs<Nibbles, 4>(row, xm, k, group, groups, so, oo, sm, out); break;
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
  const int64_t row_bytes = codes.size(1);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = cp + o * row_bytes;
      float* wo = wp + o * k;
      for (int64_t kk = 0; kk < k; kk += kRun) {
        const int64_t g = o * groups + kk / group;
#ifdef MIXBITS_AVX2
        __m256 v[4];
        load_run<Nibbles>(row + (Nibbles ? kk / 2 : kk), v);
        const __m256 s = _mm256_set1_ps(scale[g]), m = _mm256_set1_ps(offset[g]);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(wo + kk + 8 * i, _mm256_fmadd_ps(v[i], s, m));
#else
        for (int64_t i = kk; i < kk + kRun; ++i) wo[i] = code_at<Nibbles>(row, i) * scale[g] + offset[g];
#endif
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
