"""Untrusted-image decoding: every bad input gets a typed ImageError or a documented conversion."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgevlm.errors import EdgeVLMError, ImageDecodeError, ImageError, ImageSizeError
from edgevlm.runtime import image_io
from edgevlm.runtime.image_io import DEFAULT_MAX_ASPECT, load_image, load_images

from edgevlm_testkit import png_claiming


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(h: int = 48, w: int = 64) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.chelsea()[:h, :w])


# ---- decode failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"this is not an image, just text" * 3, b"\x00" * 64, b"GIF89a" + b"\x00" * 4])
def test_unrecognised_bytes_say_so(data):
    with pytest.raises(ImageDecodeError, match="not a supported image: the bytes start like none of JPEG, PNG") as e:
        load_image(data)
    assert "KeyError" not in str(e.value)  # once, every such input read "KeyError: 'MPO'" (PIL internals)


def test_mpo_opens_through_jpeg():
    """Phones and stereo cameras write MPO (JPEG frames in one file); its first frame is the image."""
    a, b = _photo(48, 64), _photo(48, 64)[::-1].copy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="MPO", save_all=True, append_images=[Image.fromarray(b)], quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    got = load_image(buf.getvalue())
    assert got.shape == (48, 64, 3)
    assert np.abs(got.astype(int) - a).mean() < np.abs(got.astype(int) - b).mean()  # the first frame


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    data = _encode(Image.fromarray(_photo(120, 160)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as e:
        load_image(path)
    assert str(path) in str(e.value)  # the error names its source


def test_empty_and_missing_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError):
        load_image(empty)
    with pytest.raises(ImageDecodeError, match="no such file") as e:
        load_image(tmp_path / "missing.jpg")
    assert isinstance(e.value.__cause__, FileNotFoundError)
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path)  # a directory


def test_disallowed_format_is_not_opened():
    # EPS would run Ghostscript on untrusted input: refused as "not readable" before any plugin runs.
    with pytest.raises(ImageDecodeError):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")


def test_keyboard_interrupt_is_not_swallowed(monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(image_io.Image, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_image(_encode(Image.fromarray(_photo()), "PNG"))


# ---- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 0, 3), (5, 0, 3), (0, 7), (0, 4, 4)])
def test_empty_arrays(shape):
    with pytest.raises(ImageSizeError, match="empty"):
        load_image(np.zeros(shape, np.uint8))


def test_thin_strip_refused_with_size_and_limit(tmp_path):
    with pytest.raises(ImageSizeError) as e:
        load_image(np.zeros((1, 20000, 3), np.uint8))
    assert "20000x1" in str(e.value) and f"max_aspect={DEFAULT_MAX_ASPECT:g}" in str(e.value)
    path = tmp_path / "strip.png"
    Image.new("RGB", (1, 20000)).save(path)
    with pytest.raises(ImageSizeError, match="aspect"):
        load_image(path)
    assert load_image(np.zeros((1, 32, 3), np.uint8)).shape == (1, 32, 3)  # exactly at the limit is fine


def test_max_pixels_checked_from_header_before_decoding():
    # 5000 x 4000 claimed, garbage data: the size error proves nothing was decoded.
    data = png_claiming(5000, 4000)
    with pytest.raises(ImageSizeError, match="max_pixels=1000000"):
        load_image(data, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError):  # allowed size: now it is decoded, and fails as garbage
        load_image(data, max_pixels=50_000_000)


def test_pil_decompression_bomb_translated():
    with pytest.raises(ImageSizeError):  # 1e10 pixels: PIL's own DecompressionBombError fires first
        load_image(png_claiming(100_000, 100_000), max_pixels=10**12, max_aspect=1e9)


def test_real_file_over_small_max_pixels(tmp_path):
    path = tmp_path / "cat.jpg"
    Image.fromarray(_photo(48, 64)).save(path)
    with pytest.raises(ImageSizeError, match="64x48"):
        load_image(path, max_pixels=1000)


# ---- conversions --------------------------------------------------------------------------------


def test_rgba_composited_over_black():
    px = np.array([[[200, 100, 50, 128], [9, 9, 9, 0], [10, 20, 30, 255]]], np.uint8)
    expected = np.array([[[100, 50, 25], [0, 0, 0], [10, 20, 30]]], np.uint8)  # round(c * a / 255)
    np.testing.assert_array_equal(load_image(px), expected)
    np.testing.assert_array_equal(load_image(_encode(Image.fromarray(px, "RGBA"), "PNG")), expected)


def test_la_composited_and_replicated():
    im = Image.fromarray(np.array([[[200, 64], [77, 255]]], np.uint8), "LA")
    out = load_image(_encode(im, "PNG"))
    np.testing.assert_array_equal(out, [[[50, 50, 50], [77, 77, 77]]])  # 200 * 64 / 255 = 50.2


def test_grayscale_replicated():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for src in (g, g[..., None], _encode(Image.fromarray(g, "L"), "PNG")):
        out = load_image(src)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, np.repeat(g[..., None], 3, axis=2))


def test_16bit_scaled_with_rounding():
    v = np.array([[0, 128, 129, 32896, 65535]], np.uint16)
    expected = np.array([0, 0, 1, 128, 255], np.uint8)  # round(x / 257)
    im = Image.fromarray(v)
    assert im.mode.startswith("I;16")
    for src in (v, _encode(im, "PNG")):
        out = load_image(src)
        np.testing.assert_array_equal(out[0, :, 0], expected)
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_palette_images():
    rgb = _photo(16, 16)
    p = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    np.testing.assert_array_equal(load_image(_encode(p, "PNG")), np.asarray(p.convert("RGB")))
    p.info["transparency"] = int(np.asarray(p)[0, 0])  # one palette index fully transparent
    out = load_image(_encode(p, "PNG", transparency=p.info["transparency"]))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])  # transparent -> black
    opaque = np.asarray(p) != p.info["transparency"]
    np.testing.assert_array_equal(out[opaque], np.asarray(p.convert("RGB"))[opaque])


def test_cmyk_goes_through_pil_convert():
    cmyk = Image.fromarray(_photo()).convert("CMYK")
    out = load_image(_encode(cmyk, "JPEG"))
    assert out.shape == (48, 64, 3)
    ref = np.asarray(Image.open(io.BytesIO(_encode(cmyk, "JPEG"))).convert("RGB"))
    np.testing.assert_array_equal(out, ref)


def test_exif_orientation_applied():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # stored: red left half, blue right half
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise: stored left -> displayed top
    out = load_image(_encode(Image.fromarray(a), "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # top is red
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # bottom is blue


def test_array_types_refused():
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    for c in (2, 5):
        with pytest.raises(ImageError, match="channels"):
            load_image(np.zeros((4, 4, c), np.uint8))
    with pytest.raises(ImageError, match="uint8 or uint16"):
        load_image(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(ImageError):
        load_image([[1, 2], [3, 4]])  # not an image source at all
    with pytest.raises(ImageError):
        load_image(Image.new("F", (4, 4)))


def test_rgb_array_is_zero_copy_and_lists():
    a = _photo()
    assert load_image(a) is a
    out = load_images([a, _encode(Image.fromarray(a), "PNG")])
    assert len(out) == 2 and all(o.shape == a.shape for o in out)
    np.testing.assert_array_equal(out[1], a)
    assert len(load_images(a)) == 1
    assert not np.shares_memory(load_image(a[:, ::-1]), a)  # reversed view -> contiguous copy


# ---- fuzz ---------------------------------------------------------------------------------------

_SEEDS = [_encode(Image.fromarray(_photo(12, 16)), f) for f in ("PNG", "JPEG", "BMP", "GIF")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_SEEDS), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       junk=st.binary(max_size=64))
def test_fuzz_only_image_errors(seed, cut, flips, junk):
    data = bytearray(seed[: max(0, len(seed) - cut)])
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    for src in (bytes(data), junk):
        try:
            out = load_image(src, max_pixels=1 << 20)
        except EdgeVLMError as e:
            assert isinstance(e, ImageError)
        else:
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
