// aarch64 kernel set of the quantised matmul (layouts and arithmetic: qgemm.cpp): neon-dotprod, the
// register-tiled kernel of qgemm_tile.inc over 128-bit sdot (Armv8.2 dotprod: Jetson Orin's Cortex-A78AE,
// Apple M1 and later, Graviton 2 and later).
//
// sdot multiplies signed by signed bytes, so int8 weights drop their +128 offset (one eor per weight
// vector) instead of being corrected afterwards; int4 codes 0..15 are already valid signed bytes. The
// integer dot products are the other sets' exactly.
//
// Not run on real Arm hardware here: tests/cpp/qgemm_selftest.cpp builds it with a cross compiler and runs
// it under qemu-aarch64 against the float64 reference (tests/test_qgemm_kernels.py).
#if defined(__aarch64__)

#include <arm_neon.h>

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
}  // namespace

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

// 12 accumulators hide sdot's latency; the empty asm keeps them in registers.
int64_t peak_loop(int64_t iters) {
  const int8x16_t w = vdupq_n_s8(1), x = vdupq_n_s8(2);
  int32x4_t a0 = vdupq_n_s32(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
            a10 = a0, a11 = a0;
  for (int64_t i = 0; i < iters; ++i) {
    a0 = vdotq_s32(a0, w, x), a1 = vdotq_s32(a1, w, x), a2 = vdotq_s32(a2, w, x), a3 = vdotq_s32(a3, w, x);
    a4 = vdotq_s32(a4, w, x), a5 = vdotq_s32(a5, w, x), a6 = vdotq_s32(a6, w, x), a7 = vdotq_s32(a7, w, x);
    a8 = vdotq_s32(a8, w, x), a9 = vdotq_s32(a9, w, x), a10 = vdotq_s32(a10, w, x), a11 = vdotq_s32(a11, w, x);
    asm volatile("" : "+w"(a0), "+w"(a1), "+w"(a2), "+w"(a3), "+w"(a4), "+w"(a5), "+w"(a6), "+w"(a7), "+w"(a8),
                 "+w"(a9), "+w"(a10), "+w"(a11));
  }
  return vaddvq_s32(vaddq_s32(vaddq_s32(vaddq_s32(a0, a1), vaddq_s32(a2, a3)),
                              vaddq_s32(vaddq_s32(vaddq_s32(a4, a5), vaddq_s32(a6, a7)),
                                        vaddq_s32(vaddq_s32(a8, a9), vaddq_s32(a10, a11)))));
}

// 32 128-bit registers: int8 3 tokens x 1 row block (12 dot + 12 scale accumulators + 4 weights + 1),
// int4 2 tokens (its nibbles take 8).
template <int BITS>
void rows(const QWeights& w, const QActs& a, int rb0, int rb1, int m0, int m1, float* out, int ldo) {
  tile_rows<BITS, BITS == 8 ? 3 : 2, 1>(w, a, rb0, rb1, m0, m1, out, ldo);
}

}  // namespace neon
EVLM_TARGET_END

namespace {
const KernelSet kNeon{"neon-dotprod", has_dotprod, true, 128, neon::rows<8>, neon::rows<4>, qacts_quantize_portable,
                      neon::peak_loop};
}  // namespace

const std::vector<const KernelSet*>& arch_kernel_sets() {
  static const std::vector<const KernelSet*> sets{&kNeon};
  return sets;
}

}  // namespace evlm

#endif  // aarch64
