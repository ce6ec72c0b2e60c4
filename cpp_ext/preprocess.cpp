// edgevlm._C.preprocess_views: one HWC uint8 frame -> the normalised views of every encoder, in one
// multithreaded pass, written into caller-provided float32 [N, 3, R, R] buffers.
//
// The plan (geometry) is computed in Python (edgevlm/runtime/views.py, preprocess.py); this file
// validates it, resamples with PIL-compatible bicubic tables (resample.h) and writes the outputs.
//
// Per distinct resolution R ("group") the plan holds one or more jobs. A job resamples the frame,
// placed at (top, left) on a virtual SH x SW source filled with `pad`, to RH x RW, places that at
// (oy, ox) on a CH x CW canvas filled with `fill`, and emits views: R x R crops of the canvas and at
// most one "global" view (the whole canvas resized to R x R). The padded source and the canvas are
// never materialised: padding taps fold into a constant per output sample, canvas rows exist one at
// a time per thread. Work per frame:
//   phase A (parallel over bands of canvas rows): horizontal pass of the frame rows a band needs into
//     a per-thread ring, vertical pass -> canvas row -> crops normalised straight into the outputs of
//     every encoder of the group, and the horizontal pass of the global view;
//   phase B (after one barrier): vertical pass of the global views + normalisation.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>

#include "resample.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace py = pybind11;

namespace evlm {
namespace {

// ---- a small persistent thread pool ------------------------------------------------------------
// Workers sleep on a condition variable between frames; one wake-up per frame. No OpenMP: torch
// ships its own libgomp and two OpenMP runtimes in one process oversubscribe and can deadlock.
class Pool {
 public:
  int size() const { return int(workers_.size()) + 1; }

  void grow(int n) {  // caller holds g_run_mutex, so no run is in flight
    while (size() < n) {
      const int id = size();
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();  // the pool lives for the process (see g_pool)
    }
  }

  void run(int nt, const std::function<void(int)>& fn) {
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn, active_ = nt, remaining_ = nt - 1, ++generation_;
    }
    cv_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [this] { return remaining_ == 0; });
    fn_ = nullptr;
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= active_) continue;
        fn = fn_;
      }
      (*fn)(id);  // fn never throws: run_plan catches per thread
      std::lock_guard<std::mutex> lk(m_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  int active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};

// Leaked on purpose: joining detached workers at static-destruction time (after the interpreter is
// gone) buys nothing. After fork() the child has no workers, so it starts a fresh pool and mutex.
Pool* g_pool = nullptr;
std::mutex* g_run_mutex = new std::mutex;
#if defined(__unix__) || defined(__APPLE__)
void atfork_child() {
  g_pool = nullptr;
  g_run_mutex = new std::mutex;
}
#endif

class SpinBarrier {  // one use per frame; spinning is cheap next to a millisecond of work
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    if (arrived_.fetch_add(1) + 1 == n_) {
      open_.store(true, std::memory_order_release);
      return;
    }
    for (int spins = 0; !open_.load(std::memory_order_acquire);)
      if (++spins > 256) std::this_thread::yield();
  }

 private:
  int n_;
  std::atomic<int> arrived_{0};
  std::atomic<bool> open_{false};
};

// ---- coefficient cache (camera streams repeat the same geometry every frame) -------------------
std::mutex g_cache_mutex;
std::map<std::tuple<int, int, int, int, int>, std::shared_ptr<const Table>> g_cache;

// Kernel set for this CPU (resample.h); EDGEVLM_SIMD=avx2|sse2 or set_simd() may pick a lower one.
std::atomic<const Kernels*> g_kernels{nullptr};
const Kernels& kernels() {
  const Kernels* k = g_kernels.load();
  if (!k) {
    const char* env = std::getenv("EDGEVLM_SIMD");
    k = select_kernels(env ? env : "");
    g_kernels.store(k);
  }
  return *k;
}

std::shared_ptr<const Table> table(int in, int off, int len, int out, bool horizontal, int width) {
  const auto key = std::make_tuple(in, off, len, out, horizontal ? width : 0);
  {
    std::lock_guard<std::mutex> lk(g_cache_mutex);
    auto it = g_cache.find(key);
    if (it != g_cache.end()) return it->second;
  }
  std::shared_ptr<const Table> t = make_table(in, off, len, out, horizontal, width);
  std::lock_guard<std::mutex> lk(g_cache_mutex);
  if (g_cache.size() >= 256) g_cache.clear();  // bounded: odd sizes from many sources cannot grow it
  g_cache.emplace(key, t);
  return t;
}

// ---- plan ---------------------------------------------------------------------------------------
struct View {
  int idx, kind, y0, x0;  // kind 0: R x R crop at (y0, x0); kind 1: whole canvas resized to R x R
};
struct Target {
  float* data;
  int64_t n;
  int offset;
  float a[3], b[3];
};
struct Group {
  int R;
  std::vector<Target> targets;
};
struct Job {
  int group, R, SH, SW, top, left, RH, RW, CH, CW, oy, ox;
  float pad[3], fill[3];
  std::vector<View> crops;
  int global_idx = -1;
  std::shared_ptr<const Table> h, v, gh, gv;
  int vlen, rowstride, crowlen, gstride;
  std::vector<float> pad3, padrow, fillrow;
};
struct Frame {
  const uint8_t* data;
  int64_t stride;
  int h, w;
};

int round_up(int x, int m) { return (x + m - 1) / m * m; }

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("preprocess_views: " + msg); }

int get_int(py::handle h, const std::string& what, int lo, int hi) {
  long long v;
  try {
    if (PyFloat_Check(h.ptr()) || PyBool_Check(h.ptr())) throw py::cast_error();
    v = h.cast<long long>();
  } catch (const py::cast_error&) {
    fail(what + " must be an int, got " + std::string(py::str(py::type::of(h))));
  }
  if (v < lo || v > hi)
    fail(what + " = " + std::to_string(v) + " outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return int(v);
}

py::sequence get_seq(py::handle h, const std::string& what, size_t n = 0) {
  if (!py::isinstance<py::sequence>(h) || py::isinstance<py::str>(h)) fail(what + " must be a tuple or list");
  auto s = py::reinterpret_borrow<py::sequence>(h);
  if (n && s.size() != n) fail(what + " must have " + std::to_string(n) + " items, got " + std::to_string(s.size()));
  return s;
}

void get_rgb(py::handle h, const std::string& what, double out[3], bool positive) {
  auto s = get_seq(h, what, 3);
  for (int c = 0; c < 3; ++c) {
    double v;
    try {
      v = s[c].cast<double>();
    } catch (const py::cast_error&) {
      fail(what + " must hold 3 numbers");
    }
    if (!std::isfinite(v) || (positive && v <= 0)) fail(what + " values must be finite" + (positive ? " and > 0" : ""));
    out[c] = v;
  }
}

Target parse_target(py::handle h, int R, const std::string& what) {
  auto s = get_seq(h, what + " (out, view_offset, mean, std)", 4);
  if (!py::isinstance<py::array>(s[0])) fail(what + ".out must be a numpy float32 array (use tensor.numpy())");
  auto arr = py::reinterpret_borrow<py::array>(s[0]);
  if (arr.dtype().kind() != 'f' || arr.itemsize() != 4) fail(what + ".out must be float32, got " + std::string(py::str(arr.dtype())));
  if (arr.ndim() != 4 || arr.shape(1) != 3 || arr.shape(2) != R || arr.shape(3) != R)
  {
    std::string got = "[";
    for (py::ssize_t i = 0; i < arr.ndim(); ++i) got += (i ? ", " : "") + std::to_string(arr.shape(i));
    fail(what + ".out must have shape [N, 3, " + std::to_string(R) + ", " + std::to_string(R) + "], got " + got + "]");
  }
  if (!(arr.flags() & py::array::c_style)) fail(what + ".out must be C-contiguous");
  if (!arr.writeable()) fail(what + ".out is read-only");
  Target t;
  t.data = static_cast<float*>(arr.mutable_data());
  t.n = arr.shape(0);
  t.offset = get_int(s[1], what + ".view_offset", 0, INT_MAX - (1 << 20));
  double mean[3], std_[3];
  get_rgb(s[2], what + ".mean", mean, false);
  get_rgb(s[3], what + ".std", std_, true);
  for (int c = 0; c < 3; ++c) t.a[c] = float(1.0 / (255.0 * std_[c])), t.b[c] = float(-mean[c] / std_[c]);
  return t;
}

constexpr int kMaxSide = 1 << 24, kMaxCanvas = 1 << 15;

Job parse_job(py::handle h, int group, int R, const Frame& f, const std::string& what) {
  auto s = get_seq(h, what + " (SH, SW, top, left, pad, RH, RW, CH, CW, oy, ox, fill, views)", 13);
  Job j;
  j.group = group, j.R = R;
  j.SH = get_int(s[0], what + ".SH", 1, kMaxSide), j.SW = get_int(s[1], what + ".SW", 1, kMaxSide);
  j.top = get_int(s[2], what + ".top", 0, j.SH - f.h), j.left = get_int(s[3], what + ".left", 0, j.SW - f.w);
  double rgb[3];
  get_rgb(s[4], what + ".pad", rgb, false);
  for (int c = 0; c < 3; ++c) j.pad[c] = float(rgb[c]);
  j.RH = get_int(s[5], what + ".RH", 1, kMaxCanvas), j.RW = get_int(s[6], what + ".RW", 1, kMaxCanvas);
  j.CH = get_int(s[7], what + ".CH", j.RH, kMaxCanvas), j.CW = get_int(s[8], what + ".CW", j.RW, kMaxCanvas);
  j.oy = get_int(s[9], what + ".oy", 0, j.CH - j.RH), j.ox = get_int(s[10], what + ".ox", 0, j.CW - j.RW);
  get_rgb(s[11], what + ".fill", rgb, false);
  for (int c = 0; c < 3; ++c) j.fill[c] = float(rgb[c]);
  for (int c = 0; c < 3; ++c)
    if (j.pad[c] < 0 || j.pad[c] > 255 || j.fill[c] < 0 || j.fill[c] > 255) fail(what + ": pad/fill must be in 0..255");
  auto views = get_seq(s[12], what + ".views");
  for (size_t i = 0; i < views.size(); ++i) {
    const std::string vw = what + ".views[" + std::to_string(i) + "]";
    auto v = get_seq(views[i], vw + " (view_idx, kind, y0, x0)", 4);
    View vv{get_int(v[0], vw + ".view_idx", 0, 1 << 20), get_int(v[1], vw + ".kind", 0, 1), 0, 0};
    if (vv.kind == 0) {
      vv.y0 = get_int(v[2], vw + ".y0", 0, j.CH - R), vv.x0 = get_int(v[3], vw + ".x0", 0, j.CW - R);
      j.crops.push_back(vv);
    } else {
      if (j.global_idx >= 0) fail(what + " has two global views");
      j.global_idx = vv.idx;
    }
  }
  if (j.crops.empty() && j.global_idx < 0) fail(what + " has no views");
  // Guard absurd geometry before allocating: the vertical ring holds ~4 x (SH / RH) rows of RW pixels.
  const double ring = (4.0 * std::max(1.0, double(j.SH) / j.RH) + 5) * 3.0 * (j.RW + 64) * 4;
  if (ring > double(1u << 31)) fail(what + ": resampling " + std::to_string(j.SH) + " rows to " + std::to_string(j.RH) +
                                    " needs too much scratch memory");
  return j;
}

void prepare(Job& j, const Frame& f, int width) {
  j.h = table(j.SW, j.left, f.w, j.RW, true, width);
  j.v = table(j.SH, j.top, f.h, j.RH, false, width);
  if (j.global_idx >= 0) {
    j.gh = table(j.CW, 0, j.CW, j.R, true, width);
    j.gv = table(j.CH, 0, j.CH, j.R, false, width);
  }
  j.vlen = round_up(3 * j.RW, 64);
  j.rowstride = round_up(3 * j.RW + 4, 64);  // hpass_row writes 4 floats of scratch
  j.gstride = round_up(3 * j.R + 4, 64);
  j.crowlen = std::max(3 * j.ox + j.vlen, 3 * j.CW + (j.gh ? 12 * j.gh->nchunk : 0)) + 16;
  j.pad3.assign(16, 0.f);
  for (int c = 0; c < 3; ++c) j.pad3[c] = j.pad[c];
  j.padrow.resize(j.vlen);
  for (int i = 0; i < j.vlen; ++i) j.padrow[i] = j.pad[i % 3];
  j.fillrow.resize(3 * size_t(j.CW));
  for (size_t i = 0; i < j.fillrow.size(); ++i) j.fillrow[i] = j.fill[i % 3];
}

// Per-thread scratch, reused across frames. Every buffer only ever holds finite values (zeros or
// resampled pixels), so reading its slack times a zero weight is harmless.
struct Scratch {
  std::vector<float> src, ring, crow, vrow;
  std::vector<const float*> ptrs;
};
thread_local Scratch tl_scratch;
thread_local std::vector<float> tl_global;  // caller thread: global-view horizontal results

float* sized(std::vector<float>& v, size_t n) {
  if (v.capacity() > 4 * n && v.capacity() > (size_t(16) << 20)) std::vector<float>().swap(v);  // after a huge frame
  if (v.size() < n) v.resize(n, 0.f);
  return v.data();
}

float* plane(const Target& t, int R, int view, int c, int row) {
  return t.data + ((int64_t(t.offset + view) * 3 + c) * R + row) * int64_t(R);
}

// Phase A for canvas rows [y0, y1) of one job.
void band(const Kernels& K, const Job& j, const Group& g, const Frame& f, int y0, int y1, float* gbuf) {
  const Table &H = *j.h, &V = *j.v;
  const int RS = V.maxcount, R = j.R;
  Scratch& s = tl_scratch;
  const size_t srclen = round_up(3 * f.w + 12 * H.nchunk + 16, 16);
  float* src = sized(s.src, 4 * srclen);
  float* ring = sized(s.ring, size_t(RS) * j.rowstride);
  float* crow = sized(s.crow, j.crowlen);
  if (s.ptrs.size() < size_t(RS)) s.ptrs.resize(RS);
  int next = INT_MIN;  // frame rows [next - RS, next) are in the ring
  for (int y = y0; y < y1; ++y) {
    if (y >= j.oy && y < j.oy + j.RH) {
      const int ry = y - j.oy, st = V.start[ry], cnt = V.count[ry];
      if (next < st) next = st;
      while (next < st + cnt) {  // each frame row: converted once, resampled once per job, 4 at a time
        const int n = st + cnt - next >= 4 ? 4 : std::min(2, st + cnt - next);
        const float* srcs[4] = {src, src + srclen, src + 2 * srclen, src + 3 * srclen};
        float* dsts[4];
        for (int r = 0; r < n; ++r) {
          K.u8_to_f32(f.data + (next + r) * f.stride, src + r * srclen, 3 * f.w);
          dsts[r] = ring + size_t((next + r) % RS) * j.rowstride;
        }
        K.hpass_rows(n, srcs, H, j.pad3.data(), dsts);
        next += n;
      }
      for (int k = 0; k < cnt; ++k) s.ptrs[k] = ring + size_t((st + k) % RS) * j.rowstride;
      K.vpass_row(crow + 3 * j.ox, j.vlen, s.ptrs.data(), V.w.data() + size_t(ry) * V.maxcount, cnt, j.padrow.data(),
                V.bias[ry]);
      // vpass_row writes whole 64-float blocks: restore the fill after it (anyres canvases only).
      std::copy(j.fillrow.begin(), j.fillrow.begin() + 3 * j.ox, crow);
      std::copy(j.fillrow.begin() + 3 * (j.ox + j.RW), j.fillrow.end(), crow + 3 * (j.ox + j.RW));
    } else {
      std::copy(j.fillrow.begin(), j.fillrow.end(), crow);
    }
    for (const View& v : j.crops) {
      if (y < v.y0 || y >= v.y0 + R) continue;
      for (const Target& t : g.targets)
        K.normalize_row(crow + 3 * v.x0, R, plane(t, R, v.idx, 0, y - v.y0), plane(t, R, v.idx, 1, y - v.y0),
                      plane(t, R, v.idx, 2, y - v.y0), t.a, t.b);
    }
    if (j.gh) {
      static const float zero16[16] = {};
      const float* srcs[1] = {crow};
      float* dsts[1] = {gbuf + size_t(y) * j.gstride};
      K.hpass_rows(1, srcs, *j.gh, zero16, dsts);
    }
  }
}

// Phase B for global-view rows [r0, r1) of one job.
void global_rows(const Kernels& K, const Job& j, const Group& g, int r0, int r1, const float* gbuf) {
  const Table& V = *j.gv;
  const int R = j.R, vlen = round_up(3 * R, 64);
  Scratch& s = tl_scratch;
  float* vrow = sized(s.vrow, vlen);
  if (s.ptrs.size() < size_t(V.maxcount)) s.ptrs.resize(V.maxcount);
  for (int r = r0; r < r1; ++r) {
    for (int k = 0; k < V.count[r]; ++k) s.ptrs[k] = gbuf + size_t(V.start[r] + k) * j.gstride;
    K.vpass_row(vrow, vlen, s.ptrs.data(), V.w.data() + size_t(r) * V.maxcount, V.count[r], j.padrow.data(), 0.f);
    for (const Target& t : g.targets)
      K.normalize_row(vrow, R, plane(t, R, j.global_idx, 0, r), plane(t, R, j.global_idx, 1, r),
                    plane(t, R, j.global_idx, 2, r), t.a, t.b);
  }
}

struct Task {
  int job, lo, hi;
};

// Split canvas rows into `k` bands of roughly equal work (pure-padding rows are nearly free).
void split_bands(const Job& j, int job_id, int k, std::vector<Task>& out) {
  const Table &H = *j.h, &V = *j.v;
  std::vector<double> cost(j.CH);
  int next = INT_MIN;
  for (int y = 0; y < j.CH; ++y) {
    double c = 3.0 * j.CW / 16 + (j.gh ? j.R * (j.gh->nchunk * 3 + 8) : 0);
    if (y >= j.oy && y < j.oy + j.RH) {
      const int ry = y - j.oy, end = V.start[ry] + V.count[ry];
      const int fresh = std::max(0, end - std::max(next, V.start[ry]));
      next = std::max(next, end);
      c += double(fresh) * (H.hi - H.lo) * (H.nchunk * 3 + 8) + double(V.count[ry]) * j.vlen / 16;
    }
    cost[y] = c;
  }
  std::vector<double> prefix(j.CH + 1, 0.0);
  for (int y = 0; y < j.CH; ++y) prefix[y + 1] = prefix[y] + cost[y];
  int lo = 0;
  for (int b = 1; b < k; ++b) {  // cut where the cumulative cost passes b/k of the total
    const double target = prefix[j.CH] * b / k;
    int cut = int(std::lower_bound(prefix.begin() + lo + 1, prefix.end(), target) - prefix.begin());
    if (cut <= lo || cut >= j.CH) continue;
    out.push_back({job_id, lo, cut});
    lo = cut;
  }
  out.push_back({job_id, lo, j.CH});
}

void run_plan(const Frame& f, std::vector<Job>& jobs, const std::vector<Group>& groups, int nthreads) {
  std::unique_lock<std::mutex> lk(*g_run_mutex, std::defer_lock);
  if (nthreads > 1 && !lk.try_lock()) nthreads = 1;  // another caller owns the pool: run inline, same numbers
  if (nthreads > 1) {
    if (!g_pool) g_pool = new Pool;
    g_pool->grow(nthreads);
  }
  const Kernels& K = kernels();  // one kernel set for the whole frame, even if set_simd() runs meanwhile
  for (Job& j : jobs) prepare(j, f, K.width);

  // Global-view horizontal results are shared between phases: one buffer per job, owned here.
  std::vector<size_t> goff(jobs.size(), 0);
  size_t gtotal = 0;
  for (size_t i = 0; i < jobs.size(); ++i)
    if (jobs[i].gh) goff[i] = gtotal, gtotal += size_t(jobs[i].CH) * jobs[i].gstride;
  float* gbase = sized(tl_global, gtotal + 16);

  std::vector<Task> a_tasks, b_tasks;
  for (size_t i = 0; i < jobs.size(); ++i) {
    split_bands(jobs[i], int(i), nthreads, a_tasks);
    if (jobs[i].gh)
      for (int t = 0; t < nthreads; ++t)
        b_tasks.push_back({int(i), jobs[i].R * t / nthreads, jobs[i].R * (t + 1) / nthreads});
  }
  std::atomic<int> next_a{0}, next_b{0};
  SpinBarrier barrier(nthreads);
  std::mutex err_mutex;
  std::exception_ptr err;
  auto guarded = [&](auto&& fn) {
    try {
      fn();
    } catch (...) {
      std::lock_guard<std::mutex> g(err_mutex);
      if (!err) err = std::current_exception();
    }
  };
  const std::function<void(int)> body = [&](int) {
    guarded([&] {
      for (int t; (t = next_a.fetch_add(1)) < int(a_tasks.size());) {
        const Job& j = jobs[a_tasks[t].job];
        band(K, j, groups[j.group], f, a_tasks[t].lo, a_tasks[t].hi, gbase + goff[a_tasks[t].job]);
      }
    });
    if (b_tasks.empty()) return;
    barrier.wait();  // every thread reaches it, even after an error, so nobody spins forever
    guarded([&] {
      if (err) return;
      for (int t; (t = next_b.fetch_add(1)) < int(b_tasks.size());) {
        const Job& j = jobs[b_tasks[t].job];
        global_rows(K, j, groups[j.group], b_tasks[t].lo, b_tasks[t].hi, gbase + goff[b_tasks[t].job]);
      }
    });
  };
  if (nthreads > 1)
    g_pool->run(nthreads, body);
  else
    body(0);
  if (err) std::rethrow_exception(err);
}

void preprocess_views(py::array frame, py::sequence groups_in, int threads) {
  if (frame.dtype().kind() != 'u' || frame.itemsize() != 1)
    fail("frame must be uint8, got " + std::string(py::str(frame.dtype())));
  if (frame.ndim() != 3 || frame.shape(2) != 3) fail("frame must have shape [H, W, 3]");
  if (frame.shape(0) < 1 || frame.shape(1) < 1) fail("frame is empty");
  if (frame.shape(0) > kMaxSide || frame.shape(1) > kMaxSide) fail("frame is larger than 2^24 on a side");
  // Rows may be strided (a crop of a larger frame), pixels must be packed RGB.
  if (frame.strides(2) != 1 || frame.strides(1) != 3 || frame.strides(0) < 3 * frame.shape(1))
    fail("frame pixels must be packed RGB (strides [>=3W, 3, 1]); pass np.ascontiguousarray(frame)");
  if (threads < 1 || threads > 256) fail("threads must be in 1..256, got " + std::to_string(threads));
  Frame f{static_cast<const uint8_t*>(frame.data()), frame.strides(0), int(frame.shape(0)), int(frame.shape(1))};

  std::vector<Group> groups;
  std::vector<Job> jobs;
  if (groups_in.size() == 0) fail("groups is empty");
  for (size_t gi = 0; gi < groups_in.size(); ++gi) {
    const std::string gw = "groups[" + std::to_string(gi) + "]";
    auto gs = get_seq(groups_in[gi], gw + " (R, jobs, targets)", 3);
    Group g;
    g.R = get_int(gs[0], gw + ".R", 1, 1 << 14);
    auto js = get_seq(gs[1], gw + ".jobs"), ts = get_seq(gs[2], gw + ".targets");
    if (js.size() == 0 || ts.size() == 0) fail(gw + " needs at least one job and one target");
    std::vector<int> seen;
    for (size_t i = 0; i < js.size(); ++i) {
      jobs.push_back(parse_job(js[i], int(groups.size()), g.R, f, gw + ".jobs[" + std::to_string(i) + "]"));
      for (const View& v : jobs.back().crops) seen.push_back(v.idx);
      if (jobs.back().global_idx >= 0) seen.push_back(jobs.back().global_idx);
    }
    std::sort(seen.begin(), seen.end());
    if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) fail(gw + ": a view index is written twice");
    for (size_t i = 0; i < ts.size(); ++i) {
      Target t = parse_target(ts[i], g.R, gw + ".targets[" + std::to_string(i) + "]");
      if (int64_t(t.offset) + seen.back() >= t.n)
        fail(gw + ".targets[" + std::to_string(i) + "]: view " + std::to_string(t.offset + seen.back()) +
             " is past the buffer's " + std::to_string(t.n) + " views");
      g.targets.push_back(t);
    }
    groups.push_back(std::move(g));
  }
  py::gil_scoped_release release;  // the arrays stay alive: the caller holds them for the call
  run_plan(f, jobs, groups, threads);
}

std::string simd_level() { return kernels().name; }

std::string set_simd(const std::string& level) {
  if (level != "" && level != "avx512" && level != "avx2" && level != "sse2" && level != "base")
    fail("set_simd: level must be '', 'avx512', 'avx2', 'sse2' or 'base', got '" + level + "'");
  g_kernels.store(select_kernels(level));
  return kernels().name;
}

}  // namespace
}  // namespace evlm

void register_preprocess(py::module_& m) {
#if defined(__unix__) || defined(__APPLE__)
  pthread_atfork(nullptr, nullptr, evlm::atfork_child);
#endif
  m.def("preprocess_views", &evlm::preprocess_views, py::arg("frame"), py::arg("groups"), py::arg("threads") = 1,
        R"doc(Resample one uint8 [H, W, 3] frame into the float32 views of every encoder, in place.

groups: [(R, jobs, targets)], one per distinct encoder resolution R.
  job:    (SH, SW, top, left, pad_rgb, RH, RW, CH, CW, oy, ox, fill_rgb, views)
          the frame sits at (top, left) on a virtual SH x SW source filled with pad_rgb, is resampled
          to RH x RW (PIL bicubic, antialiased) and placed at (oy, ox) on a CH x CW canvas filled
          with fill_rgb.
  views:  [(view_idx, kind, y0, x0)]: kind 0 = R x R crop of the canvas at (y0, x0); kind 1 = the
          whole canvas resized to R x R (at most one per job).
  target: (out float32 [N, 3, R, R] C-contiguous, view_offset, mean[3], std[3]); view v is written to
          out[view_offset + v] as (pixel / 255 - mean) / std.
Raises ValueError naming the offending argument. Releases the GIL; `threads` workers share a pool.)doc");
  m.def("simd_level", &evlm::simd_level, "The kernel set (instruction set, vector width) preprocessing runs.");
  m.def("set_simd", &evlm::set_simd, py::arg("level"),
        "Pick the kernel set: '' (best this CPU has), 'avx512', 'avx2' or 'sse2' (never above what the CPU "
        "supports; the EDGEVLM_SIMD environment variable sets the default). Returns the active set's name. "
        "For tests and benchmarks: every set gives the same numbers within the documented tolerance.");
}
