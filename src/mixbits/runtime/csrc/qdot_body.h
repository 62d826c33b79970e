// The body of qdot.cpp's kernels, included once per instruction set inside its own namespace and
// `#pragma GCC target` region (so each copy is compiled for that set and chosen at run time).
// MIXBITS_DOT: 0 AVX2 (vpmaddubsw + vpmaddwd on 8 lanes), 1 AVX-VNNI (vpdpbusd on 8 lanes),
// 2 AVX-512 VNNI (vpdpbusd on 16 lanes).
//
// Vector lanes are weight rows: lane i of an accumulator sums row i's products, four codes per step
// (vpdpbusd: four u8 x s8 products into each int32 lane), so a run of 32 inputs is 8 steps with the
// activation's 4 bytes broadcast to every lane, and no horizontal sums are needed.

#if MIXBITS_DOT == 2
struct V {
  using I = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I broadcast(const int8_t* p) {
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm512_set1_epi32(four);
  }
  static I low(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  static I table(const uint8_t* t) { return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t))); }
  static I lookup(I table, I index) { return _mm512_shuffle_epi8(table, index); }
  static I high(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
  static I dot(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }  // exact for any byte
  static I dot_bytes(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static I zero() { return _mm512_setzero_si512(); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I shl7(I v) { return _mm512_slli_epi32(v, 7); }
  static F zerof() { return _mm512_setzero_ps(); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static F loadh(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#else
struct V {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I broadcast(const int8_t* p) {
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm256_set1_epi32(four);
  }
  static I low(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
  static I table(const uint8_t* t) { return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t))); }
  static I lookup(I table, I index) { return _mm256_shuffle_epi8(table, index); }
  static I high(I v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
#if MIXBITS_DOT == 1
  static I dot(I acc, I w, I x) { return _mm256_dpbusd_avx_epi32(acc, w, x); }
  static I dot_bytes(I acc, I w, I x) { return _mm256_dpbusd_avx_epi32(acc, w, x); }
#else
  // vpmaddubsw adds two u8 x s8 products in a saturating int16: exact for codes up to 128 (128 * -128 * 2 = -2^15,
  // 128 * 127 * 2 < 2^15), which nibbles and table bytes are.
  static I dot(I acc, I w, I x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
  }
  // Byte codes would overflow it (255 * 128 * 2), so they go as two nibbles: c x = 16 (hi x) + lo x.
  static I dot_bytes(I acc, I w, I x) {
    const I hi = dot(zero(), high(w), x);
    return _mm256_add_epi32(dot(acc, low(w), x), _mm256_slli_epi32(hi, 4));
  }
#endif
  static I zero() { return _mm256_setzero_si256(); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I shl7(I v) { return _mm256_slli_epi32(v, 7); }
  static F zerof() { return _mm256_setzero_ps(); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static F loadh(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};
#endif

// A wide table's dot: the 14-bit codes are hi * 128 + lo, looked up byte by byte.
inline V::I dot_wide(V::I acc, V::I hi, V::I lo, V::I x) {
  return V::add(V::dot(acc, lo, x), V::shl7(V::dot(V::zero(), hi, x)));
}

// The kLanes per-group values of `values` (float32 or float16 [panels, groups, 16]) at `index`.
inline V::F load_params(const void* values, bool f16, int64_t index) {
  return f16 ? V::loadh(static_cast<const uint16_t*>(values) + index) : V::loadf(static_cast<const float*>(values) + index);
}

// RM activation rows against the kLanes weight rows of one panel starting at lane `lane0`.
// Lookup (Table): kNone, the nibbles or bytes are the codes; kByte, the nibbles index p.table (16 unsigned bytes,
// vpshufb); kWide, they index 14-bit codes hi * 128 + lo (p.table: 16 hi bytes, then 16 lo bytes).
// Half: weight groups of 16 inputs, a run's low nibbles (inputs 0-15) and high nibbles (16-31) in separate
// accumulators, each scaled by its own group's scale.
// One activation row gets two integer accumulators when RM is 1 or Half, so that consecutive vpdpbusd do not wait
// on each other.
template <bool Nibbles, int Table, bool Half, int RM>
inline void tile(const Problem& p, int64_t m0, int64_t panel, int64_t lane0, float* y) {
  constexpr int kChains = (RM == 1 || Half) ? 2 : 1;
  constexpr int64_t kRunBytes = Nibbles ? kRun * kPanel / 2 : kRun * kPanel;
  typename V::F total[RM];
  typename V::I acc[RM][kChains];
  for (int m = 0; m < RM; ++m) {
    total[m] = V::zerof();
    for (int c = 0; c < kChains; ++c) acc[m][c] = V::zero();
  }
  const int64_t runs = p.k / kRun;
  const uint8_t* w = p.codes + panel * runs * kRunBytes + lane0 * 4;
  const int64_t params = panel * p.groups * kPanel + lane0;  // this panel's first scale (and offset)
  const int8_t* x = p.q + m0 * p.k;
  const typename V::I table = Table != kNone ? V::table(p.table) : V::zero();
  const typename V::I table_lo = Table == kWide ? V::table(p.table + 16) : V::zero();
  for (int64_t r = 0; r < runs; ++r) {
    const uint8_t* wr = w + r * kRunBytes;
    const int8_t* xr = x + r * kRun;
    if (Nibbles) {  // 64-byte step j: low nibbles hold inputs 4j..4j+3 of each row, high ones 4j+16..4j+19
      for (int j = 0; j < 4; ++j) {
        const typename V::I packed = V::load(wr + j * 4 * kPanel);
        typename V::I lo = V::low(packed), hi = V::high(packed);
        for (int m = 0; m < RM; ++m) {
          const typename V::I x_lo = V::broadcast(xr + m * p.k + 4 * j), x_hi = V::broadcast(xr + m * p.k + 4 * j + 16);
          if (Table == kWide) {
            acc[m][0] = dot_wide(acc[m][0], V::lookup(table, lo), V::lookup(table_lo, lo), x_lo);
            acc[m][kChains - 1] = dot_wide(acc[m][kChains - 1], V::lookup(table, hi), V::lookup(table_lo, hi), x_hi);
          } else if (Table == kByte) {
            acc[m][0] = V::dot(acc[m][0], V::lookup(table, lo), x_lo);
            acc[m][kChains - 1] = V::dot(acc[m][kChains - 1], V::lookup(table, hi), x_hi);
          } else {
            acc[m][0] = V::dot(acc[m][0], lo, x_lo);
            acc[m][kChains - 1] = V::dot(acc[m][kChains - 1], hi, x_hi);
          }
        }
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        const typename V::I codes = V::load(wr + j * 4 * kPanel);
        for (int m = 0; m < RM; ++m)
          acc[m][j % kChains] = V::dot_bytes(acc[m][j % kChains], codes, V::broadcast(xr + m * p.k + 4 * j));
      }
    }
    if (Half) {  // every run: groups 2r (low nibbles) and 2r + 1 (high)
      const typename V::F s0 = load_params(p.scale, p.f16, params + 2 * r * kPanel);
      const typename V::F s1 = load_params(p.scale, p.f16, params + (2 * r + 1) * kPanel);
      for (int m = 0; m < RM; ++m) {
        const typename V::F d = V::set1(p.d[(m0 + m) * (p.k / p.block) + r * kRun / p.block]);
        total[m] = V::fmadd(V::cvt(acc[m][0]), V::mul(s0, d), total[m]);
        total[m] = V::fmadd(V::cvt(acc[m][kChains - 1]), V::mul(s1, d), total[m]);
        for (int c = 0; c < kChains; ++c) acc[m][c] = V::zero();
      }
    } else if ((r + 1) % p.span == 0 || r + 1 == runs) {  // the activation scale or the weight scale changes next
      const typename V::F s = load_params(p.scale, p.f16, params + (r * kRun / p.group) * kPanel);
      for (int m = 0; m < RM; ++m) {
        typename V::I sum = acc[m][0];
        if (kChains == 2) sum = V::add(sum, acc[m][kChains - 1]);
        const float d = p.d[(m0 + m) * (p.k / p.block) + r * kRun / p.block];
        total[m] = V::fmadd(V::cvt(sum), V::mul(s, V::set1(d)), total[m]);
        for (int c = 0; c < kChains; ++c) acc[m][c] = V::zero();
      }
    }
  }
  const int64_t first = panel * kPanel + lane0, valid = std::min<int64_t>(V::kLanes, p.n - first);
  for (int m = 0; m < RM; ++m) {
    const float* sums = p.sums + (m0 + m) * p.groups;
    for (int64_t g = 0; g < p.groups; ++g) {  // offsets, or -center * scale for codes held as c + center
      const typename V::F o = p.offset != nullptr ? load_params(p.offset, p.f16, params + g * kPanel)
                                                  : V::mul(load_params(p.scale, p.f16, params + g * kPanel), V::set1(-p.center));
      total[m] = V::fmadd(o, V::set1(sums[g]), total[m]);
    }
    if (p.unit != 1.f) total[m] = V::mul(total[m], V::set1(p.unit));  // a table's codes are multiples of the unit
    float* out = y + (m0 + m) * p.n + first;
    if (valid == V::kLanes) {
      V::store(out, total[m]);
    } else {
      alignas(64) float lanes[V::kLanes];
      V::store(lanes, total[m]);
      std::copy(lanes, lanes + valid, out);
    }
  }
}

// Threads take slices of (panel, lane group) units, weight rows that are contiguous in memory; each walks
// the activations in blocks of kRows rows, so a block stays in cache while the slice's weights pass over it.
template <bool Nibbles, int Table, bool Half>
void run(const Problem& p, float* y) {
  constexpr int64_t kRows = 64;
  constexpr int kTile = V::kLanes == 16 ? 8 : 4;  // activation rows per tile: as many accumulators as registers allow
  const int64_t per_panel = kPanel / V::kLanes, units = p.panels * per_panel;
  at::parallel_for(0, units, p.m == 1 ? 8 : 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = 0; block < p.m; block += kRows) {
      const int64_t block_end = std::min(p.m, block + kRows);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t panel = unit / per_panel, lane0 = (unit % per_panel) * V::kLanes;
        if (panel * kPanel + lane0 >= p.n) continue;  // lanes past the last row: padding
        int64_t m0 = block;
        for (; m0 + kTile <= block_end; m0 += kTile) tile<Nibbles, Table, Half, kTile>(p, m0, panel, lane0, y);
        for (; m0 + 2 <= block_end; m0 += 2) tile<Nibbles, Table, Half, 2>(p, m0, panel, lane0, y);
        for (; m0 < block_end; ++m0) tile<Nibbles, Table, Half, 1>(p, m0, panel, lane0, y);
      }
    }
  });
}

// A block's dynamic scale: e / low, e its value of largest magnitude (the first of that magnitude, as torch's argmax
// picks), the magnitude clamped to [FLT_MIN, FLT_MAX].
inline float block_scale(const float* x, int64_t block, float low) {
  const __m256 sign_mask = _mm256_set1_ps(-0.f);
  __m256 top = _mm256_setzero_ps();
  for (int64_t i = 0; i < block; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign_mask, _mm256_loadu_ps(x + i)));
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  t = _mm_max_ss(t, _mm_movehdup_ps(t));
  const float largest = _mm_cvtss_f32(t);
  float extreme = largest;
  for (int64_t i = 0; i < block; ++i) {
    if (std::fabs(x[i]) == largest) {
      extreme = x[i];
      break;
    }
  }
  const float scale = extreme / low;
  const float magnitude = std::fmin(std::fmax(std::fabs(scale), FLT_MIN), FLT_MAX);
  return scale < 0.f ? -magnitude : magnitude;
}

// quantize_rows for one row: blocks of `block` values (a multiple of 32) to int8 codes and a scale each (`fixed`
// for every block if it is positive: a static scale), and each half-run of 16 codes' sum times its block's scale.
inline void quantize_row(const float* x, int64_t k, int64_t block, int bits, float fixed, int8_t* q, float* d,
                         float* half_sums) {
  const float low = -static_cast<float>(1 << (bits - 1)), high = static_cast<float>((1 << (bits - 1)) - 1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b0 = 0; b0 < k; b0 += block) {
    const float scale = fixed > 0.f ? fixed : block_scale(x + b0, block, low);
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
      // each half-run's sum of codes: bytes widened to int16 pairs, then to int32 (the low 128 bits: codes 0-15)
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), codes);
      const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
      for (int h = 0; h < 2; ++h) {
        __m128i s4 = h == 0 ? _mm256_castsi256_si128(quads) : _mm256_extracti128_si256(quads, 1);
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        half_sums[i / kHalfRun + h] = scale * static_cast<float>(_mm_cvtsi128_si32(s4));
      }
    }
  }
}
