"""Lower-precision graphs from the fp32 export: INT8 by static quantization, FP16 by conversion.

INT8 is ONNX Runtime static quantization in QDQ form, calibrated by running the fp32 graph on real
images (a folder the caller names, scikit-image's photos where installed, then the demo task's
training scenes), never on the bundled images that validate the export. Only MatMul /
Gemm nodes with a constant weight inside the encoders are quantized, weights per output channel:

* activation x activation MatMuls (attention scores, attention x V) and the convolutions of a
  depthwise CNN lose far more than they gain with per-tensor activation scales; on the demo tower,
  quantizing every op gave a relative RMS error of 0.058 against eager and quantizing convolutions
  too 0.093, versus 0.018 for weight MatMuls alone (``docs/export.md`` has the table);
* the connector stays float: it is a small share of the FLOPs and feeds the LLM directly;
* MinMax calibration, not percentile: DINOv2-style ViTs carry a few huge activations that clipping
  destroys (percentile calibration raised the error to 0.068).

The same QDQ graph with symmetric int8 activations is what a TensorRT INT8 engine is built from
(explicit quantization; TensorRT 10 deprecates implicit calibrators).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable

import numpy as np

from edgevlm.config import TowerConfig
from edgevlm.errors import BackendUnavailableError, ConfigError, ImageError

from .contract import ExportContract

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
        from edgevlm.train.data import make_scene

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


def view_batches(tower: TowerConfig, contract: ExportContract, images: Iterable[np.ndarray],
                 per_batch: int = 1) -> list[dict[str, np.ndarray]]:
    """Images -> graph feeds ``{input name: [views, 3, R, R]}``, ``per_batch`` images each."""
    from edgevlm.runtime.preprocess import Preprocessor

    pre = Preprocessor(tower)
    images = list(images)
    out = []
    for i in range(0, len(images), per_batch):
        views = pre(images[i:i + per_batch]).views
        out.append({spec.name: views[enc].numpy() for enc, spec in zip(contract.encoder_names, contract.inputs)})
    return out


def _quantizable_nodes(model) -> list[str]:
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input) and "/connector/" not in n.name]


def quantize_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], *, symmetric: bool = False,
                  external_data: bool = False) -> dict:
    """Static INT8 (QDQ) of ``src`` into ``dst`` calibrated on ``feeds``; returns what was done.
    ``external_data`` writes the tensors beside the graph (``dst.name + ".data"``), for graphs over 2 GB."""
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise BackendUnavailableError("INT8 export needs onnx and onnxruntime: pip install 'edgevlm[onnx]'") from None
    if not feeds:
        raise ConfigError("INT8 calibration needs at least one image")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=external_data,
                          all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
        nodes = _quantizable_nodes(onnx.load(str(pre), load_external_data=False))
        if not nodes:
            raise ConfigError(f"{src}: no weight MatMul/Gemm nodes outside the connector to quantize")
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external_data,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    finally:
        pre.unlink(missing_ok=True)
        pre.with_name(pre.name + ".data").unlink(missing_ok=True)
    return {"method": "onnxruntime static QDQ, MinMax, per-channel weights", "quantized_nodes": len(nodes),
            "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
            "calibration_batches": len(feeds)}


def convert_fp16(src: Path, dst: Path, *, external_data: bool = False) -> dict:
    """Weights and compute in fp16, inputs and outputs kept fp32 (the contract does not change)."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise BackendUnavailableError("FP16 export needs onnx and onnxruntime: pip install 'edgevlm[onnx]'") from None
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst), save_as_external_data=external_data, all_tensors_to_one_file=True,
              location=dst.name + ".data")
    return {"method": "onnxruntime.transformers float16 conversion, fp32 inputs/outputs"}


__all__ = ["calibration_images", "validation_images", "view_batches", "quantize_int8", "convert_fp16"]
