"""``edgevlm convert``: every kind of source written as an edgevlm checkpoint (runtime/convert.py) loads
back as the same model.

The sources are the tiny random folders the other test files build (their fixtures and builders are
imported, not copied): causal LMs of the llama / mistral / phi3 / opt families, LLaVA, LLaVA-NeXT, BLIP-2
(OPT and LLaMA), InstructBLIP (with its Q-Former tokenizer), a LLaMA2-Accessory SPHINX folder (a
SentencePiece tokenizer.model) and a GGUF file with quantised blocks. For each, the converted folder and
the source are both loaded with float weights and must agree exactly (``atol=0``: the same tensors run the
same operations): the configs, the prompt's positions and input embeddings (images included), the last
position's logits and the greedy answer.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm import config as C
from edgevlm.cli import main
from edgevlm.errors import CheckpointError, ConfigError, UnknownPresetError, WeightsNotFoundError
from edgevlm.runtime import load_vision_tower
from edgevlm.runtime.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from edgevlm.runtime.convert import convert
from edgevlm.runtime.readers.safetensors_io import load_safetensors
from edgevlm_testkit import BYTE_VOCAB, write_byte_tokenizer
from test_blip2_model import blip2  # noqa: F401  (module fixtures, reused as they are)
from test_decoder import save_tiny
from test_decoder_families import save_family
from test_gguf import MIXED, tiny_hf, write_gguf
from test_instructblip import ib_dir  # noqa: F401
from test_llava_next import build_folder as build_llava_next
from test_pipeline import llama, llava  # noqa: F401
from test_sphinx_pth import TINY as SPHINX_TINY, reference_state, spm_pieces, write_folder

transformers = pytest.importorskip("transformers")

IMAGE = np.random.default_rng(0).integers(0, 256, size=(36, 52, 3), dtype=np.uint8)


def _converted(src, tmp_path, name="converted"):
    out = convert(src, tmp_path / name, progress=False)
    assert (out / CONFIG_NAME).is_file() and (out / WEIGHTS_NAME).is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    return out


def assert_same_model(src, out, image=None, prompt="What is this?", tokens: int = 10):
    """Loading ``out`` gives the model loading ``src`` gives, bit for bit; returns both pipelines."""
    a, b = edgevlm.load(src, quant=None), edgevlm.load(out, quant=None)
    assert b.sources["decoder"] == "checkpoint" and b.sources["tokenizer"].endswith("tokenizer.json")
    assert b.decoder.cfg == a.decoder.cfg and b.chat == a.chat
    assert (b.tower is None) == (a.tower is None)
    if a.tower is not None:
        assert b.tower.config == a.tower.config
        assert set(b.tower.weights.sources.values()) <= {"checkpoint", "none"}
    with torch.no_grad():
        xa, _, ea, ka = a._prepare(image, prompt, False, None)
        xb, _, eb, kb = b._prepare(image, prompt, False, None)
        assert [e.shape for e in eb] == [e.shape for e in ea] and kb == ka
        torch.testing.assert_close(xb, xa, atol=0, rtol=0)  # text ids, image positions and embeddings
        torch.testing.assert_close(b.decoder(inputs_embeds=xb)[0, -1], a.decoder(inputs_embeds=xa)[0, -1],
                                   atol=0, rtol=0)
    ga, gb = a.generate(image, prompt, max_new_tokens=tokens), b.generate(image, prompt, max_new_tokens=tokens)
    assert gb.token_ids == ga.token_ids and gb.text == ga.text and len(ga.token_ids) >= 1
    return a, b


# ---- causal LMs ------------------------------------------------------------------------------------


def test_llama_folder(llama, tmp_path):  # noqa: F811
    _, folder = llama
    out = _converted(folder, tmp_path)
    a, b = assert_same_model(folder, out)
    doc = json.loads((out / CONFIG_NAME).read_text())
    assert doc["config"]["tower"] is None and doc["config"]["decoder"] == C.to_dict(a.decoder.cfg)
    with pytest.raises(CheckpointError, match="text-only"):
        load_vision_tower(out)


@pytest.mark.parametrize("family", ["opt", "phi3_longrope", "mistral_tied"])
def test_decoder_families(family, tmp_path):
    src = tmp_path / family
    if family == "mistral_tied":
        save_tiny(src, cls="MistralForCausalLM", vocab_size=BYTE_VOCAB, sliding_window=200, tie_word_embeddings=True)
    else:
        save_family(src, family)
    write_byte_tokenizer(src)
    out = _converted(src, tmp_path)
    a, _ = assert_same_model(src, out, prompt="A prompt of more than sixteen positions, for the long factors.")
    keys = set(load_safetensors(out / WEIGHTS_NAME))
    assert all(k.startswith("decoder.") for k in keys)
    assert ("decoder.lm_head.weight" in keys) == (not a.decoder.cfg.tie_embeddings)


def test_gguf_file_with_quantised_blocks(tmp_path, monkeypatch):
    import gguf

    from edgevlm.runtime.tokenizer import BYTE_TO_CHAR

    # test_gguf's writer, with a vocabulary that tokenises text: <unk> <s> </s>, 252 byte tokens, one merge
    tokens = ["<unk>", "<s>", "</s>", *(BYTE_TO_CHAR[b] for b in range(4, 256)), "ab"]
    types = [3, 3, 3] + [1] * 253
    for name, value in (("add_token_list", tokens), ("add_token_types", types), ("add_token_merges", ["a b"])):
        orig = getattr(gguf.GGUFWriter, name)
        monkeypatch.setattr(gguf.GGUFWriter, name, lambda self, _v, orig=orig, value=value: orig(self, value))
    path = write_gguf(tmp_path / "tiny-mixed.gguf", tiny_hf(tie=True), MIXED)
    monkeypatch.undo()
    out = _converted(path, tmp_path)
    a, b = assert_same_model(path, out, prompt="an abacus, grabbed")
    assert b.tokenizer.chat_template == a.tokenizer.chat_template and b.tokenizer.add_bos and b.tokenizer.bos_id == 1
    # the converted folder is float weights: a GGUF's own blocks are not kept
    assert all(v.dtype == torch.float32 for v in load_safetensors(out / WEIGHTS_NAME).values())


# ---- multimodal ------------------------------------------------------------------------------------


def test_llava(llava, tmp_path):  # noqa: F811
    _, folder = llava
    out = _converted(folder, tmp_path)
    a, _ = assert_same_model(folder, out, IMAGE)
    assert a.chat.image_placement == "placeholder"
    tower = load_vision_tower(out)
    views = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(tower.from_pixels(views), a.tower.from_pixels(views), atol=0, rtol=0)


def test_llava_next_anyres(tmp_path):
    src = tmp_path / "llava_next"
    build_llava_next(src, vision="clip_vision_model", layer=[-2, -1], strategy="default")
    out = _converted(src, tmp_path)
    a, b = assert_same_model(src, out, IMAGE)
    assert b.tower.config.pack is not None and b.tower.config.views.kind == "anyres"


def test_blip2(blip2, tmp_path):  # noqa: F811
    _, _, folder = blip2
    out = _converted(folder, tmp_path)
    a, _ = assert_same_model(folder, out, IMAGE)
    assert (a.chat.kind, a.chat.image_placement) == ("qa", "before_bos")


def test_instructblip_with_its_qformer_tokenizer(ib_dir, tmp_path):  # noqa: F811
    _, _, folder = ib_dir
    out = _converted(folder, tmp_path)
    assert (out / "qformer_tokenizer" / "tokenizer.json").is_file()
    a, b = assert_same_model(folder, out, IMAGE, prompt="what is in the image?")
    assert b.tower.takes_instruction and b.tower.instruction_tokenizer is not None
    text = "describe the photo shortly"
    assert b.tower.tokenize_instruction(text)[0].tolist() == a.tower.tokenize_instruction(text)[0].tolist()
    torch.testing.assert_close(b.tower(IMAGE, instruction=text), a.tower(IMAGE, instruction=text), atol=0, rtol=0)
    tower = load_vision_tower(out)  # the tower-only loader finds it too
    assert tower.tokenize_instruction(text)[0].tolist() == a.tower.tokenize_instruction(text)[0].tolist()


def test_sphinx_folder_with_a_sentencepiece_tokenizer(tmp_path):
    state, _ = reference_state(SPHINX_TINY, "llama_ens", len(spm_pieces()), seed=2)
    folder = write_folder(tmp_path / "sphinx", state, "llama_ens", SPHINX_TINY, shards=2)
    out = _converted(folder, tmp_path)
    a, b = assert_same_model(folder, out, IMAGE, prompt="what is the cat", tokens=4)
    assert b.chat.kind == "sphinx" and b.tokenizer.decode(b.tokenizer.encode("é ###", add_bos=False)) == "é ###"


# ---- the command line, bad input, configs ----------------------------------------------------------


def test_cli_writes_the_folder_and_refuses_to_overwrite(llama, tmp_path, capsys):  # noqa: F811
    _, folder = llama
    out = tmp_path / "ckpt"
    assert main(["convert", str(folder), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and {CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json"} <= set(report["files"])
    before = (out / WEIGHTS_NAME).read_bytes()
    tensors = load_safetensors(out / WEIGHTS_NAME)

    assert main(["convert", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and "not empty" in err and "--force" in err
    assert (out / WEIGHTS_NAME).read_bytes() == before  # untouched

    assert main(["convert", str(folder), "--out", str(out), "--force"]) == 0
    assert "wrote" in capsys.readouterr().out
    again = load_safetensors(out / WEIGHTS_NAME)  # (the file's header orders its metadata differently per run)
    assert all(torch.equal(again[k], v) for k, v in tensors.items()) and again.keys() == tensors.keys()
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(folder), "--out", str(tmp_path / "empty")]) == 0  # an empty folder is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_sources_and_outputs(llama, tmp_path, capsys, monkeypatch):  # noqa: F811
    _, folder = llama
    with pytest.raises(UnknownPresetError, match="neither a preset"):
        convert("no-such-model", tmp_path / "x", progress=False)
    assert main(["convert", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "UnknownPresetError" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    with pytest.raises(WeightsNotFoundError, match="neither an edgevlm checkpoint"):
        convert(tmp_path / "plain", tmp_path / "x", progress=False)
    with pytest.raises(CheckpointError, match="overlaps the source"):
        convert(folder, folder / "inside", force=True, progress=False)
    with pytest.raises(CheckpointError, match="overlaps the source"):
        convert(folder, folder, force=True, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        convert(folder, tmp_path / "file", force=True, progress=False)
    with pytest.raises(CheckpointError, match="dtype"):
        convert(folder, tmp_path / "x", dtype="int8", progress=False)

    # a failure after writing began leaves nothing behind, and a --force target is kept
    import edgevlm.runtime.convert as conv

    def broken(*a, **k):
        raise CheckpointError("simulated failure while verifying")

    monkeypatch.setattr(conv, "_verify", broken)
    with pytest.raises(CheckpointError, match="simulated"):
        convert(folder, tmp_path / "x", progress=False)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="simulated"):
        convert(folder, tmp_path / "kept", force=True, progress=False)
    assert (tmp_path / "kept" / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kept", "plain"]


def test_dtype_bfloat16(llama, tmp_path):  # noqa: F811
    _, folder = llama
    out = convert(folder, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert {v.dtype for v in load_safetensors(out / WEIGHTS_NAME).values()} == {torch.bfloat16}
    a, b = edgevlm.load(folder, quant=None, dtype="bfloat16"), edgevlm.load(out, quant=None, dtype="bfloat16")
    assert b.generate(None, "hi", max_new_tokens=6).token_ids == a.generate(None, "hi", max_new_tokens=6).token_ids


def _every_config() -> list:
    """One instance of every config class, with values away from the defaults where a field has them."""
    enc = C.ViTConfig(name="clip", image_size=56, patch_size=14, width=64, depth=3, heads=4, mlp_dim=96,
                      mlp_act="quick_gelu", feature_layers=(-2, -1), keep_class_token=False, pos_grid=7,
                      mean=C.CLIP_MEAN, std=C.CLIP_STD, weights=C.WeightsRef(format="transformers", path="/m/clip"))
    cnx = C.ConvNeXtConfig(name="cnx", image_size=64, depths=(1, 2), dims=(8, 16), final_norm=True)
    eff = C.EfficientNetConfig(name="eff", image_size=64, width_mult=0.5, feature="blocks", mean=C.LITE_MEAN,
                               std=C.LITE_STD, weights=C.WeightsRef(format="x", path="p.pth", package="pkg"))
    q = C.QFormerConfig(encoder="clip", encoder_width=128, num_queries=4, hidden=32, layers=2, heads=2,
                        intermediate=48, text=C.QFormerTextConfig(vocab_size=50, max_positions=24, pad_id=3))
    fusion = C.SphinxFusionConfig(out_width=32, encoders=("clip", "cnx", "eff"), in_widths=(128, 16, 160), grid=4,
                                  qformer=q, pos_embed=True)
    views = C.ViewConfig(kind="anyres", anyres_grids=((1, 2), (2, 1)), anyres_fill=(1, 2, 3))
    packed = C.TowerConfig(encoders=(dataclasses.replace(enc, feature_layers=(), keep_class_token=False, pos_grid=0,
                                                         image_size=28),),
                           connector=C.MLPConnectorConfig(out_width=32, encoder="clip", in_width=64, hidden=40),
                           views=views, pack=C.AnyresPackConfig(unpad=False, newline=True))
    dec = C.DecoderConfig(vocab_size=100, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48,
                          rope_scaling="longrope", rope_short_factor=(1.0, 1.5, 2.0, 2.5),
                          rope_long_factor=(3.0, 3.5, 4.0, 4.25), rope_attention_factor=1.19, rope_original_max_len=16)
    opt = C.DecoderConfig(vocab_size=100, hidden=32, layers=1, heads=4, kv_heads=4, intermediate=48, norm="layer",
                          mlp_act="relu", mlp_gated=False, positions="learned", learned_pos_offset=2,
                          attention_bias=True, mlp_bias=True, tie_embeddings=True)
    towers = [C.TowerConfig(encoders=(enc, cnx, eff), connector=fusion, views=C.ViewConfig(crop_grid=2)), packed,
              C.TowerConfig(encoders=(dataclasses.replace(enc, feature_layers=()),),
                            connector=C.QFormerConnectorConfig(out_width=32, qformer=dataclasses.replace(
                                q, encoder_width=64, text=None))),
              C.TowerConfig(encoders=(dataclasses.replace(enc, feature_layers=()),),
                            connector=C.ResamplerConnectorConfig(out_width=32, encoder="clip", in_width=64, depth=2,
                                                                 heads=2, head_dim=8, num_latents=5)),
              C.TowerConfig(encoders=(cnx,), connector=C.LinearConnectorConfig(out_width=32, encoder="cnx",
                                                                                in_width=16, bias=False))]
    models = [C.ModelConfig(name=f"m{i}", tower=t, decoder=dec if i % 2 else opt, image_placement="placeholder",
                            image_token="<img>", chat_format="qa", lora=C.LoRAConfig(rank=2, targets=("q_proj",)),
                            decoder_weights=C.WeightsRef(format="gguf", path="/d.gguf"))
              for i, t in enumerate(towers)]
    models.append(C.ModelConfig(name="text", tower=None, decoder=dec))
    from edgevlm.presets import get_preset

    regrouped = get_preset("xgen-mm").tower  # anyres views + StripRegroupConfig (xGen-MM's strips)
    tiny = get_preset("tiny")  # its fusion: [s] 8 queries [global] 4x4 grid [e] per view
    models.append(dataclasses.replace(tiny, grounding_head=C.GroundingHeadConfig(
        visual_width=tiny.tower.out_width, first_cell=10, grid=4, width=32, layers=1, heads=2, trigger="<",
        answers=("red", "3"), answer_weight=0.5)))
    return [regrouped] + models + [C.QuantConfig.named("int4-g64"), C.QuantConfig.named("int8")]


def test_every_config_class_round_trips_through_json():
    objs = _every_config()
    seen = set()
    for obj in objs:
        back = C.from_dict(type(obj), json.loads(json.dumps(C.to_dict(obj))))
        assert back == obj, type(obj).__name__

        def walk(o):
            if dataclasses.is_dataclass(o):
                seen.add(type(o))
                for f in dataclasses.fields(o):
                    walk(getattr(o, f.name))
            elif isinstance(o, (tuple, list)):
                for v in o:
                    walk(v)
        walk(obj)
    classes = {getattr(C, n) for n in C.__all__ if isinstance(getattr(C, n), type)
               and dataclasses.is_dataclass(getattr(C, n)) and getattr(C, n) not in (C.EncoderConfig,
                                                                                     C.ConnectorConfig)}
    assert classes <= seen, f"not covered: {sorted(c.__name__ for c in classes - seen)}"
    with pytest.raises(ConfigError, match="tower"):
        C.ModelConfig.from_dict({"name": "x", "decoder": C.to_dict(objs[-3].decoder)})
