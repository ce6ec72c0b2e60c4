"""Q-Former + BLIP-2 connector parity against transformers' Blip2ForConditionalGeneration.

A tiny random BLIP-2 (OPT text side) is saved with save_pretrained, read back with edgevlm's
safetensors reader and converted; both sides get the same image embeddings [3, 101, 48]
(1 class token + 10x10 grid, Q-Former head dim 40). Parity bounds are transformers' own fp32 rounding
noise, measured by running a float64 copy of its model on the same embeddings
(:func:`edgevlm_testkit.assert_within_noise`).
"""


import pytest
import torch

from edgevlm.config import QFormerConfig, TowerConfig, ViTConfig
from edgevlm.errors import CheckpointError, ShapeError
from edgevlm.runtime.connectors import build_connector
from edgevlm.runtime.connectors.qformer import QFormer
from edgevlm.runtime.readers.hf_connectors import blip2_connector_from_hf, qformer_from_hf
from edgevlm.runtime.readers.safetensors_io import load_safetensors_dir, read_json
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs, randomize_params

transformers = pytest.importorskip("transformers")

ENC_WIDTH, GRID, N_VIEWS, N_QUERIES, QF_HIDDEN, TEXT_HIDDEN = 48, 10, 3, 7, 80, 32
TOKENS = 1 + GRID * GRID  # 101


def _blip2(freq: int):
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=ENC_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=GRID * 4, patch_size=4),
        qformer_config=dict(hidden_size=QF_HIDDEN, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96,
                            cross_attention_frequency=freq),
        text_config=dict(model_type="opt", hidden_size=TEXT_HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=64, vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=TEXT_HIDDEN),
        num_query_tokens=N_QUERIES)
    torch.manual_seed(freq)
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    randomize_params(model.qformer, 10 + freq, scale=0.2)
    randomize_params(model.language_projection, 20 + freq, scale=0.2)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape))
    return model


@pytest.fixture(scope="module", params=[1, 2], ids=["cross_every_1", "cross_every_2"])
def blip2_ckpt(request, tmp_path_factory):
    model = _blip2(request.param)
    folder = tmp_path_factory.mktemp(f"blip2_f{request.param}")
    model.save_pretrained(folder)
    return model, read_json(folder / "config.json"), load_safetensors_dir(folder)


def _eva_tower(conn_cfg):
    eva = ViTConfig(name="eva", image_size=GRID * 4, patch_size=4, width=ENC_WIDTH, depth=1, heads=2, mlp_dim=64)
    return TowerConfig(encoders=(eva,), connector=conn_cfg)


def _hf_qformer(model, emb, mask=None):
    mask = torch.ones(emb.shape[:2], dtype=torch.long) if mask is None else mask.long()
    q = model.query_tokens.expand(emb.shape[0], -1, -1)
    return model.qformer(query_embeds=q, encoder_hidden_states=emb, encoder_attention_mask=mask).last_hidden_state


def test_blip2_connector_matches_transformers(blip2_ckpt):
    model, hf_cfg, state = blip2_ckpt
    cfg, sd = blip2_connector_from_hf(hf_cfg, state)
    assert (cfg.qformer.num_queries, cfg.qformer.hidden, cfg.qformer.encoder_width, cfg.out_width) == \
        (N_QUERIES, QF_HIDDEN, ENC_WIDTH, TEXT_HIDDEN)
    assert cfg.qformer.cross_attention_every == hf_cfg["qformer_config"]["cross_attention_frequency"]
    conn = build_connector(cfg, _eva_tower(cfg)).eval()
    conn.load_state_dict(sd, strict=True)
    n_cross = sum(layer.cross_attn is not None for layer in conn.qformer.layers)
    assert n_cross == (3 if cfg.qformer.cross_attention_every == 1 else 2)

    emb = torch.randn(N_VIEWS, TOKENS, ENC_WIDTH)
    m64 = float64_copy(model)
    with torch.no_grad():
        ref = model.language_projection(_hf_qformer(model, emb))
        ref64 = m64.language_projection(_hf_qformer(m64, emb.double()))
        ours = conn({"eva": emb})
    assert ours.shape == (N_VIEWS, N_QUERIES, TEXT_HIDDEN)
    err = assert_within_noise(ours, ref, f"blip2 connector f={cfg.qformer.cross_attention_every} vs transformers",
                              noise=max_abs(ref, ref64))
    print(f"blip2 connector f={cfg.qformer.cross_attention_every}: max abs err {err:.2e}")


def test_qformer_padding_mask_matches_transformers(blip2_ckpt):
    model, hf_cfg, state = blip2_ckpt
    cfg, sd = blip2_connector_from_hf(hf_cfg, state)
    qf = QFormer(cfg.qformer).eval()
    qf.load_state_dict({k[len("qformer."):]: v for k, v in sd.items() if k.startswith("qformer.")}, strict=True)
    emb = torch.randn(N_VIEWS, TOKENS, ENC_WIDTH)
    mask = torch.ones(N_VIEWS, TOKENS, dtype=torch.bool)
    mask[0, 60:] = False  # a padded tail
    mask[2, ::3] = False  # scattered holes
    with torch.no_grad():
        ref, ref64 = _hf_qformer(model, emb, mask), _hf_qformer(float64_copy(model), emb.double(), mask)
        ours = qf(emb, mask)
        emb2 = emb.clone()
        emb2[~mask] = 1e3  # masked tokens must not matter
        ours2 = qf(emb2, mask)
    err = assert_within_noise(ours, ref, f"qformer masked f={cfg.qformer.cross_attention_every} vs transformers",
                              noise=max_abs(ref, ref64))
    print(f"qformer masked f={cfg.qformer.cross_attention_every}: max abs err {err:.2e}")
    # Exact: a masked key's score is -inf, its weight exactly 0, and 0 * (any finite value) adds nothing,
    # so every unmasked output sums the same values in the same order whatever the masked tokens hold.
    assert torch.equal(ours2, ours), f"masked tokens changed the output by {max_abs(ours2, ours):.3g}"


@pytest.mark.parametrize("layout", ["model_prefixed", "sphinx_blip2model"])
def test_qformer_reader_handles_other_key_layouts(blip2_ckpt, layout):
    model, hf_cfg, state = blip2_ckpt
    if layout == "model_prefixed":  # transformers' in-memory / newer layouts nest everything under model.
        moved = {f"model.{k}": v for k, v in state.items()}
        cfg, sd = blip2_connector_from_hf(hf_cfg, moved)
        qsd = {k[len("qformer."):]: v for k, v in sd.items() if k.startswith("qformer.")}
        qcfg = cfg.qformer
    else:  # SPHINX keeps a whole Blip2Model as `qformer`
        moved = {f"qformer.{k}": v for k, v in state.items()}
        qf_dict = dict(hf_cfg["qformer_config"], encoder_hidden_size=ENC_WIDTH)
        qcfg, qsd = qformer_from_hf(qf_dict, moved, "qformer.qformer.", "qformer.query_tokens", encoder="eva")
    qf = QFormer(qcfg).eval()
    qf.load_state_dict(qsd, strict=True)
    emb = torch.randn(2, TOKENS, ENC_WIDTH)
    with torch.no_grad():
        ref, ref64 = _hf_qformer(model, emb), _hf_qformer(float64_copy(model), emb.double())
        assert_within_noise(qf(emb), ref, f"qformer read from the {layout} layout vs transformers",
                            noise=max_abs(ref, ref64))


def test_reader_errors_name_key_and_shapes(blip2_ckpt):
    _, hf_cfg, state = blip2_ckpt
    missing = dict(state)
    del missing["qformer.encoder.layer.1.output_query.dense.weight"]
    with pytest.raises(CheckpointError, match=r"qformer\.encoder\.layer\.1\.output_query\.dense\.weight"):
        blip2_connector_from_hf(hf_cfg, missing)

    bad = dict(state)
    bad["qformer.encoder.layer.0.crossattention.attention.key.weight"] = torch.zeros(QF_HIDDEN, ENC_WIDTH + 1)
    found, expected = rf"\({QF_HIDDEN}, {ENC_WIDTH + 1}\)", rf"\({QF_HIDDEN}, {ENC_WIDTH}\)"
    with pytest.raises(CheckpointError, match=rf"crossattention\.attention\.key\.weight.*{found}.*{expected}"):
        blip2_connector_from_hf(hf_cfg, bad)

    wrong_freq = dict(hf_cfg, qformer_config=dict(hf_cfg["qformer_config"], cross_attention_frequency=3))
    with pytest.raises(CheckpointError, match="cross-attention"):
        blip2_connector_from_hf(wrong_freq, state)

    with pytest.raises(CheckpointError, match="none of the expected key prefixes"):
        blip2_connector_from_hf(hf_cfg, {k: v for k, v in state.items() if not k.startswith("qformer.")})


def test_qformer_shape_checks():
    cfg = QFormerConfig(encoder="eva", encoder_width=12, num_queries=3, hidden=16, layers=2, heads=2, intermediate=32)
    qf = QFormer(cfg)
    assert qf(torch.randn(2, 5, 12)).shape == (2, 3, 16)
    with pytest.raises(ShapeError, match=r"\[N, T, 12\]"):
        qf(torch.randn(2, 5, 13))
    with pytest.raises(ShapeError, match="bool mask"):
        qf(torch.randn(2, 5, 12), torch.ones(2, 5))  # a float mask would be read as additive by SDPA
    with pytest.raises(ShapeError, match=r"\(2, 5\)"):
        qf(torch.randn(2, 5, 12), torch.ones(2, 4, dtype=torch.bool))
