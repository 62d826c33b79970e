// Attention over a quantized KV cache, computed from its codes (runtime/kv_store.py).
//
// A store holds, per key/value head, one row of head_dim integer codes per token, bit-packed at `width`
// bits as mixbits.packing lays them out (code i at stream bits [i * width, (i + 1) * width), least
// significant bit first), and a float32 scale s and offset o per parameter group: value = code * s + o.
//   per token   (token_group == 1): groups of `group` numbers along head_dim; params [heads, tokens, head_dim / group];
//   per channel (token_group > 1):  one scale and offset per channel for token_group consecutive tokens;
//                                   params [heads, tokens / token_group, head_dim].
//
//   kv_scores: scores[h, j, n] = sum_d q[h, j, d] * value[h, n, d]     (j: the queries sharing head h)
//   kv_mix:    out[h, j, d]    = sum_n w[h, j, n] * value[h, n, d]
//
// Per token, a group's dot product is s * (q . codes) + o * sum(q); per channel, the queries are scaled by
// each block's channel scales once, so every token of the block is one dot product of floats with codes.
// Codes are widened to floats in registers, 8 at a time, and never written back as a float cache.
#include "ops.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxQueries = 16;  // queries per key/value head (grouped-query attention's group)

// Codes k..k+7 of a packed row as 8 floats (k a multiple of 8, so they start on a byte boundary).
inline __m256 codes8(const uint8_t* row, int64_t k, int64_t width) {
  const uint8_t* at = row + k * width / 8;
  if (width == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at))));
  if (width <= 4) {  // 8 codes in at most 32 bits: one word, shifted per lane
    uint32_t word = 0;
    std::memcpy(&word, at, width);  // exactly the codes' bytes: never past the row
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(width));
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                                           _mm256_set1_epi32((1 << width) - 1));
    return _mm256_cvtepi32_ps(codes);
  }
  uint64_t word = 0;  // 5 to 7 bits: 8 codes in at most 56 bits
  std::memcpy(&word, at, width);
  alignas(32) float out[8];
  for (int i = 0; i < 8; ++i) out[i] = static_cast<float>((word >> (i * width)) & ((1u << width) - 1));
  return _mm256_load_ps(out);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Store {
  const uint8_t* codes;
  const float* scale;
  const float* offset;
  int64_t heads, capacity, row_bytes, tokens, width, token_group, group, dim, param_rows, param_cols;

  const uint8_t* row(int64_t h, int64_t n) const { return codes + (h * capacity + n) * row_bytes; }
  // The scales and offsets of parameter row r of head h: a token's groups, or a token block's channels.
  const float* scales(int64_t h, int64_t r) const { return scale + (h * param_rows + r) * param_cols; }
  const float* offsets(int64_t h, int64_t r) const { return offset + (h * param_rows + r) * param_cols; }
};

// The float32 rows a kernel reads beside a store ([heads, queries, last]): checked, and their query count.
int64_t check_rows(const at::Tensor& t, const char* what, int64_t heads, int64_t last) {
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == at::kFloat && t.is_contiguous() && t.size(2) == last, what,
              " must be contiguous float32 [heads, queries, ", last, "]");
  TORCH_CHECK(t.size(0) == heads, what, " and codes have different head counts");
  TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= kMaxQueries, "1 to 16 queries per key/value head");
  return t.size(1);
}

Store check(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset, int64_t tokens, int64_t width,
            int64_t token_group, int64_t group, int64_t dim) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes must be contiguous uint8 [heads, capacity, row bytes]");
  TORCH_CHECK(width >= 1 && width <= 8 && dim % 8 == 0 && codes.size(2) == dim * width / 8,
              "rows must hold head_dim (a multiple of 8) codes of 1 to 8 bits");
  TORCH_CHECK(tokens >= 0 && tokens <= codes.size(1), "more tokens than the store holds");
  TORCH_CHECK(token_group >= 1 && (token_group == 1 ? group % 8 == 0 && dim % group == 0 : tokens % token_group == 0),
              "groups must tile head_dim in multiples of 8 (per token) or the tokens (per channel)");
  const int64_t rows = token_group == 1 ? tokens : tokens / token_group, cols = token_group == 1 ? dim / group : dim;
  for (const at::Tensor* t : {&scale, &offset}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == codes.size(0) &&
                    t->size(1) == rows && t->size(2) == cols,
                "scale and offset must be contiguous float32 [heads, parameter rows, parameter columns]");
  }
  return {codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(), codes.size(0), codes.size(1),
          codes.size(2), tokens, width, token_group, group, dim, rows, cols};
}

}  // namespace

at::Tensor kv_scores(at::Tensor query, at::Tensor codes, at::Tensor scale, at::Tensor offset, int64_t tokens,
                     int64_t width, int64_t token_group, int64_t group) {
  TORCH_CHECK(query.dim() == 3, "query must be [heads, queries, head_dim]");
  const int64_t dim = query.size(2);
  const Store s = check(codes, scale, offset, tokens, width, token_group, group, dim);
  const int64_t queries = check_rows(query, "query", s.heads, dim);
  at::Tensor out = at::empty({s.heads, queries, tokens}, query.options());
  const float* qp = query.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t chunk = token_group == 1 ? 64 : token_group;  // per channel: whole blocks, which share scaled queries
  const int64_t chunks = (tokens + chunk - 1) / chunk;
  at::parallel_for(0, s.heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(queries * dim), sums(queries * (dim / 8 + 1));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / chunks, n0 = (item % chunks) * chunk, n1 = std::min(tokens, n0 + chunk);
      const float* q = qp + h * queries * dim;
      float constant[kMaxQueries] = {0.f};
      if (token_group == 1) {  // each query's sum over each group, for the offsets
        const int64_t groups = dim / group;
        for (int64_t j = 0; j < queries; ++j)
          for (int64_t g = 0; g < groups; ++g) {
            float total = 0.f;
            for (int64_t d = g * group; d < (g + 1) * group; ++d) total += q[j * dim + d];
            sums[j * groups + g] = total;
          }
      } else {  // the block's channel scales folded into the queries, its offsets into one constant per query
        const int64_t b = n0 / token_group;
        const float* sc = s.scales(h, b);
        const float* of = s.offsets(h, b);
        for (int64_t j = 0; j < queries; ++j) {
          for (int64_t d = 0; d < dim; ++d) {
            scaled[j * dim + d] = q[j * dim + d] * sc[d];
            constant[j] += q[j * dim + d] * of[d];
          }
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = s.row(h, n);
        float* target = op + h * queries * tokens + n;
        if (token_group == 1) {
          const int64_t groups = dim / group;
          const float* sc = s.scales(h, n);
          const float* of = s.offsets(h, n);
          float total[kMaxQueries] = {0.f};
          for (int64_t g = 0; g < groups; ++g) {
            __m256 acc[kMaxQueries];
            for (int64_t j = 0; j < queries; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t d = g * group; d < (g + 1) * group; d += 8) {
              const __m256 c = codes8(row, d, width);
              for (int64_t j = 0; j < queries; ++j) acc[j] = _mm256_fmadd_ps(c, _mm256_loadu_ps(q + j * dim + d), acc[j]);
            }
            for (int64_t j = 0; j < queries; ++j) total[j] += sc[g] * hsum(acc[j]) + of[g] * sums[j * groups + g];
          }
          for (int64_t j = 0; j < queries; ++j) target[j * tokens] = total[j];
        } else {
          __m256 acc[kMaxQueries];
          for (int64_t j = 0; j < queries; ++j) acc[j] = _mm256_setzero_ps();
          for (int64_t d = 0; d < dim; d += 8) {
            const __m256 c = codes8(row, d, width);
            for (int64_t j = 0; j < queries; ++j)
              acc[j] = _mm256_fmadd_ps(c, _mm256_loadu_ps(scaled.data() + j * dim + d), acc[j]);
          }
          for (int64_t j = 0; j < queries; ++j) target[j * tokens] = hsum(acc[j]) + constant[j];
        }
      }
    }
  });
  return out;
}

at::Tensor kv_mix(at::Tensor weights, at::Tensor codes, at::Tensor scale, at::Tensor offset, int64_t tokens,
                  int64_t width, int64_t token_group, int64_t group, int64_t dim) {
  const Store s = check(codes, scale, offset, tokens, width, token_group, group, dim);
  const int64_t queries = check_rows(weights, "weights", s.heads, tokens);
  at::Tensor out = at::zeros({s.heads, queries, dim}, weights.options());
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block(queries * dim);
    for (int64_t h = begin; h < end; ++h) {
      const float* w = wp + h * queries * tokens;
      float* o = op + h * queries * dim;
      if (token_group == 1) {
        const int64_t groups = dim / group;
        std::vector<float> offsets(queries * groups, 0.f);  // sum over tokens of weight * offset, per group
        for (int64_t n = 0; n < tokens; ++n) {
          const uint8_t* row = s.row(h, n);
          const float* sc = s.scales(h, n);
          const float* of = s.offsets(h, n);
          for (int64_t g = 0; g < groups; ++g) {
            __m256 weighted[kMaxQueries];
            for (int64_t j = 0; j < queries; ++j) {
              weighted[j] = _mm256_set1_ps(w[j * tokens + n] * sc[g]);
              offsets[j * groups + g] += w[j * tokens + n] * of[g];
            }
            for (int64_t d = g * group; d < (g + 1) * group; d += 8) {
              const __m256 c = codes8(row, d, width);
              for (int64_t j = 0; j < queries; ++j) {
                float* at = o + j * dim + d;
                _mm256_storeu_ps(at, _mm256_fmadd_ps(weighted[j], c, _mm256_loadu_ps(at)));
              }
            }
          }
        }
        for (int64_t j = 0; j < queries; ++j)
          for (int64_t d = 0; d < dim; ++d) o[j * dim + d] += offsets[j * groups + d / group];
      } else {
        for (int64_t n0 = 0; n0 < tokens; n0 += token_group) {
          std::fill(block.begin(), block.end(), 0.f);
          float total[kMaxQueries] = {0.f};
          for (int64_t n = n0; n < n0 + token_group; ++n) {
            const uint8_t* row = s.row(h, n);
            for (int64_t j = 0; j < queries; ++j) total[j] += w[j * tokens + n];
            for (int64_t d = 0; d < dim; d += 8) {
              const __m256 c = codes8(row, d, width);
              for (int64_t j = 0; j < queries; ++j) {
                float* at = block.data() + j * dim + d;
                _mm256_storeu_ps(at, _mm256_fmadd_ps(_mm256_set1_ps(w[j * tokens + n]), c, _mm256_loadu_ps(at)));
              }
            }
          }
          const int64_t b = n0 / token_group;
          const float* sc = s.scales(h, b);
          const float* of = s.offsets(h, b);
          for (int64_t j = 0; j < queries; ++j)
            for (int64_t d = 0; d < dim; ++d) o[j * dim + d] += sc[d] * block[j * dim + d] + of[d] * total[j];
        }
      }
    }
  });
  return out;
}
