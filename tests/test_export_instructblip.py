"""InstructBLIP tower export: the Q-Former reads the instruction, so the graph takes it as two more inputs,
``qformer_input_ids`` / ``qformer_attention_mask`` int64 ``[views, instruction_tokens]`` with a dynamic length.

The tower comes from test_instructblip.py's tiny random ``InstructBlipForConditionalGeneration`` folder
(EVA ViT 40 px, Q-Former with 6 queries, a 22-token WordPiece vocabulary and 24 positions, its processor's
Q-Former tokenizer in ``qformer_tokenizer/``). Tolerances: graph outputs against eager within the eager
model's own fp32 noise (a float64 copy on the same views and ids, :func:`edgevlm_testkit.assert_within_noise`);
reduced precisions within the export's own bounds (``TOLERANCES``); greedy tokens exactly.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="exported towers run with onnxruntime (pip install 'edgevlm[onnx]')")
pytest.importorskip("transformers")

import edgevlm  # noqa: E402
from edgevlm.errors import ConfigError, ShapeError  # noqa: E402
from edgevlm.export import ExportContract, export_model, open_export, read_manifest  # noqa: E402
from edgevlm.export.api import validation_feeds  # noqa: E402
from edgevlm.export.calibration import validation_images  # noqa: E402
from edgevlm.export.contract import (  # noqa: E402
    INSTRUCTION_AXIS, INSTRUCTION_IDS, INSTRUCTION_MASK, InstructionProfile,
)
from edgevlm.export.validate import TOLERANCES, compare  # noqa: E402
from edgevlm.runtime.preprocess import Preprocessor  # noqa: E402
from edgevlm.runtime.tower import build_tower_model  # noqa: E402

from edgevlm_testkit import fp32_export_of, tower_model_of, assert_differs, assert_within_noise, float64_copy, max_abs  # noqa: E402
from test_instructblip import MAX_POS, N_QUERIES, PROMPTS, VOCAB, ib_dir  # noqa: E402,F401  (the tiny folder)


@pytest.fixture(scope="module")
def folder(ib_dir):  # noqa: F811
    return ib_dir[2]


@pytest.fixture(scope="module")
def model(folder):
    return tower_model_of(folder)


@pytest.fixture(scope="module")
def fp32_export(folder, tmp_path_factory):
    return fp32_export_of(folder, tmp_path_factory, "instructblip-fp32")


@pytest.fixture(scope="module")
def photos():
    return validation_images()[:3]  # real photos and a scene, resized to the tower's 40 px


def instruction(folder, prompts):
    """The folder's own Q-Former tokenizer, as the runtime tokenises prompts: (ids int64, mask bool) [N, L]."""
    from edgevlm.runtime.qformer_tokenizer import QFormerTokenizer

    return QFormerTokenizer.from_folder(folder)(prompts)


def eager(model, views, text):
    with torch.inference_mode():
        return model(views, text=text) if text is not None else model(views)


def assert_graph_matches_eager(got, model, views, text, what) -> float:
    ref = eager(model, views, text)
    ref64 = eager(float64_copy(model), {k: v.double() for k, v in views.items()}, text)
    assert got.shape == ref.shape
    return assert_within_noise(got, ref, what, noise=max_abs(ref, ref64))


# ---- contract and graph ----------------------------------------------------------------------

def test_graph_has_instruction_inputs_with_a_dynamic_length(fp32_export, model):
    import onnx

    out, manifest = fp32_export
    c = manifest.contract
    assert c.input_names == ["pixels.eva", INSTRUCTION_IDS, INSTRUCTION_MASK]
    assert c.instruction == InstructionProfile(min_tokens=1, opt_tokens=MAX_POS, max_tokens=MAX_POS,
                                               vocab_size=len(VOCAB), pad_id=0)  # opt 32 clipped to 24 positions
    assert c.dynamic_axes()[INSTRUCTION_IDS] == {0: "views", 1: INSTRUCTION_AXIS}
    graph = onnx.load(str(out / manifest.files["graph"]["path"])).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    assert list(dims) == c.input_names
    for name in (INSTRUCTION_IDS, INSTRUCTION_MASK):
        assert dims[name] == ["views", INSTRUCTION_AXIS] and types[name] == onnx.TensorProto.INT64
    # TensorRT's profile: the views' bounds on the first axis, 1 / opt / max_positions tokens on the second
    p = c.profile
    assert c.trt_shapes()[INSTRUCTION_MASK] == ((p.min_views, 1), (p.opt_views, MAX_POS), (p.max_views, MAX_POS))
    assert c.trt_shapes()["pixels.eva"] == ((1, 3, 40, 40), (1, 3, 40, 40), (3, 3, 40, 40))
    # the manifest on disk records it, and reads back to the same contract
    on_disk = json.loads((out / "manifest.json").read_text())["contract"]
    assert on_disk["instruction"]["max_tokens"] == MAX_POS
    assert on_disk["dynamic_axes"][INSTRUCTION_IDS] == {"0": "views", "1": INSTRUCTION_AXIS}
    assert read_manifest(out).contract == c and c.tower_config() == model.config


def test_validation_ran_at_two_instruction_lengths(fp32_export, photos):
    _, manifest = fp32_export
    v = manifest.validation["fp32"]
    assert v["instruction_tokens"] == [MAX_POS, 5] and v["batch_views"] == [3, 1]
    assert 0 <= v["rel_max"] <= TOLERANCES["fp32"][1]
    assert "instructions" in manifest.validation["images"]
    feeds = validation_feeds(manifest.contract, validation_images())
    (ids0, mask0), (ids1, mask1) = (f.extra["text"] for f in feeds)
    assert not bool(mask0.all()) and bool(mask1.all())  # the long one is padded per row, the short one not
    assert int(ids0.max()) < len(VOCAB) and int(ids1.min()) >= 0


def test_blip2_tower_keeps_todays_graph(model, tmp_path):
    """The same tower without the Q-Former's text side (BLIP-2): no instruction inputs, no contract entry."""
    import onnx

    c = model.config.connector
    cfg = dataclasses.replace(model.config, connector=dataclasses.replace(
        c, qformer=dataclasses.replace(c.qformer, text=None)))
    contract = ExportContract.for_tower(cfg)
    assert contract.input_names == ["pixels.eva"] and contract.instruction is None
    assert "instruction" not in contract.to_dict() and list(contract.trt_shapes()) == ["pixels.eva"]
    blip2, _ = build_tower_model(cfg, allow_random=True)
    m = export_model(blip2, out=tmp_path / "blip2", progress=False)
    graph = onnx.load(str(tmp_path / "blip2" / m.files["graph"]["path"])).graph
    assert [i.name for i in graph.input] == ["pixels.eva"]
    assert "instruction_tokens" not in m.validation["fp32"]
    runner, _ = open_export(tmp_path / "blip2", backend="onnxruntime", model=blip2)
    with pytest.raises(ConfigError, match="takes no instruction"):
        runner({"eva": torch.zeros(1, 3, 40, 40)}, text=(torch.zeros(1, 2, dtype=torch.long), None))


# ---- the graph against eager -----------------------------------------------------------------

def test_runner_matches_eager_for_instructions_of_different_lengths(fp32_export, model, folder, photos):
    out, _ = fp32_export
    runner, _ = open_export(out, backend="onnxruntime", model=model)
    views = Preprocessor(model.config)(photos).views  # 3 views
    short, long = PROMPTS[1], PROMPTS[2]
    got = {}
    for prompts in ([short] * 3, [long] * 3, [PROMPTS[0], short, long]):  # L = 4, 14, and a padded batch
        text = instruction(folder, prompts)
        y = runner(views, text=text)
        assert y.shape == (3, N_QUERIES, model.config.out_width)
        err = assert_graph_matches_eager(y, model, views, text, f"ORT fp32 vs eager, L={text[0].shape[1]}")
        print(f"instructblip ORT fp32 vs eager, L={text[0].shape[1]}: max abs err {err:.2e}")
        got[tuple(prompts)] = y
    lengths = [instruction(folder, [p])[0].shape[1] for p in (short, long)]
    assert lengths[0] != lengths[1]
    # the instruction is really read: another one changes every view's output
    a, b = got[(short,) * 3], got[(long,) * 3]
    assert_differs(a, b, "ORT output under two instructions", rel=0.01)
    # in the padded batch each view gets what it gets alone with its own instruction (padding is masked)
    mixed = got[(PROMPTS[0], short, long)]
    assert_within_noise(mixed[1], a[1], "padded row vs the same instruction alone",
                        noise=max_abs(eager(model, views, instruction(folder, [short] * 3))[1],
                                      eager(float64_copy(model), {k: v.double() for k, v in views.items()},
                                            instruction(folder, [short] * 3))[1]))
    # without an instruction the graph gets an empty one: the Q-Former's query path, as eager without text
    assert_graph_matches_eager(runner(views), model, views, None, "ORT fp32 with no instruction vs eager query path")


def test_runner_rejects_bad_instructions(fp32_export, model):
    out, _ = fp32_export
    runner, _ = open_export(out, backend="onnxruntime", model=model)
    views = {"eva": torch.zeros(2, 3, 40, 40)}
    ids = torch.full((2, 3), 5)
    with pytest.raises(ShapeError, match=rf"{INSTRUCTION_IDS}: 25 tokens are outside .*\[0, {MAX_POS}\]"):
        runner(views, text=(torch.full((2, MAX_POS + 1), 5), None))
    with pytest.raises(ShapeError, match=rf"must lie in \[0, {len(VOCAB)}\)"):
        runner(views, text=(torch.full((2, 3), len(VOCAB)), None))
    with pytest.raises(ShapeError, match=r"expected integer ids \[2, L\]"):
        runner(views, text=(ids[:1], None))
    with pytest.raises(ShapeError, match=r"expected integer ids"):
        runner(views, text=(ids.float(), None))
    with pytest.raises(ShapeError, match=rf"{INSTRUCTION_MASK}: expected a bool or 0/1 integer mask \[2, 3\]"):
        runner(views, text=(ids, torch.ones(2, 2, dtype=torch.bool)))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_exports_read_the_instruction(model, folder, photos, tmp_path, precision):
    m = export_model(model, out=tmp_path / precision, precision=precision, calib_images=3, max_images=3,
                     progress=False)
    metric, bound = TOLERANCES[precision]
    v = m.validation[precision]
    assert v["instruction_tokens"] == [MAX_POS, 5] and 0 < v[metric] <= bound
    runner, _ = open_export(tmp_path / precision, backend="onnxruntime", model=model)
    views = Preprocessor(model.config)(photos).views
    for prompts in ([PROMPTS[1]] * 3, [PROMPTS[0], PROMPTS[1], PROMPTS[2]]):
        text = instruction(folder, prompts)
        got, ref = runner(views, text=text), eager(model, views, text)
        assert got.shape == ref.shape
        assert 0 < compare(got.numpy(), ref.numpy())[metric] <= bound


# ---- the runtime -----------------------------------------------------------------------------

def test_load_with_onnxruntime_answers_as_torch(folder, photos, tmp_path, monkeypatch):
    """``edgevlm.load(folder, vision_backend="onnxruntime")`` exports into the cache on first use; the Pipeline's
    Q-Former reads the prompt through the graph, its embeddings stay within the torch tower's fp32 noise and
    its greedy tokens equal the torch backend's."""
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path))
    ref = edgevlm.load(folder)
    pipe = edgevlm.load(folder, vision_backend="onnxruntime")
    assert pipe.tower.backend == "onnxruntime" and pipe.tower.takes_instruction
    assert len(list((tmp_path / "exports").iterdir())) == 1
    tower64 = float64_copy(ref.tower.model)
    for prompt in (PROMPTS[0], PROMPTS[2]):
        a = pipe.tower.embed_each(photos, instruction=prompt)
        b = ref.tower.embed_each(photos, instruction=prompt)
        pre = ref.tower.preprocessor(photos)
        text = instruction(folder, [prompt] * len(photos))
        b64 = eager(tower64, {k: v.double() for k, v in pre.views.items()}, text)
        assert_within_noise(torch.stack(a), torch.stack(b), f"load(onnxruntime) vs torch tower, {prompt!r}",
                            noise=max_abs(torch.stack(b), b64))
    answers = []
    img = np.random.default_rng(5).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    for prompt in PROMPTS:
        x = pipe.generate(img, prompt, max_new_tokens=8)
        y = ref.generate(img, prompt, max_new_tokens=8)
        assert x.token_ids == y.token_ids and len(y.token_ids) > 0 and x.visual_tokens == N_QUERIES
        answers.append(y.token_ids)
    assert len({tuple(a) for a in answers}) == len(PROMPTS)  # equal per prompt above, yet not one constant loop
    assert pipe.tower.last_timings["cached_images"] == 0  # the last prompt's embedding came from the graph


# ---- command line and TensorRT --------------------------------------------------------------

def test_cli_exports_an_instructblip_folder(folder, tmp_path, capsys):
    from edgevlm.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(folder), "--out", str(out), "--max-images", "2"]) == 0
    text = capsys.readouterr().out
    assert f"{INSTRUCTION_IDS}" in text and "['views', 'instruction_tokens']" in text
    assert f"profile min/opt/max 1/{MAX_POS}/{MAX_POS} tokens" in text and "ORT fp32 vs eager" in text
    assert read_manifest(out).contract.instruction.max_tokens == MAX_POS


def test_tensorrt_engine_reads_the_instruction(model, folder, photos, tmp_path):
    """Runs only where TensorRT imports and a GPU is present (not on this project's CPU machines)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (CPU-only CI); the engine path is "
                        "unverified here, see docs/export.md")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU; none is visible")
    m = export_model(model, out=tmp_path / "trt", to="tensorrt", progress=False)
    assert m.validation["tensorrt"]["instruction_tokens"] == [MAX_POS, 5]
    runner, _ = open_export(tmp_path / "trt", backend="tensorrt", model=model)
    views = Preprocessor(model.config)(photos[:2]).views
    for prompts in ([PROMPTS[1]] * 2, [PROMPTS[0], PROMPTS[2]]):
        text = instruction(folder, prompts)
        assert_graph_matches_eager(runner(views, text=text).cpu(), model, views, text, "TensorRT fp32 vs eager")
    with pytest.raises(ShapeError, match="outside the exported tower"):
        runner(views)  # an empty instruction is below the engine's profile (1 token)
