"""Any-resolution (LLaVA-NeXT) tower export: one per-view ONNX graph with a dynamic ``views`` axis, fed an
image's base view and tiles like any other views; packing (unpad + image_newline) stays in torch after it.

The tower comes from a tiny random ``LlavaNextForConditionalGeneration`` folder (test_llava_next.py's
builder: 40 px tiles, 5x5 tokens per view, canvases 1x2 / 2x1 / 2x2 tiles), so one image has 3 or 5
views. Tolerances: graph outputs against eager within the eager model's own fp32 noise (a float64 copy
on the same views, :func:`edgevlm_testkit.assert_within_noise`); the loaded pipeline's per-image
embeddings also within the export's own validation bound (``TOLERANCES``); greedy tokens exactly.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="exported towers run with onnxruntime (pip install 'edgevlm[onnx]')")
pytest.importorskip("transformers")

import edgevlm  # noqa: E402
from edgevlm.errors import ConfigError, ShapeError  # noqa: E402
from edgevlm.export import ExportContract, export_model, open_export, read_manifest  # noqa: E402
from edgevlm.export.api import aspect_crops, validation_batches  # noqa: E402
from edgevlm.export.calibration import validation_images  # noqa: E402
from edgevlm.export.validate import TOLERANCES, compare  # noqa: E402
from edgevlm.presets import get_preset  # noqa: E402
from edgevlm.runtime.preprocess import Preprocessor  # noqa: E402

from edgevlm_testkit import fp32_export_of, tower_model_of, assert_within_noise, float64_copy, max_abs  # noqa: E402
from test_llava_next import PROMPT, VARIANTS, build_folder  # noqa: E402  (the tiny LLaVA-NeXT folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_next_anyres")
    build_folder(path, **VARIANTS["clip"])
    return path


@pytest.fixture(scope="module")
def model(folder):
    return tower_model_of(folder)


@pytest.fixture(scope="module")
def fp32_export(folder, tmp_path_factory):
    return fp32_export_of(folder, tmp_path_factory, "llava-next-fp32")


@pytest.fixture(scope="module")
def images():
    """Two real photos of different aspect ratios: a wide one (200x512: 1x2 tiles, 3 views, its 5x10 map
    unpadded to 3 rows) and a near-square one (490x512: 2x2 tiles, 5 views)."""
    astronaut = validation_images()[0]  # 512x512
    return [np.ascontiguousarray(astronaut[150:350]), np.ascontiguousarray(astronaut[:490])]


def eager(model, views):
    with torch.inference_mode():
        return model(views)


def assert_graph_matches_eager(got, model, views, what):
    ref = eager(model, views)
    ref64 = eager(float64_copy(model), {k: v.double() for k, v in views.items()})
    assert got.shape == ref.shape
    assert_within_noise(got, ref, what, noise=max_abs(ref, ref64))


# ---- contract ------------------------------------------------------------------------------

def test_contract_records_variable_views(model):
    cfg = model.config
    c = ExportContract.for_tower(cfg, max_images=3)
    assert c.view_counts == (3, 5) and c.views_per_image == 5 and c.token_masks == "unused"
    # the smallest image (base + 1x2 tiles) up to three of the largest (base + 2x2)
    assert (c.profile.min_views, c.profile.opt_views, c.profile.max_views) == (3, 5, 15)
    assert c.dynamic_axes() == {"pixels.clip": {0: "views"}, "visual_embeds": {0: "views"}}
    assert c.trt_shapes()["pixels.clip"] == ((3, 3, 40, 40), (5, 3, 40, 40), (15, 3, 40, 40))
    again = ExportContract.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.tower_config() == cfg
    # fixed recipes: one count, no masks; a manifest written before these fields reads the same
    fixed = ExportContract.for_tower(get_preset("tiny").tower)
    assert fixed.view_counts == (5,) and fixed.token_masks == "none"
    old = {k: v for k, v in fixed.to_dict().items() if k not in ("view_counts", "token_masks")}
    assert ExportContract.from_dict(old) == fixed


def test_connectors_that_read_masks_take_them_as_graph_inputs():
    """A resampler attends under the views' padding masks, so they become graph inputs; xGen-MM's released
    anyres also regroups the tiles' tokens per image, whose gather index is one more input (both made by
    the preprocessor from each image's size). Parity: tests/test_xgenmm_anyres_export.py."""
    tower = get_preset("xgen-mm").tower
    e = tower.encoders[0]
    c = ExportContract.for_tower(tower)
    assert c.token_masks == "input"
    assert [(t.name, t.shape, t.dtype) for t in c.inputs[1:]] == [
        (f"token_mask.{e.name}", ("views", e.tokens), "bool"), (f"token_order.{e.name}", ("views", e.tokens), "int64")]
    assert c.trt_shapes()[f"token_order.{e.name}"][2] == (c.profile.max_views, e.tokens)
    assert ExportContract.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    # an anyres resampler without regrouping: the masks only
    plain = ExportContract.for_tower(replace(tower, regroup=None))
    assert [t.name for t in plain.inputs[1:]] == [f"token_mask.{e.name}"] and not plain.order_inputs
    # runners' checks of what comes with the views
    n = 2 * c.views_per_image
    with pytest.raises(ShapeError, match="token masks"):
        c.token_inputs(None, None, n)
    mask = {e.name: torch.ones(n, e.tokens, dtype=torch.bool)}
    with pytest.raises(ShapeError, match="token_order"):
        c.token_inputs(mask, None, n)
    with pytest.raises(ShapeError, match=r"indices must lie in \[0, "):
        c.token_inputs(mask, {e.name: torch.full((n, e.tokens), n * e.tokens)}, n)
    feeds = c.token_inputs(mask, {e.name: torch.arange(n * e.tokens).view(n, e.tokens)}, n)
    assert sorted(feeds) == [f"token_mask.{e.name}", f"token_order.{e.name}"]
    with pytest.raises(ConfigError, match="token order"):
        plain.token_inputs(mask, {e.name: torch.zeros(n, e.tokens, dtype=torch.long)}, n)
    # InstructBLIP's instruction inputs: tests/test_export_instructblip.py
    # BLIP-2's Q-Former (no text) still exports: test_export.py::test_other_connectors_export_matches_eager


# ---- the graph -----------------------------------------------------------------------------

def test_graph_has_a_dynamic_views_axis_and_manifest_says_so(fp32_export):
    import onnx

    out, manifest = fp32_export
    graph = onnx.load(str(out / manifest.files["graph"]["path"])).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}
    assert dims["pixels.clip"] == ["views", 3, 40, 40] and dims["visual_embeds"][0] == "views"
    on_disk = json.loads((out / "manifest.json").read_text())["contract"]
    assert on_disk["view_counts"] == [3, 5] and on_disk["token_masks"] == "unused"
    assert on_disk["dynamic_axes"]["pixels.clip"] == {"0": "views"}
    assert read_manifest(out).contract == manifest.contract


def test_validation_ran_at_every_view_count(fp32_export):
    """The bundled photos all pick the 2x2 grid here, so validation adds crops shaped like each grid: a
    mixed batch, then a 3-view and a 5-view image alone."""
    _, manifest = fp32_export
    v = manifest.validation["fp32"]
    assert v["batch_views"][1:] == [3, 5] and v["batch_views"][0] <= manifest.contract.profile.max_views
    batches = validation_batches(manifest.contract, validation_images())
    counts = Preprocessor(manifest.contract.tower_config()).views_per_image(
        aspect_crops(validation_images()[0], [(1, 2), (2, 1), (2, 2)]))
    assert counts == [3, 3, 5]
    assert [next(iter(b.values())).shape[0] for b in batches] == v["batch_views"]
    assert 0 <= v["rel_max"] <= TOLERANCES["fp32"][1]


def test_runner_matches_eager_at_several_view_counts(fp32_export, model, images):
    out, _ = fp32_export
    runner, _ = open_export(out, backend="onnxruntime", model=model)
    pre = Preprocessor(model.config)
    for batch in ([images[0]], [images[1]], images, [images[1], images[0], images[1]]):
        p = pre(batch)
        n = sum(p.views_per_image)
        got = runner(p.views, p.token_masks)  # anyres padding masks come along; the MLP does not read them
        assert got.shape == (n, 25, model.config.out_width)
        assert_graph_matches_eager(got, model, p.views, f"anyres ORT fp32 vs eager, {p.views_per_image} views")
    assert [pre.views_per_image([im])[0] for im in images] == [3, 5]
    p = pre(images)
    with pytest.raises(ShapeError, match=r"token mask for encoder 'clip': expected \[8, tokens\]"):
        runner(p.views, {"clip": p.token_masks["clip"][:3]})


# ---- the runtime ---------------------------------------------------------------------------

def test_load_with_onnxruntime_matches_torch(folder, fp32_export, images, tmp_path, monkeypatch):
    """``edgevlm.load(folder, vision_backend="onnxruntime")`` (exported into the cache on first use) answers
    with the torch backend's greedy tokens, and its per-image packed embeddings stay within the export's
    validation bound; an explicit export folder gives the same."""
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path))
    ref = edgevlm.load(folder)
    pipe = edgevlm.load(folder, vision_backend="onnxruntime")
    assert pipe.tower.backend == "onnxruntime" and len(list((tmp_path / "exports").iterdir())) == 1
    explicit = edgevlm.load(folder, vision_backend="onnxruntime", vision_export=fp32_export[0])
    metric, bound = TOLERANCES["fp32"]
    want = ref.tower.embed_each(images)
    assert [t.shape[0] for t in want] == [25 + 3 * 11, 25 + 10 * 11]  # base view + map rows, each with a newline
    for p in (pipe, explicit):
        got = p.tower.embed_each(images)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape
            err = compare(g.numpy(), w.numpy())[metric]
            assert err <= bound, f"image {i}: {metric} {err:.3g} > the export's bound {bound:g}"
    answers = []
    for img in images:
        a = pipe.generate(img, PROMPT, raw=True, max_new_tokens=12)
        b = ref.generate(img, PROMPT, raw=True, max_new_tokens=12)
        assert a.token_ids == b.token_ids and len(b.token_ids) > 0
        assert a.visual_tokens == b.visual_tokens
        answers.append(b.token_ids)
    # The random decoder soon repeats one token, but its first answer token follows the image (top-2 logit
    # gaps ~0.5 and ~0.09 here, against backend differences ~1e-6): equal answers above are not image-blind.
    assert answers[0] != answers[1]
    both = "<s>user: <image><image>\nCompare.\nassistant:"
    a = pipe.generate(images, both, raw=True, max_new_tokens=8)
    assert a.token_ids == ref.generate(images, both, raw=True, max_new_tokens=8).token_ids


# ---- reduced precision ---------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_exports_validate_at_every_view_count(model, images, tmp_path, precision):
    m = export_model(model, out=tmp_path / precision, precision=precision, calib_images=4, max_images=3,
                     progress=False)
    metric, bound = TOLERANCES[precision]
    v = m.validation[precision]
    assert v["batch_views"][1:] == [3, 5] and 0 < v[metric] <= bound
    runner, _ = open_export(tmp_path / precision, backend="onnxruntime", model=model)
    p = Preprocessor(model.config)(images)
    got, ref = runner(p.views, p.token_masks), eager(model, p.views)
    assert got.shape == ref.shape == (8, 25, model.config.out_width)
    assert 0 < compare(got.numpy(), ref.numpy())[metric] <= bound
