// aarch64 kernel sets of the quantised matmul (layouts and arithmetic: qgemm.cpp):
//   neon-dotprod: the register-tiled kernel of qgemm_tile.inc over 128-bit sdot (Armv8.2 dotprod: Jetson
//     Orin's Cortex-A78AE, Apple M1 and later, Graviton 2 and later).
//   neon-i8mm: prefill over smmla, a 2x8 by 8x2 int8 matrix product (32 multiply-adds per instruction
//     against sdot's 16; Armv8.6 i8mm: Jetson Thor's Neoverse V3AE, Graviton 3 and later, Grace, Apple
//     M2 and later). Decode (1-2 tokens) keeps the sdot kernel: smmla pairs tokens, so a lone token
//     would waste half of each instruction.
//
// sdot multiplies signed by signed bytes, so int8 weights drop their +128 offset (one eor per weight
// vector) instead of being corrected afterwards; int4 codes 0..15 are already valid signed bytes. The
// integer dot products are the other sets' exactly.
//
// Not run on real Arm hardware here: tests/cpp/qgemm_selftest.cpp builds it with a cross compiler and runs
// it under qemu-aarch64 against the float64 reference (tests/test_qgemm_kernels.py).
#if defined(__aarch64__)

#include <arm_neon.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qgemm.h"
#include "target_region.h"

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#define EVLM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace evlm {
namespace {
bool has_dotprod() {
#if defined(__linux__)
  return getauxval(AT_HWCAP) & HWCAP_ASIMDDP;
#elif defined(__APPLE__)
  return true;  // every Apple Silicon core has it
#else
  return false;
#endif
}
bool has_i8mm() {
#if defined(__linux__)
  return has_dotprod() && (getauxval(AT_HWCAP2) & HWCAP2_I8MM);
#elif defined(__APPLE__)
  int v = 0;
  size_t n = sizeof v;
  return sysctlbyname("hw.optional.arm.FEAT_I8MM", &v, &n, nullptr, 0) == 0 && v;
#else
  return false;
#endif
}
}  // namespace

// The set's dot-product instruction alone (KernelSet::peak_loop), for sdot and smmla alike (both
// int32x4 += f(int8x16, int8x16)): 12 accumulators hide its latency, the empty asm keeps them in
// registers. A macro, not a template, so each expansion is compiled in its own set's target region.
#define EVLM_NEON_PEAK_LOOP(DOT)                                                                              \
  int64_t peak_loop(int64_t iters) {                                                                          \
    const int8x16_t w = vdupq_n_s8(1), x = vdupq_n_s8(2);                                                     \
    int32x4_t a0 = vdupq_n_s32(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,     \
              a9 = a0, a10 = a0, a11 = a0;                                                                    \
    for (int64_t i = 0; i < iters; ++i) {                                                                     \
      a0 = DOT(a0, w, x), a1 = DOT(a1, w, x), a2 = DOT(a2, w, x), a3 = DOT(a3, w, x), a4 = DOT(a4, w, x);     \
      a5 = DOT(a5, w, x), a6 = DOT(a6, w, x), a7 = DOT(a7, w, x), a8 = DOT(a8, w, x), a9 = DOT(a9, w, x);     \
      a10 = DOT(a10, w, x), a11 = DOT(a11, w, x);                                                             \
      asm volatile("" : "+w"(a0), "+w"(a1), "+w"(a2), "+w"(a3), "+w"(a4), "+w"(a5), "+w"(a6), "+w"(a7),       \
                   "+w"(a8), "+w"(a9), "+w"(a10), "+w"(a11));                                                 \
    }                                                                                                         \
    return vaddvq_s32(vaddq_s32(vaddq_s32(vaddq_s32(a0, a1), vaddq_s32(a2, a3)),                              \
                                vaddq_s32(vaddq_s32(vaddq_s32(a4, a5), vaddq_s32(a6, a7)),                    \
                                          vaddq_s32(vaddq_s32(a8, a9), vaddq_s32(a10, a11)))));               \
  }

EVLM_TARGET_BEGIN("arch=armv8.2-a+dotprod", "dotprod")
namespace neon {

struct V {
  using I = int32x4_t;
  using F = float32x4_t;
  static constexpr int kL = 4;
  static EVLM_ALWAYS_INLINE I zero_i() { return vdupq_n_s32(0); }
  static EVLM_ALWAYS_INLINE I load_i(const uint8_t* p) { return vreinterpretq_s32_u8(vld1q_u8(p)); }
  static EVLM_ALWAYS_INLINE I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return vdupq_n_s32(v);
  }
  static EVLM_ALWAYS_INLINE I dp(I acc, I w, I x) {
    return vdotq_s32(acc, vreinterpretq_s8_s32(w), vreinterpretq_s8_s32(x));
  }
  static EVLM_ALWAYS_INLINE I w8(I raw) {  // byte w + 128 -> signed w
    return vreinterpretq_s32_u8(veorq_u8(vreinterpretq_u8_s32(raw), vdupq_n_u8(0x80)));
  }
  static EVLM_ALWAYS_INLINE I init8(int32_t) { return vdupq_n_s32(0); }
  static EVLM_ALWAYS_INLINE I low4(I v) { return vreinterpretq_s32_u8(vandq_u8(vreinterpretq_u8_s32(v), vdupq_n_u8(0x0F))); }
  static EVLM_ALWAYS_INLINE I high4(I v) { return vreinterpretq_s32_u8(vshrq_n_u8(vreinterpretq_u8_s32(v), 4)); }
  static EVLM_ALWAYS_INLINE F cvt(I v) { return vcvtq_f32_s32(v); }
  static EVLM_ALWAYS_INLINE F zero_f() { return vdupq_n_f32(0.f); }
  static EVLM_ALWAYS_INLINE F set1_f(float f) { return vdupq_n_f32(f); }
  static EVLM_ALWAYS_INLINE F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static EVLM_ALWAYS_INLINE F load_f(const float* p) { return vld1q_f32(p); }
  static EVLM_ALWAYS_INLINE void store_f(float* p, F v) { vst1q_f32(p, v); }
  static EVLM_ALWAYS_INLINE F load_h(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static EVLM_ALWAYS_INLINE void prefetch(const uint8_t* p) { __builtin_prefetch(p); }
};

#include "qgemm_tile.inc"

EVLM_NEON_PEAK_LOOP(vdotq_s32)

// 32 128-bit registers: int8 3 tokens x 1 row block (12 dot + 12 scale accumulators + 4 weights + 1),
// int4 2 tokens (its nibbles take 8).
template <int BITS>
void rows(const QWeights& w, const QActs& a, int rb0, int rb1, int m0, int m1, float* out, int ldo) {
  tile_rows<BITS, BITS == 8 ? 3 : 2, 1>(w, a, rb0, rb1, m0, m1, out, ldo);
}

}  // namespace neon
EVLM_TARGET_END

EVLM_TARGET_BEGIN("arch=armv8.2-a+dotprod+i8mm", "dotprod,i8mm")
namespace mm {

// smmla(acc, a, b) adds a (2 rows x 8 bytes) times b^T (2 rows x 8 bytes) to acc = [a0.b0, a0.b1, a1.b0,
// a1.b1]. Here a is two weight rows and b two tokens, over 8 values of K in the same order.
//
// Weights come in the shared layout (4 values of K per lane per 64-byte chunk), so two chunks give 8
// values: zip1/zip2 of 4 lanes of chunk c and the same lanes of chunk c + 1 are rows (l0, l1) and
// (l2, l3) with K = 4c..4c+7 (int8), and of one int4 chunk's low and high nibbles the same with
// K = 8c..8c+7 in order. One zip per operand, shared by every token pair of the tile.
//
// Activations of a chunk of tokens are packed in pairs, [pair][K/8][2 tokens x 8 bytes], an odd last
// token paired with zeros; their block scales and group sums (int4 zero points) likewise as
// [pair][blocks or groups][2], so one 64-bit broadcast load gives (t0, t1, t0, t1) to match the
// accumulators.
struct PairPack {
  std::vector<int8_t> q;
  std::vector<float> scale, xsum;
};

void pack_pairs(const QActs& a, int m0, int m1, int ng, int bpg, PairPack& p) {
  const int K = a.K, nb = a.nb, np = (m1 - m0 + 1) / 2;
  p.q.assign(size_t(np) * 2 * K, 0);
  p.scale.assign(size_t(np) * nb * 2, 0.f), p.xsum.assign(size_t(np) * ng * 2, 0.f);
  for (int m = m0; m < m1; ++m) {
    const int i = (m - m0) / 2, t = (m - m0) % 2;
    const int8_t* src = a.q.data() + size_t(m) * K;
    int8_t* dst = p.q.data() + size_t(i) * 2 * K + t * 8;
    for (int o = 0; o < K / 8; ++o) std::memcpy(dst + o * 16, src + o * 8, 8);
    const size_t row = size_t(m) * nb;
    for (int b = 0; b < nb; ++b) p.scale[(size_t(i) * nb + b) * 2 + t] = a.scale[row + b];
    for (int g = 0; g < ng; ++g) {
      float s = 0.f;
      for (int bb = 0; bb < bpg; ++bb) s += a.sum[row + g * bpg + bb];
      p.xsum[(size_t(i) * ng + g) * 2 + t] = s;
    }
  }
}

EVLM_ALWAYS_INLINE float32x4_t dup_pair(const float* p) {  // (p0, p1, p0, p1)
  return vreinterpretq_f32_f64(vld1q_dup_f64(reinterpret_cast<const double*>(p)));
}

// TP token pairs x the 8 rows of half h of row block rb -> acc [TP][4 row pairs][r0t0, r0t1, r1t0, r1t1].
template <int BITS, int TP>
void tile(const QWeights& w, const PairPack& p, int pair0, int rb, int h, float* acc) {
  const int K = w.K, nb = K / kQBlock, ng = K / w.G, bpg = w.G / kQBlock;
  const int8_t* xq[TP];
  const float *xs[TP], *xz[TP];
  for (int i = 0; i < TP; ++i) {
    xq[i] = p.q.data() + size_t(pair0 + i) * 2 * K;
    xs[i] = p.scale.data() + size_t(pair0 + i) * nb * 2, xz[i] = p.xsum.data() + size_t(pair0 + i) * ng * 2;
  }
  for (int j = 0; j < TP * 4; ++j) vst1q_f32(acc + j * 4, vdupq_n_f32(0.f));
  for (int g = 0; g < ng; ++g) {  // accumulators in registers within a group, through acc (L1) between
    float32x4_t gacc[TP][4];
    for (int i = 0; i < TP; ++i)
      for (int r = 0; r < 4; ++r) gacc[i][r] = vdupq_n_f32(0.f);
    for (int bb = 0; bb < bpg; ++bb) {
      const int b = g * bpg + bb;
      int32x4_t dot[TP][4];
      for (int i = 0; i < TP; ++i)
        for (int r = 0; r < 4; ++r) dot[i][r] = vdupq_n_s32(0);
      for (int j = 0; j < 4; ++j) {  // 8 values of K
        int8x16_t wv[4];
        for (int q = 0; q < 2; ++q) {  // lanes 8h + 4q .. 8h + 4q + 3
          uint32x4_t lo, hi;
          if (BITS == 8) {
            const uint8_t* c = w.qw + (size_t(rb) * (K / 4) + size_t(b) * 8 + 2 * j) * 64 + h * 32 + q * 16;
            lo = vreinterpretq_u32_u8(veorq_u8(vld1q_u8(c), vdupq_n_u8(0x80)));  // byte w + 128 -> w
            hi = vreinterpretq_u32_u8(veorq_u8(vld1q_u8(c + 64), vdupq_n_u8(0x80)));
          } else {
            const uint8x16_t raw = vld1q_u8(w.qw + (size_t(rb) * (K / 8) + size_t(b) * 4 + j) * 64 + h * 32 + q * 16);
            lo = vreinterpretq_u32_u8(vandq_u8(raw, vdupq_n_u8(0x0F)));
            hi = vreinterpretq_u32_u8(vshrq_n_u8(raw, 4));
          }
          wv[2 * q] = vreinterpretq_s8_u32(vzip1q_u32(lo, hi));
          wv[2 * q + 1] = vreinterpretq_s8_u32(vzip2q_u32(lo, hi));
        }
        for (int i = 0; i < TP; ++i) {
          const int8x16_t x = vld1q_s8(xq[i] + (size_t(b) * 4 + j) * 16);
          for (int r = 0; r < 4; ++r) dot[i][r] = vmmlaq_s32(dot[i][r], wv[r], x);
        }
      }
      for (int i = 0; i < TP; ++i) {
        const float32x4_t s = dup_pair(xs[i] + b * 2);
        for (int r = 0; r < 4; ++r) gacc[i][r] = vfmaq_f32(gacc[i][r], vcvtq_f32_s32(dot[i][r]), s);
      }
    }
    const size_t so = (size_t(rb) * ng + g) * kQLanes + h * 8;
    for (int q = 0; q < 2; ++q) {
      float32x4_t s4, z4 = vdupq_n_f32(0.f);
      if (BITS == 8) {
        s4 = vld1q_f32(static_cast<const float*>(w.scales) + so + q * 4);
      } else {
        s4 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const uint16_t*>(w.scales) + so + q * 4)));
        z4 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w.zeros + so + q * 4)));
      }
      const float32x4_t s[2] = {vzip1q_f32(s4, s4), vzip2q_f32(s4, s4)};  // (r0, r0, r1, r1), (r2, r2, r3, r3)
      const float32x4_t z[2] = {vzip1q_f32(z4, z4), vzip2q_f32(z4, z4)};
      for (int i = 0; i < TP; ++i)
        for (int e = 0; e < 2; ++e) {
          float* ap = acc + (i * 4 + 2 * q + e) * 4;
          float32x4_t o = vfmaq_f32(vld1q_f32(ap), gacc[i][2 * q + e], s[e]);
          if (BITS == 4) o = vfmaq_f32(o, z[e], dup_pair(xz[i] + g * 2));
          vst1q_f32(ap, o);
        }
    }
  }
}

template <int BITS, int TP>
void tile_any(int tp, const QWeights& w, const PairPack& p, int pair0, int rb, int h, float* acc) {
  if constexpr (TP > 1) {
    if (tp < TP) return tile_any<BITS, TP - 1>(tp, w, p, pair0, rb, h, acc);
  }
  tile<BITS, TP>(w, p, pair0, rb, h, acc);
}

// 32 128-bit registers: 3 token pairs x 4 row pairs take 12 integer and 12 fp32 accumulators, 4 the
// zipped weights.
constexpr int kPairs = 3;

EVLM_NEON_PEAK_LOOP(vmmlaq_s32)

template <int BITS>
void rows(const QWeights& w, const QActs& a, int rb0, int rb1, int m0, int m1, float* out, int ldo) {
  if (m1 - m0 <= 2) return neon::rows<BITS>(w, a, rb0, rb1, m0, m1, out, ldo);
  alignas(16) float acc[kPairs * 4 * 4];
  static thread_local PairPack pack;
  const int ng = w.K / w.G, bpg = w.G / kQBlock;
  for (int mc = m0; mc < m1; mc += neon::kTileChunk) {
    const int mend = std::min(m1, mc + neon::kTileChunk), np = (mend - mc + 1) / 2;
    pack_pairs(a, mc, mend, ng, bpg, pack);
    for (int rb = rb0; rb < rb1; ++rb)
      for (int h = 0; h < 2; ++h) {
        const int n0 = rb * kQLanes + h * 8;
        if (n0 >= w.N) break;
        for (int pr = 0; pr < np; pr += kPairs) {
          const int tp = std::min(kPairs, np - pr);
          tile_any<BITS, kPairs>(tp, w, pack, pr, rb, h, acc);
          for (int i = 0; i < tp; ++i)
            for (int t = 0; t < 2; ++t) {
              const int m = mc + 2 * (pr + i) + t;
              if (m >= mend) break;
              float* o = out + size_t(m) * ldo;
              for (int r = 0; r < 8 && n0 + r < w.N; ++r)  // row r of the half: pair r / 2, element 2 (r % 2) + t
                o[n0 + r] = acc[(i * 4 + r / 2) * 4 + 2 * (r % 2) + t] + (w.bias ? w.bias[n0 + r] : 0.f);
            }
        }
      }
  }
}

}  // namespace mm
EVLM_TARGET_END

namespace {
const KernelSet kI8mm{"neon-i8mm", has_i8mm, true, 128, mm::rows<8>, mm::rows<4>, qacts_quantize_portable,
                      mm::peak_loop, 32};
const KernelSet kNeon{"neon-dotprod", has_dotprod, true, 128, neon::rows<8>, neon::rows<4>, qacts_quantize_portable,
                      neon::peak_loop, 16};
}  // namespace

const std::vector<const KernelSet*>& arch_kernel_sets() {
  static const std::vector<const KernelSet*> sets{&kI8mm, &kNeon};
  return sets;
}

}  // namespace evlm

#endif  // aarch64
