"""TensorRT engines from the exported ONNX graph, and a runner for them.

Build (``build_engine``): parse the ONNX graph, one optimisation profile from the contract
(``views`` between one image and ``max_images`` images, tuned at ``opt``; an InstructBLIP tower's
``instruction_tokens`` between 1 and the Q-Former's ``max_positions``, tuned at 32), a strongly typed network
where TensorRT has one (10.x; 11.x has nothing else), so precision comes from the graph: the fp16
graph (:func:`edgevlm.export.onnx_precision.convert_fp16`) builds an FP16 engine, the symmetric QDQ graph an
INT8 one (explicit quantization). A timing cache is reused across builds, and a DLA core with GPU
fallback can be chosen (Jetson Xavier / Orin).

Engines are only valid for the GPU model (compute capability) and TensorRT version that built them,
so the manifest records both and :func:`check_engine_device` refuses a mismatch before TensorRT is
asked to deserialize anything; a file whose hash changed is refused by the manifest reader, and
bytes TensorRT cannot deserialize are refused here. Every message says how to rebuild.

Jetson: build on the device itself (engines do not move between a desktop GPU and Orin), keep the
workspace small (``workspace_mb``, e.g. 1024 on an 8 GB Orin Nano, which shares memory with the
CPU), and try ``dla_core=0`` for the encoders' convolutions with GPU fallback for the rest.

Nothing in this file was run on a GPU in this project's CI (there is none); see docs/status.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgevlm.errors import BackendUnavailableError, ConfigError, CorruptExportError, ExportError, ShapeError, StaleExportError

from .contract import INSTRUCTION_IDS, INSTRUCTION_MASK, ExportContract


def trt_module():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(f"TensorRT is not importable ({e}); install it with pip install "
                                      "'edgevlm[gpu]' on a CUDA machine, or use JetPack's on Jetson") from None
    return trt


def device_key() -> dict[str, Any]:
    """What an engine is bound to: GPU model, compute capability, TensorRT version."""
    trt = trt_module()
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT engines need a CUDA GPU; torch sees none")
    i = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(i)
    return {"gpu": torch.cuda.get_device_name(i), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__}


def check_engine_device(recorded: dict[str, Any] | None, current: dict[str, Any], folder: Path) -> None:
    """Refuse an engine built for another GPU model, compute capability or TensorRT version."""
    if not recorded:
        raise CorruptExportError(f"{folder}: TensorRT export without a recorded device; rebuild with "
                                 "`edgevlm export ... --to tensorrt`")
    diffs = [f"{k} {recorded.get(k)!r} (this machine: {current.get(k)!r})"
             for k in ("gpu", "compute_capability", "tensorrt") if recorded.get(k) != current.get(k)]
    if diffs:
        raise StaleExportError(f"{folder}: engine was built for another device: " + "; ".join(diffs) +
                               f". Engines do not move between GPUs or TensorRT versions; rebuild here with "
                               f"`edgevlm export SOURCE --to tensorrt --out {folder}` (or delete the folder "
                               "and let edgevlm.load rebuild its cache)")


def build_engine(onnx_path: Path, contract: ExportContract, precision: str, engine_path: Path, *,
                 workspace_mb: int | None = None, timing_cache: Path | None = None,
                 dla_core: int | None = None) -> dict[str, Any]:
    """ONNX -> serialized engine at ``engine_path``; returns build facts for the manifest."""
    trt = trt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strong = _network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in contract.trt_shapes().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 would miss the fp32 bound (rel_max 1e-4) by far
    if not strong:  # TensorRT 8.x: the graph's types are hints, precision comes from builder flags
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
    if dla_core is not None:
        if builder.num_DLA_cores <= dla_core:
            raise ConfigError(f"dla_core={dla_core}, but this device has {builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    return {"workspace_mb": workspace_mb, "dla_core": dla_core, "timing_cache": bool(cache_bytes),
            "strongly_typed": strong,
            "profile": {k: [list(s) for s in v] for k, v in contract.trt_shapes().items()}}


def _network_flags(trt) -> tuple[int, bool]:
    """(create_network flags, strongly typed?). Strongly typed wherever TensorRT has it (10.x, and the
    only mode of 11.x, which removed the FP16/INT8 builder flags): the graph's own types decide, so the
    fp16 graph builds fp16 and the QDQ graph int8. TensorRT 8.x (older JetPacks) gets explicit batch
    and builder flags instead."""
    f = trt.NetworkDefinitionCreationFlag
    if hasattr(f, "STRONGLY_TYPED"):
        return 1 << int(f.STRONGLY_TYPED), True
    return (1 << int(f.EXPLICIT_BATCH)) if hasattr(f, "EXPLICIT_BATCH") else 0, False


class TrtTowerRunner:
    """``(views, masks=None, text=None, order=None) -> torch.Tensor`` (on the GPU) backed by a TensorRT engine;
    ``masks`` / ``order`` / ``text`` as :class:`~edgevlm.export.ort_runner.OrtTowerRunner` takes them, within the
    engine's profiles."""

    backend = "tensorrt"

    def __init__(self, engine_path: Path, contract: ExportContract):
        trt = trt_module()
        self.contract = contract
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise CorruptExportError(f"{engine_path}: TensorRT cannot deserialize this engine (corrupt, or built by "
                                     "another TensorRT); rebuild with `edgevlm export ... --to tensorrt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = [n for n in contract.input_names + contract.output_names if n not in names]
        if missing:
            raise CorruptExportError(f"{engine_path}: engine lacks tensors {missing} that the manifest lists")

    def __call__(self, views: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                 text=None, order: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        n = None
        keep = []  # inputs must outlive the enqueue
        p = self.contract.profile
        for enc, spec in zip(self.contract.encoder_names, self.contract.pixel_inputs):
            if enc not in views:
                raise ShapeError(f"no views for encoder {enc!r}; got views for {sorted(views)}")
            x = views[enc]
            n = x.shape[0] if n is None else n
            if tuple(x.shape) != spec.concrete(n):
                raise ShapeError(f"views for encoder {enc!r}: expected {list(spec.concrete(n))}, got {list(x.shape)}")
            if not p.min_views <= n <= p.max_views:
                raise ShapeError(f"{n} views are outside the engine's profile [{p.min_views}, {p.max_views}] "
                                 f"(up to {self.contract.max_images} images); rebuild with a larger --max-images")
            x = x.to(self.device, torch.float32).contiguous()
            keep.append(x)
            self.context.set_input_shape(spec.name, tuple(x.shape))
            self.context.set_tensor_address(spec.name, x.data_ptr())
        # anyres padding masks (and a regrouping's order) where the graph reads them, in the engine's types
        for name, x in self.contract.token_inputs(masks, order, n).items():
            x = x.to(self.device, self._int_dtype(name)).contiguous()
            keep.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        t = self.contract.instruction
        instruction = self.contract.instruction_inputs(text, n, min_tokens=t.min_tokens if t is not None else 0)
        if instruction is not None:  # InstructBLIP: ids and mask, in the integer type the engine declares
            for name, x in zip((INSTRUCTION_IDS, INSTRUCTION_MASK), instruction):
                x = x.to(self.device, self._int_dtype(name)).contiguous()
                keep.append(x)
                self.context.set_input_shape(name, tuple(x.shape))
                self.context.set_tensor_address(name, x.data_ptr())
        out_spec = self.contract.outputs[0]
        out = torch.empty(out_spec.concrete(n), device=self.device, dtype=torch.float32)
        self.context.set_tensor_address(out_spec.name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed (see its log above)")
        stream.synchronize()
        return out

    def _int_dtype(self, name: str) -> torch.dtype:
        """The torch type of an integer or bool input as the engine declares it: INT64 where TensorRT keeps the
        graph's int64 (10.x), INT32 where its parser narrowed it (8.x), BOOL for token masks."""
        trt = trt_module()
        kind = self.engine.get_tensor_dtype(name)
        types = {trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
        if hasattr(trt.DataType, "INT64"):
            types[trt.DataType.INT64] = torch.int64
        if kind not in types:
            raise CorruptExportError(f"engine input {name!r} has type {kind}, not an integer or bool type")
        return types[kind]


__all__ = ["build_engine", "TrtTowerRunner", "check_engine_device", "device_key", "trt_module"]
