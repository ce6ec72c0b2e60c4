"""Every quantised-matmul kernel set against the float64 oracle (``quant.qgemm_reference``).

The sets this CPU runs are switched in-process (``_C.qgemm_use``); the aarch64 set (NEON dotprod) is
built with Debian's cross compiler and run under qemu-user, whose outputs come back here to the same
oracle. What cannot run here is skipped with the reason: AVX-VNNI's VEX encoding needs an Intel client
CPU, but its source is the one ``avx512vl-vnni256`` runs (cpp_ext/qgemm_x86.cpp), so its arithmetic is
tested wherever AVX-512 VNNI is."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevlm import _C
from edgevlm.runtime import quant as Q

from edgevlm_testkit import assert_kernel_matches_reference

SETS = _C.qgemm_kernel_sets()
CASES = [(8, 0), (8, 32), (4, 32), (4, 64), (4, 128)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel_set(request):
    """Makes request.param the active set for one test, then restores the automatic choice."""
    before = _C.qgemm_kernels()
    _C.qgemm_use(request.param)
    try:
        yield request.param
    finally:
        _C.qgemm_use(before)


def _case(bits, group, n, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, :40] *= 20  # an outlier run, so groups differ in scale
    p = Q.quantize_int8(w, group) if bits == 8 else Q.quantize_int4(w, group)
    x = torch.randn(m, k, generator=g)
    x[:, 7] = 30.0  # an activation outlier: its block gets a coarse scale, the others must not
    return p, x, torch.randn(n, generator=g)


@pytest.mark.parametrize("kernel_set", SETS, indirect=True)
@pytest.mark.parametrize("bits,group", CASES)
# 1-3 tokens: decode kernels; 4+: the tiled prefill kernels, with token and row-block remainders
# (200 rows = 12.5 row blocks) and more than one 64-token pass.
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 70])
def test_kernel_set_matches_reference(kernel_set, bits, group, m):
    p, x, bias = _case(bits, group, n=200, k=256, m=m, seed=m)
    out = Q.QuantLinear(p, bias)(x)
    assert _C.qgemm_kernels() == kernel_set
    assert out.shape == (m, 200)
    assert_kernel_matches_reference(out, x, p, bias, f"{kernel_set} qgemm int{bits} g{group} m={m}")


@pytest.mark.parametrize("kernel_set", SETS, indirect=True)
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32)])
def test_threads_split_rows_never_sums(kernel_set, bits, group):
    p, x, _ = _case(bits, group, n=512, k=128, m=9, seed=1)
    lin = Q.QuantLinear(p)
    lin.threads = 1
    one = lin(x)
    lin.threads = 2
    assert torch.equal(one, lin(x))


@pytest.mark.parametrize("kernel_set", SETS, indirect=True)
def test_peak_loop_measures_the_dot_product_instruction(kernel_set):
    peak = _C.qgemm_peak_gops(1, 0.05)
    assert (peak > 1.0) if kernel_set != "portable" else peak == 0.0, peak


def test_unknown_set_is_refused_and_nothing_changes():
    before = _C.qgemm_kernels()
    with pytest.raises(ValueError, match="no kernel set 'sse9'.*portable"):
        _C.qgemm_use("sse9")
    assert _C.qgemm_kernels() == before
    assert SETS[-1] == "portable" and SETS[0] == before  # the automatic choice is the best this CPU runs


def test_avx_vnni_runs_where_the_cpu_has_it():
    if "avx-vnni" not in SETS:
        pytest.skip("this CPU has no AVX-VNNI (Intel Alder Lake and later client cores); its source is "
                    "tested here as avx512vl-vnni256 when the CPU has AVX-512 VNNI")
    assert SETS.index("avx-vnni") < SETS.index("portable")


# ---- aarch64 under emulation ---------------------------------------------------------------------
CROSS, QEMU = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
needs_arm_emulation = pytest.mark.skipif(
    not (CROSS and QEMU),
    reason="needs Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them where apt-get works)")


@pytest.fixture(scope="module")
def arm_selftest(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("arm") / "qgemm_selftest"
    src = [REPO / "tests/cpp/qgemm_selftest.cpp"] + [REPO / "cpp_ext" / f for f in
                                                     ("qgemm.cpp", "qgemm_arm.cpp", "qgemm_x86.cpp")]
    r = subprocess.run([CROSS, "-std=c++17", "-O2", "-static", "-pthread", f"-I{REPO / 'cpp_ext'}",
                        *map(str, src), "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


def _write_cases(folder: Path) -> dict:
    cases, lines = {}, []
    for bits, group in CASES:
        for m in (1, 3, 5, 40):
            name = f"i{bits}g{group}m{m}"
            # n = 76: the last row block's second half holds 4 rows (i8mm works in halves of 8)
            p, x, bias = _case(bits, group, n=76, k=128, m=m, seed=100 + m)
            cases[name] = (p, x, bias)
            for ext, t in (("qw", p.qweight), ("scales", p.scales), ("zeros", p.zeros), ("bias", bias), ("x", x)):
                if t is not None:
                    t.contiguous().numpy().tofile(folder / f"{name}.{ext}")
            lines.append(f"{name} {bits} {p.n} {p.k} {p.group} {m} 2 1")
    (folder / "cases.txt").write_text("\n".join(lines) + "\n")
    return cases


def _run_arm(exe: Path, folder: Path, cpu: str, kernel_set: str = "") -> str:
    r = subprocess.run([QEMU, "-cpu", cpu, str(exe), str(folder), kernel_set], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


@needs_arm_emulation
@pytest.mark.parametrize("kernel_set", ["neon-i8mm", "neon-dotprod", "portable"])
def test_aarch64_kernel_sets_under_qemu(arm_selftest, tmp_path, kernel_set):
    cases = _write_cases(tmp_path)
    out = _run_arm(arm_selftest, tmp_path, "max", kernel_set)  # qemu's "max" Arm core has dotprod and i8mm
    assert f"used: {kernel_set}" in out and f"cases: {len(cases)}" in out, out
    peak = float(out.split("peak_gops: ")[1].split()[0])
    assert (peak > 0) == (kernel_set != "portable"), out  # sdot's peak loop ran (its rate means nothing under qemu)
    for name, (p, x, bias) in cases.items():
        got = torch.from_numpy(np.fromfile(tmp_path / f"{name}.{kernel_set}.out", dtype=np.float32))
        assert_kernel_matches_reference(got.view(x.shape[0], p.n), x, p, bias, f"aarch64 {kernel_set} {name}")


@needs_arm_emulation
def test_aarch64_picks_the_best_set_the_core_has(arm_selftest, tmp_path):
    (tmp_path / "cases.txt").write_text("")
    assert "sets: neon-i8mm neon-dotprod portable\nused: neon-i8mm" in _run_arm(arm_selftest, tmp_path, "max")
    out = _run_arm(arm_selftest, tmp_path, "neoverse-n1")  # Armv8.2 with dotprod, no i8mm (Graviton 2)
    assert "sets: neon-dotprod portable\nused: neon-dotprod" in out, out
    out = _run_arm(arm_selftest, tmp_path, "cortex-a53")  # Armv8.0: no sdot
    assert "sets: portable\nused: portable" in out, out
