// Runs the quantised-matmul kernels on cases written by tests/test_qgemm_kernels.py, without Python:
// built for another CPU (aarch64 with a cross compiler) and run under emulation (qemu-user), it tests
// the kernel sets this machine cannot run natively. The float64 oracle stays in the Python test, which
// reads the outputs back.
//
//   qgemm_selftest DIR [SET]   DIR/cases.txt: one case per line
//                              "name bits N K G M threads has_bias"; DIR/<name>.{qw,scales,zeros,bias,x}
//                              raw little-endian arrays; writes DIR/<name>.<SET>.out (fp32 [M, N]).
//                              SET: a kernel set name, or "" for the automatic choice. Prints the sets
//                              this CPU runs, the one used, and its dot-product peak (0: portable).
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "qgemm.h"

namespace {
std::vector<char> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: qgemm_selftest DIR [SET]\n";
    return 2;
  }
  const std::string dir = argv[1], want = argc > 2 ? argv[2] : "";
  try {
    evlm::use_kernel_set(want);
    std::cout << "sets:";
    for (const std::string& s : evlm::kernel_sets_here()) std::cout << ' ' << s;
    const std::string used = evlm::active_kernel_set().name;
    std::cout << "\nused: " << used << '\n';
    std::ifstream cases(dir + "/cases.txt");
    std::string line;
    int n_cases = 0;
    while (std::getline(cases, line)) {
      std::istringstream in(line);
      std::string name;
      int bits, N, K, G, M, threads, has_bias;
      if (!(in >> name >> bits >> N >> K >> G >> M >> threads >> has_bias)) continue;
      const std::string base = dir + "/" + name;
      const std::vector<char> qw = slurp(base + ".qw"), sc = slurp(base + ".scales"), x = slurp(base + ".x");
      const std::vector<char> zr = bits == 4 ? slurp(base + ".zeros") : std::vector<char>();
      const std::vector<char> bias = has_bias ? slurp(base + ".bias") : std::vector<char>();
      if (x.size() != size_t(M) * K * 4) throw std::runtime_error(name + ": x has the wrong size");
      const evlm::QWeights w{bits, N, K, G, reinterpret_cast<const uint8_t*>(qw.data()), sc.data(),
                             bits == 4 ? reinterpret_cast<const uint16_t*>(zr.data()) : nullptr,
                             has_bias ? reinterpret_cast<const float*>(bias.data()) : nullptr};
      std::vector<float> out(size_t(M) * N);
      evlm::qgemm_run(w, reinterpret_cast<const float*>(x.data()), M, out.data(), threads);
      std::ofstream o(base + "." + used + ".out", std::ios::binary);
      o.write(reinterpret_cast<const char*>(out.data()), std::streamsize(out.size() * 4));
      ++n_cases;
    }
    std::cout << "cases: " << n_cases << '\n';
    std::cout << "peak_gops: " << evlm::kernel_set_peak_gops(1, 0.05) << '\n';  // runs the set's peak loop
  } catch (const std::exception& e) {
    std::cerr << "qgemm_selftest: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
