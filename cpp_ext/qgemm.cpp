// Weight-only quantised matmul for the decoder: out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias).
//
// Batch-1 decode reads every weight once per token, so it runs at memory speed only if the kernel
// needs few instructions per weight byte. Converting int8/int4 weights to fp32 and using FMAs costs
// ~3 vector ops per 16 weights, which on two cores is slower than DRAM. Instead the activations are
// quantised too (int8, one scale per 32 values, as llama.cpp's Q8_0 does) and the dot products run in
// integer VNNI instructions: one vpdpbusd does 64 multiply-adds.
//
// Packed layouts (rows padded to a multiple of 16; "lanes" are the 16 rows of a row block, so one zmm
// holds 16 rows' partial sums and no horizontal reductions are needed):
//   int8: qw uint8 [N/16, K/4, 16, 4]  byte = w + 128 (vpdpbusd multiplies unsigned by signed)
//         scales fp32 [N/16, K/G, 16]  w = scale * int8
//   int4: qw uint8 [N/16, K/8, 16, 4]  lane's byte j holds k = 8c + j (low nibble) and 8c + 4 + j (high)
//         scales, zeros fp16 [N/16, K/G, 16]  w = scale * q + zero, q in 0..15 (GGUF Q4_0/Q4_1 exactly)
// Activations: x[m, block b of 32] = xs[m, b] * xq[m, b, :] with xq int8 in -127..127.
//   int8:  sum_k w x = scale * sum_b xs_b * (sum_k (w + 128) xq - 128 sum_k xq)
//   int4:  sum_k w x = scale * sum_b xs_b * sum_k q xq + zero * sum_k x      (exact fp32 sum of x)
//
// Kernels: AVX-512 VNNI (x86-64-v4 + avx512vnni, picked at run time) and a portable C++ path with the
// same arithmetic (integer dot products are exact, so the two differ only in fp32 summation order).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "qgemm.h"
#include "spin_pool.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EVLM_X86 1
#endif

namespace py = pybind11;

namespace evlm {
namespace {

constexpr int kBlock = kQBlock;
constexpr int kLanes = kQLanes;
constexpr int kMTile = 4;   // tokens sharing one weight load
using Acts = QActs;
using Weights = QWeights;

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { man <<= 1, ++e; } while (!(man & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One row block rb, tokens m0..m0+mt-1 -> out rows (16 lanes each, written to tmp[mt][16]).
using BlockFn = void (*)(const Weights&, const Acts&, int rb, int m0, int mt, float* tmp);

// ---- portable path -------------------------------------------------------------------------------
void block_portable(const Weights& w, const Acts& a, int rb, int m0, int mt, float* tmp) {
  const int K = w.K, ng = K / w.G, bpg = w.G / kBlock;
  for (int mi = 0; mi < mt; ++mi) {
    const int m = m0 + mi;
    float acc[kLanes] = {0};
    for (int g = 0; g < ng; ++g) {
      float gacc[kLanes] = {0};
      for (int bb = 0; bb < bpg; ++bb) {
        const int b = g * bpg + bb;
        const int8_t* xq = a.q.data() + size_t(m) * K + size_t(b) * kBlock;
        int32_t dot[kLanes] = {0};
        if (w.bits == 8) {
          const uint8_t* p = w.qw + (size_t(rb) * (K / 4) + size_t(b) * 8) * 64;
          for (int c = 0; c < 8; ++c)
            for (int l = 0; l < kLanes; ++l)
              for (int j = 0; j < 4; ++j) dot[l] += int32_t(p[c * 64 + l * 4 + j]) * xq[4 * c + j];
          for (int l = 0; l < kLanes; ++l) dot[l] -= 128 * a.qsum[size_t(m) * a.nb + b];
        } else {
          const uint8_t* p = w.qw + (size_t(rb) * (K / 8) + size_t(b) * 4) * 64;
          for (int c = 0; c < 4; ++c)
            for (int l = 0; l < kLanes; ++l)
              for (int j = 0; j < 4; ++j) {
                const uint8_t v = p[c * 64 + l * 4 + j];
                dot[l] += int32_t(v & 0xF) * xq[8 * c + j] + int32_t(v >> 4) * xq[8 * c + 4 + j];
              }
        }
        const float xs = a.scale[size_t(m) * a.nb + b];
        for (int l = 0; l < kLanes; ++l) gacc[l] += float(dot[l]) * xs;
      }
      const size_t so = (size_t(rb) * ng + g) * kLanes;
      if (w.bits == 8) {
        const float* s = static_cast<const float*>(w.scales) + so;
        for (int l = 0; l < kLanes; ++l) acc[l] += gacc[l] * s[l];
      } else {
        const uint16_t* s = static_cast<const uint16_t*>(w.scales) + so;
        float xsum = 0.f;
        for (int bb = 0; bb < bpg; ++bb) xsum += a.sum[size_t(m) * a.nb + g * bpg + bb];
        for (int l = 0; l < kLanes; ++l)
          acc[l] += gacc[l] * half_to_float(s[l]) + half_to_float(w.zeros[so + l]) * xsum;
      }
    }
    std::memcpy(tmp + mi * kLanes, acc, sizeof acc);
  }
}

// ---- AVX-512 VNNI path ---------------------------------------------------------------------------
#ifdef EVLM_X86
#define EVLM_V4 __attribute__((target("arch=x86-64-v4,avx512vnni")))
// Decode streams each weight byte once, so the stream is prefetched explicitly this far ahead. Measured
// here: 2 KB vs 4 KB vs none made no difference that this shared machine's noise did not swamp (the
// int8 path reads 30-49 GB/s depending on the moment, int4 up to ~60); kept as a tuning knob.
int g_prefetch = 2048;  // bytes; EDGEVLM_QGEMM_PREFETCH overrides it (read once, with the kernel set)

template <int BITS, int MT>
EVLM_V4 void block_vnni_t(const Weights& w, const Acts& a, int rb, int m0, float* tmp) {
  const int K = w.K, ng = K / w.G, bpg = w.G / kBlock, nb = a.nb;
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
          if (MT == 1) _mm_prefetch(reinterpret_cast<const char*>(p + c * 64 + g_prefetch), _MM_HINT_T0);
          const __m512i wv = _mm512_loadu_si512(p + c * 64);
          for (int i = 0; i < MT; ++i) {
            int32_t x4;
            std::memcpy(&x4, xq[i] + b * kBlock + 4 * c, 4);
            if (c & 1)
              dot2[i] = _mm512_dpbusd_epi32(dot2[i], wv, _mm512_set1_epi32(x4));
            else
              dot[i] = _mm512_dpbusd_epi32(dot[i], wv, _mm512_set1_epi32(x4));
          }
        }
        for (int i = 0; i < MT; ++i)
          dot[i] = _mm512_sub_epi32(_mm512_add_epi32(dot[i], dot2[i]),
                                    _mm512_set1_epi32(128 * a.qsum[size_t(m0 + i) * nb + b]));
      } else {
        const uint8_t* p = w.qw + (size_t(rb) * (K / 8) + size_t(b) * 4) * 64;
        for (int c = 0; c < 4; ++c) {
          if (MT == 1) _mm_prefetch(reinterpret_cast<const char*>(p + c * 64 + g_prefetch), _MM_HINT_T0);
          const __m512i v = _mm512_loadu_si512(p + c * 64);
          const __m512i lo = _mm512_and_si512(v, low4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          for (int i = 0; i < MT; ++i) {
            int32_t xl, xh;
            std::memcpy(&xl, xq[i] + b * kBlock + 8 * c, 4);
            std::memcpy(&xh, xq[i] + b * kBlock + 8 * c + 4, 4);
            dot[i] = _mm512_dpbusd_epi32(dot[i], lo, _mm512_set1_epi32(xl));
            dot2[i] = _mm512_dpbusd_epi32(dot2[i], hi, _mm512_set1_epi32(xh));
          }
        }
        for (int i = 0; i < MT; ++i) dot[i] = _mm512_add_epi32(dot[i], dot2[i]);
      }
      for (int i = 0; i < MT; ++i)
        gacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_set1_ps(a.scale[size_t(m0 + i) * nb + b]),
                                  gacc[i]);
    }
    const size_t so = (size_t(rb) * ng + g) * kLanes;
    if (BITS == 8) {
      const __m512 s = _mm512_loadu_ps(static_cast<const float*>(w.scales) + so);
      for (int i = 0; i < MT; ++i) acc[i] = _mm512_fmadd_ps(gacc[i], s, acc[i]);
    } else {
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w.scales) + so)));
      const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.zeros + so)));
      for (int i = 0; i < MT; ++i) {
        float xsum = 0.f;
        for (int bb = 0; bb < bpg; ++bb) xsum += a.sum[size_t(m0 + i) * nb + g * bpg + bb];
        acc[i] = _mm512_fmadd_ps(gacc[i], s, acc[i]);
        acc[i] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum), acc[i]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) _mm512_storeu_ps(tmp + i * kLanes, acc[i]);
}

template <int BITS>
EVLM_V4 void block_vnni(const Weights& w, const Acts& a, int rb, int m0, int mt, float* tmp) {
  switch (mt) {
    case 4: return block_vnni_t<BITS, 4>(w, a, rb, m0, tmp);
    case 3: return block_vnni_t<BITS, 3>(w, a, rb, m0, tmp);
    case 2: return block_vnni_t<BITS, 2>(w, a, rb, m0, tmp);
    default: return block_vnni_t<BITS, 1>(w, a, rb, m0, tmp);
  }
}
#endif

// ---- dispatch and threading ----------------------------------------------------------------------
struct KernelSet {
  const char* name;
  BlockFn int8, int4;
};

const KernelSet kPortable{"portable", block_portable, block_portable};
#ifdef EVLM_X86
const KernelSet kVnni{"avx512-vnni", block_vnni<8>, block_vnni<4>};
#endif

const KernelSet* g_set = nullptr;

const KernelSet& kernel_set() {
  if (!g_set) {
    g_set = &kPortable;
#ifdef EVLM_X86
    if (const char* pf = std::getenv("EDGEVLM_QGEMM_PREFETCH")) g_prefetch = std::clamp(std::atoi(pf), 0, 1 << 16);
#endif
#ifdef EVLM_X86
    const char* env = std::getenv("EDGEVLM_QGEMM");
    const bool want_portable = env && std::string(env) == "portable";
    __builtin_cpu_init();
    if (!want_portable && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      g_set = &kVnni;
#endif
  }
  return *g_set;
}

// Leaked on purpose, like the preprocessing pool; a forked child has no workers, so it starts afresh.
SpinPool* g_qpool = nullptr;
std::mutex* g_qmutex = new std::mutex;
void qgemm_atfork_child() {
  g_qpool = nullptr;
  g_qmutex = new std::mutex;
}
thread_local Acts tl_acts;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("qgemm: " + msg); }

void qgemm(int bits, uintptr_t x_ptr, int M, int K, uintptr_t qw_ptr, int N, uintptr_t scales_ptr,
           uintptr_t zeros_ptr, int G, uintptr_t bias_ptr, uintptr_t out_ptr, int threads) {
  if (bits != 8 && bits != 4) fail("bits must be 8 or 4, got " + std::to_string(bits));
  if (M < 1 || N < 1 || K < 1) fail("M, N, K must be positive");
  if (K % kBlock) fail("K=" + std::to_string(K) + " is not a multiple of 32");
  if (G < kBlock || G % kBlock || K % G) fail("group " + std::to_string(G) + " must be a multiple of 32 dividing K");
  if (!x_ptr || !qw_ptr || !scales_ptr || !out_ptr || (bits == 4 && !zeros_ptr)) fail("null pointer");
  if (threads < 1 || threads > 256) fail("threads must be in 1..256");
  const Weights w{bits, N, K, G, reinterpret_cast<const uint8_t*>(qw_ptr), reinterpret_cast<const void*>(scales_ptr),
                  reinterpret_cast<const uint16_t*>(zeros_ptr), reinterpret_cast<const float*>(bias_ptr)};
  const float* x = reinterpret_cast<const float*>(x_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  const int nrb = (N + kLanes - 1) / kLanes;

  py::gil_scoped_release release;  // pointers are owned by tensors the caller holds for the call
  Acts& a = tl_acts;
  qacts_resize(M, K, a);
  std::unique_lock<std::mutex> lk;
  SpinPool* pool = qgemm_pool(std::min(threads, nrb), lk);
  threads = pool ? std::min(threads, nrb) : 1;
  // Row blocks split evenly (decode: each thread streams its share of the weights once).
  const std::function<void(int)> body = [&](int t) {
    qgemm_row_blocks(w, a, int(int64_t(nrb) * t / threads), int(int64_t(nrb) * (t + 1) / threads), out);
  };
  if (pool) {
    if (M >= 8) {  // a long prompt's activations are worth quantising in parallel (rows are independent)
      const std::function<void(int)> quant = [&](int t) {
        qacts_quantize(x, int(int64_t(M) * t / threads), int(int64_t(M) * (t + 1) / threads), a);
      };
      pool->run(threads, quant);
    } else {
      qacts_quantize(x, 0, M, a);
    }
    pool->run(threads, body);
  } else {
    qacts_quantize(x, 0, M, a);
    body(0);
  }
}

std::string qgemm_kernels() { return kernel_set().name; }

}  // namespace

// ---- entry points shared with decode_step.cpp (qgemm.h) ------------------------------------------
void qacts_resize(int M, int K, QActs& a) {
  a.M = M, a.K = K, a.nb = K / kBlock;
  a.q.resize(size_t(M) * K), a.scale.resize(size_t(M) * a.nb), a.qsum.resize(size_t(M) * a.nb);
  a.sum.resize(size_t(M) * a.nb);
}

void qacts_quantize(const float* x, int m0, int m1, QActs& a) {
  const int K = a.K;
  for (int m = m0; m < m1; ++m)
    for (int b = 0; b < a.nb; ++b) {
      const float* xb = x + size_t(m) * K + size_t(b) * kBlock;
      float amax = 0.f, s = 0.f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i])), s += xb[i];
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int8_t* qb = a.q.data() + size_t(m) * K + size_t(b) * kBlock;
      int32_t qs = 0;
      for (int i = 0; i < kBlock; ++i) {
        const int v = int(std::nearbyint(xb[i] * inv));
        qb[i] = int8_t(std::clamp(v, -127, 127));
        qs += qb[i];
      }
      a.scale[size_t(m) * a.nb + b] = d, a.qsum[size_t(m) * a.nb + b] = qs, a.sum[size_t(m) * a.nb + b] = s;
    }
}

void qgemm_row_blocks(const QWeights& w, const QActs& a, int rb0, int rb1, float* out) {
  const KernelSet& ks = kernel_set();
  const BlockFn fn = w.bits == 8 ? ks.int8 : ks.int4;
  const int M = a.M, N = w.N;
  // For long prompts every thread walks all tokens in tiles of 4 over its row blocks, weights staying in L2.
  float tmp[kMTile * kLanes];
  constexpr int kMChunk = 64;  // tokens per pass over the row blocks (keeps xq in L2)
  for (int mc = 0; mc < M; mc += kMChunk) {
    const int mend = std::min(M, mc + kMChunk);
    for (int rb = rb0; rb < rb1; ++rb) {
      const int n0 = rb * kLanes, nl = std::min(kLanes, N - n0);
      for (int m0 = mc; m0 < mend; m0 += kMTile) {
        const int mt = std::min(kMTile, mend - m0);
        fn(w, a, rb, m0, mt, tmp);
        for (int i = 0; i < mt; ++i) {
          float* o = out + size_t(m0 + i) * N + n0;
          for (int l = 0; l < nl; ++l) o[l] = tmp[i * kLanes + l] + (w.bias ? w.bias[n0 + l] : 0.f);
        }
      }
    }
  }
}

SpinPool* qgemm_pool(int threads, std::unique_lock<std::mutex>& lk) {
  kernel_set();  // picked here, on the calling thread, before any worker asks for it
  if (threads < 2) return nullptr;
  std::unique_lock<std::mutex> mine(*g_qmutex, std::try_to_lock);
  if (!mine.owns_lock()) return nullptr;  // another caller owns the pool: run inline
  if (!g_qpool) g_qpool = new SpinPool;
  g_qpool->grow(threads);
  lk = std::move(mine);
  return g_qpool;
}

}  // namespace evlm

void register_qgemm(py::module_& m) {
#if defined(__unix__) || defined(__APPLE__)
  pthread_atfork(nullptr, nullptr, evlm::qgemm_atfork_child);
#endif
  m.def("qgemm", &evlm::qgemm, py::arg("bits"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("qweight"),
        py::arg("N"), py::arg("scales"), py::arg("zeros"), py::arg("group"), py::arg("bias"), py::arg("out"),
        py::arg("threads"),
        R"doc(out[M, N] = x[M, K] @ dequant(W)^T + bias, from raw data pointers (edgevlm.runtime.quant checks
dtypes, shapes and contiguity before calling). x, out, bias: float32; qweight/scales/zeros in the packed
layouts described in cpp_ext/qgemm.cpp. Activations are quantised to int8 per 32 values inside.
Releases the GIL.)doc");
  m.def("qgemm_kernels", &evlm::qgemm_kernels,
        "The quantised-matmul kernel set in use: 'avx512-vnni' or 'portable' (EDGEVLM_QGEMM=portable forces it).");
}
