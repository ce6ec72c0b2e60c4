"""Export a vision tower to a folder, and open an export folder as a tower backend.

::

    manifest = export_tower("demo", to="onnx", precision="int8", out="exports/demo-int8")
    runner, manifest = open_export("exports/demo-int8", backend="onnxruntime", model=model)  # checks it first

An export folder holds the graph(s), ``manifest.json`` (see :mod:`.manifest`) and, for TensorRT, the
engine and its timing cache. It is written to a hidden sibling folder and renamed into place only
after validation passed, so a failed or interrupted export leaves nothing behind at ``out``.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevlm.errors import ConfigError, ExportError, StaleExportError
from edgevlm.file_lock import exclusive
from edgevlm.progress import Stages
from edgevlm.runtime.tower import VisionTowerModel, build_tower_model, resolve_tower_source

from .contract import OUTPUT_NAME, ExportContract, check_precision
from .manifest import (
    MANIFEST, Manifest, check_source, file_entry, now, read_manifest, tool_versions, tower_digest, write_manifest,
)
from .onnx_export import DEFAULT_OPSET, export_onnx
from .validate import Feed, validate

BACKENDS = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}  # vision backend -> export target it reads
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with a margin


def validation_batches(contract: ExportContract, images: list) -> list[dict[str, torch.Tensor]]:
    """Real images -> view batches: all of them at once (up to the profile's maximum), then one alone,
    so both ends of the dynamic axis are checked."""
    return [r.views for r in _preprocessed_batches(contract, images)]


def _preprocessed_batches(contract: ExportContract, images: list) -> list:
    """:func:`validation_batches` as the preprocessor's results (views with their token masks and order)."""
    from edgevlm.runtime.preprocess import Preprocessor

    pre = Preprocessor(contract.tower_config())
    if len(contract.view_counts) > 1:
        return _anyres_batches(pre, contract, images)
    k = min(len(images), contract.max_images)
    batches = [pre(images[:k])]
    if k > 1:
        batches.append(pre(images[k - 1:k]))
    return batches


def validation_instruction_lengths(contract: ExportContract) -> tuple[int, ...]:
    """The instruction lengths an InstructBLIP export is validated at: the Q-Former's longest (``max_positions``,
    rows padded to it) and a short one; () for towers without an instruction."""
    t = contract.instruction
    if t is None:
        return ()
    return (t.max_tokens, min(5, t.max_tokens - 1)) if t.max_tokens > 1 else (1,)


def validation_feeds(contract: ExportContract, images: list) -> list[Feed]:
    """What :func:`~.validate.validate` runs: :func:`validation_batches` as :class:`~.validate.Feed` s, with
    the token masks and regrouping order of towers whose graph reads them (``token_masks="input"``), and for
    an InstructBLIP tower each batch paired with a :func:`~.calibration.synthetic_instruction` -- the first at
    the longest instruction (rows of different lengths padded to it), the next at a short one without
    padding, so that the ``instruction_tokens`` axis is checked at two lengths (a single batch of views is
    run at both)."""
    from .calibration import synthetic_instruction

    results = _preprocessed_batches(contract, images)
    feeds = [Feed(r.views, _token_extra(contract, r)) for r in results]
    lengths = validation_instruction_lengths(contract)
    if not lengths:
        return feeds
    if len(feeds) < len(lengths):
        feeds = feeds + [feeds[-1]] * (len(lengths) - len(feeds))
    out = []
    for i, f in enumerate(feeds):
        n = next(iter(f.views.values())).shape[0]
        length = lengths[min(i, len(lengths) - 1)]
        text = synthetic_instruction(contract.instruction, n, length, seed=i, padded=i == 0)
        out.append(Feed(f.views, {**f.extra, "text": text}))
    return out


def _token_extra(contract: ExportContract, result) -> dict[str, Any]:
    """The preprocessor's token masks and order, for a graph that takes them as inputs."""
    if contract.token_masks != "input":
        return {}
    extra = {"masks": result.token_masks}
    if contract.order_inputs:
        extra["order"] = result.token_order
    return extra


def aspect_crops(image, grids) -> list:
    """Centre crops of ``image`` shaped like each ``(rows, cols)`` canvas (rows:cols = height:width), so that
    an any-resolution recipe picks each grid at least once whatever the validation photos' shapes."""
    h, w = image.shape[:2]
    out = []
    for r, c in grids:
        ch, cw = (max(1, round(w * r / c)), w) if h * c > w * r else (h, max(1, round(h * c / r)))
        y, x = (h - ch) // 2, (w - cw) // 2
        out.append(np.ascontiguousarray(image[y:y + ch, x:x + cw]))
    return out


def _anyres_batches(pre, contract: ExportContract, images: list) -> list:
    """Any-resolution views: one batch of mixed view counts (as many images as the profile's maximum takes),
    then one image alone per count of views, so the graph is checked at every count an image can have (the
    profile's minimum included) and with several images of different counts in one batch."""
    grids = contract.tower_config().views.anyres_grids
    images = aspect_crops(images[0], grids) + list(images)  # the crops first: the mixed batch gets every count
    counts = pre.views_per_image(images)
    mixed, total = [], 0
    for i, n in enumerate(counts):
        if total + n > contract.profile.max_views:
            break
        mixed.append(i)
        total += n
    alone = {n: i for i, n in reversed(list(enumerate(counts)))}  # the first image with each count
    batches = [pre([images[i] for i in mixed])] if mixed else []
    batches += [pre([images[alone[n]]]) for n in sorted(alone)]
    return batches


def export_model(model: VisionTowerModel, *, out: str | Path, to: str = "onnx", precision: str = "fp32",
                 source_name: str = "", max_images: int = 4, calib_dir: str | Path | None = None,
                 calib_images: int = 24, opset: int = DEFAULT_OPSET, overwrite: bool = False,
                 workspace_mb: int | None = None, dla_core: int | None = None,
                 progress: bool = True, weights: dict | None = None) -> Manifest:
    """Export a built tower model; see :func:`export_tower` for the arguments."""
    from .ort_runner import OrtTowerRunner
    from .calibration import calibration_images, validation_images, view_batches
    from .onnx_precision import convert_fp16, static_int8_qdq

    check_precision(precision, to)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass overwrite=True (--force) to replace it")
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu", torch.float32)  # export traces fp32 on the CPU; leave the caller's as is
    model = model.eval()
    contract = ExportContract.for_tower(model.config, max_images=max_images)
    # The fp32 graph is exported first whatever the precision; int8 and fp16 graphs are made from it
    # (TensorRT builds from them too: its networks take their precision from the graph).
    keep_fp32 = precision == "fp32"
    names = ["export fp32 ONNX", "validate fp32"]
    names += {"int8": ["calibrate + quantize int8"], "fp16": ["convert fp16"]}.get(precision, [])
    names += ["build TensorRT engine", f"validate TensorRT {precision}"] if to == "tensorrt" else []
    names += [f"validate {precision}"] if precision != "fp32" and to == "onnx" else []
    device = None
    if to == "tensorrt":  # before minutes of export work: is there a TensorRT and a GPU at all?
        from .tensorrt import device_key

        device = device_key()
    stages = Stages(names, f"export {source_name or 'tower'}", progress)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "fp32").mkdir(parents=True)
    try:
        images = validation_images()
        vbatches = validation_feeds(contract, images)
        with stages("export fp32 ONNX"):
            fp32 = export_onnx(model, contract, tmp / "fp32" / "tower.fp32.onnx", opset=opset)
        # Past 2 GB the exporter writes tensors beside the graph; later graphs must do the same.
        external = sum(f.stat().st_size for f in (tmp / "fp32").iterdir()) > EXTERNAL_DATA_BYTES
        with stages("validate fp32"):
            checks = {"fp32": validate(OrtTowerRunner(fp32, contract), model, vbatches, "fp32", output=OUTPUT_NAME,
                                       what="ONNX Runtime fp32 graph")}
        extra: dict[str, Any] = {}
        if keep_fp32:
            for f in (tmp / "fp32").iterdir():
                os.replace(f, tmp / f.name)
            graph = tmp / fp32.name
        elif precision == "int8":
            with stages("calibrate + quantize int8"):
                calib, calib_sources = calibration_images(calib_images, calib_dir)
                graph = tmp / "tower.int8.onnx"
                extra["quantization"] = static_int8_qdq(fp32, graph, view_batches(model.config, contract, calib),
                                                      symmetric=to == "tensorrt", external_data=external)
                extra["quantization"]["calibration_images"] = calib_sources
        else:
            with stages("convert fp16"):
                graph = tmp / "tower.fp16.onnx"
                extra["conversion"] = convert_fp16(fp32, graph, external_data=external)
        shutil.rmtree(tmp / "fp32")
        run = None
        if to == "tensorrt":
            from .tensorrt import TrtTowerRunner, build_engine

            with stages("build TensorRT engine"):
                engine = tmp / f"tower.{precision}.engine"
                cache = tmp / "timing.cache"
                if (out / cache.name).is_file():  # a rebuild into the same folder reuses the layer timings
                    shutil.copyfile(out / cache.name, cache)
                extra["engine"] = build_engine(graph, contract, precision, engine, workspace_mb=workspace_mb,
                                               timing_cache=cache, dla_core=dla_core)
                run = TrtTowerRunner(engine, contract)
        elif precision != "fp32":
            run = OrtTowerRunner(graph, contract)
        if run is not None:  # a reduced-precision graph's check is keyed by precision, an engine's by "tensorrt"
            key, stage = ("tensorrt", f"validate TensorRT {precision}") if to == "tensorrt" else \
                (precision, f"validate {precision}")
            with stages(stage):
                what = f"{'TensorRT' if to == 'tensorrt' else 'ONNX Runtime'} {precision}"
                checks[key] = validate(run, model, vbatches, precision, output=OUTPUT_NAME, what=what)
        roles = {graph.name: "graph", f"tower.{precision}.engine": "engine", "timing.cache": "timing_cache"}
        files = {roles.get(f.name, f"data:{f.name}"): file_entry(tmp, f.name) for f in sorted(tmp.iterdir())}
        manifest = Manifest(target=to, precision=precision, contract=contract, files=files,
                            source={"name": source_name, "tower_sha256": tower_digest(model), "weights": weights or {}},
                            tools={**tool_versions(), "opset": str(opset)},
                            validation={"images": f"{len(images)} bundled images (2 photos, 2 held-out "
                                                  "scenes, a digit), none calibrated on" + (
                                                      "; for any-resolution views also crops of the first "
                                                      "shaped like each grid" if len(contract.view_counts) > 1
                                                      else "") + _instruction_note(contract), **checks, **extra},
                            device=device, created=now())
        write_manifest(tmp, manifest)
        _publish(tmp, out)
    finally:
        stages.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _publish(tmp: Path, out: Path) -> None:
    """Moves a finished export into place. A folder already at ``out`` is first renamed aside in one
    step, so a reader never opens a half-deleted export; if another process publishes into ``out``
    in between, the rename fails and says so instead of deleting that export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as e:
        raise ExportError(f"{out} was written by another process while this export ran; this export is "
                          "discarded (exports into one folder must not run at once)") from e
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _instruction_note(contract: ExportContract) -> str:
    lengths = validation_instruction_lengths(contract)
    if not lengths:
        return ""
    return (f"; instructions: seeded Q-Former ids (not words) of {' and '.join(map(str, lengths))} tokens, "
            "the first with rows padded to it")


def export_tower(source: Any, *, out: str | Path, to: str = "onnx", precision: str = "fp32", **kw) -> Manifest:
    """Export the vision tower + connector of ``source`` (a preset name, an edgevlm checkpoint folder,
    a transformers LLaVA / BLIP-2 / InstructBLIP folder, or a config) to ``out``. An InstructBLIP tower's
    graph also takes the instruction (``qformer_input_ids`` / ``qformer_attention_mask``, see
    :mod:`.contract`).

    ``to``: ``"onnx"`` or ``"tensorrt"`` (needs ``tensorrt`` and a CUDA GPU). ``precision``: ``"fp32"``,
    ``"fp16"`` or ``"int8"`` (static quantization calibrated on ``calib_images`` images: a folder
    ``calib_dir`` first, then scikit-image's photos where installed, then demo training scenes). ``max_images`` bounds the
    dynamic number of images for TensorRT's profile (ONNX Runtime takes any number). Every export is
    validated against eager PyTorch on real images before it is written
    (:class:`~edgevlm.errors.ExportValidationError` otherwise). ``workspace_mb`` and ``dla_core``
    are TensorRT builder options (Jetson).
    """
    config, state, allow_random = resolve_tower_source(source)
    model, report = build_tower_model(config, state, allow_random=allow_random)
    name = str(source) if isinstance(source, (str, os.PathLike)) else getattr(config, "name", "tower")
    return export_model(model, out=out, to=to, precision=precision, source_name=name, weights=report.sources, **kw)


def open_export(folder: str | Path, *, backend: str, model: VisionTowerModel | None = None,
                threads: int | None = None, providers: tuple[str, ...] | None = None, digest: str | None = None):
    """Check an export folder and return a runner ``(views, masks=None, text=None) -> embeddings`` (``text``:
    an InstructBLIP tower's instruction, as :meth:`VisionTowerModel.forward` takes it).

    With ``model`` (the tower the runtime loaded), the export must have been made from the same
    weights (:class:`~edgevlm.errors.StaleExportError` otherwise). A TensorRT engine must match this
    GPU and TensorRT version. Files are re-hashed (:class:`~edgevlm.errors.CorruptExportError`).
    ``digest`` is ``tower_digest(model)`` when the caller has it already (hashing reads every weight).
    ``providers`` are ONNX Runtime execution providers in order of preference (default: the CPU's);
    one that is missing or fails to start raises :class:`~edgevlm.errors.BackendUnavailableError`.
    """
    folder = Path(folder)
    if backend not in BACKENDS:
        raise ConfigError(f"vision backend must be one of {sorted(BACKENDS)} for an export, got {backend!r}")
    manifest = read_manifest(folder)
    if manifest.target != BACKENDS[backend]:
        raise ConfigError(f"{folder} holds a {manifest.target!r} export; vision_backend={backend!r} needs "
                          f"--to {BACKENDS[backend]}")
    if model is not None:
        check_source(manifest, digest or tower_digest(model), folder)
        if manifest.contract.tower_config() != model.config:
            raise StaleExportError(f"{folder}: exported for another tower configuration; re-export")
    if backend == "onnxruntime":
        from .ort_runner import OrtTowerRunner

        return OrtTowerRunner(manifest.path(folder, "graph"), manifest.contract, threads=threads,
                              providers=providers), manifest
    from .tensorrt import TrtTowerRunner, check_engine_device, device_key

    check_engine_device(manifest.device, device_key(), folder)
    return TrtTowerRunner(manifest.path(folder, "engine"), manifest.contract), manifest


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEVLM_CACHE") or Path.home() / ".cache" / "edgevlm")


def cached_export(model: VisionTowerModel, *, backend: str, precision: str = "fp32", name: str = "",
                  progress: bool = True, digest: str | None = None) -> Path:
    """The export of ``model`` for ``backend`` under :func:`cache_dir`, made on first use.

    Keyed by the weights' digest, precision and (for TensorRT) GPU and TensorRT version, so a
    changed checkpoint or a new GPU gets a new folder instead of a stale engine. Processes that ask
    for the same entry at once take turns (:func:`edgevlm.file_lock.exclusive`): one exports, the
    others wait and then use its folder.
    """
    target = BACKENDS.get(backend)
    if target is None:
        raise ConfigError(f"vision backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    key = f"{(digest or tower_digest(model))[:16]}-{target}-{precision}"
    if target == "tensorrt":
        import hashlib

        from .tensorrt import device_key

        key += "-" + hashlib.sha256(repr(sorted(device_key().items())).encode()).hexdigest()[:12]
    folder = cache_dir() / "exports" / key
    with exclusive(cache_dir() / "locks" / f"export-{key}.lock", str(folder), announce=progress):
        if (folder / MANIFEST).is_file():
            try:
                read_manifest(folder)
                return folder
            except ExportError:  # a corrupt cache entry is rebuilt, not trusted
                pass
        export_model(model, out=folder, to=target, precision=precision, source_name=name, overwrite=True,
                     progress=progress)
    return folder


__all__ = ["export_tower", "export_model", "open_export", "cached_export", "cache_dir", "BACKENDS", "validation_feeds",
           "validation_batches"]
