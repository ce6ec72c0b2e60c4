// The quantised matmul's building blocks, shared by qgemm_py.cpp (edgevlm._C.qgemm, called per projection
// from Python), decode_step.cpp (a whole decode step in C++, which calls the same kernels directly) and
// tests/cpp/qgemm_selftest.cpp (the kernels alone, built for another CPU and run under emulation).
// Layouts and arithmetic are described at the top of qgemm.cpp; the kernel sets are in qgemm_x86.cpp,
// qgemm_arm.cpp and (the portable one, the reference the others are read against) qgemm.cpp.
#pragma once

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "spin_pool.h"

namespace evlm {

constexpr int kQBlock = 32;  // activation quantisation block
constexpr int kQLanes = 16;  // rows per row block

// Quantised activations of M tokens: int8 values, one scale per block, per-block sums.
struct QActs {
  int M = 0, K = 0, nb = 0;
  std::vector<int8_t> q;       // [M, K]
  std::vector<float> scale;    // [M, nb]
  std::vector<int32_t> qsum;   // [M, nb]  sum of q (int8 weights' +128 correction)
  std::vector<float> sum;      // [M, nb]  exact sum of x (int4 zero points)
};

struct QWeights {
  int bits;            // 8 or 4
  int N, K, G;         // logical rows, columns, group size (G divides K, multiple of 32)
  const uint8_t* qw;
  const void* scales;  // fp32 (int8) or fp16 (int4)
  const uint16_t* zeros;
  const float* bias;   // [N] or null
};

// out[m, n] (+ bias) for row blocks rb0..rb1-1 and tokens m0..m1-1 of `a`; out's rows are ldo floats apart.
using RowsFn = void (*)(const QWeights& w, const QActs& a, int rb0, int rb1, int m0, int m1, float* out, int ldo);
// Rows m0..m1-1 of x [M, K] into `a` (sized by qacts_resize).
using QuantizeFn = void (*)(const float* x, int m0, int m1, QActs& a);

// One instruction set's kernels. Every set computes the same integer dot products exactly; sets differ
// only in the order of their fp32 scaling and accumulation (and in the sum of x, for int4's zero points).
struct KernelSet {
  const char* name;
  bool (*runs_here)();  // this CPU has the instructions
  bool automatic;       // picked without being asked for (false: a test instantiation of another set's code)
  int vector_bits;      // 512, 256, 128, or 0 (portable); decode_step.cpp picks its fp32 loops to match
  RowsFn int8, int4;
  QuantizeFn quantize;
  // The set's dot-product instruction alone: `iters` rounds of 12 independent accumulations, no memory
  // traffic (null for portable). Its rate is the integer peak the prefill kernels are judged against.
  int64_t (*peak_loop)(int64_t iters);
  int peak_macs;  // byte multiply-adds per instruction of peak_loop (vpdpbusd zmm 64, sdot 16, smmla 32)
};

// Sets in order of preference (x86: avx512-vnni, avx-vnni, avx512vl-vnni256; aarch64: neon-i8mm,
// neon-dotprod).
const std::vector<const KernelSet*>& arch_kernel_sets();

// Sizes `a` for M tokens of K values (allocates only when it grows).
void qacts_resize(int M, int K, QActs& a);
// Quantises rows m0..m1-1 of x [M, K] into `a` with the active set's quantiser (every set rounds the same:
// scale = max|x| / 127, nearest-even).
void qacts_quantize(const float* x, int m0, int m1, QActs& a);
void qacts_quantize_portable(const float* x, int m0, int m1, QActs& a);
// out[m, n] (+ bias) for the rows n of row blocks rb0..rb1-1 (16 rows each, the last one may be short)
// and every token m of `a`; out's rows are ldo floats apart (w.N for a whole matmul). Runs the active
// kernel set.
void qgemm_row_blocks(const QWeights& w, const QActs& a, int rb0, int rb1, float* out, int ldo);

// The active kernel set. Picked on first use: EDGEVLM_QGEMM names one (or "portable"), else the first set
// of arch_kernel_sets() that is automatic and runs here, else portable.
const KernelSet& active_kernel_set();
// Names of the sets this CPU can run, best first (portable last).
std::vector<std::string> kernel_sets_here();
// Makes `name` the active set ("" = the automatic choice); throws std::invalid_argument naming the sets
// this CPU can run. Not for use while another thread is inside a kernel.
void use_kernel_set(const std::string& name);

// GOP/s (2 per multiply-add) of the active set's dot-product instruction on `threads` threads, about
// `seconds` long; 0 for the portable set.
double kernel_set_peak_gops(int threads, double seconds);

// Whole matmul on `threads` threads (the pool when free, else inline): out[M, N] = x[M, K] @ W^T + bias.
void qgemm_run(const QWeights& w, const float* x, int M, float* out, int threads);

// The worker pool every quantised kernel shares. Returns it grown to `threads` with `lk` holding its
// lock, or nullptr (run inline on the calling thread, same numbers) when threads < 2 or another
// caller holds the pool right now. Call it before qgemm_row_blocks (it also picks the kernel set).
SpinPool* qgemm_pool(int threads, std::unique_lock<std::mutex>& lk);

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

}  // namespace evlm
