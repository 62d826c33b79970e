// Attention over a quantized KV cache, computed from its codes, and the encoding of new tokens into it
// (runtime/kv_store.py).
//
// A store holds, per key/value head, one row of head_dim integer codes per token, bit-packed at `width`
// bits as mixbits.packing lays them out (code i at stream bits [i * width, (i + 1) * width), least
// significant bit first), and its parameters in their stored dtypes, one per parameter group:
//   scale s:  float32, float16 or bfloat16;
//   offset:   an 8-bit zero point z (value = (code - z) * s), a float minimum m (value = code * s + m),
//             or none: symmetric codes offset by 2^(width-1) (value = (code - 2^(width-1)) * s).
//   per token   (token_group == 1): groups of `group` numbers along head_dim;
//                                   params [heads, >= tokens, head_dim / group];
//   per channel (token_group > 1):  one parameter per channel for token_group consecutive tokens;
//                                   params [heads, >= tokens / token_group, head_dim].
//
//   kv_scores: scores[h, j, n] = sum_d q[h, j, d] * value[h, n, d]     (j: the queries sharing head h)
//   kv_mix:    out[h, j, d]    = sum_n w[h, j, n] * value[h, n, d]
//   kv_encode: new tokens' codes and parameters, per token, exactly as KVQuant.encode computes them.
//
// Per token, a token's dot product is sum_g s_g (q . codes_g) + o_g sum(q_g); per channel, the queries are scaled
// by each block's channel scales once, so every token of the block is one dot product of floats with codes.
// Codes are widened to floats in registers, 8 at a time, and never written back as a float cache.
#include "ops.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kMaxQueries = 16;  // queries per key/value head (grouped-query attention's group)
constexpr int64_t kChunk = 256;      // tokens per work item: heads x chunks share the threads

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

enum class Kind { kNone, kFloat, kHalf, kBFloat16, kZeroPoint };

inline float load(const void* p, Kind kind, int64_t i) {
  switch (kind) {
    case Kind::kFloat: return static_cast<const float*>(p)[i];
    case Kind::kHalf: return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
    case Kind::kBFloat16: {
      const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
      float out;
      std::memcpy(&out, &bits, 4);
      return out;
    }
    default: return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
  }
}

Kind float_kind(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return Kind::kFloat;
    case at::kHalf: return Kind::kHalf;
    case at::kBFloat16: return Kind::kBFloat16;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16");
  }
  return Kind::kNone;
}

struct Store {
  const uint8_t* codes;
  const void* scale;
  const void* offset;
  Kind scale_kind, offset_kind;
  float symmetric_offset;  // -2^(width-1): symmetric codes' offset, in scales
  int64_t heads, capacity, row_bytes, tokens, width, token_group, group, dim, param_capacity, param_cols;

  const uint8_t* row(int64_t h, int64_t n) const { return codes + (h * capacity + n) * row_bytes; }
  // Scale and offset (value = code * s + o) of parameter c of parameter row r of head h: a token's groups, or a
  // token block's channels.
  void params(int64_t h, int64_t r, int64_t c, float& s, float& o) const {
    const int64_t i = (h * param_capacity + r) * param_cols + c;
    s = load(scale, scale_kind, i);
    if (offset_kind == Kind::kNone) o = symmetric_offset * s;
    else if (offset_kind == Kind::kZeroPoint) o = -load(offset, offset_kind, i) * s;
    else o = load(offset, offset_kind, i);
  }
  // Per channel: the channel scales and offsets of token block b of head h.
  void block_params(int64_t h, int64_t b, float* sc, float* of) const {
    for (int64_t d = 0; d < dim; ++d) params(h, b, d, sc[d], of[d]);
  }
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
  TORCH_CHECK(scale.is_contiguous() && scale.dim() == 3 && scale.size(0) == codes.size(0) && scale.size(1) >= rows &&
                  scale.size(2) == cols,
              "scale must be contiguous [heads, parameter rows, parameter columns] for every stored token");
  Kind offset_kind = Kind::kNone;
  if (offset.numel() > 0) {
    TORCH_CHECK(offset.is_contiguous() && offset.sizes() == scale.sizes(), "offsets must be shaped as the scales");
    offset_kind = offset.scalar_type() == at::kByte ? Kind::kZeroPoint : float_kind(offset, "a minimum");
  }
  return {codes.data_ptr<uint8_t>(), scale.data_ptr(), offset.numel() > 0 ? offset.data_ptr() : nullptr,
          float_kind(scale, "scale"), offset_kind, -static_cast<float>(1 << (width - 1)), codes.size(0), codes.size(1),
          codes.size(2), tokens, width, token_group, group, dim, scale.size(1), cols};
}

// Work items over heads and token chunks (per channel, whole token blocks).
struct Items {
  int64_t chunk, chunks;
  explicit Items(const Store& s) {
    chunk = s.token_group == 1 ? kChunk : s.token_group * std::max<int64_t>(1, kChunk / s.token_group);
    chunks = (s.tokens + chunk - 1) / chunk;
  }
};

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
  const Items items(s);
  at::parallel_for(0, s.heads * items.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(queries * dim), sums(queries * dim);
    std::vector<float> sc(dim), of(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / items.chunks, n0 = (item % items.chunks) * items.chunk;
      const int64_t n1 = std::min(tokens, n0 + items.chunk);
      const float* q = qp + h * queries * dim;
      float* target = op + h * queries * tokens;
      if (token_group == 1) {
        const int64_t groups = dim / group;
        for (int64_t j = 0; j < queries; ++j)  // each query's sum over each group, for the offsets
          for (int64_t g = 0; g < groups; ++g) {
            float total = 0.f;
            for (int64_t d = g * group; d < (g + 1) * group; ++d) total += q[j * dim + d];
            sums[j * groups + g] = total;
          }
        for (int64_t n = n0; n < n1; ++n) {
          const uint8_t* row = s.row(h, n);
          __m256 total[kMaxQueries];
          float constant[kMaxQueries] = {0.f};
          for (int64_t j = 0; j < queries; ++j) total[j] = _mm256_setzero_ps();
          for (int64_t g = 0; g < groups; ++g) {
            float scale_g, offset_g;
            s.params(h, n, g, scale_g, offset_g);
            __m256 acc[kMaxQueries];
            for (int64_t j = 0; j < queries; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t d = g * group; d < (g + 1) * group; d += 8) {
              const __m256 c = codes8(row, d, width);
              for (int64_t j = 0; j < queries; ++j)
                acc[j] = _mm256_fmadd_ps(c, _mm256_loadu_ps(q + j * dim + d), acc[j]);
            }
            const __m256 sv = _mm256_set1_ps(scale_g);
            for (int64_t j = 0; j < queries; ++j) {
              total[j] = _mm256_fmadd_ps(sv, acc[j], total[j]);
              constant[j] += offset_g * sums[j * groups + g];
            }
          }
          for (int64_t j = 0; j < queries; ++j) target[j * tokens + n] = hsum(total[j]) + constant[j];
        }
      } else {
        for (int64_t b0 = n0; b0 < n1; b0 += token_group) {
          // the block's channel scales folded into the queries, its offsets into one constant per query
          s.block_params(h, b0 / token_group, sc.data(), of.data());
          float constant[kMaxQueries] = {0.f};
          for (int64_t j = 0; j < queries; ++j)
            for (int64_t d = 0; d < dim; ++d) {
              scaled[j * dim + d] = q[j * dim + d] * sc[d];
              constant[j] += q[j * dim + d] * of[d];
            }
          for (int64_t n = b0; n < b0 + token_group; ++n) {
            const uint8_t* row = s.row(h, n);
            __m256 acc[kMaxQueries];
            for (int64_t j = 0; j < queries; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
              const __m256 c = codes8(row, d, width);
              for (int64_t j = 0; j < queries; ++j)
                acc[j] = _mm256_fmadd_ps(c, _mm256_loadu_ps(scaled.data() + j * dim + d), acc[j]);
            }
            for (int64_t j = 0; j < queries; ++j) target[j * tokens + n] = hsum(acc[j]) + constant[j];
          }
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
  if (tokens == 0) return at::zeros({s.heads, queries, dim}, weights.options());
  const Items items(s);
  // Each work item's partial sum [queries, dim], added up per head afterwards.
  at::Tensor partial = at::empty({s.heads, items.chunks, queries, dim}, weights.options());
  const float* wp = weights.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const int64_t blocks_of_8 = dim / 8;
  at::parallel_for(0, s.heads * items.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weighted(kChunk * kMaxQueries * dim / 8), offsets(queries * dim);
    std::vector<float> sc(dim), of(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / items.chunks, n0 = (item % items.chunks) * items.chunk;
      const int64_t n1 = std::min(tokens, n0 + items.chunk);
      const float* w = wp + h * queries * tokens;
      float* o = pp + item * queries * dim;
      if (token_group == 1) {
        // weighted[(n - n0), g, j] = w[j, n] * s[n, g]; offsets[j, g] = sum_n w[j, n] * o[n, g]
        const int64_t groups = dim / group;
        std::fill(offsets.begin(), offsets.end(), 0.f);
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t g = 0; g < groups; ++g) {
            float scale_g, offset_g;
            s.params(h, n, g, scale_g, offset_g);
            for (int64_t j = 0; j < queries; ++j) {
              weighted[((n - n0) * groups + g) * queries + j] = w[j * tokens + n] * scale_g;
              offsets[j * groups + g] += w[j * tokens + n] * offset_g;
            }
          }
        for (int64_t k = 0; k < blocks_of_8; ++k) {  // 8 columns at a time, every query's sum in registers
          const int64_t g = k * 8 / group;
          __m256 acc[kMaxQueries];
          for (int64_t j = 0; j < queries; ++j) acc[j] = _mm256_setzero_ps();
          for (int64_t n = n0; n < n1; ++n) {
            const __m256 c = codes8(s.row(h, n), k * 8, width);
            const float* ws = weighted.data() + ((n - n0) * groups + g) * queries;
            for (int64_t j = 0; j < queries; ++j) acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(ws + j), c, acc[j]);
          }
          for (int64_t j = 0; j < queries; ++j)
            _mm256_storeu_ps(o + j * dim + k * 8, _mm256_add_ps(acc[j], _mm256_set1_ps(offsets[j * groups + g])));
        }
      } else {
        std::fill(o, o + queries * dim, 0.f);
        for (int64_t b0 = n0; b0 < n1; b0 += token_group) {
          s.block_params(h, b0 / token_group, sc.data(), of.data());
          float total[kMaxQueries] = {0.f};
          for (int64_t j = 0; j < queries; ++j)
            for (int64_t n = b0; n < b0 + token_group; ++n) total[j] += w[j * tokens + n];
          for (int64_t k = 0; k < blocks_of_8; ++k) {
            __m256 acc[kMaxQueries];
            for (int64_t j = 0; j < queries; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t n = b0; n < b0 + token_group; ++n) {
              const __m256 c = codes8(s.row(h, n), k * 8, width);
              for (int64_t j = 0; j < queries; ++j)
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(w[j * tokens + n]), c, acc[j]);
            }
            const __m256 scales = _mm256_loadu_ps(sc.data() + k * 8), offs = _mm256_loadu_ps(of.data() + k * 8);
            for (int64_t j = 0; j < queries; ++j) {
              float* at = o + j * dim + k * 8;
              const __m256 block = _mm256_fmadd_ps(scales, acc[j], _mm256_mul_ps(offs, _mm256_set1_ps(total[j])));
              _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), block));
            }
          }
        }
      }
    }
  });
  return partial.sum(1);
}

namespace {

// A scale as CastScale.round stores it: its magnitude clamped to the stored dtype's range (16-bit: down to its
// smallest subnormal), then rounded to the dtype (nearest, ties to even), as float.
inline float round_scale(float t, bool half) {
  const float tiny = half ? 5.9604644775390625e-08f : std::numeric_limits<float>::min();
  const float top = half ? 65504.f : std::numeric_limits<float>::max();
  const float sign = t < 0.f ? -1.f : 1.f;
  const float magnitude = std::min(std::max(std::fabs(t), tiny), top);
  const float clamped = sign * magnitude;
  return half ? _cvtsh_ss(_cvtss_sh(clamped, _MM_FROUND_TO_NEAREST_INT)) : clamped;
}

}  // namespace

void kv_encode(at::Tensor x, at::Tensor codes, at::Tensor scale, at::Tensor zero, int64_t first, int64_t width,
               int64_t group, bool symmetric) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf),
              "tokens must be contiguous float32 or float16 [heads, tokens, head_dim]");
  const int64_t heads = x.size(0), count = x.size(1), dim = x.size(2);
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(0) == heads &&
                  width >= 1 && width <= 8 && dim * width % 8 == 0 && codes.size(2) == dim * width / 8,
              "codes must be contiguous uint8 [heads, capacity, head_dim * width / 8]");
  TORCH_CHECK(first >= 0 && first + count <= codes.size(1), "more tokens than the store holds");
  TORCH_CHECK(group >= 1 && dim % group == 0, "groups must tile head_dim");
  TORCH_CHECK(scale.is_contiguous() && scale.dim() == 3 && scale.size(0) == heads && scale.size(1) == codes.size(1) &&
                  scale.size(2) == dim / group &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
              "scale must be contiguous float32 or float16 [heads, capacity, head_dim / group]");
  TORCH_CHECK(symmetric ? zero.numel() == 0 : zero.sizes() == scale.sizes() && zero.is_contiguous() &&
                                                  zero.scalar_type() == at::kByte,
              "asymmetric codes need uint8 zero points shaped as the scales; symmetric ones none");
  const bool half_in = x.scalar_type() == at::kHalf, half_scale = scale.scalar_type() == at::kHalf;
  const int64_t groups = dim / group, capacity = codes.size(1), row_bytes = codes.size(2);
  const float high = static_cast<float>(symmetric ? (1 << (width - 1)) - 1 : (1 << width) - 1);
  const float low = symmetric ? -static_cast<float>(1 << (width - 1)) : 0.f;
  const int bias = symmetric ? 1 << (width - 1) : 0;  // signed codes are stored offset
  const at::Half* x_half = half_in ? x.data_ptr<at::Half>() : nullptr;
  const float* x_float = half_in ? nullptr : x.data_ptr<float>();
  at::Half* scale_half = half_scale ? scale.data_ptr<at::Half>() : nullptr;
  float* scale_float = half_scale ? nullptr : scale.data_ptr<float>();
  uint8_t* zeros = symmetric ? nullptr : zero.data_ptr<uint8_t>();
  std::vector<float> values(dim);
  std::vector<uint8_t> row_codes(dim);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = 0; t < count; ++t) {
      const int64_t index = h * count + t, slot = h * capacity + first + t;
      for (int64_t d = 0; d < dim; ++d)
        values[d] = half_in ? _cvtsh_ss(x_half[index * dim + d].x) : x_float[index * dim + d];
      for (int64_t g = 0; g < groups; ++g) {
        const float* v = values.data() + g * group;
        float s;
        if (symmetric) {  // IntFormat.fit: the (first) value of largest magnitude, signed, over the lowest code
          float extreme = v[0];
          for (int64_t i = 1; i < group; ++i)
            if (std::fabs(v[i]) > std::fabs(extreme)) extreme = v[i];
          s = round_scale(extreme / low, half_scale);
          for (int64_t i = 0; i < group; ++i) {
            const float code = std::min(std::max(std::nearbyint(v[i] / s), low), high);
            row_codes[g * group + i] = static_cast<uint8_t>(static_cast<int>(code) + bias);
          }
        } else {  // zero_point_params and zero_point_codes
          float lowest = 0.f, highest = 0.f;
          for (int64_t i = 0; i < group; ++i) {
            lowest = std::min(lowest, v[i]);
            highest = std::max(highest, v[i]);
          }
          s = round_scale((highest - lowest) / high, half_scale);
          const float z = std::min(std::max(std::nearbyint(-lowest / s), 0.f), high);
          zeros[slot * groups + g] = static_cast<uint8_t>(z);
          for (int64_t i = 0; i < group; ++i) {
            const float code = std::min(std::max(std::nearbyint(v[i] / s) + z, 0.f), high);
            row_codes[g * group + i] = static_cast<uint8_t>(code);
          }
        }
        if (half_scale) scale_half[slot * groups + g] = at::Half(s);
        else scale_float[slot * groups + g] = s;
      }
      uint8_t* row = codes.data_ptr<uint8_t>() + slot * row_bytes;  // pack: code i at bits [i * width, (i + 1) * width)
      std::memset(row, 0, row_bytes);
      for (int64_t i = 0; i < dim; ++i) {
        const int64_t bit = i * width;
        const uint32_t shifted = static_cast<uint32_t>(row_codes[i]) << (bit % 8);
        row[bit / 8] |= static_cast<uint8_t>(shifted);
        if (bit % 8 + width > 8) row[bit / 8 + 1] |= static_cast<uint8_t>(shifted >> 8);
      }
    }
}
