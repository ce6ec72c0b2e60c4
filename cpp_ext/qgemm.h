// The quantised matmul's building blocks, shared by qgemm.cpp (edgevlm._C.qgemm, called per projection
// from Python) and decode_step.cpp (a whole decode step in C++, which calls the same kernels directly).
// Layouts and arithmetic are described at the top of qgemm.cpp.
#pragma once

#include <cstdint>
#include <mutex>
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

// Sizes `a` for M tokens of K values (allocates only when it grows).
void qacts_resize(int M, int K, QActs& a);
// Quantises rows m0..m1-1 of x [M, K] into `a` (sized by qacts_resize).
void qacts_quantize(const float* x, int m0, int m1, QActs& a);
// out[m, n] (+ bias) for the rows n of row blocks rb0..rb1-1 (16 rows each, the last one may be short)
// and every token m of `a`; out's row stride is w.N. The kernel set (VNNI or portable) is the one
// edgevlm._C.qgemm_kernels() names.
void qgemm_row_blocks(const QWeights& w, const QActs& a, int rb0, int rb1, float* out);

// The worker pool every quantised kernel shares. Returns it grown to `threads` with `lk` holding its
// lock, or nullptr (run inline on the calling thread, same numbers) when threads < 2 or another
// caller holds the pool right now. Call it before qgemm_row_blocks (it also picks the kernel set).
SpinPool* qgemm_pool(int threads, std::unique_lock<std::mutex>& lk);

}  // namespace evlm
