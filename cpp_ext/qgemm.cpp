// Weight-only quantised matmul for the decoder: out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias).
//
// Batch-1 decode reads every weight once per token, so it runs at memory speed only if the kernel
// needs few instructions per weight byte. Converting int8/int4 weights to fp32 and using FMAs costs
// ~3 vector ops per 16 weights, which on two cores is slower than DRAM. Instead the activations are
// quantised too (int8, one scale per 32 values, as llama.cpp's Q8_0 does) and the dot products run in
// integer dot-product instructions: one AVX-512 vpdpbusd does 64 multiply-adds.
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
// Kernel sets, picked at run time (active_kernel_set): AVX-512 VNNI, AVX-VNNI (256-bit, Intel client
// CPUs), NEON i8mm and dotprod (aarch64), and the portable C++ path here, which is written as plainly as the
// arithmetic above so that it reads as the reference for the others. Integer dot products are exact in
// every set, so sets differ only in fp32 summation order.
#include "qgemm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace evlm {
namespace {

constexpr int kBlock = kQBlock;
constexpr int kLanes = kQLanes;

// ---- portable path -------------------------------------------------------------------------------
// Row block rb, token m -> 16 lanes of out (before bias).
void block_portable(const QWeights& w, const QActs& a, int rb, int m, float* lanes) {
  const int K = w.K, ng = K / w.G, bpg = w.G / kBlock;
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
      for (int l = 0; l < kLanes; ++l) acc[l] += gacc[l] * half_to_float(s[l]) + half_to_float(w.zeros[so + l]) * xsum;
    }
  }
  std::memcpy(lanes, acc, sizeof acc);
}

void rows_portable(const QWeights& w, const QActs& a, int rb0, int rb1, int m0, int m1, float* out, int ldo) {
  float lanes[kLanes];
  for (int rb = rb0; rb < rb1; ++rb) {
    const int n0 = rb * kLanes, nl = std::min(kLanes, w.N - n0);
    for (int m = m0; m < m1; ++m) {
      block_portable(w, a, rb, m, lanes);
      float* o = out + size_t(m) * ldo + n0;
      for (int l = 0; l < nl; ++l) o[l] = lanes[l] + (w.bias ? w.bias[n0 + l] : 0.f);
    }
  }
}

bool always() { return true; }

const KernelSet kPortable{"portable", always, true, 0, rows_portable, rows_portable, qacts_quantize_portable, nullptr, 0};

// ---- dispatch ------------------------------------------------------------------------------------
std::atomic<const KernelSet*> g_set{nullptr};
std::mutex g_set_mutex;

const KernelSet* find_set(const std::string& name) {
  for (const KernelSet* s : arch_kernel_sets())
    if (name == s->name && s->runs_here()) return s;
  return name == kPortable.name ? &kPortable : nullptr;
}

const KernelSet* automatic_set() {
  for (const KernelSet* s : arch_kernel_sets())
    if (s->automatic && s->runs_here()) return s;
  return &kPortable;
}

std::string sets_here_text() {
  std::string t;
  for (const std::string& n : kernel_sets_here()) t += (t.empty() ? "'" : ", '") + n + "'";
  return t;
}

// Leaked on purpose, like the preprocessing pool; a forked child has no workers, so it starts afresh.
SpinPool* g_qpool = nullptr;
std::mutex* g_qmutex = new std::mutex;
void qgemm_atfork_child() {
  g_qpool = nullptr;
  g_qmutex = new std::mutex;
}
thread_local QActs tl_acts;

}  // namespace

#if !defined(__x86_64__) && !defined(_M_X64) && !defined(__aarch64__)
const std::vector<const KernelSet*>& arch_kernel_sets() {
  static const std::vector<const KernelSet*> none;
  return none;
}
#endif

const KernelSet& active_kernel_set() {
  const KernelSet* s = g_set.load(std::memory_order_acquire);
  if (s) return *s;
  std::lock_guard<std::mutex> lk(g_set_mutex);
  if (!(s = g_set.load())) {
    s = automatic_set();
    if (const char* env = std::getenv("EDGEVLM_QGEMM"); env && *env) {
      // A name this CPU cannot run falls back to the automatic choice rather than failing in a worker.
      if (const KernelSet* asked = find_set(env)) s = asked;
    }
#if defined(__unix__) || defined(__APPLE__)
    static bool hooked = (pthread_atfork(nullptr, nullptr, qgemm_atfork_child), true);
    (void)hooked;
#endif
    g_set.store(s, std::memory_order_release);
  }
  return *s;
}

std::vector<std::string> kernel_sets_here() {
  std::vector<std::string> names;
  for (const KernelSet* s : arch_kernel_sets())
    if (s->runs_here()) names.emplace_back(s->name);
  names.emplace_back(kPortable.name);
  return names;
}

void use_kernel_set(const std::string& name) {
  const KernelSet* s = name.empty() ? automatic_set() : find_set(name);
  if (!s) throw std::invalid_argument("qgemm: no kernel set '" + name + "' on this CPU; it runs " + sets_here_text());
  active_kernel_set();  // env read and fork hook installed first, so this choice is not overwritten
  g_set.store(s, std::memory_order_release);
}

void qacts_resize(int M, int K, QActs& a) {
  a.M = M, a.K = K, a.nb = K / kBlock;
  a.q.resize(size_t(M) * K), a.scale.resize(size_t(M) * a.nb), a.qsum.resize(size_t(M) * a.nb);
  a.sum.resize(size_t(M) * a.nb);
}

void qacts_quantize_portable(const float* x, int m0, int m1, QActs& a) {
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

void qacts_quantize(const float* x, int m0, int m1, QActs& a) { active_kernel_set().quantize(x, m0, m1, a); }

void qgemm_row_blocks(const QWeights& w, const QActs& a, int rb0, int rb1, float* out, int ldo) {
  const KernelSet& ks = active_kernel_set();
  (w.bits == 8 ? ks.int8 : ks.int4)(w, a, rb0, rb1, 0, a.M, out, ldo);
}

SpinPool* qgemm_pool(int threads, std::unique_lock<std::mutex>& lk) {
  active_kernel_set();  // picked here, on the calling thread, before any worker asks for it
  if (threads < 2) return nullptr;
  std::unique_lock<std::mutex> mine(*g_qmutex, std::try_to_lock);
  if (!mine.owns_lock()) return nullptr;  // another caller owns the pool: run inline
  if (!g_qpool) g_qpool = new SpinPool;
  g_qpool->grow(threads);
  lk = std::move(mine);
  return g_qpool;
}

double kernel_set_peak_gops(int threads, double seconds) {
  const KernelSet& ks = active_kernel_set();
  if (!ks.peak_loop || threads < 1) return 0.0;
  // 12 instructions per round, 2 ops per multiply-add.
  const double ops_per_round = 12.0 * ks.peak_macs * 2;
  int64_t iters = 1 << 16;
  for (;;) {  // grow until one thread's loop takes a tenth of the budget, then run it on every thread
    const auto t0 = std::chrono::steady_clock::now();
    volatile int64_t sink = ks.peak_loop(iters);
    (void)sink;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > seconds / 10 || iters > (int64_t(1) << 40)) {
      iters = std::max<int64_t>(1, int64_t(iters * (seconds / std::max(dt, 1e-9))));
      break;
    }
    iters *= 4;
  }
  std::vector<std::thread> pool;
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&] { volatile int64_t sink = ks.peak_loop(iters); (void)sink; });
  for (std::thread& t : pool) t.join();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return ops_per_round * double(iters) * threads / dt / 1e9;
}

void qgemm_run(const QWeights& w, const float* x, int M, float* out, int threads) {
  const int nrb = (w.N + kLanes - 1) / kLanes;
  QActs& a = tl_acts;
  qacts_resize(M, w.K, a);
  std::unique_lock<std::mutex> lk;
  SpinPool* pool = qgemm_pool(std::min(threads, nrb), lk);
  threads = pool ? std::min(threads, nrb) : 1;
  // Row blocks split evenly (decode: each thread streams its share of the weights once).
  const std::function<void(int)> body = [&](int t) {
    qgemm_row_blocks(w, a, int(int64_t(nrb) * t / threads), int(int64_t(nrb) * (t + 1) / threads), out, w.N);
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

}  // namespace evlm
