// edgevlm._C: pybind11 bindings for the C++ fast paths.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_preprocess(py::module_& m);
void register_qgemm(py::module_& m);
void register_decode_step(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "edgevlm C++ fast paths";
  register_preprocess(m);
  register_qgemm(m);
  register_decode_step(m);
}
