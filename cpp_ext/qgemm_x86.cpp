// x86-64 kernel sets of the quantised matmul (layouts and arithmetic: qgemm.cpp):
//
//   avx512-vnni       512-bit vpdpbusd (Intel Ice Lake / Sapphire Rapids and later, AMD Zen 4 and later)
//   avx-vnni          256-bit VEX vpdpbusd, 16 registers (Intel Alder Lake and later client CPUs, which
//                     have no AVX-512)
//   avx512vl-vnni256  the avx-vnni kernels' source built with the EVEX encoding of the same instruction.
//                     Never picked on its own: it lets a machine with AVX-512 VNNI but no AVX-VNNI (AMD
//                     Zen 4, most Xeons) run and test the 256-bit kernels' arithmetic.
//
// Each set is its own namespace compiled under its own target (target_region.h: a pragma region, not a whole-file -m
// flag: nothing here may leak wide instructions into code that every CPU runs). Prefill (4 or more
// tokens) runs the register-tiled kernel of qgemm_tile.inc; AVX-512 decode (1 to 3 tokens) keeps its
// own weight-streaming kernel, whose two accumulator chains per row block hide vpdpbusd's latency.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qgemm.h"
#include "target_region.h"

#define EVLM_ALWAYS_INLINE inline __attribute__((always_inline))
// What the 512-bit set and the EVEX build of the 256-bit one are compiled for.
#define EVLM_AVX512_VNNI "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"

namespace evlm {
namespace {

// Decode streams each weight byte once, so the stream is prefetched explicitly this far ahead. Measured
// here: 2 KB vs 4 KB vs none made no difference that this shared machine's noise did not swamp (the
// int8 path reads 30-49 GB/s depending on the moment, int4 up to ~60); kept as a tuning knob.
const int g_prefetch = [] {
  const char* pf = std::getenv("EDGEVLM_QGEMM_PREFETCH");
  return pf ? std::clamp(std::atoi(pf), 0, 1 << 16) : 2048;
}();

bool has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

bool has_avx_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("avxvnni");
}

}  // namespace

// ==== AVX-512 VNNI ================================================================================
EVLM_TARGET_BEGIN(EVLM_AVX512_VNNI, EVLM_AVX512_VNNI)
namespace v512 {

struct V {
  using I = __m512i;
  using F = __m512;
  static constexpr int kL = 16;
  static EVLM_ALWAYS_INLINE I zero_i() { return _mm512_setzero_si512(); }
  static EVLM_ALWAYS_INLINE I load_i(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static EVLM_ALWAYS_INLINE I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static EVLM_ALWAYS_INLINE I dp(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static EVLM_ALWAYS_INLINE I w8(I raw) { return raw; }  // keep the +128: vpdpbusd wants unsigned bytes
  static EVLM_ALWAYS_INLINE I init8(int32_t qsum) { return _mm512_set1_epi32(-128 * qsum); }
  static EVLM_ALWAYS_INLINE I low4(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  static EVLM_ALWAYS_INLINE I high4(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
  static EVLM_ALWAYS_INLINE F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static EVLM_ALWAYS_INLINE F zero_f() { return _mm512_setzero_ps(); }
  static EVLM_ALWAYS_INLINE F set1_f(float f) { return _mm512_set1_ps(f); }
  static EVLM_ALWAYS_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static EVLM_ALWAYS_INLINE F load_f(const float* p) { return _mm512_loadu_ps(p); }
  static EVLM_ALWAYS_INLINE void store_f(float* p, F v) { _mm512_storeu_ps(p, v); }
  static EVLM_ALWAYS_INLINE F load_h(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static EVLM_ALWAYS_INLINE void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
};

#include "qgemm_tile.inc"

// Decode: one row block, 1 to 3 tokens, weights streamed from DRAM with an explicit prefetch.
template <int BITS, int MT>
void decode_block(const QWeights& w, const QActs& a, int rb, int m0, float* tmp) {
  const int K = w.K, ng = K / w.G, bpg = w.G / kQBlock, nb = a.nb;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
  const int8_t* xq[MT];
  for (int i = 0; i < MT; ++i) xq[i] = a.q.data() + size_t(m0 + i) * K;
  for (int g = 0; g < ng; ++g) {
    __m512 gacc[MT];
    for (int i = 0; i < MT; ++i) gacc[i] = _mm512_setzero_ps();
    for (int bb = 0; bb < bpg; ++bb) {
      const int b = g * bpg + bb;
      // Two accumulators per token: vpdpbusd's latency would otherwise chain all of a block's steps.
      __m512i dot[MT], dot2[MT];
      for (int i = 0; i < MT; ++i) dot[i] = dot2[i] = _mm512_setzero_si512();
      if (BITS == 8) {
        const uint8_t* p = w.qw + (size_t(rb) * (K / 4) + size_t(b) * 8) * 64;
        for (int c = 0; c < 8; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(p + c * 64 + g_prefetch), _MM_HINT_T0);
          const __m512i wv = _mm512_loadu_si512(p + c * 64);
          for (int i = 0; i < MT; ++i) {
            const __m512i x = V::bcast4(xq[i] + b * kQBlock + 4 * c);
            if (c & 1)
              dot2[i] = _mm512_dpbusd_epi32(dot2[i], wv, x);
            else
              dot[i] = _mm512_dpbusd_epi32(dot[i], wv, x);
          }
        }
        for (int i = 0; i < MT; ++i)
          dot[i] = _mm512_sub_epi32(_mm512_add_epi32(dot[i], dot2[i]),
                                    _mm512_set1_epi32(128 * a.qsum[size_t(m0 + i) * nb + b]));
      } else {
        const uint8_t* p = w.qw + (size_t(rb) * (K / 8) + size_t(b) * 4) * 64;
        for (int c = 0; c < 4; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(p + c * 64 + g_prefetch), _MM_HINT_T0);
          const __m512i v = _mm512_loadu_si512(p + c * 64);
          const __m512i lo = _mm512_and_si512(v, low4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          for (int i = 0; i < MT; ++i) {
            dot[i] = _mm512_dpbusd_epi32(dot[i], lo, V::bcast4(xq[i] + b * kQBlock + 8 * c));
            dot2[i] = _mm512_dpbusd_epi32(dot2[i], hi, V::bcast4(xq[i] + b * kQBlock + 8 * c + 4));
          }
        }
        for (int i = 0; i < MT; ++i) dot[i] = _mm512_add_epi32(dot[i], dot2[i]);
      }
      for (int i = 0; i < MT; ++i)
        gacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_set1_ps(a.scale[size_t(m0 + i) * nb + b]),
                                  gacc[i]);
    }
    const size_t so = (size_t(rb) * ng + g) * kQLanes;
    if (BITS == 8) {
      const __m512 s = _mm512_loadu_ps(static_cast<const float*>(w.scales) + so);
      for (int i = 0; i < MT; ++i) acc[i] = _mm512_fmadd_ps(gacc[i], s, acc[i]);
    } else {
      const __m512 s = V::load_h(static_cast<const uint16_t*>(w.scales) + so);
      const __m512 z = V::load_h(w.zeros + so);
      for (int i = 0; i < MT; ++i) {
        float xsum = 0.f;
        for (int bb = 0; bb < bpg; ++bb) xsum += a.sum[size_t(m0 + i) * nb + g * bpg + bb];
        acc[i] = _mm512_fmadd_ps(gacc[i], s, acc[i]);
        acc[i] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum), acc[i]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) _mm512_storeu_ps(tmp + i * kQLanes, acc[i]);
}

template <int BITS>
void rows(const QWeights& w, const QActs& a, int rb0, int rb1, int m0, int m1, float* out, int ldo) {
  if (m1 - m0 >= 4) return tile_rows<BITS, BITS == 8 ? 6 : 5, 2>(w, a, rb0, rb1, m0, m1, out, ldo);
  alignas(64) float tmp[3 * kQLanes];
  for (int rb = rb0; rb < rb1; ++rb) {
    const int mt = m1 - m0;
    if (mt == 3) decode_block<BITS, 3>(w, a, rb, m0, tmp);
    else if (mt == 2) decode_block<BITS, 2>(w, a, rb, m0, tmp);
    else decode_block<BITS, 1>(w, a, rb, m0, tmp);
    const int n0 = rb * kQLanes, nl = std::min(kQLanes, w.N - n0);
    for (int i = 0; i < mt; ++i)
      for (int l = 0; l < nl; ++l) out[size_t(m0 + i) * ldo + n0 + l] = tmp[i * kQLanes + l] + (w.bias ? w.bias[n0 + l] : 0.f);
  }
}

// The portable quantiser's exact roundings (fp32 max|x| / 127, x * (1 / d), nearest-even via the
// default MXCSR mode), 16 values per instruction; only the fp32 sum of x is added in another order.
void quantize(const float* x, int m0, int m1, QActs& a) {
  const int K = a.K;
  for (int m = m0; m < m1; ++m)
    for (int b = 0; b < a.nb; ++b) {
      const float* xb = x + size_t(m) * K + size_t(b) * kQBlock;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      const __m512 vi = _mm512_set1_ps(inv);
      const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
      const __m512i q0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x0, vi)), lo), hi);
      const __m512i q1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x1, vi)), lo), hi);
      int8_t* qb = a.q.data() + size_t(m) * K + size_t(b) * kQBlock;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(q1));
      const size_t i = size_t(m) * a.nb + b;
      a.scale[i] = d, a.qsum[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      a.sum[i] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
    }
}

// 12 accumulators hide vpdpbusd's latency; the empty asm keeps them in registers (an array spills).
int64_t peak_loop(int64_t iters) {
  const __m512i w = _mm512_set1_epi8(1), x = _mm512_set1_epi8(2);
  __m512i a0 = w, a1 = w, a2 = w, a3 = w, a4 = w, a5 = w, a6 = w, a7 = w, a8 = w, a9 = w, a10 = w, a11 = w;
  for (int64_t i = 0; i < iters; ++i) {
    a0 = _mm512_dpbusd_epi32(a0, w, x), a1 = _mm512_dpbusd_epi32(a1, w, x), a2 = _mm512_dpbusd_epi32(a2, w, x);
    a3 = _mm512_dpbusd_epi32(a3, w, x), a4 = _mm512_dpbusd_epi32(a4, w, x), a5 = _mm512_dpbusd_epi32(a5, w, x);
    a6 = _mm512_dpbusd_epi32(a6, w, x), a7 = _mm512_dpbusd_epi32(a7, w, x), a8 = _mm512_dpbusd_epi32(a8, w, x);
    a9 = _mm512_dpbusd_epi32(a9, w, x), a10 = _mm512_dpbusd_epi32(a10, w, x), a11 = _mm512_dpbusd_epi32(a11, w, x);
    asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(a8),
                 "+v"(a9), "+v"(a10), "+v"(a11));
  }
  const __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                     _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11))));
}

}  // namespace v512
EVLM_TARGET_END

// ==== 256-bit VNNI (AVX-VNNI, and the same source in EVEX encoding) ==============================
// 16 ymm registers without AVX-512: tiles of 3 tokens x 1 row block (int8: 6 dot + 6 scale
// accumulators + 2 weight vectors + 1 broadcast), 2 tokens for int4 (its nibbles take 4 more).
#define EVLM_V256_KERNELS(DP)                                                                              \
  struct V {                                                                                             \
    using I = __m256i;                                                                                   \
    using F = __m256;                                                                                    \
    static constexpr int kL = 8;                                                                         \
    static EVLM_ALWAYS_INLINE I zero_i() { return _mm256_setzero_si256(); }                               \
    static EVLM_ALWAYS_INLINE I load_i(const uint8_t* p) {                                               \
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));                                    \
    }                                                                                                    \
    static EVLM_ALWAYS_INLINE I bcast4(const int8_t* p) {                                                \
      int32_t v;                                                                                         \
      std::memcpy(&v, p, 4);                                                                             \
      return _mm256_set1_epi32(v);                                                                       \
    }                                                                                                    \
    static EVLM_ALWAYS_INLINE I dp(I acc, I w, I x) { return DP(acc, w, x); }                            \
    static EVLM_ALWAYS_INLINE I w8(I raw) { return raw; }                                                \
    static EVLM_ALWAYS_INLINE I init8(int32_t qsum) { return _mm256_set1_epi32(-128 * qsum); }           \
    static EVLM_ALWAYS_INLINE I low4(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }         \
    static EVLM_ALWAYS_INLINE I high4(I v) {                                                             \
      return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));                          \
    }                                                                                                    \
    static EVLM_ALWAYS_INLINE F cvt(I v) { return _mm256_cvtepi32_ps(v); }                                \
    static EVLM_ALWAYS_INLINE F zero_f() { return _mm256_setzero_ps(); }                                  \
    static EVLM_ALWAYS_INLINE F set1_f(float f) { return _mm256_set1_ps(f); }                             \
    static EVLM_ALWAYS_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }                   \
    static EVLM_ALWAYS_INLINE F load_f(const float* p) { return _mm256_loadu_ps(p); }                     \
    static EVLM_ALWAYS_INLINE void store_f(float* p, F v) { _mm256_storeu_ps(p, v); }                     \
    static EVLM_ALWAYS_INLINE F load_h(const uint16_t* p) {                                              \
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));                       \
    }                                                                                                    \
    static EVLM_ALWAYS_INLINE void prefetch(const uint8_t* p) {                                          \
      _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);                                       \
    }                                                                                                    \
  };                                                                                                     \
  int64_t peak_loop(int64_t iters) {                                                                     \
    const __m256i w = _mm256_set1_epi8(1), x = _mm256_set1_epi8(2);                                      \
    __m256i a0 = w, a1 = w, a2 = w, a3 = w, a4 = w, a5 = w, a6 = w, a7 = w, a8 = w, a9 = w, a10 = w, a11 = w; \
    for (int64_t i = 0; i < iters; ++i) {                                                                \
      a0 = DP(a0, w, x), a1 = DP(a1, w, x), a2 = DP(a2, w, x), a3 = DP(a3, w, x), a4 = DP(a4, w, x);     \
      a5 = DP(a5, w, x), a6 = DP(a6, w, x), a7 = DP(a7, w, x), a8 = DP(a8, w, x), a9 = DP(a9, w, x);     \
      a10 = DP(a10, w, x), a11 = DP(a11, w, x);                                                          \
      asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7),  \
                   "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));                                            \
    }                                                                                                    \
    int32_t out[8];                                                                                      \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),                                                 \
                        _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)), \
                                         _mm256_add_epi32(_mm256_add_epi32(a4, a5), _mm256_add_epi32(a6, a7)))); \
    return int64_t(out[0]) + out[7] + _mm256_extract_epi32(_mm256_add_epi32(a8, _mm256_add_epi32(a9, _mm256_add_epi32(a10, a11))), 0); \
  }

// Tiles of 3 tokens (int8) or 2 (int4) over one row block, for every token count.
#define EVLM_V256_ROWS                                                                                     \
  template <int BITS>                                                                                    \
  void rows(const QWeights& w, const QActs& a, int rb0, int rb1, int m0, int m1, float* out, int ldo) {  \
    tile_rows<BITS, BITS == 8 ? 3 : 2, 1>(w, a, rb0, rb1, m0, m1, out, ldo);                             \
  }

namespace avx2_quant {
// AVX2 version of v512::quantize (same roundings; only the fp32 sum of x is added in another order).
EVLM_TARGET_BEGIN("avx2,fma", "avx2,fma")
EVLM_ALWAYS_INLINE float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
EVLM_ALWAYS_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
void quantize(const float* x, int m0, int m1, QActs& a) {
  const int K = a.K;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes packs' per-128-bit interleave
  for (int m = m0; m < m1; ++m)
    for (int b = 0; b < a.nb; ++b) {
      const float* xb = x + size_t(m) * K + size_t(b) * kQBlock;
      __m256 v[4];
      __m256 mx = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(xb + 8 * j);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
        sm = _mm256_add_ps(sm, v[j]);
      }
      const float amax = hmax8(mx), d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      const __m256 vi = _mm256_set1_ps(inv);
      __m256i q[4];
      __m256i qs = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        q[j] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[j], vi)), lo), hi);
        qs = _mm256_add_epi32(qs, q[j]);
      }
      const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + size_t(m) * K + size_t(b) * kQBlock),
                          _mm256_permutevar8x32_epi32(p16, order));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      const size_t i = size_t(m) * a.nb + b;
      a.scale[i] = d, a.qsum[i] = _mm_cvtsi128_si32(s4), a.sum[i] = hsum8(sm);
    }
}
EVLM_TARGET_END
}  // namespace avx2_quant

EVLM_TARGET_BEGIN("avx2,fma,f16c,avxvnni", "avx2,fma,f16c,avxvnni")
namespace vex256 {
EVLM_V256_KERNELS(_mm256_dpbusd_avx_epi32)
#include "qgemm_tile.inc"
EVLM_V256_ROWS
}  // namespace vex256
EVLM_TARGET_END

EVLM_TARGET_BEGIN(EVLM_AVX512_VNNI, EVLM_AVX512_VNNI)
namespace evex256 {
EVLM_V256_KERNELS(_mm256_dpbusd_epi32)
#include "qgemm_tile.inc"
EVLM_V256_ROWS
}  // namespace evex256
EVLM_TARGET_END

namespace {
const KernelSet kAvx512{"avx512-vnni", has_avx512_vnni, true, 512, v512::rows<8>, v512::rows<4>, v512::quantize,
                        v512::peak_loop, 64};
const KernelSet kAvxVnni{"avx-vnni", has_avx_vnni, true, 256, vex256::rows<8>, vex256::rows<4>, avx2_quant::quantize,
                         vex256::peak_loop, 32};
const KernelSet kEvex256{"avx512vl-vnni256", has_avx512_vnni, false, 256, evex256::rows<8>, evex256::rows<4>,
                         avx2_quant::quantize, evex256::peak_loop, 32};
}  // namespace

const std::vector<const KernelSet*>& arch_kernel_sets() {
  static const std::vector<const KernelSet*> sets{&kAvx512, &kAvxVnni, &kEvex256};
  return sets;
}

}  // namespace evlm

#endif  // x86-64
