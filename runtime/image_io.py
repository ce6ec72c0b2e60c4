"""Decoding and validating untrusted images into C-contiguous HWC uint8 RGB arrays.

Every failure is an :class:`~edgevlm.errors.ImageError` subclass naming the source:

- unreadable, corrupt, truncated or non-image bytes, a missing file -> :class:`ImageDecodeError`;
- empty images, more than ``max_pixels`` pixels, or an aspect ratio beyond ``max_aspect`` ->
  :class:`ImageSizeError`. Files are measured from their header *before* any pixel is decoded
  (decompression-bomb guard); PIL's own ``DecompressionBombError``/``Warning`` become the same error;
- arrays of an ambiguous type (float, int32, bool, 2 or more than 4 channels) -> :class:`ImageError`.

Only common raster formats are opened (:data:`ALLOWED_FORMATS`): PIL plugins such as EPS would run an
external interpreter on untrusted input. Multi-frame files (GIF, TIFF) yield their first frame.

Documented conversions (files, bytes, PIL images and arrays alike):

- alpha (RGBA, LA, PA, P or L/RGB with a transparency key, 4-channel arrays) is composited over
  **black**: ``c' = round(c * a / 255)``, so fully transparent pixels are 0 whatever colour they hide;
- grayscale (``1``, ``L``, 2-D arrays, ``H x W x 1``) is replicated to three channels;
- 16-bit (``I;16*`` images, uint16 arrays) is scaled to 8 bits with rounding: ``round(x / 257)``;
  32-bit integer ``I`` images are clipped to 0..65535 first; float ``F`` images are refused (range unknown);
- every other mode (CMYK, YCbCr, LAB, HSV, RGBX, ...) goes through PIL's ``convert("RGB")``;
- the EXIF orientation tag of files and bytes is applied (a corrupt EXIF block is ignored rather than
  refusing a decodable image); PIL images passed in are used as they are.

A uint8 ``H x W x 3`` C-contiguous array is returned as is (no copy): camera frames stay zero-copy.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgevlm.errors import ImageDecodeError, ImageError, ImageSizeError

# 64 Mpx: above a 50 Mpx phone photo (8160 x 6120), below PIL's own 89 Mpx warning. The decoded
# RGB array is then at most 192 MiB.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# 32:1 (e.g. 7168 x 224): a strip thinner than that has less than one pixel per patch row after
# any recipe here, and padding it to a square would be ~32x larger than the image.
DEFAULT_MAX_ASPECT = 32.0

# MPO (multi-picture JPEG, from phones and stereo cameras) opens through the JPEG entry, as in PIL itself.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA", "ICO")


def _open_formats() -> tuple[str, ...]:
    """The allowed formats this PIL has an opener for. Naming one it lacks makes ``Image.open`` raise
    ``KeyError`` for every unrecognised input, which would hide what was wrong with the bytes."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"{len(src)} bytes"
    if isinstance(src, np.ndarray):
        return f"array {src.shape} {src.dtype}"
    if isinstance(src, Image.Image):
        return f"PIL image {src.mode} {src.size[0]}x{src.size[1]}"
    return type(src).__name__


def check_size(h: int, w: int, what: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float = DEFAULT_MAX_ASPECT) -> None:
    """Raise :class:`ImageSizeError` if an ``h x w`` image is empty, too large or too thin."""
    if h < 1 or w < 1:
        raise ImageSizeError(f"{what}: image is empty ({h}x{w} pixels, height x width)")
    if h * w > max_pixels:
        raise ImageSizeError(f"{what}: {w}x{h} = {h * w} pixels exceeds max_pixels={max_pixels} "
                             "(decompression-bomb guard; raise max_pixels if this image is expected)")
    aspect = max(h, w) / min(h, w)
    if aspect > max_aspect:
        raise ImageSizeError(f"{what}: {w}x{h} has aspect ratio {aspect:.1f}:1, beyond max_aspect={max_aspect:g}:1")


def _composite_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # round(c * a / 255) in integers: (2ca + 255) // 510.
    c = rgb.astype(np.uint32) * alpha.astype(np.uint32)[..., None]
    return ((2 * c + 255) // 510).astype(np.uint8)


def _from_16bit(a: np.ndarray) -> np.ndarray:
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(x / 257), 65535 -> 255


def _pil_to_rgb(im: Image.Image, what: str) -> np.ndarray:
    mode = im.mode
    if mode == "P" or (mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode == "RGB":
        return np.array(im)  # a writable copy (np.asarray of a PIL image is read-only)
    if mode == "RGBa":  # PIL's premultiplied RGBA is already "composited over black"
        return np.asarray(im)[..., :3]
    if mode == "La":
        return np.repeat(np.asarray(im)[..., :1], 3, axis=2)
    if mode == "LA":
        a = np.asarray(im)
        return _composite_black(np.repeat(a[..., :1], 3, axis=2), a[..., 1])
    if mode in ("RGBA", "PA"):
        a = np.asarray(im.convert("RGBA"))
        return _composite_black(a[..., :3], a[..., 3])
    if mode in ("1", "L"):
        return np.repeat(np.asarray(im.convert("L"))[..., None], 3, axis=2)
    if mode.startswith("I;16"):
        return np.repeat(_from_16bit(np.asarray(im))[..., None], 3, axis=2)
    if mode == "I":
        a = np.clip(np.asarray(im), 0, 65535)
        return np.repeat(_from_16bit(a)[..., None], 3, axis=2)
    if mode == "F":
        raise ImageError(f"{what}: 32-bit float images have no defined range; convert to 8 or 16 bit first")
    return np.asarray(im.convert("RGB"))


def _array_to_rgb(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind == "f":
        raise ImageError(f"{what}: float arrays are refused because their range is ambiguous (0..1 or 0..255?); "
                         "convert to uint8, e.g. (x * 255).round().clip(0, 255).astype(np.uint8)")
    if a.dtype == np.uint16:
        a = _from_16bit(a)
    elif a.dtype != np.uint8:
        raise ImageError(f"{what}: arrays must be uint8 or uint16, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ImageError(f"{what}: arrays must be H x W, H x W x 1, H x W x 3 or H x W x 4, got shape {a.shape}")
    c = a.shape[2]
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 3:
        return np.ascontiguousarray(a)
    if c == 4:
        return _composite_black(a[..., :3], a[..., 3])
    raise ImageError(f"{what}: {c} channels is ambiguous; expected 1 (gray), 3 (RGB) or 4 (RGBA)")


def _open(src: Any, what: str, max_pixels: int, max_aspect: float) -> np.ndarray:
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            fp: Any = open(path, "rb")
        except FileNotFoundError as e:
            raise ImageDecodeError(f"{what}: no such file") from e
        except OSError as e:  # a directory, no permission, ...
            raise ImageDecodeError(f"{what}: cannot open ({e.strerror or e})") from e
    else:
        fp = io.BytesIO(bytes(src))
    with fp:
        try:
            with warnings.catch_warnings():  # our max_pixels check below is the policy, not PIL's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                formats = _open_formats()
                im = Image.open(fp, formats=formats)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageSizeError(f"{what}: refused by PIL's decompression-bomb guard ({e})") from e
        except UnidentifiedImageError as e:
            raise ImageDecodeError(f"{what}: not a supported image: the bytes start like none of "
                                   f"{', '.join(formats)}") from e
        except Exception as e:  # untrusted bytes: any plugin failure means "not a readable image"
            raise ImageDecodeError(f"{what}: not a readable image ({type(e).__name__}: {e})") from e
        with im:
            w, h = im.size
            check_size(h, w, what, max_pixels, max_aspect)  # before a single pixel is decoded
            try:
                im.load()
                try:
                    ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to rotate
                except Exception:  # corrupt EXIF: keep the decoded pixels unrotated (documented)
                    pass
                return _pil_to_rgb(im, what)
            except ImageError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise ImageSizeError(f"{what}: refused by PIL's decompression-bomb guard ({e})") from e
            except MemoryError as e:
                raise ImageSizeError(f"{what}: out of memory while decoding {w}x{h} pixels") from e
            except Exception as e:  # truncated data, bad Huffman tables, zlib errors, ...
                raise ImageDecodeError(f"{what}: corrupt or truncated image data ({type(e).__name__}: {e})") from e


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float = DEFAULT_MAX_ASPECT) -> np.ndarray:
    """Decode and validate one image into a C-contiguous ``[H, W, 3]`` uint8 RGB array.

    ``src``: a path (str / PathLike), encoded bytes, a ``PIL.Image.Image`` or a NumPy array
    (uint8 or uint16; ``H x W``, ``H x W x 1``, ``x 3`` or ``x 4``). Conversions and errors are listed in
    the module docstring; limits default to :data:`DEFAULT_MAX_PIXELS` (64 Mpx) and
    :data:`DEFAULT_MAX_ASPECT` (32:1).
    """
    what = _describe(src)
    if isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)):
        out = _open(src, what, max_pixels, max_aspect)
    elif isinstance(src, Image.Image):
        w, h = src.size
        check_size(h, w, what, max_pixels, max_aspect)
        try:
            out = _pil_to_rgb(src, what)
        except ImageError:
            raise
        except Exception as e:  # a lazily opened PIL image can still fail to decode here
            raise ImageDecodeError(f"{what}: could not read pixels ({type(e).__name__}: {e})") from e
    elif isinstance(src, np.ndarray):
        if src.ndim < 2:
            raise ImageError(f"{what}: arrays must be H x W or H x W x C, got shape {src.shape}")
        check_size(int(src.shape[0]), int(src.shape[1]), what, max_pixels, max_aspect)
        out = _array_to_rgb(src, what)
    else:
        raise ImageError(f"cannot read an image from {type(src).__name__}; expected a path, bytes, a PIL image "
                         "or a uint8 numpy array")
    return np.ascontiguousarray(out)


def load_images(src: ImageSource | Sequence[ImageSource], **limits: Any) -> list[np.ndarray]:
    """:func:`load_image` over one image or a list/tuple of them (a 3-D array is one image)."""
    if isinstance(src, (list, tuple)):
        return [load_image(s, **limits) for s in src]
    return [load_image(src, **limits)]


__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_ASPECT", "ALLOWED_FORMATS", "ImageSource", "check_size", "load_image",
           "load_images"]
