"""Images for INT8 calibration, kept apart from the images that validate an export.

Calibration runs the fp32 graph on real images (a folder the caller names, scikit-image's photos where
installed, then the demo task's training scenes from :mod:`edgevlm.scenes`), never on the bundled
images (:func:`validation_images`) that judge the exported graph afterwards. :func:`view_batches` turns
either set into graph feeds. :mod:`edgevlm.export.onnx_precision` consumes the calibration feeds.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable

import numpy as np

from edgevlm.config import TowerConfig
from edgevlm.errors import ConfigError, ImageError

from .contract import INSTRUCTION_IDS, INSTRUCTION_MASK, ExportContract, InstructionProfile

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# Real photos scikit-image ships as files (read by path; nothing is downloaded). astronaut and chelsea are
# left out: the bundled copies of them validate exports, and calibration must not see them.
SKIMAGE_PHOTOS = ("coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png",
                  "retina.jpg", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png")


def calibration_images(n: int = 24, extra_dir: str | Path | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Images to calibrate INT8 on, and where they came from: a folder's images first (if given),
    then scikit-image's photos (when it is installed), then demo-task scenes (train split) up to ``n``.
    None of them is a validation image (:func:`validation_images`)."""
    from edgevlm.runtime.image_io import load_images

    paths: list[str] = []
    if extra_dir is not None:
        d = Path(extra_dir)
        if not d.is_dir():
            raise ImageError(f"calibration folder {d} does not exist")
        paths += sorted(p for p in glob.glob(str(d / "*")) if p.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise ImageError(f"calibration folder {d} has no images ({', '.join(IMAGE_SUFFIXES)})")
    own = len(paths)
    sk = _skimage_dir()
    if sk is not None:
        paths += [str(sk / f) for f in SKIMAGE_PHOTOS if (sk / f).is_file()]
    paths = paths[:n]
    images = load_images(paths)
    sources = []
    if own:
        sources.append(f"{min(own, n)} from {extra_dir}")
    if len(paths) > own:
        sources.append(f"{len(paths) - own} scikit-image photos")
    if len(images) < n:
        from edgevlm.scenes import make_scene

        images += [make_scene(0, "train", i).image for i in range(n - len(images))]
        sources.append(f"{n - len(paths)} demo training scenes")
    return images, sources


def validation_images() -> list[np.ndarray]:
    """The bundled images (two real photos, two held-out demo scenes, a digit): never calibrated on."""
    from edgevlm.runtime.image_io import load_images

    return load_images(sorted(str(p) for p in _asset_dir().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))


def _asset_dir() -> Path:
    import edgevlm

    return Path(edgevlm.__file__).resolve().parent / "assets"


def _skimage_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def synthetic_instruction(profile: InstructionProfile, n_views: int, length: int, *, seed: int,
                          padded: bool = True):
    """An instruction for an InstructBLIP tower's export, calibration and validation: ``(ids int64 [n_views,
    length], mask bool [n_views, length])``, seeded ids drawn from the Q-Former's vocabulary (never its pad id).

    With ``padded`` the rows' lengths cycle through ``length``, about half of it and 1, so that the mask hides
    padding (as a batch of images with different questions has it) and a one-token row is in there too;
    otherwise every row is ``length`` tokens. Export has only the weights, not the Q-Former tokenizer, so the
    ids are not words; the graph computes the same for any ids, and the bound is on the difference to eager."""
    import torch

    if not 1 <= length <= profile.max_tokens:
        raise ConfigError(f"instruction length {length} outside [1, {profile.max_tokens}]")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, profile.vocab_size - 1, (n_views, length), generator=g)
    ids = ids + (ids >= profile.pad_id).long()  # skip the pad id: [0, vocab) without it
    cycle = (length, max(1, (length + 1) // 2), 1) if padded else (length,)
    lengths = torch.tensor([cycle[i % len(cycle)] for i in range(n_views)])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, profile.pad_id)  # right-padded, as the Q-Former's BERT tokenizer pads
    return ids, mask


def view_batches(tower: TowerConfig, contract: ExportContract, images: Iterable[np.ndarray],
                 per_batch: int = 1) -> list[dict[str, np.ndarray]]:
    """Images -> graph feeds ``{input name: [views, 3, R, R]}``, ``per_batch`` images each, with the token
    masks and order of a graph that reads them (``token_masks="input"``). An InstructBLIP
    tower's feeds also carry a :func:`synthetic_instruction` per batch (lengths varying between batches): the
    Q-Former stays float, but the graph needs every input to run."""
    from edgevlm.runtime.preprocess import Preprocessor

    pre = Preprocessor(tower)
    images = list(images)
    out = []
    t = contract.instruction
    for i in range(0, len(images), per_batch):
        result = pre(images[i:i + per_batch])
        views = result.views
        feed = {spec.name: views[enc].numpy() for enc, spec in zip(contract.encoder_names, contract.pixel_inputs)}
        if contract.token_masks == "input":  # anyres masks (and a regrouping's order) the graph reads
            n = next(iter(views.values())).shape[0]
            feed.update({k: v.numpy() for k, v in contract.token_inputs(result.token_masks, result.token_order,
                                                                        n).items()})
        if t is not None:
            n = next(iter(views.values())).shape[0]
            ids, mask = synthetic_instruction(t, n, 1 + (i * 7) % t.max_tokens, seed=1000 + i)
            feed[INSTRUCTION_IDS], feed[INSTRUCTION_MASK] = ids.numpy(), mask.long().numpy()
        out.append(feed)
    return out


__all__ = ["calibration_images", "validation_images", "view_batches", "synthetic_instruction", "IMAGE_SUFFIXES",
           "SKIMAGE_PHOTOS"]
