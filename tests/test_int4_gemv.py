"""The Triton int4 kernel's GPU layout (pure torch, always runs) and the kernel itself against its
reference under TRITON_INTERPRET=1 (CPU, small shapes; skipped when triton is not importable).

On a GPU the same kernel runs compiled; bench/gpu_decode.py checks it there.
"""

import copy

import pytest
from edgevlm_testkit import HAVE_TRITON, assert_kernel_close, assert_within_noise, float64_copy, max_abs
import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.errors import BackendUnavailableError, ConfigError
from edgevlm.kernels.int4_gemv import dequantize_triton, int4_matmul, int4_matmul_reference, unpack_codes_int32
from edgevlm.runtime.quant import (TritonInt4Linear, dequantize, pack_for_triton, pack_int4_codes, quantize_int4,
                                   quantize_int8, swap_linears_for_triton, unlanes, unpack_codes)

# ---- the layout (pure torch) --------------------------------------------------------------------

@pytest.mark.parametrize("n,k,group", [(64, 128, 32), (37, 96, 32), (8, 256, 128), (20, 192, 64)])
def test_pack_for_triton_round_trips_codes_scales_zeros(n, k, group):
    # Every code value in every nibble slot, including 8..15 in the top nibble (the int32 sign bit).
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    codes[0, :16] = torch.arange(16, dtype=torch.uint8)
    codes[1, 7::8] = 15
    scales = torch.rand(n, k // group).half()
    zeros = (torch.randn(n, k // group) * 3).half()
    p = pack_int4_codes(codes, scales, zeros, group, "test")
    w = pack_for_triton(p)
    assert w.qweight.dtype == torch.int32 and w.qweight.shape == (n, k // 8)
    assert w.scales.dtype == w.zeros.dtype == torch.float16 and w.scales.shape == w.zeros.shape == (n, k // group)
    assert (w.qweight < 0).any()  # nibble 7 >= 8 really uses the sign bit
    assert torch.equal(unpack_codes_int32(w.qweight), unpack_codes(p))
    assert torch.equal(unpack_codes_int32(w.qweight), codes.to(torch.int16))
    assert torch.equal(w.scales, unlanes(p.scales, p.n)) and torch.equal(w.scales, scales)
    assert torch.equal(w.zeros, unlanes(p.zeros, p.n)) and torch.equal(w.zeros, zeros)
    assert torch.equal(dequantize_triton(w), dequantize(p))  # bit-exact, same arithmetic


def test_pack_for_triton_refuses_int8_and_odd_groups():
    with pytest.raises(ConfigError, match="int4"):
        pack_for_triton(quantize_int8(torch.randn(16, 64)))
    with pytest.raises(ConfigError, match="group"):
        pack_for_triton(pack_int4_codes(torch.zeros(16, 96, dtype=torch.uint8), torch.ones(16, 1).half(),
                                        torch.zeros(16, 1).half(), 96, "test"))


def test_swap_replaces_every_linear_and_runs_off_gpu_on_the_reference(monkeypatch):
    """Off CUDA and without the interpreter the module runs the reference, so the swap is testable here."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = nn.Sequential(nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 16, bias=False))
    deq = [dequantize(quantize_int4(model[i].weight, 32)) for i in (0, 2)]  # what the swap must compute with
    x = torch.randn(2, 3, 64)

    def dense(dt):
        return F.linear(F.silu(F.linear(x.to(dt), deq[0].to(dt), model[0].bias.detach().to(dt))), deq[1].to(dt))

    expected, expected64 = dense(torch.float32), dense(torch.float64)
    swap_linears_for_triton(model, group=32)
    assert isinstance(model[0], TritonInt4Linear) and isinstance(model[2], TritonInt4Linear)
    assert model[2].bias is None and model[0].bias.dtype == torch.float32
    assert torch.equal(dequantize_triton(model[0].weight4), deq[0])
    out = model(x)
    assert out.shape == (2, 3, 16)
    assert_within_noise(out, expected, "swapped model vs dense dequantised model", noise=max_abs(expected, expected64))


def test_swap_checks_every_shape_before_changing_anything():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8), nn.Linear(8 * 5, 4))  # 40 inputs: not /32
    with pytest.raises(ConfigError, match="40 inputs"):
        swap_linears_for_triton(model, group=32)
    assert all(isinstance(m, nn.Linear) for m in model)


def test_launcher_refuses_cpu_tensors_without_interpreter(monkeypatch):
    w = pack_for_triton(quantize_int4(torch.randn(16, 64), 32))
    if HAVE_TRITON:
        import triton  # noqa: F401  (first import while TRITON_INTERPRET=1, so the interpreted tests still run)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not HAVE_TRITON:
        with pytest.raises(BackendUnavailableError, match="triton"):
            int4_matmul(torch.randn(1, 64), w)
        return
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        int4_matmul(torch.randn(1, 64), w)


# ---- the kernel, interpreted ----------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,group,bias", [(64, 128, 32, True), (40, 96, 32, False), (64, 256, 128, False)])
def test_kernel_matches_reference_interpreted(interpreter, m, dtype, n, k, group, bias):
    # M = 1..3 take the GEMV path; M = 17 fp16 takes the tl.dot path (masked partial M block); N = 40 and
    # K = 96 give partial N and K blocks. bf16 is left out: the interpreter's tl.dot mishandles bf16
    # (a plain 16x16 bf16 dot is wrong by 1e10 in triton 3.9's interpreter), and the GEMV is dtype-generic.
    torch.manual_seed(m * 1000 + n + k)
    w = pack_for_triton(quantize_int4(torch.randn(n, k), group))
    b = torch.randn(n) if bias else None
    x = torch.randn(m, k).to(dtype)
    out = int4_matmul(x, w, b)
    assert out.shape == (m, n) and out.dtype == dtype
    ref32 = int4_matmul_reference(x, w, b, upcast=True)
    lowp = F.linear(x, dequantize_triton(w).to(dtype), None if b is None else b.to(dtype))
    assert_kernel_close(out, ref32, lowp, f"m={m} {dtype} [{n}x{k}] g{group}")
    # A row stride other than K (a column slice, passed to the kernel as is) must give the same result.
    xs = torch.randn(m, k + 8).to(dtype)[:, 8:]
    assert xs.stride() == (k + 8, 1)
    torch.testing.assert_close(int4_matmul(xs, w, b), int4_matmul(xs.contiguous(), w, b), atol=0, rtol=0)


def test_triton_linear_interpreted_matches_reference_module(interpreter, monkeypatch):
    lin = nn.Linear(128, 64)
    mod = TritonInt4Linear(pack_for_triton(quantize_int4(lin.weight, 32)), lin.bias)
    x = torch.randn(2, 1, 128)
    out = mod(x)  # the kernel (interpreted)
    monkeypatch.delenv("TRITON_INTERPRET")
    ref = mod(x)  # the reference (no CUDA, no interpreter)
    assert out.shape == ref.shape == (2, 1, 64)
    ref64 = F.linear(x.double(), dequantize_triton(mod.weight4).double(), lin.bias.detach().double())
    assert_within_noise(out, ref, "interpreted TritonInt4Linear vs reference", noise=max_abs(ref, ref64))


@torch.no_grad()
def test_graphed_step_over_triton_linears_matches_cached_path_interpreted(interpreter):
    """The two pieces together, as the GPU bench runs them: a decoder swapped to TritonInt4Linear, decoded
    by GraphedDecodeStep (eagerly here) and by the ordinary cached path, both on the interpreted kernel."""
    from edgevlm.config import DecoderConfig
    from edgevlm.runtime.cuda_graph import GraphedDecodeStep
    from edgevlm.runtime.decoder import Decoder

    cfg = DecoderConfig(vocab_size=97, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_seq_len=32)
    dec = Decoder(cfg).eval()
    dense = copy.deepcopy(dec)  # becomes the same decoder with nn.Linear over the dequantised int4 weights
    swap_linears_for_triton(dec, group=32)
    assert not any(isinstance(m, nn.Linear) for m in dec.modules())
    for name, m in dec.named_modules():
        if isinstance(m, TritonInt4Linear):
            dense.get_submodule(name).weight.copy_(dequantize_triton(m.weight4))
    dense64 = float64_copy(dense)  # the decoder's fp32 rounding noise: dense fp32 vs dense fp64
    prompt = torch.randint(0, cfg.vocab_size, (1, 4))
    d32_cache, d64_cache = dense.new_cache(max_len=8), dense64.new_cache(max_len=8)
    dense(prompt, cache=d32_cache)
    dense64(prompt, cache=d64_cache)
    ref_cache, cache = dec.new_cache(max_len=8), dec.new_cache(max_len=8)
    ref = dec(prompt, cache=ref_cache, last_only=True)[:, -1]
    dec(prompt, cache=cache)
    step = GraphedDecodeStep(dec, cache)
    for i in range(3):
        tok = ref.argmax(-1)
        out = step(tok, cache.length)
        ref = dec(tok[:, None], cache=ref_cache)[:, -1]
        noise = max_abs(dense(tok[:, None], cache=d32_cache)[:, -1], dense64(tok[:, None], cache=d64_cache)[:, -1])
        assert_within_noise(out, ref, f"graphed vs cached step {i} on TritonInt4Linear", noise=noise)
