"""The compiled GPU paths on a CUDA device: the Triton kernels on CUDA tensors (not the interpreter),
the CUDA-graph decode step, load(device="cuda", quant="int4") on the Triton int4 kernel, and a whole
Pipeline on the GPU against the same model on the CPU.

CI has no GPU, so everything here is skipped there; run it on a GPU machine with the interpreter off:
``TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py`` (scripts/gpu_check.sh does).
"""

import os

import pytest
import torch
from edgevlm_testkit import HAVE_TRITON, assert_kernel_close, assert_within_noise, float64_copy, max_abs

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; see scripts/gpu_check.sh)"),
    pytest.mark.skipif(not HAVE_TRITON, reason="needs triton for the compiled kernels"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET is on: these tests time nothing but must run the compiled kernels"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 references must be IEEE fp32: TF32 convolutions or matmuls would be the larger error.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["vit", "masked", "resampler", "long-head"])
def test_attention_kernel_on_cuda(dtype, case):
    from edgevlm.kernels.attention import attention_reference, triton_attention

    n, h, lq, t, t2, d = {"vit": (2, 6, 257, 257, 0, 64), "masked": (3, 12, 32, 257, 0, 64),
                          "resampler": (2, 8, 64, 729, 64, 72), "long-head": (1, 4, 65, 300, 0, 128)}[case]
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    q, k, v = rnd(n, h, lq, d), rnd(n, h, t, d), rnd(n, h, t, d)
    k2 = v2 = mask = None
    if t2:
        k2, v2 = rnd(n, h, t2, d), rnd(n, h, t2, d)
    if case in ("masked", "resampler"):
        mask = torch.rand(n, t, device="cuda", generator=g) > 0.15
        mask[:, 0] = True
    cast = [x if x is None else x.to(dtype) for x in (q, k, v, k2, v2)]
    out = triton_attention(cast[0], cast[1], cast[2], k2=cast[3], v2=cast[4], key_mask=mask)
    ref = attention_reference(*[x.double() for x in cast[:3]], k2=None if k2 is None else cast[3].double(),
                              v2=None if v2 is None else cast[4].double(), key_mask=mask)
    lowp = attention_reference(cast[0], cast[1], cast[2], k2=cast[3], v2=cast[4], key_mask=mask)
    assert out.dtype == dtype and out.shape == (n, h, lq, d)
    assert_kernel_close(out, ref, lowp, f"attention {case} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_with_pos_kernel_on_cuda(dtype):
    from edgevlm.kernels.token_drop import gather_with_pos_reference, triton_gather_with_pos

    n, length, w, k = 3, 256, 384, 128
    patches = torch.randn(n, length, w, device="cuda").to(dtype)
    pos = torch.randn(1, 1 + length, w, device="cuda").to(dtype)
    cls = torch.randn(1, 1, w, device="cuda").to(dtype)
    ids = torch.stack([torch.randperm(length, device="cuda")[:k].sort().values for _ in range(n)])
    out = triton_gather_with_pos(patches, pos, ids, cls)
    ref = gather_with_pos_reference(patches.double(), pos.double(), ids, cls.double())
    lowp = gather_with_pos_reference(patches, pos, ids, cls)
    assert_kernel_close(out, ref, lowp, f"gather_with_pos {dtype}")


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_matmul_on_cuda(m, group):
    from edgevlm.kernels.int4_gemv import dequantize_triton, int4_matmul, int4_matmul_reference
    from edgevlm.runtime.quant import pack_for_triton, quantize_int4

    n, k = 576, 1536
    w = pack_for_triton(quantize_int4(torch.randn(n, k) * 0.05, group, "w")).to("cuda")
    x = torch.randn(m, k, device="cuda").half()
    out = int4_matmul(x, w)
    ref = int4_matmul_reference(x, w, upcast=True)  # fp32 dequantised weights, fp32 arithmetic
    lowp = torch.nn.functional.linear(x, dequantize_triton(w).to("cuda").half())  # cuBLAS fp16
    assert out.shape == (m, n)
    assert_kernel_close(out, ref, lowp, f"int4 matmul m={m} g={group}")


@torch.no_grad()
def test_cuda_graph_step_matches_eager_decoder():
    from edgevlm.config import DecoderConfig
    from edgevlm.runtime.cuda_graph import GraphedDecodeStep
    from edgevlm.runtime.decoder import Decoder

    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(vocab_size=97, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                     max_seq_len=64)).cuda().eval()
    dec64 = float64_copy(dec)  # the eager cached path in float64: the fp32 noise of each step
    prompt = torch.randint(0, 97, (1, 7), device="cuda")
    ref_cache, cache, cache64 = dec.new_cache(max_len=24), dec.new_cache(max_len=24), dec64.new_cache(max_len=24)
    ref_logits = dec(prompt, cache=ref_cache, last_only=True)[:, -1]
    logits = dec(prompt, cache=cache, last_only=True)[:, -1]
    dec64(prompt, cache=cache64)
    step = GraphedDecodeStep(dec, cache)
    step.capture()
    assert step.graph is not None
    for i in range(8):
        tok = ref_logits.argmax(-1)
        ref_logits = dec(tok[:, None], cache=ref_cache)[:, -1]
        noise = max_abs(ref_logits, dec64(tok[:, None], cache=cache64)[:, -1])
        logits = step(tok, cache.length)
        assert_within_noise(logits, ref_logits, f"CUDA graph step {i} vs eager cached decoder", noise=noise)
    assert cache.length == ref_cache.length


@torch.no_grad()
def test_load_int4_on_cuda_runs_the_triton_kernel():
    import edgevlm
    from edgevlm.kernels.int4_gemv import dequantize_triton
    from edgevlm.runtime.quant import TritonInt4Linear

    pipe = edgevlm.load("tiny", device="cuda", dtype="float16", quant="int4")
    swapped = {name: m for name, m in pipe.decoder.named_modules() if isinstance(m, TritonInt4Linear)}
    assert swapped and not any(isinstance(m, torch.nn.Linear) for m in pipe.decoder.modules())
    assert "(triton)" in pipe.info()["decoder"]["quantization"]
    # The reference: the same int4 codes dequantised into a float decoder.
    ref = edgevlm.load("tiny", device="cuda", dtype="float32", quant="none").decoder
    for name, m in swapped.items():
        ref.get_submodule(name).weight.copy_(dequantize_triton(m.weight4).float())
    lowp = edgevlm.load("tiny", device="cuda", dtype="float16", quant="none").decoder
    lowp.load_state_dict({k: v.half() for k, v in ref.state_dict().items()})
    ids = torch.randint(0, ref.cfg.vocab_size, (1, 12), device="cuda")
    assert_kernel_close(pipe.decoder(ids), ref(ids), lowp(ids), "int4 decoder logits")
    image = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8).numpy()
    out = pipe.generate(image, "Describe.", max_new_tokens=6)
    assert out.visual_tokens > 0 and (len(out.token_ids) == 6 or out.stop_reason != "max_new_tokens")


@torch.no_grad()
def test_pipeline_on_cuda_matches_cpu():
    import numpy as np

    import edgevlm

    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    cpu = edgevlm.load("tiny", quant="none", embedding_cache_bytes=0)
    gpu = edgevlm.load("tiny", device="cuda", quant="none", embedding_cache_bytes=0)
    a, b = cpu.tower(image), gpu.tower(image).cpu()
    # The same math on two devices (TF32 off): within the CPU model's fp32 noise, measured in float64.
    pre = cpu.tower.preprocessor([image])
    a64 = float64_copy(cpu.tower.model)({k: v.double() for k, v in pre.views.items()}, pre.token_masks)
    assert_within_noise(b, a, "tower on CUDA vs CPU", noise=max_abs(a, a64.reshape(a.shape)))
    ids = torch.randint(0, cpu.decoder.cfg.vocab_size, (1, 20))
    la, lb = cpu.decoder(ids), gpu.decoder(ids.cuda()).cpu()
    la64 = float64_copy(cpu.decoder)(ids)
    assert_within_noise(lb, la, "decoder logits on CUDA vs CPU", noise=max_abs(la, la64))
    oa, ob = cpu.generate(image, "hi", max_new_tokens=8), gpu.generate(image, "hi", max_new_tokens=8)
    assert oa.token_ids == ob.token_ids


@torch.no_grad()
def test_pipeline_decode_graphs_match_the_eager_pipeline():
    """decode_graphs="on": every bucket's greedy step captured at load, tokens as the eager Pipeline's
    (greedy and seeded sampling), a sampling setting captured once with its cost reported."""
    import numpy as np

    import edgevlm

    image = (np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)
    kw = dict(device="cuda", quant="none", embedding_cache_bytes=0, max_context=300)
    eager = edgevlm.load("tiny", **kw)
    graphed = edgevlm.load("tiny", decode_graphs="on", **kw)
    info = graphed.info()["decode_graphs"]
    assert info["graphs"] and info["buckets"] == [128, 256, 300] and info["captured"] == 3
    # prompt ~150 positions (135 visual) + 120 new: the answer crosses from the 256 bucket into 300
    a = eager.generate(image, "describe", max_new_tokens=120)
    b = graphed.generate(image, "describe", max_new_tokens=120)
    assert a.token_ids == b.token_ids and "graph_capture" not in b.timings
    s1 = graphed.generate(image, "describe", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)
    assert s1.timings.get("graph_capture", 0) > 0  # a new sampling setting: captured on first use
    s2 = graphed.generate(image, "describe", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)
    assert "graph_capture" not in s2.timings and s1.token_ids == s2.token_ids
    ref = eager.generate(image, "describe", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)
    assert ref.token_ids == s1.token_ids
