// edgevlm._C.qgemm and the kernel-set controls (the kernels: qgemm.cpp and the per-ISA files).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "qgemm.h"

namespace py = pybind11;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("qgemm: " + msg); }

void qgemm(int bits, uintptr_t x_ptr, int M, int K, uintptr_t qw_ptr, int N, uintptr_t scales_ptr,
           uintptr_t zeros_ptr, int G, uintptr_t bias_ptr, uintptr_t out_ptr, int threads) {
  if (bits != 8 && bits != 4) fail("bits must be 8 or 4, got " + std::to_string(bits));
  if (M < 1 || N < 1 || K < 1) fail("M, N, K must be positive");
  if (K % evlm::kQBlock) fail("K=" + std::to_string(K) + " is not a multiple of 32");
  if (G < evlm::kQBlock || G % evlm::kQBlock || K % G)
    fail("group " + std::to_string(G) + " must be a multiple of 32 dividing K");
  if (!x_ptr || !qw_ptr || !scales_ptr || !out_ptr || (bits == 4 && !zeros_ptr)) fail("null pointer");
  if (threads < 1 || threads > 256) fail("threads must be in 1..256");
  const evlm::QWeights w{bits, N, K, G, reinterpret_cast<const uint8_t*>(qw_ptr),
                         reinterpret_cast<const void*>(scales_ptr), reinterpret_cast<const uint16_t*>(zeros_ptr),
                         reinterpret_cast<const float*>(bias_ptr)};
  py::gil_scoped_release release;  // pointers are owned by tensors the caller holds for the call
  evlm::qgemm_run(w, reinterpret_cast<const float*>(x_ptr), M, reinterpret_cast<float*>(out_ptr), threads);
}

}  // namespace

void register_qgemm(py::module_& m) {
  m.def("qgemm", &qgemm, py::arg("bits"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("qweight"), py::arg("N"),
        py::arg("scales"), py::arg("zeros"), py::arg("group"), py::arg("bias"), py::arg("out"), py::arg("threads"),
        R"doc(out[M, N] = x[M, K] @ dequant(W)^T + bias, from raw data pointers (edgevlm.runtime.quant checks
dtypes, shapes and contiguity before calling). x, out, bias: float32; qweight/scales/zeros in the packed
layouts described in cpp_ext/qgemm.cpp. Activations are quantised to int8 per 32 values inside.
Releases the GIL.)doc");
  m.def("qgemm_kernels", [] { return std::string(evlm::active_kernel_set().name); },
        "The quantised-matmul kernel set in use (EDGEVLM_QGEMM=<name> picks another this CPU can run).");
  m.def("qgemm_kernel_sets", &evlm::kernel_sets_here,
        "Names of the quantised-matmul kernel sets this CPU can run, best first ('portable' last).");
  m.def("qgemm_peak_gops",
        [](int threads, double seconds) {
          py::gil_scoped_release release;
          return evlm::kernel_set_peak_gops(threads, seconds);
        },
        py::arg("threads"), py::arg("seconds") = 0.3,
        "GOP/s (2 per multiply-add) of the active kernel set's dot-product instruction alone on `threads` threads, "
        "no memory traffic: the integer peak the prefill kernels are judged against (0 for 'portable').");
  m.def("qgemm_use", &evlm::use_kernel_set, py::arg("name"),
        "Make `name` the active kernel set ('' = the automatic choice). Raises ValueError naming the sets this "
        "CPU can run. Not while another thread is inside a kernel.");
}
