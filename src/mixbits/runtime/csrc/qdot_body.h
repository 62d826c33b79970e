// The body of qdot.cpp's kernels, included once per instruction set inside its own namespace and
// `#pragma GCC target` region (so each copy is compiled for that set and chosen at run time).
// MIXBITS_DOT selects how 32 unsigned weight codes meet 32 signed activation codes:
//   0: AVX2 (vpmaddubsw + vpmaddwd), 1: AVX-VNNI (vpdpbusd, VEX), 2: AVX-512 VNNI on 256-bit registers.

// Byte codes in 0..255 against int8 need care on AVX2: vpmaddubsw adds two u8*s8 products in a
// saturating int16 (255 * 128 * 2 > 32767), so they are widened to int16 first. VNNI sums four
// products straight into int32, exactly, for any byte.
template <bool Nibbles>
inline __m256i dot_run(__m256i w, __m256i x) {
#if MIXBITS_DOT == 0
  const __m256i ones = _mm256_set1_epi16(1);
  if (Nibbles) return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
  const __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(w)),
                                       _mm256_cvtepi8_epi16(_mm256_castsi256_si128(x)));
  const __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1)),
                                       _mm256_cvtepi8_epi16(_mm256_extracti128_si256(x, 1)));
  return _mm256_add_epi32(lo, hi);
#elif MIXBITS_DOT == 1
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#endif
}

// The 32 codes of one run, in input order, one per byte. Nibbles: byte j holds input j (low) and j + 16 (high).
template <bool Nibbles>
inline __m256i load_codes(const uint8_t* codes) {
  if (!Nibbles) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// RM activation rows against RN weight rows, over all K inputs; writes out[m * ldo + n].
template <bool Nibbles, int RM, int RN>
inline void tile(const Problem& p, int64_t m0, int64_t n0, float* out) {
  __m256 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) acc[m][n] = _mm256_setzero_ps();
  const int64_t runs = p.k / kRun;
  const int8_t* x = p.q + m0 * p.k;
  const float* d = p.d + m0 * p.blocks;
  const uint8_t* codes = p.codes + n0 * p.row_bytes;
  const float* s = p.scale + n0 * p.groups;
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t b = r * kRun / p.block, g = r * kRun / p.group;
    __m256i w[RN];
    for (int n = 0; n < RN; ++n) w[n] = load_codes<Nibbles>(codes + n * p.row_bytes + r * (Nibbles ? kRun / 2 : kRun));
    for (int m = 0; m < RM; ++m) {
      const __m256i xm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * p.k + r * kRun));
      const float dm = d[m * p.blocks + b];
      for (int n = 0; n < RN; ++n) {
        const __m256 dot = _mm256_cvtepi32_ps(dot_run<Nibbles>(w[n], xm));
        acc[m][n] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dm * s[n * p.groups + g]), acc[m][n]);
      }
    }
  }
  for (int m = 0; m < RM; ++m) {
    const float* xs = p.sums + (m0 + m) * p.groups;
    for (int n = 0; n < RN; ++n) {
      const float* o = p.offset + (n0 + n) * p.groups;
      float total = hsum(acc[m][n]);
      for (int64_t g = 0; g < p.groups; ++g) total += o[g] * xs[g];
      out[m * p.n + n] = total;
    }
  }
}

template <bool Nibbles, int RM>
inline void tile_rows(const Problem& p, int64_t m0, int64_t n0, int64_t rn, float* out) {
  switch (rn) {
    case 1: tile<Nibbles, RM, 1>(p, m0, n0, out); break;
    case 2: tile<Nibbles, RM, 2>(p, m0, n0, out); break;
    case 3: tile<Nibbles, RM, 3>(p, m0, n0, out); break;
    default: tile<Nibbles, RM, 4>(p, m0, n0, out); break;
  }
}

// Decode (one activation row) takes weight rows four at a time; prefill tiles of 4 activation rows by
// 2 weight rows keep 8 accumulators in registers. Each thread takes a slice of weight rows and walks
// the activations in panels of kPanel rows, so a panel stays in cache while its slice passes over it.
template <bool Nibbles>
void run(const Problem& p, float* y) {
  constexpr int64_t kPanel = 64;
  const int64_t grain = p.m == 1 ? 16 : 8;
  at::parallel_for(0, p.n, grain, [&](int64_t begin, int64_t end) {
    if (p.m == 1) {
      for (int64_t n0 = begin; n0 < end; n0 += 4) {
        if (n0 + 8 < end) {  // the weights stream from memory: ask for the rows after next now
          const char* ahead = reinterpret_cast<const char*>(p.codes + (n0 + 8) * p.row_bytes);
          for (int64_t line = 0; line < 4 * p.row_bytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        }
        tile_rows<Nibbles, 1>(p, 0, n0, std::min<int64_t>(4, end - n0), y + n0);
      }
      return;
    }
    for (int64_t panel = 0; panel < p.m; panel += kPanel) {
      const int64_t panel_end = std::min(p.m, panel + kPanel);
      for (int64_t n0 = begin; n0 < end; n0 += 2) {
        const int64_t rn = std::min<int64_t>(2, end - n0);
        int64_t m0 = panel;
        for (; m0 + 4 <= panel_end; m0 += 4) tile_rows<Nibbles, 4>(p, m0, n0, rn, y + m0 * p.n + n0);
        for (; m0 < panel_end; ++m0) tile_rows<Nibbles, 1>(p, m0, n0, rn, y + m0 * p.n + n0);
      }
    }
  });
}

// quantize_rows for one row: blocks of `block` values (a multiple of 32) to int8 codes and a scale each, and each
// run of 32 codes' sum times its block's scale.
inline void quantize_row(const float* x, int64_t k, int64_t block, int bits, int8_t* q, float* d, float* run_sums) {
  const float low = -static_cast<float>(1 << (bits - 1)), high = static_cast<float>((1 << (bits - 1)) - 1);
  const __m256 sign_mask = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b0 = 0; b0 < k; b0 += block) {
    __m256 top = _mm256_setzero_ps();
    for (int64_t i = b0; i < b0 + block; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign_mask, _mm256_loadu_ps(x + i)));
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    t = _mm_max_ss(t, _mm_movehdup_ps(t));
    const float largest = _mm_cvtss_f32(t);
    float extreme = largest;  // with the sign of the first value of that magnitude, as torch's argmax picks
    for (int64_t i = b0; i < b0 + block; ++i) {
      if (std::fabs(x[i]) == largest) {
        extreme = x[i];
        break;
      }
    }
    float scale = extreme / low;
    const float magnitude = std::fmin(std::fmax(std::fabs(scale), FLT_MIN), FLT_MAX);
    scale = scale < 0.f ? -magnitude : magnitude;
    d[b0 / block] = scale;
    const __m256 divisor = _mm256_set1_ps(scale), lo = _mm256_set1_ps(low), hi = _mm256_set1_ps(high);
    for (int64_t i = b0; i < b0 + block; i += kRun) {
      __m256i part[4];
      for (int j = 0; j < 4; ++j) {
        __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i + 8 * j), divisor),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        part[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
      }
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(part[0], part[1]), _mm256_packs_epi32(part[2], part[3]));
      const __m256i codes = _mm256_permutevar8x32_epi32(packed, order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), codes);
      // the run's sum of codes: bytes widened to int16 pairs, then to int32
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), codes);
      const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(quads), _mm256_extracti128_si256(quads, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      run_sums[i / kRun] = scale * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
  }
}
