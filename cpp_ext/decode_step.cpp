// edgevlm._C.DecodePlan: one batch-1 step of M tokens (a decode step, M = 1, or a prefill) of a quantised
// LLaMA-style decoder, every layer in C++.
//
// The Python step (runtime/decoder.py) spends about a third of a small model's token in the
// interpreter and in small torch ops between the quantised matmuls; its prefill, half of a 128-token
// prompt's time in elementwise ops and attention calls (measured on SmolLM2-135M int8, 2 threads).
// Here one call runs, per layer and for each token (position p),
//
//   h = rmsnorm(x) -> qkv = qgemm(h) (+ B (A h)) -> rope(q, k) -> cache[l, :, :, p] = k, v
//     -> att = softmax(q k^T / sqrt(Dh)) v over positions 0..p (GQA: head h reads kv head h / (H / Hkv))
//     -> x += qgemm_o(att) (+ side) -> h = rmsnorm(x) -> gu = qgemm(h) (+ side)
//     -> x += qgemm_down(silu(gate) * up) (+ side)
//
// and returns x before the final norm (Python applies decoder.norm and lm_head, so the logits come
// from the same modules as the ordinary path). The matmuls are the very kernels edgevlm._C.qgemm runs
// (qgemm.h), on the same shared worker pool; rope, attention and the norms are plain fp32 C++.
//
// Everything is raw pointers: runtime/quant/fused_decode.py checks dtype, contiguity and size of every
// tensor once and keeps them alive; this file checks only the structure it is given (sizes that must
// agree, offsets that must tile the output, null pointers).
//
// Buffers per step (batch 1, M tokens): x [M, D]; h [M, max(D, I)]; qkv [M, (H + 2 Hkv) Dh] (q | k | v,
// the order of the fused projection); att [M, H Dh]; gu [M, 2 I] (gate | up); act [M, I]; tmp [M, D];
// side [M, sum of ranks]; scores [threads, p + M]. K/V cache: float [L, 1, Hkv, max_len, Dh].
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "qgemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#define EVLM_X86 1
#endif

namespace py = pybind11;

namespace evlm {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("DecodePlan: " + msg); }

// Attention work (heads x positions x head_dim) from which the heads are split over the worker pool.
constexpr size_t kParallelAttention = size_t(1) << 17;

// ---- fp32 math helpers ---------------------------------------------------------------------------
// Written so that -O3 vectorises them without -ffast-math: dot products keep 16 independent partial
// sums (a plain `s += a[i] * b[i]` is a serial chain the compiler may not reorder), and exp is a
// polynomial the compiler can unroll across lanes (std::exp is a scalar libm call per element: at a
// 2k context that alone would cost milliseconds per token). On x86 the helpers are built twice more,
// for x86-64-v3 (AVX2 + FMA) and v4 (AVX-512), and picked at run time like the qgemm kernels.
#define EVLM_INLINE inline __attribute__((always_inline))

EVLM_INLINE float dot_body(const float* a, const float* b, int n) {
  float acc[16] = {0};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = 8; w; w >>= 1)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0] + tail;
}

// sum and max of n floats in 16 independent lanes (a serial fp32 chain would cost 4 cycles an element).
EVLM_INLINE float sum_body(const float* a, int n) {
  float acc[16] = {0};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i];
  for (int w = 8; w; w >>= 1)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0] + tail;
}

EVLM_INLINE float max_body(const float* a, int n) {
  float acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] = acc[j] > a[i + j] ? acc[j] : a[i + j];
  for (; i < n; ++i) acc[0] = acc[0] > a[i] ? acc[0] : a[i];
  for (int w = 8; w; w >>= 1)
    for (int j = 0; j < w; ++j) acc[j] = acc[j] > acc[j + w] ? acc[j] : acc[j + w];
  return acc[0];
}

// e^x for x in [-87.3, 88.3] (clamped outside: softmax and SiLU only need 0 and "huge" there), within
// about 2 ulp: x = k ln2 + r with |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (truncation
// below 1e-8 relative), 2^k written into the exponent bits.
EVLM_INLINE float exp_body(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  // round to nearest by the 1.5 * 2^23 trick: plain adds, so it vectorises on every ISA (|x log2 e| < 2^22)
  const float k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723212e-6f;  // ln2 split hi + lo
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// y[r] += A[r, :] . x for r < rows (A row-major [rows, K]).
EVLM_INLINE void matvec_body(const float* A, const float* x, int rows, int K, float* y) {
  for (int r = 0; r < rows; ++r) y[r] += dot_body(A + size_t(r) * K, x, K);
}

// One head over positions 0..n-1: out[Dh] = softmax(q . K[j] * scale) @ V, fp32 with the max subtracted.
EVLM_INLINE void attend_body(const float* q, const float* K, const float* V, int n, int Dh, float scale,
                             float* scores, float* out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; ++j) {
    scores[j] = dot_body(q, K + size_t(j) * Dh, Dh) * scale;
    m = std::max(m, scores[j]);
  }
  for (int j = 0; j < n; ++j) scores[j] = exp_body(scores[j] - m);
  float sum = 0.f;
  for (int j = 0; j < n; ++j) sum += scores[j];
  for (int d = 0; d < Dh; ++d) out[d] = 0.f;
  for (int j = 0; j < n; ++j) {
    const float w = scores[j];
    const float* v = V + size_t(j) * Dh;
    for (int d = 0; d < Dh; ++d) out[d] += w * v[d];
  }
  const float inv = 1.f / sum;
  for (int d = 0; d < Dh; ++d) out[d] *= inv;
}

// The prefill's attention: as attend_body, but the scores read a transposed copy of the keys, Kt [Dh, ld]
// (ld a multiple of 64 covering n), so 64 positions' scores are four independent vector accumulators
// over Dh broadcast multiply-adds, with no horizontal sums; the weighted sum of V keeps 64 output dims
// in registers across all positions. A prompt's queries all read the same keys, so the transpose is
// made once per layer and kv head; one decode step would pay it for a single query.
EVLM_INLINE void attend_t_body(const float* q, const float* Kt, int ld, const float* V, int n, int Dh, float scale,
                               float* scores, float* out) {
  constexpr int kW = 64;
  for (int j0 = 0; j0 < n; j0 += kW) {
    float acc[kW] = {0};
    for (int d = 0; d < Dh; ++d) {
      const float qd = q[d];
      const float* kr = Kt + size_t(d) * ld + j0;
      for (int l = 0; l < kW; ++l) acc[l] += qd * kr[l];
    }
    const int w = std::min(kW, n - j0);
    for (int l = 0; l < w; ++l) scores[j0 + l] = acc[l] * scale;
  }
  const float m = max_body(scores, n);
  for (int j = 0; j < n; ++j) scores[j] = exp_body(scores[j] - m);
  const float inv = 1.f / sum_body(scores, n);
  int d0 = 0;
  for (; d0 + kW <= Dh; d0 += kW) {
    float acc[kW] = {0};
    for (int j = 0; j < n; ++j) {
      const float w = scores[j];
      const float* v = V + size_t(j) * Dh + d0;
      for (int l = 0; l < kW; ++l) acc[l] += w * v[l];
    }
    for (int l = 0; l < kW; ++l) out[d0 + l] = acc[l] * inv;
  }
  if (d0 < Dh) {  // head_dim not a multiple of 64
    for (int d = d0; d < Dh; ++d) out[d] = 0.f;
    for (int j = 0; j < n; ++j) {
      const float w = scores[j];
      const float* v = V + size_t(j) * Dh;
      for (int d = d0; d < Dh; ++d) out[d] += w * v[d];
    }
    for (int d = d0; d < Dh; ++d) out[d] *= inv;
  }
}

// A LoRA side path's second factor: out[i, n] += sum_r B[n, r] h[i, r] for rows n0..n1-1 and tokens i < M
// (B [N, rank] row-major; h's rows ldh apart, out's ldo apart). One dot_body of `rank` values per output
// costs a call and a 16-lane reduction for 8 to 24 multiply-adds: on the demo's LoRA that was 14 % of a
// 128-token prefill. Here 16 rows of B are transposed once into a [rank, 16] tile that every token reuses,
// and each output is summed exactly as dot_body sums it (16 lanes over whole chunks of 16, a sequential
// tail, the lanes folded in halves, then lanes + tail), so the step's numbers do not change.
constexpr int kMaxSideRank = 64;
EVLM_INLINE void side_add_body(const float* B, int rank, int n0, int n1, const float* h, int ldh, int M, float* out,
                               int ldo) {
  constexpr int kR = 16;
  float bt[kMaxSideRank * kR];
  const int whole = rank / 16 * 16;
  for (int nb = n0; nb < n1; nb += kR) {
    const int w = std::min(kR, n1 - nb);
    for (int r = 0; r < rank; ++r)
      for (int l = 0; l < kR; ++l) bt[r * kR + l] = l < w ? B[size_t(nb + l) * rank + r] : 0.f;
    for (int i = 0; i < M; ++i) {
      const float* hi = h + size_t(i) * ldh;
      float lane[16][kR] = {};  // dot_body's acc[16], for 16 outputs at once
      for (int c = 0; c < whole; c += 16)
        for (int j = 0; j < 16; ++j) {
          const float hv = hi[c + j];
          for (int l = 0; l < kR; ++l) lane[j][l] += bt[(c + j) * kR + l] * hv;
        }
      float tail[kR] = {};
      for (int r = whole; r < rank; ++r) {
        const float hv = hi[r];
        for (int l = 0; l < kR; ++l) tail[l] += bt[r * kR + l] * hv;
      }
      for (int half = 8; half; half >>= 1)
        for (int j = 0; j < half; ++j)
          for (int l = 0; l < kR; ++l) lane[j][l] += lane[j + half][l];
      float* o = out + size_t(i) * ldo + nb;
      for (int l = 0; l < w; ++l) o[l] += lane[0][l] + tail[l];
    }
  }
}

// out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up, as torch computes it.
EVLM_INLINE void silu_mul_body(const float* gate, const float* up, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = gate[i] / (1.f + exp_body(-gate[i])) * up[i];
}

struct MathSet {
  const char* name;
  void (*matvec)(const float*, const float*, int, int, float*);
  void (*attend)(const float*, const float*, const float*, int, int, float, float*, float*);
  void (*attend_t)(const float*, const float*, int, const float*, int, int, float, float*, float*);
  void (*silu_mul)(const float*, const float*, int, float*);
  void (*side_add)(const float*, int, int, int, const float*, int, int, float*, int);
};

#define EVLM_MATH_SET(NAME, ATTR)                                                                       \
  ATTR void matvec_##NAME(const float* A, const float* x, int rows, int K, float* y) {                  \
    matvec_body(A, x, rows, K, y);                                                                      \
  }                                                                                                     \
  ATTR void attend_##NAME(const float* q, const float* K, const float* V, int n, int Dh, float scale,   \
                          float* scores, float* out) {                                                  \
    attend_body(q, K, V, n, Dh, scale, scores, out);                                                    \
  }                                                                                                     \
  ATTR void attend_t_##NAME(const float* q, const float* Kt, int ld, const float* V, int n, int Dh,       \
                            float scale, float* scores, float* out) {                                   \
    attend_t_body(q, Kt, ld, V, n, Dh, scale, scores, out);                                             \
  }                                                                                                     \
  ATTR void silu_mul_##NAME(const float* g, const float* u, int n, float* out) {                     \
    silu_mul_body(g, u, n, out);                                                                        \
  }                                                                                                     \
  ATTR void side_add_##NAME(const float* B, int rank, int n0, int n1, const float* h, int ldh, int M,    \
                            float* out, int ldo) {                                                      \
    side_add_body(B, rank, n0, n1, h, ldh, M, out, ldo);                                                \
  }                                                                                                     \
  const MathSet k_##NAME{#NAME, matvec_##NAME, attend_##NAME, attend_t_##NAME, silu_mul_##NAME, side_add_##NAME};

EVLM_MATH_SET(portable, )
#ifdef EVLM_X86
EVLM_MATH_SET(x86_64_v3, __attribute__((target("arch=x86-64-v3"))))
EVLM_MATH_SET(x86_64_v4, __attribute__((target("arch=x86-64-v4"))))
#endif

// The fp32 loops follow the active matmul kernel set's vector width (whose check already proved the
// instructions: AVX-512 F/BW/VL/DQ for 512 bits, AVX2 + FMA for 256), so picking a set (EDGEVLM_QGEMM,
// edgevlm._C.qgemm_use) tests the whole step on that path. aarch64 builds the portable loops with NEON.
const MathSet& math_set() {
#ifdef EVLM_X86
  const int bits = active_kernel_set().vector_bits;
  if (bits >= 512) return k_x86_64_v4;
  if (bits >= 256) return k_x86_64_v3;
#endif
  return k_portable;
}

// RMSNorm as torch's fp32 rms_norm: x * rsqrt(mean(x^2) + eps) * weight.
void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
  const float ss = dot_body(x, x, n);
  const float r = 1.f / std::sqrt(ss / float(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// Rotate-half RoPE of one head in place over its first Dr dims, with the sin row sign-folded as
// runtime/decoder.py's Rotary builds it: x * cos + roll(x, Dr / 2) * signed_sin.
void rope(float* x, const float* cos, const float* ssin, int Dr) {
  float t[1024];  // Dr <= head_dim <= 1024, checked at construction
  const int half = Dr / 2;
  for (int i = 0; i < Dr; ++i) t[i] = x[i];
  for (int i = 0; i < Dr; ++i) x[i] = t[i] * cos[i] + t[i < half ? i + half : i - half] * ssin[i];
}

// ---- the plan ------------------------------------------------------------------------------------
// One quantised matmul writing rows [off, off + N) of its group's output, with an optional low-rank
// side path (LoRA beside quantised weights): out += B (A in), A [rank, K], B [N, rank].
struct Proj {
  QWeights w;
  int off = 0;
  const float* side_a = nullptr;
  const float* side_b = nullptr;
  int rank = 0;
  int side_off = 0;  // where A in goes in the step's side buffer
  int nrb() const { return (w.N + kQLanes - 1) / kQLanes; }
};

struct Layer {
  bool set = false;
  const float* attn_norm = nullptr;
  const float* mlp_norm = nullptr;
  float attn_eps = 0.f, mlp_eps = 0.f;
  std::vector<Proj> qkv, o, gate_up, down;
};

// (bits, N, K, group, qweight, scales, zeros, bias, out offset, side_A, side_B, rank)
using ProjArgs =
    std::tuple<int, int, int, int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int, uintptr_t, uintptr_t, int>;

// Scratch of the calling thread (reused across steps; a plan may be stepped from several threads).
struct Scratch {
  std::vector<float> h, qkv, att, gu, act, tmp, side, scores, kt;
  QActs acts;
};
thread_local Scratch tl_scratch;

class DecodePlan {
 public:
  DecodePlan(int hidden, int heads, int kv_heads, int head_dim, int rope_dim, int intermediate, int layers)
      : D_(hidden), H_(heads), Hkv_(kv_heads), Dh_(head_dim), Dr_(rope_dim), I_(intermediate), layers_(layers) {
    if (D_ < 1 || H_ < 1 || Hkv_ < 1 || Dh_ < 1 || I_ < 1 || layers_ < 1) fail("sizes must be positive");
    if (H_ % Hkv_) fail("heads " + std::to_string(H_) + " must be a multiple of kv_heads " + std::to_string(Hkv_));
    if (Dh_ > 1024) fail("head_dim " + std::to_string(Dh_) + " above 1024");
    if (Dr_ < 2 || Dr_ > Dh_ || Dr_ % 2) fail("rope_dim " + std::to_string(Dr_) + " must be even and in 2..head_dim");
    layer_.resize(layers_);
  }

  void set_layer(int i, uintptr_t attn_norm, float attn_eps, uintptr_t mlp_norm, float mlp_eps,
                 const std::vector<ProjArgs>& qkv, const std::vector<ProjArgs>& o,
                 const std::vector<ProjArgs>& gate_up, const std::vector<ProjArgs>& down) {
    if (i < 0 || i >= layers_) fail("layer " + std::to_string(i) + " outside 0.." + std::to_string(layers_ - 1));
    if (!attn_norm || !mlp_norm) fail("null norm weight");
    Layer l;
    l.attn_norm = reinterpret_cast<const float*>(attn_norm), l.attn_eps = attn_eps;
    l.mlp_norm = reinterpret_cast<const float*>(mlp_norm), l.mlp_eps = mlp_eps;
    const std::string at = "layer " + std::to_string(i) + " ";
    l.qkv = group(qkv, D_, (H_ + 2 * Hkv_) * Dh_, at + "q/k/v");
    l.o = group(o, H_ * Dh_, D_, at + "o_proj");
    l.gate_up = group(gate_up, D_, 2 * I_, at + "gate/up");
    l.down = group(down, I_, D_, at + "down_proj");
    l.set = true;
    layer_[i] = std::move(l);
  }

  // x [M, D] (fp32, updated in place to the last layer's output) of M consecutive tokens at positions
  // pos..pos+M-1, the cos / signed-sin rows of those positions [M, Dr], the cache's K and V buffers
  // [L, 1, Hkv, max_len, Dh]. M = 1 is a decode step; M > 1 a prefill (or a forced chunk), whose
  // matmuls take the tiled prefill kernels and whose token i attends to positions 0..pos+i.
  void step(uintptr_t x_ptr, int pos, uintptr_t cos_ptr, uintptr_t sin_ptr, uintptr_t k_ptr, uintptr_t v_ptr,
            int max_len, int threads, int M) {
    for (int i = 0; i < layers_; ++i)
      if (!layer_[i].set) fail("layer " + std::to_string(i) + " was never set");
    if (!x_ptr || !cos_ptr || !sin_ptr || !k_ptr || !v_ptr) fail("null pointer");
    if (M < 1) fail("tokens must be at least 1, got " + std::to_string(M));
    if (max_len < 1 || pos < 0 || pos + M > max_len)
      fail("positions " + std::to_string(pos) + ".." + std::to_string(pos + M - 1) + " outside the cache's 0.." +
           std::to_string(max_len - 1));
    if (threads < 1 || threads > 256) fail("threads must be in 1..256");
    float* x = reinterpret_cast<float*>(x_ptr);
    const float* cos = reinterpret_cast<const float*>(cos_ptr);
    const float* ssin = reinterpret_cast<const float*>(sin_ptr);
    float* kc = reinterpret_cast<float*>(k_ptr);
    float* vc = reinterpret_cast<float*>(v_ptr);

    py::gil_scoped_release release;  // the tensors behind every pointer are held by the Python step
    Scratch& s = tl_scratch;
    const size_t m = size_t(M), qkv_w = size_t(H_ + 2 * Hkv_) * Dh_;
    s.h.resize(m * std::max(D_, I_)), s.qkv.resize(m * qkv_w), s.att.resize(m * H_ * Dh_);
    s.gu.resize(m * 2 * I_), s.act.resize(m * I_), s.tmp.resize(m * D_), s.side.resize(m * std::max(side_len_, 1));
    std::unique_lock<std::mutex> lk;
    SpinPool* pool = qgemm_pool(threads, lk);  // held for the whole step: no other caller interleaves
    const int nt = pool ? threads : 1;
    s.scores.resize(size_t(nt) * ((pos + M + 63) / 64 * 64));
    const MathSet& ms = math_set();
    const float scale = float(1.0 / std::sqrt(double(Dh_)));
    const int group_size = H_ / Hkv_;
    const size_t head_stride = size_t(max_len) * Dh_;  // one kv head's positions in the cache
    // Row-wise work (norms, rope, SiLU) of a prompt split over the pool; rows are independent, so the
    // numbers do not depend on the split.
    const auto for_rows = [&](int rows, const auto& fn) {
      if (!pool || rows < 8) {
        for (int i = 0; i < rows; ++i) fn(i);
        return;
      }
      const std::function<void(int)> part = [&](int t) {
        for (int i = int(int64_t(rows) * t / nt); i < int(int64_t(rows) * (t + 1) / nt); ++i) fn(i);
      };
      pool->run(nt, part);
    };

    for (int li = 0; li < layers_; ++li) {
      const Layer& L = layer_[li];
      for_rows(M, [&](int i) { rms_norm(x + i * size_t(D_), L.attn_norm, D_, L.attn_eps, s.h.data() + i * size_t(D_)); });
      project(L.qkv, s.h.data(), D_, M, s.qkv.data(), int(qkv_w), nullptr, pool, nt, ms, s);
      float* kl = kc + size_t(li) * Hkv_ * head_stride;  // this layer's [Hkv, max_len, Dh]
      float* vl = vc + size_t(li) * Hkv_ * head_stride;
      for_rows(M, [&](int i) {  // tokens write disjoint cache rows
        float* q = s.qkv.data() + i * qkv_w;
        float* k = q + size_t(H_) * Dh_;
        const float* v = k + size_t(Hkv_) * Dh_;
        const float* ci = cos + size_t(i) * Dr_;
        const float* si = ssin + size_t(i) * Dr_;
        for (int h = 0; h < H_; ++h) rope(q + size_t(h) * Dh_, ci, si, Dr_);
        for (int g = 0; g < Hkv_; ++g) {
          rope(k + size_t(g) * Dh_, ci, si, Dr_);
          std::memcpy(kl + g * head_stride + size_t(pos + i) * Dh_, k + size_t(g) * Dh_, sizeof(float) * Dh_);
          std::memcpy(vl + g * head_stride + size_t(pos + i) * Dh_, v + size_t(g) * Dh_, sizeof(float) * Dh_);
        }
      });
      // Token i sees positions 0..pos+i. Several tokens read the keys through their transpose
      // (attend_t_body), made here once per kv head: Kt[g, d, j] = K[g, j, d], zero past the last position.
      const int pairs = M * H_, n_all = pos + M, ld = (n_all + 63) / 64 * 64;
      if (M > 1) {
        s.kt.resize(size_t(Hkv_) * Dh_ * ld);
        for_rows(Hkv_ * Dh_, [&](int r) {
          const int g = r / Dh_, d = r % Dh_;
          float* kt = s.kt.data() + size_t(r) * ld;
          const float* kg = kl + g * head_stride + d;
          for (int j = 0; j < n_all; ++j) kt[j] = kg[size_t(j) * Dh_];
          std::fill(kt + n_all, kt + ld, 0.f);
        });
      }
      // (token, head) pairs dealt round-robin: a later token attends to more positions, so contiguous
      // ranges would leave the last thread most of the work. Each pair's numbers do not depend on who runs it.
      const std::function<void(int)> attend = [&](int t) {
        float* sc = s.scores.data() + size_t(t) * ld;
        for (int j = t; j < pairs; j += nt) {
          const int i = j / H_, h = j % H_, g = h / group_size;
          const float* q = s.qkv.data() + i * qkv_w + size_t(h) * Dh_;
          float* o = s.att.data() + (i * size_t(H_) + h) * Dh_;
          if (M > 1)
            ms.attend_t(q, s.kt.data() + size_t(g) * Dh_ * ld, ld, vl + g * head_stride, pos + i + 1, Dh_, scale, sc, o);
          else
            ms.attend(q, kl + g * head_stride, vl + g * head_stride, pos + 1, Dh_, scale, sc, o);
        }
      };
      // Split over the pool only when the work is worth a pool run: measured on the demo (2 threads), a
      // pool run per layer costs more than it saves below ~250 positions of one token (+0.8 ms a token
      // at 40) and saves 1 ms at 600, 4 ms at 2000.
      if (pool && size_t(H_) * M * (pos + (M + 1) / 2) * Dh_ >= kParallelAttention) {
        pool->run(nt, attend);
      } else {
        for (int t = 0; t < nt; ++t) attend(t);  // same pairs per t, so the same numbers either way
      }
      project(L.o, s.att.data(), H_ * Dh_, M, s.tmp.data(), D_, x, pool, nt, ms, s);
      for_rows(M, [&](int i) { rms_norm(x + i * size_t(D_), L.mlp_norm, D_, L.mlp_eps, s.h.data() + i * size_t(D_)); });
      project(L.gate_up, s.h.data(), D_, M, s.gu.data(), 2 * I_, nullptr, pool, nt, ms, s);
      for_rows(M, [&](int i) {
        const float* gu = s.gu.data() + i * 2 * size_t(I_);
        ms.silu_mul(gu, gu + I_, I_, s.act.data() + i * size_t(I_));
      });
      project(L.down, s.act.data(), I_, M, s.tmp.data(), D_, x, pool, nt, ms, s);
    }
  }

  std::string math_kernels() const { return math_set().name; }

 private:
  // Checks one group of projections (all reading K inputs) that must tile `total` output rows.
  std::vector<Proj> group(const std::vector<ProjArgs>& args, int K, int total, const std::string& what) {
    if (args.empty()) fail(what + ": no projection");
    std::vector<Proj> out;
    int next = 0;
    for (const ProjArgs& a : args) {
      Proj p;
      auto [bits, N, k, G, qw, sc, zr, bias, off, sa, sb, rank] = a;
      p.w = QWeights{bits, N, k, G, reinterpret_cast<const uint8_t*>(qw), reinterpret_cast<const void*>(sc),
                     reinterpret_cast<const uint16_t*>(zr), reinterpret_cast<const float*>(bias)};
      if (bits != 8 && bits != 4) fail(what + ": bits must be 8 or 4, got " + std::to_string(bits));
      if (k != K) fail(what + ": expected " + std::to_string(K) + " inputs, got " + std::to_string(k));
      if (K % kQBlock || G < kQBlock || G % kQBlock || K % G)
        fail(what + ": group " + std::to_string(G) + " must be a multiple of 32 dividing K=" + std::to_string(K));
      if (!qw || !sc || (bits == 4 && !zr)) fail(what + ": null weight pointer");
      if (off != next || N < 1) fail(what + ": output rows must tile 0.." + std::to_string(total) + " in order");
      if (rank < 0 || (rank > 0 && (!sa || !sb))) fail(what + ": side path needs A and B for rank > 0");
      p.off = off, next = off + N;
      p.rank = rank, p.side_a = reinterpret_cast<const float*>(sa), p.side_b = reinterpret_cast<const float*>(sb);
      if (rank) p.side_off = side_len_, side_len_ += rank;
      out.push_back(p);
    }
    if (next != total)
      fail(what + ": outputs cover " + std::to_string(next) + " rows, expected " + std::to_string(total));
    return out;
  }

  // out[m, 0..width) = each projection of the group applied to in[m] [K] (+ its side path), for M rows
  // (row stride K in, width out); with a residual [M, width], residual += out. Row blocks of all the
  // group's matrices are split evenly over threads; a long prompt's activations are quantised in parallel.
  void project(const std::vector<Proj>& ps, const float* in, int K, int M, float* out, int width, float* residual,
               SpinPool* pool, int nt, const MathSet& ms, Scratch& s) const {
    qacts_resize(M, K, s.acts);
    if (pool && M >= 8) {
      const std::function<void(int)> quant = [&](int t) {
        qacts_quantize(in, int(int64_t(M) * t / nt), int(int64_t(M) * (t + 1) / nt), s.acts);
      };
      pool->run(nt, quant);
    } else {
      qacts_quantize(in, 0, M, s.acts);
    }
    int total = 0;
    for (const Proj& p : ps) {
      total += p.nrb();
      if (p.rank)
        for (int i = 0; i < M; ++i) {
          float* h = s.side.data() + size_t(i) * side_len_ + p.side_off;
          std::fill(h, h + p.rank, 0.f);
          ms.matvec(p.side_a, in + size_t(i) * K, p.rank, K, h);
        }
    }
    const std::function<void(int)> body = [&](int t) {
      const int g0 = int(int64_t(total) * t / nt), g1 = int(int64_t(total) * (t + 1) / nt);
      int base = 0;
      for (const Proj& p : ps) {
        const int lo = std::max(g0, base) - base, hi = std::min(g1, base + p.nrb()) - base;
        base += p.nrb();
        if (lo >= hi) continue;
        qgemm_row_blocks(p.w, s.acts, lo, hi, out + p.off, width);
        const int n0 = lo * kQLanes, n1 = std::min(hi * kQLanes, p.w.N);
        if (p.rank && p.rank <= kMaxSideRank) {
          ms.side_add(p.side_b, p.rank, n0, n1, s.side.data() + p.side_off, side_len_, M, out + p.off, width);
        } else if (p.rank) {
          for (int i = 0; i < M; ++i)
            ms.matvec(p.side_b + size_t(n0) * p.rank, s.side.data() + size_t(i) * side_len_ + p.side_off, n1 - n0,
                      p.rank, out + size_t(i) * width + p.off + n0);
        }
        if (residual)
          for (int i = 0; i < M; ++i) {
            const float* o = out + size_t(i) * width + p.off;
            float* r = residual + size_t(i) * width + p.off;
            for (int n = n0; n < n1; ++n) r[n] += o[n];
          }
      }
    };
    if (pool) pool->run(nt, body); else body(0);
  }

  int D_, H_, Hkv_, Dh_, Dr_, I_, layers_;
  int side_len_ = 0;
  std::vector<Layer> layer_;
};

}  // namespace
}  // namespace evlm

void register_decode_step(py::module_& m) {
  using evlm::DecodePlan;
  py::class_<DecodePlan>(m, "DecodePlan", R"doc(One batch-1 decode step of a quantised LLaMA-style decoder,
every layer in C++ (cpp_ext/decode_step.cpp). Built and fed raw pointers by
edgevlm.runtime.quant.fused_decode.FusedDecodeStep, which checks every tensor first.)doc")
      .def(py::init<int, int, int, int, int, int, int>(), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("rope_dim"), py::arg("intermediate"), py::arg("layers"))
      .def("set_layer", &DecodePlan::set_layer, py::arg("index"), py::arg("attn_norm"), py::arg("attn_eps"),
           py::arg("mlp_norm"), py::arg("mlp_eps"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           "Projections: lists of (bits, N, K, group, qweight, scales, zeros, bias, out_offset, side_A, side_B, "
           "rank) tuples whose outputs tile the group's rows in order (q|k|v, gate|up).")
      .def("step", &DecodePlan::step, py::arg("x"), py::arg("position"), py::arg("cos"), py::arg("signed_sin"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("max_len"), py::arg("threads"), py::arg("tokens") = 1,
           "Run every layer for `tokens` consecutive tokens: x [tokens, hidden] fp32 in place -> the last "
           "layer's output (before the final norm); cos / signed_sin: their rows [tokens, rope_dim]; writes "
           "K/V at position..position+tokens-1. Releases the GIL.")
      .def_property_readonly("math_kernels", &DecodePlan::math_kernels,
                             "The instruction set of the non-matmul loops: x86_64_v4, x86_64_v3 or portable.");
}
