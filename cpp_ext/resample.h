// PIL-compatible bicubic resampling kernels for edgevlm's view preprocessing.
//
// Semantics follow Pillow's libImaging/Resample.c for 8-bit images (re-derived, not copied):
//   * Keys cubic with a = -0.5, support 2 scaled by the downscale factor (antialiased);
//   * per output sample, taps [xmin, xmax) with xmin = int(center - support + 0.5), clipped to the
//     input, weights normalised over those in-bounds taps, then quantised to 22-bit fixed point;
//   * two passes, horizontal first, each rounded to the nearest integer and clamped to [0, 255].
// We keep PIL's exact quantised weights (k / 2^22 is exact in float) and round + clamp where PIL
// does, but accumulate in float: the result equals PIL's except where a float sum lands within
// ~1e-5 of a .5 boundary (measured: a handful of pixels per frame, each off by one level).
//
// Layouts: pixel rows are interleaved RGB float (3 floats per pixel) with finite slack at the end,
// so the vector loads below may read past the last real pixel (times a zero weight).
//
// Vector code uses GCC/Clang vector extensions at the CPU's native width W (16 floats with AVX-512,
// 8 with AVX2, 4 with SSE2 or NEON). The width must be native: a 16-float type on an AVX2 target is
// lowered through the stack and ran 4x slower than this. On x86-64 with GCC each kernel is compiled
// three times (target attributes) and one set is picked at load time; elsewhere (Jetson's aarch64,
// Clang) the portable 4-wide code is built for the baseline ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

// Vector helpers are always inlined into their ISA-specific callers, so GCC's ABI note about wide
// vector arguments does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(EVLM_NO_DISPATCH)
#define EVLM_X86_DISPATCH 1
#endif

namespace evlm {

#define EVLM_INLINE static inline __attribute__((always_inline))

constexpr int kPrecisionBits = 22;  // PIL: 32 - 8 (pixel) - 2 (headroom for negative lobes)

// One resampling direction: `out` outputs from `in` virtual inputs of which [off, off + len) are real
// image samples and the rest is constant padding. `start`/`count` index the real segment; `bias` is the
// summed weight of the padding taps (multiplied by the pad colour at run time).
struct Table {
  int in = 0, off = 0, len = 0, out = 0;
  int maxcount = 1;  // widest real window (ring size for the vertical pass)
  int lo = 0, hi = 0;  // outputs [lo, hi) have real taps; the others are pure padding (monotone windows)
  int width = 16;    // horizontal: vector width W (floats) the expanded weights are laid out for
  int nchunk = 1;    // horizontal: taps in chunks of W/4 pixels, padded
  std::vector<int32_t> start, count;
  std::vector<float> w;     // [out][maxcount], zero past count
  std::vector<float> wexp;  // horizontal [out][nchunk][W]: each weight x3 (RGB), lanes >= 3W/4 zero
  std::vector<float> bias;  // [out]
};

inline double bicubic_kernel(double x) {
  const double a = -0.5;  // PIL's (and OpenCV's INTER_CUBIC uses -0.75, torch -0.75: not those)
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

inline std::shared_ptr<Table> make_table(int in, int off, int len, int out, bool horizontal, int width) {
  auto t = std::make_shared<Table>();
  t->in = in, t->off = off, t->len = len, t->out = out;
  // Coefficients exactly as PIL computes them, in double, over the whole virtual input.
  const double scale = double(in) / double(out);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  const double ss = 1.0 / filterscale;
  const int ksize = int(std::ceil(support)) * 2 + 1;
  std::vector<double> k(ksize);
  std::vector<float> wq(ksize);
  t->start.assign(out, 0);
  t->count.assign(out, 0);
  t->bias.assign(out, 0.f);
  std::vector<std::vector<float>> real(out);
  for (int xx = 0; xx < out; ++xx) {
    const double center = (xx + 0.5) * scale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in) xmax = in;
    const int n = xmax - xmin;
    double ww = 0.0;
    for (int x = 0; x < n; ++x) {
      k[x] = bicubic_kernel((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    float bias = 0.f;
    int first = -1, last = -1;
    for (int x = 0; x < n; ++x) {
      const double v = ww != 0.0 ? k[x] / ww : k[x];
      const double s = v * double(1 << kPrecisionBits);
      const int q = v < 0 ? int(-0.5 + s) : int(0.5 + s);  // PIL's normalize_coeffs_8bpc
      wq[x] = float(q) / float(1 << kPrecisionBits);        // exact: |q| < 2^24
      const int src = x + xmin;
      if (src >= off && src < off + len) {
        // Horizontal windows drop zero weights at their ends. Vertical windows keep them: the
        // ring buffer of the vertical pass relies on window starts and ends never decreasing.
        if (q != 0 || !horizontal) {
          if (first < 0) first = x;
          last = x;
        }
      } else {
        bias += wq[x];  // padding taps fold into one constant (sums of k/2^22 stay exact)
      }
    }
    t->bias[xx] = bias;
    if (first >= 0) {  // real taps
      t->start[xx] = first + xmin - off;
      t->count[xx] = last - first + 1;
      real[xx].assign(wq.begin() + first, wq.begin() + last + 1);
    } else {
      t->start[xx] = 0;  // pure padding: no real taps (start kept in range for pointer maths)
    }
    if (t->count[xx] > t->maxcount) t->maxcount = t->count[xx];
  }
  t->lo = out, t->hi = 0;
  for (int xx = 0; xx < out; ++xx)
    if (t->count[xx] > 0) t->lo = std::min(t->lo, xx), t->hi = xx + 1;
  if (t->hi == 0) t->lo = 0;
  t->w.assign(size_t(out) * t->maxcount, 0.f);
  for (int xx = 0; xx < out; ++xx)
    std::copy(real[xx].begin(), real[xx].end(), t->w.begin() + size_t(xx) * t->maxcount);
  if (horizontal) {
    const int px = width / 4;  // pixels per chunk: 3 * px of the W lanes carry data
    t->width = width;
    t->nchunk = (t->maxcount + px - 1) / px;
    t->wexp.assign(size_t(out) * t->nchunk * width, 0.f);
    for (int xx = 0; xx < out; ++xx)
      for (int j = 0; j < t->count[xx]; ++j)
        for (int c = 0; c < 3; ++c)
          t->wexp[(size_t(xx) * t->nchunk + j / px) * width + 3 * (j % px) + c] = real[xx][j];
  }
  return t;
}

// ---- native-width vectors --------------------------------------------------------------------

template <int W>
struct VT;
template <>
struct VT<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
};
template <>
struct VT<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
template <>
struct VT<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
};
template <int W>
using vf = typename VT<W>::f;
template <int W>
using vi = typename VT<W>::i;

#if defined(__clang__)
#define EVLM_SHUF(W, v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#define EVLM_SHUF2(W, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define EVLM_SHUF(W, v, ...) __builtin_shuffle(v, vi<W>{__VA_ARGS__})
#define EVLM_SHUF2(W, a, b, ...) __builtin_shuffle(a, b, vi<W>{__VA_ARGS__})
#endif

template <int W>
EVLM_INLINE vf<W> loadv(const float* p) {
  vf<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int W>
EVLM_INLINE void storev(float* p, vf<W> v) {
  std::memcpy(p, &v, sizeof v);
}

// PIL's 8-bit output step: clip to [0, 255] then floor(x + 0.5). Clamping first keeps the int
// conversion in range; for x in [0, 255] truncation equals floor.
template <int W>
EVLM_INLINE vf<W> round_clamp(vf<W> v) {
  const vf<W> zero = {}, hi = zero + 255.f;
  v = v < zero ? zero : v;
  v = v > hi ? hi : v;
  return __builtin_convertvector(__builtin_convertvector(v + 0.5f, vi<W>), vf<W>);
}

// Lanes {c, c+3, c+6, ...} of a horizontal accumulator belong to channel c: fold them into 0..2.
template <int W>
EVLM_INLINE vf<W> fold_rgb(vf<W> a) {
  if constexpr (W == 16) {
    a += EVLM_SHUF(16, a, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5);
    return a + EVLM_SHUF(16, a, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2);
  } else if constexpr (W == 8) {
    return a + EVLM_SHUF(8, a, 3, 4, 5, 6, 7, 0, 1, 2);
  } else {
    return a;  // one pixel per chunk: already RGB
  }
}

// ---- horizontal pass ----------------------------------------------------------------------------
// For each output pixel, chunks of W/4 input pixels (3W/4 floats) are multiplied by a pre-expanded
// weight vector. ROWS rows share every weight load (streaming the weight table from L2 cost as much
// as the arithmetic). With W = 16 four outputs are folded together by shuffles so that rounding,
// clamping and the store happen once per 4 pixels (the per-pixel tail was the bottleneck).
// dst rows receive 3 * t.out floats plus 4 floats of scratch (overlapping 16-byte stores).

template <int W, int N, int ROWS>
EVLM_INLINE void hpass_acc(const float* const* src, int off, const float* __restrict w, int nc, vf<W> init,
                           vf<W>* acc) {
  constexpr int P = W / 4;
  for (int r = 0; r < ROWS; ++r) acc[r] = init;
  for (int i = 0; i < (N > 0 ? N : nc); ++i) {
    const vf<W> wv = loadv<W>(w + W * i);
    for (int r = 0; r < ROWS; ++r) acc[r] += loadv<W>(src[r] + off + 3 * P * i) * wv;
  }
}

template <int W, int N, int ROWS>
EVLM_INLINE void hpass_body(const float* const* src, const Table& t, vf<W> pad3, float* const* dst) {
  const int nc = N > 0 ? N : t.nchunk;
  const int32_t* start = t.start.data();
  const float* bias = t.bias.data();
  const float* wexp = t.wexp.data();
  const size_t wstep = size_t(nc) * W;
  // Outputs whose taps all fall in the padding are the pad colour: no multiply-adds (a portrait
  // frame on its padded square has most of its columns there).
  // Stores go left to right: each 16-byte store spills into the next pixel, which is written later.
  auto padding = [&](int from, int to) {
    for (int x = from; x < to; ++x) {
      const vf<W> v = round_clamp<W>(pad3 * bias[x]);
      for (int r = 0; r < ROWS; ++r) std::memcpy(dst[r] + 3 * x, &v, 16);
    }
  };
  padding(0, t.lo);
  int x = t.lo;
  if constexpr (W == 16) {
    for (; x + 4 <= t.hi; x += 4) {
      const float* w = wexp + size_t(x) * wstep;
      vf<16> a[ROWS], b[ROWS], c[ROWS], d[ROWS];
      hpass_acc<16, N, ROWS>(src, 3 * start[x], w, nc, pad3 * bias[x], a);
      hpass_acc<16, N, ROWS>(src, 3 * start[x + 1], w + wstep, nc, pad3 * bias[x + 1], b);
      hpass_acc<16, N, ROWS>(src, 3 * start[x + 2], w + 2 * wstep, nc, pad3 * bias[x + 2], c);
      hpass_acc<16, N, ROWS>(src, 3 * start[x + 3], w + 3 * wstep, nc, pad3 * bias[x + 3], d);
      for (int r = 0; r < ROWS; ++r) {
        const vf<16> sa = a[r] + EVLM_SHUF(16, a[r], 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5);
        const vf<16> sb = b[r] + EVLM_SHUF(16, b[r], 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5);
        const vf<16> sc = c[r] + EVLM_SHUF(16, c[r], 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5);
        const vf<16> sd = d[r] + EVLM_SHUF(16, d[r], 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5);
        vf<16> ab = EVLM_SHUF2(16, sa, sb, 0, 1, 2, 3, 4, 5, 16, 17, 18, 19, 20, 21, 0, 0, 0, 0);
        vf<16> cd = EVLM_SHUF2(16, sc, sd, 0, 1, 2, 3, 4, 5, 16, 17, 18, 19, 20, 21, 0, 0, 0, 0);
        ab += EVLM_SHUF(16, ab, 3, 4, 5, 0, 0, 0, 9, 10, 11, 0, 0, 0, 0, 0, 0, 0);  // a in 0..2, b in 6..8
        cd += EVLM_SHUF(16, cd, 3, 4, 5, 0, 0, 0, 9, 10, 11, 0, 0, 0, 0, 0, 0, 0);
        const vf<16> rgb4 = EVLM_SHUF2(16, ab, cd, 0, 1, 2, 6, 7, 8, 16, 17, 18, 22, 23, 24, 0, 0, 0, 0);
        storev<16>(dst[r] + 3 * x, round_clamp<16>(rgb4));  // 12 floats + 4 overwritten next
      }
    }
  }
  for (; x < t.hi; ++x) {
    vf<W> s[ROWS];
    hpass_acc<W, N, ROWS>(src, 3 * start[x], wexp + size_t(x) * wstep, nc, pad3 * bias[x], s);
    for (int r = 0; r < ROWS; ++r) {
      const vf<W> v = round_clamp<W>(fold_rgb<W>(s[r]));
      std::memcpy(dst[r] + 3 * x, &v, 16);
    }
  }
  padding(t.hi, t.out);
}

template <int W, int ROWS>
EVLM_INLINE void hpass_dispatch(const float* const* src, const Table& t, vf<W> pad3, float* const* dst) {
  switch (t.nchunk) {  // fixed trip counts let the compiler unroll the common window sizes
    case 1: hpass_body<W, 1, ROWS>(src, t, pad3, dst); break;
    case 2: hpass_body<W, 2, ROWS>(src, t, pad3, dst); break;
    case 3: hpass_body<W, 3, ROWS>(src, t, pad3, dst); break;
    case 4: hpass_body<W, 4, ROWS>(src, t, pad3, dst); break;
    case 5: hpass_body<W, 5, ROWS>(src, t, pad3, dst); break;
    case 6: hpass_body<W, 6, ROWS>(src, t, pad3, dst); break;
    default: hpass_body<W, 0, ROWS>(src, t, pad3, dst); break;
  }
}

// `rows` (1..4) interleaved RGB rows -> their horizontal passes. `pad3`: pad colour in lanes 0..2.
template <int W>
EVLM_INLINE void hpass_rows_impl(int rows, const float* const* src, const Table& t, const float* pad3p,
                                 float* const* dst) {
  const vf<W> pad3 = loadv<W>(pad3p);
  if (rows == 4) {
    hpass_dispatch<W, 4>(src, t, pad3, dst);
  } else if (rows == 2) {
    hpass_dispatch<W, 2>(src, t, pad3, dst);
  } else {
    for (int r = 0; r < rows; ++r) hpass_dispatch<W, 1>(src + r, t, pad3, dst + r);
  }
}

// ---- vertical pass, conversions -----------------------------------------------------------------

// dst[j] = round_clamp(bias * padrow[j] + sum_k w[k] * rows[k][j]) for j < n (n a multiple of 64;
// every row buffer has that much finite data). Four accumulators hide the FMA latency.
template <int W>
EVLM_INLINE void vpass_impl(float* __restrict dst, int n, const float* const* rows, const float* w, int ntaps,
                            const float* padrow, float bias) {
  for (int j = 0; j < n; j += 4 * W) {
    vf<W> a0 = loadv<W>(padrow + j) * bias, a1 = loadv<W>(padrow + j + W) * bias;
    vf<W> a2 = loadv<W>(padrow + j + 2 * W) * bias, a3 = loadv<W>(padrow + j + 3 * W) * bias;
    for (int k = 0; k < ntaps; ++k) {
      const float* r = rows[k] + j;
      const vf<W> wk = vf<W>{} + w[k];
      a0 += loadv<W>(r) * wk, a1 += loadv<W>(r + W) * wk, a2 += loadv<W>(r + 2 * W) * wk, a3 += loadv<W>(r + 3 * W) * wk;
    }
    storev<W>(dst + j, round_clamp<W>(a0)), storev<W>(dst + j + W, round_clamp<W>(a1));
    storev<W>(dst + j + 2 * W, round_clamp<W>(a2)), storev<W>(dst + j + 3 * W, round_clamp<W>(a3));
  }
}

// Interleaved RGB (0..255) -> three normalised planes: d_c = v * a_c + b_c, a_c = 1/(255 std_c),
// b_c = -mean_c / std_c. Plain loops: the compiler vectorises them for each target.
EVLM_INLINE void normalize_impl(const float* __restrict src, int n, float* __restrict d0, float* __restrict d1,
                                float* __restrict d2, const float* a, const float* b) {
  const float a0 = a[0], a1 = a[1], a2 = a[2], b0 = b[0], b1 = b[1], b2 = b[2];
  for (int x = 0; x < n; ++x) {
    d0[x] = src[3 * x] * a0 + b0;
    d1[x] = src[3 * x + 1] * a1 + b1;
    d2[x] = src[3 * x + 2] * a2 + b2;
  }
}

EVLM_INLINE void u8_to_f32_impl(const uint8_t* __restrict s, float* __restrict d, int n) {
  for (int i = 0; i < n; ++i) d[i] = float(s[i]);
}

// ---- per-ISA instantiation and dispatch ---------------------------------------------------------

struct Kernels {
  const char* name;
  int width;
  void (*hpass_rows)(int, const float* const*, const Table&, const float*, float* const*);
  void (*vpass_row)(float*, int, const float* const*, const float*, int, const float*, float);
  void (*normalize_row)(const float*, int, float*, float*, float*, const float*, const float*);
  void (*u8_to_f32)(const uint8_t*, float*, int);
};

#define EVLM_DEFINE_KERNELS(SUFFIX, W, ATTR)                                                                \
  ATTR static void hpass_rows_##SUFFIX(int rows, const float* const* src, const Table& t, const float* pad3, \
                                       float* const* dst) {                                                  \
    hpass_rows_impl<W>(rows, src, t, pad3, dst);                                                             \
  }                                                                                                          \
  ATTR static void vpass_row_##SUFFIX(float* dst, int n, const float* const* rows, const float* w, int ntaps, \
                                      const float* padrow, float bias) {                                     \
    vpass_impl<W>(dst, n, rows, w, ntaps, padrow, bias);                                                     \
  }                                                                                                          \
  ATTR static void normalize_row_##SUFFIX(const float* src, int n, float* d0, float* d1, float* d2,          \
                                          const float* a, const float* b) {                                  \
    normalize_impl(src, n, d0, d1, d2, a, b);                                                                \
  }                                                                                                          \
  ATTR static void u8_to_f32_##SUFFIX(const uint8_t* s, float* d, int n) { u8_to_f32_impl(s, d, n); }

EVLM_DEFINE_KERNELS(base, 4, )
#if defined(EVLM_X86_DISPATCH)
EVLM_DEFINE_KERNELS(v3, 8, __attribute__((target("arch=x86-64-v3"))))
EVLM_DEFINE_KERNELS(v4, 16, __attribute__((target("arch=x86-64-v4"))))
#endif

#if defined(__aarch64__)
#define EVLM_BASE_NAME "aarch64 neon (4-wide)"
#elif defined(__x86_64__)
#define EVLM_BASE_NAME "x86-64 sse2 (4-wide)"
#else
#define EVLM_BASE_NAME "portable (4-wide vectors)"
#endif

inline const Kernels kKernelsBase{EVLM_BASE_NAME, 4, hpass_rows_base, vpass_row_base, normalize_row_base,
                                  u8_to_f32_base};
#if defined(EVLM_X86_DISPATCH)
inline const Kernels kKernelsV3{"x86-64-v3 avx2+fma (8-wide)", 8, hpass_rows_v3, vpass_row_v3, normalize_row_v3,
                                u8_to_f32_v3};
inline const Kernels kKernelsV4{"x86-64-v4 avx512 (16-wide)", 16, hpass_rows_v4, vpass_row_v4, normalize_row_v4,
                                u8_to_f32_v4};
#endif

// The kernels this CPU runs; `request` ("avx512", "avx2", "sse2"/"base", "" = best) may only lower it.
inline const Kernels* select_kernels(const std::string& request) {
#if defined(EVLM_X86_DISPATCH)
  __builtin_cpu_init();
  const bool v4 = __builtin_cpu_supports("x86-64-v4"), v3 = __builtin_cpu_supports("x86-64-v3");
  if ((request.empty() || request == "avx512") && v4) return &kKernelsV4;
  if ((request.empty() || request == "avx512" || request == "avx2") && v3) return &kKernelsV3;
#endif
  (void)request;
  return &kKernelsBase;
}

}  // namespace evlm
