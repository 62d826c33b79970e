// Matrix products of int8-quantized activations with integer-coded weights, in integer arithmetic.
//
// quantize_rows(x, block, bits, fixed): each row of float32 x [M, K] in blocks of `block` inputs (a multiple of
// 32; K for one scale per row): d = e / -2^(bits-1), e the block's value of largest magnitude (the first on
// ties), |d| clamped to [FLT_MIN, FLT_MAX], or d = `fixed` if that is positive (a static scale); q =
// round-half-even(x / d) clamped to the bits' signed range. That is exactly mixbits' format
// intB:gBLOCK:sym:scale=fp32 (intB:ch:sym:scale=fp32 for block = K; intB:static=FIXED), so a fake-quantized
// forward computes the same numbers. It returns q (int8 [M, K]), d ([M, K / block]) and,
// per half-run of 16 inputs, d times the sum of its codes ([M, K / 16]).
//
// nibble_xlinear / byte_xlinear(x, block, bits, codes, scales, offsets, group, n, center, unit[, table]): x
// quantized as quantize_rows does, times weights w = (c * s + o) * unit per group of `group` inputs (a multiple
// of 32, or 16 for codes of up to 4 bits), unsigned codes c in the panel layout (below):
//
//     y[m, n] = unit * (sum over runs r of 32 inputs:  d[m, r] * s[n, r] * (sum over the run of c * q)   (integer dot)
//                       + sum over groups g:  o[n, g] * (sum over the group's half-runs of half_sums[m, h]))
//
// which is the float product of the dequantized activations and weights, up to float summation order.
// Integer dots accumulate across runs while neither scale changes.
//
// Panel layout (runtime/linear.py's `to_panels` writes it): weight rows in panels of 16, padded with zero
// rows; per panel and run of 32 inputs, steps of 4 inputs, each step 16 rows x 4 bytes (64 bytes), so one
// load gives four codes of each of 16 rows. Codes of up to 4 bits take 4 steps of 64 bytes per run, the low
// nibbles holding inputs 4j..4j+3 and the high ones 4j+16..4j+19; wider codes take 8 steps, a byte each.
// Scales and offsets are [panel, group, 16], float32 or float16 (when that holds them exactly, as for any
// format with 16-bit scales: 4.5 bits a weight for Q4_0, as llama.cpp reads). A symmetric format needs no
// offsets: its codes are held as c + center, and its offset is -center * scale.
//
// The integer dot has three implementations, compiled side by side and picked at run time for the CPU:
// AVX-512 VNNI, AVX-VNNI, or AVX2.
//
// Table formats (codes of up to 4 bits indexing 16 values, each an integer multiple of one unit): the nibbles
// index a table of 16 unsigned codes c (the integers plus a center) with one vpshufb. FP4 E2M1's
// {0, 0.5, ..., 6} are small multiples of 0.5 and take one byte (llama.cpp's IQ4_NL works alike); other tables
// (NF4's) take 14-bit codes hi * 128 + lo in multiples of 2^-13 of the largest, two lookups and two dots.
#include "ops.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace {

constexpr int64_t kRun = 32;
constexpr int64_t kHalfRun = 16;
constexpr int64_t kPanel = 16;  // weight rows per panel
enum Table { kNone, kByte, kWide };

struct Problem {
  int64_t m, n, k, block, group, groups, span, panels;  // span: runs whose integer dots add before a scale changes
  const int8_t* q;
  const float* d;     // [m, k / block]: the activation scales
  const float* sums;  // [m, groups]: the dequantized activations' sum over each weight group
  const uint8_t* codes;
  const void* scale;   // float32, or float16 if `half`
  const void* offset;  // the same; null for codes held as c + center (offset -center * scale)
  bool f16;  // scales and offsets in float16
  float center;
  float unit;            // every product's factor: a table's unit, else 1
  const uint8_t* table;  // 16 codes (kByte) or 16 hi and 16 lo bytes (kWide) the nibbles index, or null
};

}  // namespace

// The whole file is built with -mavx2 -mfma -mf16c (kernels.py), which the AVX2 copy needs; the VNNI copies take
// their instruction sets from `#pragma GCC target`, which GCC 11 and later (AVX-VNNI's intrinsics) honour.
// Other compilers build the AVX2 copy alone. (F16C, for the 16-bit scales, comes with every AVX2 CPU.)
// (-DMIXBITS_AVX2_ONLY builds that copy alone with any compiler: how the fallback is checked here.)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && !defined(MIXBITS_AVX2_ONLY)
#define MIXBITS_VNNI 1
#endif

namespace avx2 {
#define MIXBITS_DOT 0
#include "qdot_body.h"
#undef MIXBITS_DOT
}  // namespace avx2

#ifdef MIXBITS_VNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace avxvnni {
#define MIXBITS_DOT 1
#include "qdot_body.h"
#undef MIXBITS_DOT
}  // namespace avxvnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512vnni {
#define MIXBITS_DOT 2
#include "qdot_body.h"
#undef MIXBITS_DOT
}  // namespace avx512vnni
#pragma GCC pop_options
#endif

namespace {

enum Isa { kAvx2, kAvxVnni, kAvx512Vnni };
const char* const kIsaNames[] = {"avx2", "avxvnni", "avx512vnni"};

bool supported(Isa isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef MIXBITS_VNNI
  if (isa == kAvxVnni) return avx2 && __builtin_cpu_supports("avxvnni");
  if (isa == kAvx512Vnni)
    return avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw");
#endif
  return isa == kAvx2 && avx2;
}

Isa best_isa() { return supported(kAvx512Vnni) ? kAvx512Vnni : supported(kAvxVnni) ? kAvxVnni : kAvx2; }

// Read by every call; set by tests (set_qdot_isa) between calls.
std::atomic<Isa>& chosen_isa() {
  static std::atomic<Isa> isa{best_isa()};
  return isa;
}

// The call (a function of qdot_body.h) in the chosen instruction set's copy.
#ifdef MIXBITS_VNNI
#define MIXBITS_DISPATCH(isa, ...)                    \
  switch (isa) {                                      \
    case kAvx512Vnni: avx512vnni::__VA_ARGS__; break; \
    case kAvxVnni: avxvnni::__VA_ARGS__; break;       \
    default: avx2::__VA_ARGS__; break;                \
  }
#else
#define MIXBITS_DISPATCH(isa, ...) avx2::__VA_ARGS__;
#endif

}  // namespace

std::string qdot_isa() { return kIsaNames[chosen_isa().load()]; }

void set_qdot_isa(std::string name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(supported(static_cast<Isa>(i)), "this CPU (or this build) cannot run the ", name,
                  " integer-dot kernels; it runs ", kIsaNames[best_isa()]);
      chosen_isa() = static_cast<Isa>(i);
      return;
    }
  }
  TORCH_CHECK(false, "unknown instruction set ", name, "; use avx2, avxvnni or avx512vnni");
}

std::vector<at::Tensor> quantize_rows(at::Tensor x, int64_t block, int64_t bits, double fixed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous float32 matrix");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(block > 0 && k % kRun == 0 && block % kRun == 0 && k % block == 0, "inputs and the block must be multiples of 32, "
              "and the block must divide the inputs; got ", k, " inputs, block ", block);
  TORCH_CHECK(bits >= 2 && bits <= 8, "activation codes take 2 to 8 bits, got ", bits);
  TORCH_CHECK(fixed >= 0 && std::isfinite(fixed), "a static scale must be positive (0: scales from the values)");
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({m, k / block}, x.options());
  at::Tensor half_sums = at::empty({m, k / kHalfRun}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  float* sp = half_sums.data_ptr<float>();
  const Isa isa = chosen_isa().load();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      MIXBITS_DISPATCH(isa, quantize_row(xp + r * k, k, block, bits, static_cast<float>(fixed), qp + r * k, dp + r * (k / block),
                                         sp + r * (k / kHalfRun)))
    }
  });
  return {q, d, half_sums};
}

namespace {

at::Tensor qlinear(bool nibbles, const at::Tensor& q, const at::Tensor& d, const at::Tensor& half_sums, int64_t block,
                   const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                   int64_t group, int64_t n, double center, double unit, const c10::optional<at::Tensor>& table) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous int8");
  const int64_t m = q.size(0), k = q.size(1), runs = k / kRun;
  const bool half = group == kHalfRun;
  TORCH_CHECK(block > 0 && group > 0 && k % kRun == 0 && (group % kRun == 0 || (half && nibbles)) && block % kRun == 0 &&
              k % block == 0, "inputs and block must be positive multiples of 32, the group too (or 16 for codes of up "
              "to 4 bits), and the block must divide the inputs");
  const int64_t groups = (k + group - 1) / group, panels = (n + kPanel - 1) / kPanel;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() &&
              codes.numel() == panels * runs * kRun * kPanel / (nibbles ? 2 : 1),
              "codes must be contiguous uint8 in the panel layout for ", n, " rows of ", k, " inputs");
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.is_contiguous() && d.size(0) == m && d.size(1) == k / block,
              "d must be contiguous float32 [rows, blocks]");
  TORCH_CHECK(half_sums.scalar_type() == at::kFloat && half_sums.is_contiguous() && half_sums.size(0) == m &&
              half_sums.size(1) == k / kHalfRun, "half_sums must be contiguous float32 [rows, inputs / 16]");
  const bool half_scales = scales.scalar_type() == at::kHalf;
  TORCH_CHECK((half_scales || scales.scalar_type() == at::kFloat) && scales.is_contiguous() &&
              scales.numel() == panels * groups * kPanel, "scales must be contiguous float32 or float16 [panels, groups, 16]");
  if (offsets) {
    TORCH_CHECK(offsets->scalar_type() == scales.scalar_type() && offsets->is_contiguous() &&
                offsets->numel() == scales.numel(), "offsets must be laid out as the scales");
  }
  const Table kind = !table ? kNone : table->numel() == 32 ? kWide : kByte;
  if (table) {
    TORCH_CHECK(nibbles && table->scalar_type() == at::kByte && table->is_contiguous() &&
                (table->numel() == 16 || table->numel() == 32), "a code table must be 16 contiguous uint8 codes (or 16 "
                "high and 16 low bytes of 14-bit codes), for codes of up to 4 bits");
    const uint8_t* t = table->data_ptr<uint8_t>();
    TORCH_CHECK(std::all_of(t, t + 16, [](uint8_t v) { return v <= 128; }) &&
                (kind == kByte || std::all_of(t + 16, t + 32, [](uint8_t v) { return v < 128; })),
                "table bytes must be at most 128 (low bytes of 14-bit codes below 128)");
  }
  at::Tensor sums = at::zeros({m, groups}, q.options().dtype(at::kFloat));
  const float* hs = half_sums.data_ptr<float>();
  float* gs = sums.data_ptr<float>();
  const int64_t halves = k / kHalfRun;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t h = 0; h < halves; ++h) gs[r * groups + h * kHalfRun / group] += hs[r * halves + h];
  at::Tensor y = at::empty({m, n}, q.options().dtype(at::kFloat));
  // Runs whose integer dots add before a scale changes; a lane's dot over them must stay within int32: at most
  // span * 32 * 255 * 128 for byte codes, span * 32 * 16384 * 128 for a wide table's (so at most 16 runs there).
  int64_t span = half ? 1 : std::gcd(block, group) / kRun;
  if (kind == kWide) {
    for (int64_t s = std::min<int64_t>(span, 16); s >= 1; --s) {
      if (span % s == 0) {
        span = s;
        break;
      }
    }
  }
  TORCH_CHECK(span * kRun * 255 * 128 < (int64_t{1} << 31), "a scale spans ", span * kRun,
              " inputs: too many for int32 dot products; use groups or blocks of at most 65536 inputs");
  const Problem p{m, n, k, block, group, groups, span, panels, q.data_ptr<int8_t>(), d.data_ptr<float>(), gs,
                  codes.data_ptr<uint8_t>(), scales.data_ptr(), offsets ? offsets->data_ptr() : nullptr, half_scales,
                  static_cast<float>(center), static_cast<float>(unit), table ? table->data_ptr<uint8_t>() : nullptr};
  float* yp = y.data_ptr<float>();
  const Isa isa = chosen_isa().load();
  if (!nibbles) {
    MIXBITS_DISPATCH(isa, run<false, kNone, false>(p, yp))
  } else if (half) {
    switch (kind) {
      case kWide: MIXBITS_DISPATCH(isa, run<true, kWide, true>(p, yp)) break;
      case kByte: MIXBITS_DISPATCH(isa, run<true, kByte, true>(p, yp)) break;
      default: MIXBITS_DISPATCH(isa, run<true, kNone, true>(p, yp)) break;
    }
  } else {
    switch (kind) {
      case kWide: MIXBITS_DISPATCH(isa, run<true, kWide, false>(p, yp)) break;
      case kByte: MIXBITS_DISPATCH(isa, run<true, kByte, false>(p, yp)) break;
      default: MIXBITS_DISPATCH(isa, run<true, kNone, false>(p, yp)) break;
    }
  }
  return y;
}

// quantize_rows then qlinear, in one call (a decode step makes over a hundred of them).
at::Tensor quantized_linear(bool nibbles, const at::Tensor& x, int64_t block, int64_t bits, double fixed, const at::Tensor& codes,
                            const at::Tensor& scales, const c10::optional<at::Tensor>& offsets, int64_t group, int64_t n,
                            double center, double unit, const c10::optional<at::Tensor>& table) {
  const std::vector<at::Tensor> q = quantize_rows(x, block, bits, fixed);
  return qlinear(nibbles, q[0], q[1], q[2], block, codes, scales, offsets, group, n, center, unit, table);
}

}  // namespace

// table_xlinear(x, block, bits, fixed, codes, tables, units, group): x quantized as quantize_rows does, times
// learned-table weights w = (t[c] - 8192) * unit, a table t of 16 unsigned 14-bit codes per row and group of
// `group` inputs (a multiple of 32), held as 16 high bytes (t >> 7, at most 128) then 16 low bytes (t & 127):
// tables uint8 [n, groups, 32], units float32 [n, groups]. Codes are 4-bit, row by row in runs of 32 inputs, byte j of
// a run holding input j (low nibble) and input j + 16 (high): uint8 [n, k / 2].
//
// Each thread takes rows; a row's tables are looked up once into 32 high and 32 low weight bytes per run (L1
// resident), then every activation row is dotted with them (vpmaddubsw, exact for bytes up to 128). AVX2 for every
// CPU: the rows are independent, so lanes hold inputs and each row ends in one horizontal sum.
at::Tensor table_xlinear(at::Tensor x, int64_t block, int64_t bits, double fixed, at::Tensor codes, at::Tensor tables,
                         at::Tensor units, int64_t group) {
  const std::vector<at::Tensor> quantized = quantize_rows(x, block, bits, fixed);
  const int64_t m = x.size(0), k = x.size(1), runs = k / kRun;
  TORCH_CHECK(group > 0 && group % kRun == 0, "learned-table groups must be multiples of 32 inputs, got ", group);
  const int64_t groups = (k + group - 1) / group;
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(1) == k / 2,
              "codes must be contiguous uint8 [rows, inputs / 2]");
  const int64_t n = codes.size(0);
  TORCH_CHECK(tables.scalar_type() == at::kByte && tables.is_contiguous() && tables.numel() == n * groups * 32,
              "tables must be contiguous uint8 [rows, groups, 32]");
  TORCH_CHECK(units.scalar_type() == at::kFloat && units.is_contiguous() && units.numel() == n * groups,
              "units must be contiguous float32 [rows, groups]");
  const int8_t* q = quantized[0].data_ptr<int8_t>();
  const float* d = quantized[1].data_ptr<float>();
  const float* hs = quantized[2].data_ptr<float>();
  at::Tensor sums = at::zeros({m, groups}, x.options());  // the dequantized inputs' sum over each group
  float* gs = sums.data_ptr<float>();
  const int64_t halves = k / kHalfRun;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t h = 0; h < halves; ++h) gs[r * groups + h * kHalfRun / group] += hs[r * halves + h];
  // runs whose dots add in int32 before a scale changes: at most 16 (16 * 32 * 16384 * 128 < 2^31)
  int64_t span = std::gcd(block, group) / kRun;
  for (int64_t s = std::min<int64_t>(span, 16); s >= 1; --s) {
    if (span % s == 0) {
      span = s;
      break;
    }
  }
  at::Tensor y = at::empty({m, n}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* tp = tables.data_ptr<uint8_t>();
  const float* up = units.data_ptr<float>();
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> looked_up(runs * 64);  // per run: 32 high, then 32 low weight bytes
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t r = 0; r < runs; ++r) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + row * (k / 2) + r * kHalfRun));
        const __m256i index = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), nibble);  // inputs 0-15 low lane, 16-31 high lane
        const uint8_t* t = tp + (row * groups + r * kRun / group) * 32;
        const __m256i t_high = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
        const __m256i t_low = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
        __m256i* out = reinterpret_cast<__m256i*>(looked_up.data() + r * 64);
        _mm256_storeu_si256(out, _mm256_shuffle_epi8(t_high, index));
        _mm256_storeu_si256(out + 1, _mm256_shuffle_epi8(t_low, index));
      }
      const float* unit = up + row * groups;
      for (int64_t mi = 0; mi < m; ++mi) {
        const int8_t* xq = q + mi * k;
        __m256 total = _mm256_setzero_ps();
        __m256i acc = _mm256_setzero_si256();
        for (int64_t r = 0; r < runs; ++r) {
          const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * kRun));
          const __m256i* w = reinterpret_cast<const __m256i*>(looked_up.data() + r * 64);
          const __m256i dh = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256(w), xr), ones);
          const __m256i dl = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256(w + 1), xr), ones);
          acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_slli_epi32(dh, 7), dl));
          if ((r + 1) % span == 0 || r + 1 == runs) {
            const float f = d[mi * (k / block) + r * kRun / block] * unit[r * kRun / group];
            total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(f), total);
            acc = _mm256_setzero_si256();
          }
        }
        __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
        t4 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
        t4 = _mm_add_ss(t4, _mm_movehdup_ps(t4));
        float value = _mm_cvtss_f32(t4);
        for (int64_t g = 0; g < groups; ++g) value -= 8192.f * unit[g] * gs[mi * groups + g];  // the codes' center
        yp[mi * n + row] = value;
      }
    }
  });
  return y;
}

at::Tensor nibble_xlinear(at::Tensor x, int64_t block, int64_t bits, double fixed, at::Tensor codes, at::Tensor scales,
                          c10::optional<at::Tensor> offsets, int64_t group, int64_t n, double center, double unit,
                          c10::optional<at::Tensor> table) {
  return quantized_linear(true, x, block, bits, fixed, codes, scales, offsets, group, n, center, unit, table);
}
at::Tensor byte_xlinear(at::Tensor x, int64_t block, int64_t bits, double fixed, at::Tensor codes, at::Tensor scales,
                        c10::optional<at::Tensor> offsets, int64_t group, int64_t n, double center) {
  return quantized_linear(false, x, block, bits, fixed, codes, scales, offsets, group, n, center, 1.0, c10::nullopt);
}
