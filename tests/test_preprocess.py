"""C++ preprocessing against the PIL reference, buffers, threads and backend selection.

Tolerance (stated in edgevlm/runtime/preprocess.py): the C++ path uses PIL's exact fixed-point
weights and rounds/clamps where PIL does, so it differs from the reference by at most one 8-bit level
(contract: 3/255) and on average by far less than 0.01 level, in pixel units (times 1/std after
normalisation).
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import skimage.data
import torch
from edgevlm_testkit import EPS32
from PIL import Image

from edgevlm.config import (
    CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, ConvNeXtConfig, SphinxFusionConfig,
    TowerConfig, ViewConfig, ViTConfig,
)
from edgevlm.errors import BackendUnavailableError, ShapeError
from edgevlm.runtime import preprocess as pp
from edgevlm.runtime.preprocess import Preprocessor, resize_virtual
from edgevlm.runtime.views import pad_to_square

_C = pytest.importorskip("edgevlm._C")

MAX_LEVELS = 1.0  # measured bound, in whole 8-bit levels; the documented contract is 3 levels
MEAN_LEVELS = 0.01
# Around those whole levels: fp32 rounding of both normalised values (pixel * a + b) and of the conversion
# back to levels below, a few ulps of the normalised scale (measured excess: <= 0.5 ulp).
NORM_ULPS = 4


def tower(view: ViewConfig) -> TowerConfig:
    """Three encoders at two resolutions with three different normalisations."""
    encs = (
        ViTConfig(name="clip", image_size=56, patch_size=14, width=16, depth=1, heads=2, mlp_dim=32,
                  mean=CLIP_MEAN, std=CLIP_STD),
        ViTConfig(name="dino", image_size=56, patch_size=14, width=16, depth=1, heads=2, mlp_dim=32,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ConvNeXtConfig(name="cnx", image_size=64, depths=(1, 1), dims=(8, 16), mean=HALF_MEAN, std=HALF_STD),
    )
    fusion = SphinxFusionConfig(encoders=("clip", "dino", "cnx"), in_widths=(16, 16, 16), out_width=32)
    return TowerConfig(encoders=encs, connector=fusion, views=view)


VIEWS = {
    "pad0": ViewConfig(kind="pad_square"),
    "pad2": ViewConfig(kind="pad_square", crop_grid=2),
    "pad3": ViewConfig(kind="pad_square", crop_grid=3, pad_rgb=(0, 255, 17)),
    "stretch": ViewConfig(kind="stretch"),
    "anyres": ViewConfig(kind="anyres", anyres_grids=((1, 2), (2, 1), (2, 2), (1, 3)), anyres_fill=(9, 9, 9)),
}


def _photos():
    a, c, k = skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()
    return {
        "astronaut": a, "chelsea": np.ascontiguousarray(c), "coffee": k,
        "1x1": np.ascontiguousarray(a[200:201, 200:201]), "3x500": np.ascontiguousarray(k[100:103, :500]),
        "999x17": np.ascontiguousarray(np.tile(c, (4, 1, 1))[:999, 200:217]),
        "portrait": np.ascontiguousarray(a[:, 100:300]), "landscape": np.ascontiguousarray(k[150:260]),
    }


PHOTOS = _photos()


def assert_close_levels(a: dict, b: dict, t: TowerConfig) -> None:
    for e in t.encoders:
        std = torch.tensor(e.std).view(1, 3, 1, 1)
        d = (a[e.name] - b[e.name]).abs() * std * 255  # back to 8-bit levels
        slack = NORM_ULPS * EPS32 * b[e.name].abs().max().item() * std.max().item() * 255  # fp32 ulps, in levels
        assert d.max().item() <= MAX_LEVELS + slack, f"{e.name}: max |diff| {d.max().item():.6f} levels"
        assert d.mean().item() <= MEAN_LEVELS, f"{e.name}: mean |diff| {d.mean().item():.4f} levels"


@pytest.mark.parametrize("view", list(VIEWS))
def test_cpp_matches_reference(view):
    t = tower(VIEWS[view])
    cpp, ref = Preprocessor(t, backend="cpp", threads=2), Preprocessor(t, backend="reference")
    names = list(PHOTOS)
    for batch in (names[:3], names[3:]):  # real photos, then odd sizes: batches of several images
        imgs = [PHOTOS[n] for n in batch]
        a, b = cpp(imgs), ref(imgs)
        assert a.backend == "cpp" and b.backend == "reference"
        assert a.views_per_image == b.views_per_image
        n = sum(a.views_per_image)
        assert tuple(a.views["cnx"].shape) == (n, 3, 64, 64) and tuple(a.views["clip"].shape) == (n, 3, 56, 56)
        assert_close_levels(a.views, b.views, t)
        if view == "anyres":
            for name in a.token_masks:
                assert torch.equal(a.token_masks[name], b.token_masks[name])


@pytest.mark.parametrize("level", ["avx2", "sse2"])
def test_every_kernel_set_matches_reference(level):
    # The x86 build carries AVX-512, AVX2 and SSE2 kernels (the 4-wide set is the one aarch64 builds);
    # set_simd can only lower the level, so on a CPU without a set this re-tests a higher one.
    t = tower(VIEWS["pad2"])
    imgs = [PHOTOS["astronaut"], PHOTOS["999x17"], PHOTOS["3x500"]]
    ref = Preprocessor(t, backend="reference")(imgs)
    try:
        name = _C.set_simd(level)
        got = Preprocessor(t, backend="cpp", threads=2)(imgs)
        assert name in got.backend_reason or name == _C.simd_level()
    finally:
        _C.set_simd("")
    assert_close_levels(got.views, ref.views, t)
    with pytest.raises(ValueError, match="level"):
        _C.set_simd("avx9000")


def test_reference_equals_materialised_padded_square():
    # The bounded-memory reference is bit-identical to padding the square and resizing it with PIL.
    for img in (PHOTOS["portrait"], PHOTOS["landscape"], PHOTOS["999x17"]):
        h, w = img.shape[:2]
        g = pad_to_square(h, w)
        sq = Image.new("RGB", (g.side, g.side), (122, 116, 104))
        sq.paste(Image.fromarray(img), (g.left, g.top))
        for size in (56, 112):
            expect = np.asarray(sq.resize((size, size), Image.BICUBIC))
            got = resize_virtual(Image.fromarray(img), (g.side, g.side, g.top, g.left), (122, 116, 104), (size, size))
            np.testing.assert_array_equal(np.asarray(got), expect)


def test_full_hd_frame_is_close_to_pil():
    frame = np.ascontiguousarray(np.tile(PHOTOS["astronaut"], (3, 4, 1))[:1080, :1920])
    t = tower(VIEWS["pad2"])
    assert_close_levels(Preprocessor(t, "cpp")([frame]).views, Preprocessor(t, "reference")([frame]).views, t)


def test_out_buffers_written_in_place():
    t = tower(VIEWS["pad2"])
    pre = Preprocessor(t, backend="cpp")
    imgs = [PHOTOS["chelsea"], PHOTOS["coffee"]]
    out = {"clip": torch.full((10, 3, 56, 56), float("nan")), "cnx": torch.full((10, 3, 64, 64), float("nan"))}
    ptrs = {k: v.data_ptr() for k, v in out.items()}
    res = pre(imgs, out=out)
    fresh = pre(imgs)
    for k in out:
        assert res.views[k].data_ptr() == ptrs[k] and res.views[k] is out[k]
        assert torch.equal(out[k], fresh.views[k])  # every element written (no NaN left)
    assert tuple(res.views["dino"].shape) == (10, 3, 56, 56)  # encoders without a buffer get a new one
    ref = Preprocessor(t, backend="reference")(imgs, out={"clip": torch.zeros(10, 3, 56, 56)})
    assert_close_levels(ref.views, fresh.views, t)


@pytest.mark.parametrize("bad", [
    {"clip": torch.zeros(9, 3, 56, 56)},                      # wrong number of views
    {"clip": torch.zeros(10, 3, 64, 64)},                     # wrong resolution
    {"clip": torch.zeros(10, 3, 56, 56, dtype=torch.float64)},
    {"clip": torch.zeros(10, 3, 56, 112)[..., ::2]},          # not contiguous
    {"clip": np.zeros((10, 3, 56, 56), np.float32)},          # not a tensor
    {"nope": torch.zeros(10, 3, 56, 56)},                     # unknown encoder
    {"clip": (shared := torch.zeros(10, 3, 56, 56)), "dino": shared},  # two encoders, one buffer
])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_wrong_buffers_raise_shape_error(bad, backend):
    with pytest.raises(ShapeError):
        Preprocessor(tower(VIEWS["pad2"]), backend=backend)([PHOTOS["chelsea"], PHOTOS["coffee"]], out=bad)


def test_threads_do_not_change_results():
    frame = np.ascontiguousarray(np.tile(PHOTOS["coffee"], (2, 2, 1))[:720, :1100])
    for view in ("pad2", "anyres", "stretch"):
        t = tower(VIEWS[view])
        one, two = Preprocessor(t, "cpp", threads=1)([frame]), Preprocessor(t, "cpp", threads=2)([frame])
        three = Preprocessor(t, "cpp", threads=3)([frame])
        for k in one.views:
            assert torch.equal(one.views[k], two.views[k]) and torch.equal(one.views[k], three.views[k])


def test_concurrent_callers_and_strided_frames():
    t = tower(VIEWS["pad2"])
    pre = Preprocessor(t, "cpp", threads=2)
    big = np.tile(PHOTOS["astronaut"], (2, 2, 1))
    roi = big[100:700, 50:900]  # a row-strided view: passed to C++ without a copy
    assert not roi.flags.c_contiguous
    expect = pre([np.ascontiguousarray(roi)]).views
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                results.append(pre([roi]).views)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 15
    for r in results:
        for k in r:
            assert torch.equal(r[k], expect[k])


def test_cpp_requested_without_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "edgevlm._C", None)  # the import now fails as if never built
    with pytest.raises(BackendUnavailableError, match="pip install"):
        Preprocessor(tower(VIEWS["pad2"]), backend="cpp")
    monkeypatch.setattr(pp, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="reference"):
        pre = Preprocessor(tower(VIEWS["pad2"]), backend="auto")
    assert pre.backend == "reference" and "not importable" in pre.backend_reason
    res = pre([PHOTOS["chelsea"]])
    assert res.backend == "reference" and "not importable" in res.backend_reason


def test_auto_picks_cpp_and_says_so():
    pre = Preprocessor(tower(VIEWS["anyres"]))
    assert pre.backend == "cpp" and "available" in pre.backend_reason
    res = pre(PHOTOS["coffee"])  # a single array is one image
    assert res.backend == "cpp" and res.ms > 0 and res.views_per_image == pre.views_per_image([PHOTOS["coffee"]])


def test_non_array_inputs_go_through_load_image():
    pre = Preprocessor(tower(VIEWS["pad0"]), "cpp")
    gray = PHOTOS["chelsea"][..., 0]
    a = pre([gray, Image.fromarray(PHOTOS["chelsea"])])
    b = pre([np.repeat(gray[..., None], 3, axis=2), PHOTOS["chelsea"]])
    for k in a.views:
        assert torch.equal(a.views[k], b.views[k])
    with pytest.raises(Exception, match=r"images\[0\]"):
        pre([np.zeros((4, 4, 3), np.float32)])


def test_cpp_validates_its_arguments():
    frame = PHOTOS["chelsea"]
    out = np.zeros((1, 3, 8, 8), np.float32)
    job = (451, 451, 75, 0, (0, 0, 0), 8, 8, 8, 8, 0, 0, (0, 0, 0), [(0, 0, 0, 0)])
    ok = [(8, [job], [(out, 0, (0, 0, 0), (1, 1, 1))])]
    _C.preprocess_views(frame, ok, 1)
    assert np.isfinite(out).all() and 0.3 < out.max() <= 1.0  # std 1: pixel / 255

    def bad(groups, match, f=frame, threads=1):
        with pytest.raises(ValueError, match=match):
            _C.preprocess_views(f, groups, threads)

    bad(ok, "uint8", f=frame.astype(np.float32))
    bad(ok, r"\[H, W, 3\]", f=np.ascontiguousarray(frame[..., :2]))
    bad(ok, "threads", threads=0)
    bad([(8, [job], [(out.astype(np.float64), 0, (0, 0, 0), (1, 1, 1))])], "float32")
    bad([(8, [job], [(np.zeros((1, 3, 8, 9), np.float32), 0, (0, 0, 0), (1, 1, 1))])], "shape")
    bad([(8, [job], [(out, 1, (0, 0, 0), (1, 1, 1))])], "past the buffer")
    bad([(8, [job], [(out, 0, (0, 0, 0), (1, 0, 1))])], "std")
    bad([(8, [(451, 451, 200, 0) + job[4:]], [(out, 0, (0, 0, 0), (1, 1, 1))])], "top")
    bad([(8, [job[:12] + ([(0, 0, 1, 0)],)], [(out, 0, (0, 0, 0), (1, 1, 1))])], "y0")
    bad([(8, [job[:12] + ([(0, 0, 0, 0), (0, 0, 0, 0)],)], [(out, 0, (0, 0, 0), (1, 1, 1))])], "twice")
    bad([(8, [job[:5] + (8.5,) + job[6:]], [(out, 0, (0, 0, 0), (1, 1, 1))])], "must be an int")
    bad([(8, [job], [(out[:, :, :, ::-1], 0, (0, 0, 0), (1, 1, 1))])], "contiguous")
