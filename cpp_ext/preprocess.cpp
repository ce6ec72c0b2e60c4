// Placeholder: the multithreaded view preprocessing lands here.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_preprocess(py::module_& m) { (void)m; }
