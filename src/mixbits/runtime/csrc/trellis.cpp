// Trellis codes (formats/trellis.py): the Viterbi search that encodes them, and products computed from their bits.
//
// A bit-shift trellis of S = 2^L states moves by K bits a step: state s follows the F = 2^K states
// ((s mod 2^(L-K)) << K) | j. Each step covers D weights, the codeword table[s] of its state. A row's codes are a
// stream of K-bit symbols, little-endian in its bytes; the state of step t is the L bits of the stream starting at
// bit t K + e (e = (P + 1) K - L, P the symbols before the first step's own).
#include "ops.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <limits>
#include <vector>

namespace {

inline uint32_t state_at(const uint8_t* stream, int64_t bit, uint32_t mask) {
  uint32_t word;  // L + 7 <= 23 bits from the byte holding `bit`: a 4-byte load (rows are padded by 4 bytes)
  std::memcpy(&word, stream + (bit >> 3), 4);
  return (word >> (bit & 7)) & mask;
}

}  // namespace

// The best walk of each of N sequences: target, weight [N, T, D]; table [S, D]; start [N] (a state the walk
// follows, or -1 for a free first state). Returns the states [N, T] (int32). Ties go to the lowest state.
at::Tensor trellis_viterbi(at::Tensor target, at::Tensor weight, at::Tensor table, int64_t step_bits, at::Tensor start) {
  TORCH_CHECK(target.dim() == 3 && target.scalar_type() == at::kFloat && target.is_contiguous(),
              "target must be contiguous float32 [N, T, D]");
  TORCH_CHECK(weight.sizes() == target.sizes() && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "weight must be contiguous float32 like target");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == at::kFloat && table.is_contiguous(),
              "table must be contiguous float32 [S, D]");
  const int64_t n = target.size(0), steps = target.size(1), dim = target.size(2), states = table.size(0);
  TORCH_CHECK(table.size(1) == dim, "table rows must have D values");
  TORCH_CHECK(states >= 2 && (states & (states - 1)) == 0 && step_bits >= 1 && step_bits <= 8 &&
              (int64_t(1) << step_bits) < states, "states must be a power of two above 2^step_bits, steps of 1-8 bits");
  TORCH_CHECK(start.scalar_type() == at::kLong && start.dim() == 1 && start.size(0) == n && start.is_contiguous(),
              "start must be int64 [N]");
  const int64_t fanin = int64_t(1) << step_bits, kept = states >> step_bits;
  // The table transposed, [D][S], and its squares: a step's errors are D passes over contiguous states.
  std::vector<float> codes(dim * states), squares(dim * states);
  const float* tp = table.data_ptr<float>();
  for (int64_t s = 0; s < states; ++s)
    for (int64_t d = 0; d < dim; ++d) {
      codes[d * states + s] = tp[s * dim + d];
      squares[d * states + s] = tp[s * dim + d] * tp[s * dim + d];
    }
  at::Tensor path = at::empty({n, steps}, target.options().dtype(at::kInt));
  const float* xp = target.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t* sp = start.data_ptr<int64_t>();
  int32_t* pp = path.data_ptr<int32_t>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cost(states), next(states), best(kept);
    std::vector<uint8_t> back(steps * kept);
    for (int64_t row = begin; row < end; ++row) {
      const float* x = xp + row * steps * dim;
      const float* w = wp + row * steps * dim;
      const int64_t first = sp[row];
      TORCH_CHECK(first < states, "a start state is out of range");
      if (first >= 0) {
        std::fill(cost.begin(), cost.end(), std::numeric_limits<float>::infinity());
        cost[first] = 0.f;
      }
      for (int64_t t = 0; t < steps; ++t) {
        // error[s] = sum_d w_d c_d^2 - 2 w_d x_d c_d (the constant sum_d w_d x_d^2 left out)
        const float w0 = w[t * dim], a0 = -2.f * w0 * x[t * dim];
#pragma omp simd
        for (int64_t s = 0; s < states; ++s) next[s] = w0 * squares[s] + a0 * codes[s];
        for (int64_t d = 1; d < dim; ++d) {
          const float wd = w[t * dim + d], ad = -2.f * wd * x[t * dim + d];
          const float* sq = squares.data() + d * states;
          const float* cd = codes.data() + d * states;
#pragma omp simd
          for (int64_t s = 0; s < states; ++s) next[s] += wd * sq[s] + ad * cd[s];
        }
        if (t > 0 || first >= 0) {
          uint8_t* choice = back.data() + t * kept;
          for (int64_t r = 0; r < kept; ++r) {
            const float* c = cost.data() + r * fanin;
            float b = c[0];
            int64_t a = 0;
            for (int64_t j = 1; j < fanin; ++j)
              if (c[j] < b) b = c[j], a = j;
            best[r] = b;
            choice[r] = static_cast<uint8_t>(a);
          }
          for (int64_t sym = 0; sym < fanin; ++sym) {
            float* out = next.data() + sym * kept;
#pragma omp simd
            for (int64_t r = 0; r < kept; ++r) out[r] += best[r];
          }
        }
        std::swap(cost, next);
      }
      int64_t state = 0;
      for (int64_t s = 1; s < states; ++s)
        if (cost[s] < cost[state]) state = s;
      int32_t* out = pp + row * steps;
      for (int64_t t = steps - 1; t >= 0; --t) {
        out[t] = static_cast<int32_t>(state);
        if (t > 0 || first >= 0) {
          const int64_t r = state & (kept - 1);
          state = (r << step_bits) | back[t * kept + r];
        }
      }
    }
  });
  return path;
}

// y = x W^T for trellis-coded rows: x [M, C] (already rotated), streams [N, B] bytes per row (padded by 4),
// scales [N], table [S, D]. W[o] is table[state of each step] times scale[o].
at::Tensor trellis_linear(at::Tensor x, at::Tensor streams, at::Tensor scales, at::Tensor table, int64_t step_bits,
                          int64_t offset) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [M, C]");
  TORCH_CHECK(streams.dim() == 2 && streams.scalar_type() == at::kByte && streams.is_contiguous(),
              "streams must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == at::kFloat && table.is_contiguous(), "table must be float32 [S, D]");
  const int64_t m = x.size(0), cols = x.size(1), n = streams.size(0), width = streams.size(1);
  const int64_t states = table.size(0), dim = table.size(1), steps = cols / dim;
  TORCH_CHECK(cols % dim == 0 && (states & (states - 1)) == 0 && states <= 65536, "bad trellis shapes");
  TORCH_CHECK((offset + (steps - 1) * step_bits) / 8 + 4 <= width, "streams are too short for ", steps, " steps");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == n && scales.is_contiguous(), "scales must be float32 [N]");
  const uint32_t mask = static_cast<uint32_t>(states - 1);
  at::Tensor y = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* bp = streams.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> row_states(steps);
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* stream = bp + o * width;
      for (int64_t t = 0; t < steps; ++t) row_states[t] = state_at(stream, offset + t * step_bits, mask);
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = xp + i * cols;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        if (dim == 2) {
          int64_t t = 0;
          for (; t + 2 <= steps; t += 2) {
            const float* c0 = tp + 2 * row_states[t];
            const float* c1 = tp + 2 * row_states[t + 1];
            acc[0] += c0[0] * xi[2 * t];
            acc[1] += c0[1] * xi[2 * t + 1];
            acc[2] += c1[0] * xi[2 * t + 2];
            acc[3] += c1[1] * xi[2 * t + 3];
          }
          for (; t < steps; ++t) acc[0] += tp[2 * row_states[t]] * xi[2 * t] + tp[2 * row_states[t] + 1] * xi[2 * t + 1];
        } else {
          for (int64_t t = 0; t < steps; ++t) {
            const float* c = tp + dim * row_states[t];
            for (int64_t d = 0; d < dim; ++d) acc[d & 3] += c[d] * xi[t * dim + d];
          }
        }
        yp[i * n + o] = sp[o] * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
      }
    }
  });
  return y;
}

// The rotated weights [N, C] of trellis-coded rows (as trellis_linear reads them).
at::Tensor trellis_dequantize(at::Tensor streams, at::Tensor scales, at::Tensor table, int64_t step_bits, int64_t offset,
                              int64_t cols) {
  TORCH_CHECK(streams.dim() == 2 && streams.scalar_type() == at::kByte && streams.is_contiguous(),
              "streams must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == at::kFloat && table.is_contiguous(), "table must be float32 [S, D]");
  const int64_t n = streams.size(0), width = streams.size(1), states = table.size(0), dim = table.size(1);
  const int64_t steps = cols / dim;
  TORCH_CHECK(cols % dim == 0 && (states & (states - 1)) == 0 && states <= 65536, "bad trellis shapes");
  TORCH_CHECK((offset + (steps - 1) * step_bits) / 8 + 4 <= width, "streams are too short for ", steps, " steps");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == n && scales.is_contiguous(), "scales must be float32 [N]");
  const uint32_t mask = static_cast<uint32_t>(states - 1);
  at::Tensor w = at::empty({n, cols}, table.options());
  const uint8_t* bp = streams.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* stream = bp + o * width;
      float* out = wp + o * cols;
      for (int64_t t = 0; t < steps; ++t) {
        const float* c = tp + dim * state_at(stream, offset + t * step_bits, mask);
        for (int64_t d = 0; d < dim; ++d) out[t * dim + d] = sp[o] * c[d];
      }
    }
  });
  return w;
}
