"""Lower-precision graphs from the fp32 export: INT8 by static quantization, FP16 by conversion.

INT8 is ONNX Runtime static quantization in QDQ form (activation scales calibrated by running the
fp32 graph on the feeds of :mod:`edgevlm.export.calibration`, never on the images that validate the
export). This is graph quantisation of the exported vision tower; the decoder's weight formats are
:mod:`edgevlm.runtime.quant`, a different operation. Only MatMul / Gemm nodes with a constant weight
inside the encoders are quantized, weights per output channel:

* activation x activation MatMuls (attention scores, attention x V) and the convolutions of a
  depthwise CNN lose far more than they gain with per-tensor activation scales; on the demo tower,
  quantizing every op gave a relative RMS error of 0.058 against eager and quantizing convolutions
  too 0.093, versus 0.018 for weight MatMuls alone (``docs/export.md`` has the table);
* the connector stays float: it is a small share of the FLOPs and feeds the LLM directly;
* MinMax calibration, not percentile: DINOv2-style ViTs carry a few huge activations that clipping
  destroys (percentile calibration raised the error to 0.068);
* 7-bit weights (``reduce_range``) for ONNX Runtime: its x86 kernel for uint8 activations x int8
  weights adds pairs of products in int16 (``vpmaddubsw``) on CPUs without VNNI, and two products of
  255 x 127 overflow it. The saturation depends on the CPU the graph *runs* on, not the one that
  exported it: on an AVX2-only EPYC the tiny InstructBLIP test tower went from rel. RMS 0.108 (over the
  0.1 bound) to 0.049, and the demo tower from 0.0199 to 0.0196 (``docs/export.md``). uint8 x uint8
  (no saturation either) measured the same speed on AVX2 but loses VNNI's int8 path.

The same QDQ graph with symmetric int8 activations is what a TensorRT INT8 engine is built from
(explicit quantization; TensorRT 10 deprecates implicit calibrators).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.errors import BackendUnavailableError, ConfigError


def _quantizable_nodes(model) -> list[str]:
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input) and "/connector/" not in n.name]


def static_int8_qdq(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], *, symmetric: bool = False,
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
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes, reduce_range=not symmetric,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external_data,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    finally:
        pre.unlink(missing_ok=True)
        pre.with_name(pre.name + ".data").unlink(missing_ok=True)
    return {"method": "onnxruntime static QDQ, MinMax, per-channel weights", "quantized_nodes": len(nodes),
            "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
            "weights": "int8 symmetric per channel" if symmetric else "7-bit symmetric per channel (reduce_range)",
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


__all__ = ["static_int8_qdq", "convert_fp16"]
