"""BLIP-2 stage-1 Q-Former pre-training (train/qformer_pretrain.py): masks, losses, runtime hand-off."""


import pytest
import torch
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs

from edgevlm.config import QFormerConfig
from edgevlm.errors import ShapeError
from edgevlm.runtime.connectors.qformer import QFormer
from edgevlm.train.qformer_pretrain import (CLS, DEC, PAD, SEP, ByteTokenizer, QFormerPretrainer, Stage1Trainer,
                                            bidirectional_mask, causal_multimodal_mask, run, unimodal_mask)

CAPTIONS = ["a red cube", "two blue balls", "a green cone", "one yellow star"]
# cross-attention in both layers; 4 queries, width 64: big enough to break the ITM plateau in 30 steps
CFG = QFormerConfig(encoder="eva", encoder_width=32, num_queries=4, hidden=64, layers=2, heads=2, intermediate=128,
                    cross_attention_every=1)

# Q = 3 queries, T = 4 text tokens of which the last is padding; columns/rows: q0 q1 q2 t0 t1 t2 t3
VALID = torch.tensor([[True, True, True, False]])
UNIMODAL = [[1, 1, 1, 0, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 1, 1, 0]] * 4
BIDIRECTIONAL = [[1, 1, 1, 1, 1, 1, 0]] * 7
CAUSAL = [[1, 1, 1, 0, 0, 0, 0]] * 3 + [
    [1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 0],  # the pad row still sees real tokens (no all-False row -> no NaN)
]


@pytest.mark.parametrize("builder, expected", [(unimodal_mask, UNIMODAL), (bidirectional_mask, BIDIRECTIONAL),
                                               (causal_multimodal_mask, CAUSAL)],
                         ids=["itc_unimodal", "itm_bidirectional", "itg_causal"])
def test_mask_patterns(builder, expected):
    m = builder(3, VALID)
    assert m.dtype == torch.bool and m.shape == (1, 7, 7)
    assert m[0].int().tolist() == expected


def test_tokenizer_layout():
    ids, valid = ByteTokenizer().encode(["ab", "abcdefgh"], max_len=6)
    a, b = ord("a") + 4, ord("b") + 4
    assert ids[0].tolist() == [CLS, a, b, SEP, PAD, PAD]
    assert ids[1].tolist()[:3] == [CLS, a, b] and ids[1, -1].item() == SEP  # truncation keeps [SEP]
    assert valid.sum(1).tolist() == [4, 6]
    assert ByteTokenizer().decode(ids[0].tolist()) == "ab"


@pytest.fixture()
def model_and_batch():
    torch.manual_seed(0)
    model = QFormerPretrainer(CFG, max_text_len=24)
    g = torch.Generator().manual_seed(1)
    # [4, 17, 32]: per-token noise plus a per-image offset (real features share an image-level component)
    image = torch.randn(4, 17, 32, generator=g) + 2 * torch.randn(4, 1, 32, generator=g)
    return model, model.make_batch(image, CAPTIONS)


def test_unimodal_joint_pass_equals_separate_passes(model_and_batch):
    """ITC runs queries and text separately; one joint pass under the unimodal mask must be the same."""
    model, b = model_and_batch
    q = CFG.num_queries
    model64 = float64_copy(model)  # the separate passes in float64: their fp32 rounding noise
    with torch.no_grad():
        joint = model.encode_joint(b["text_ids"], b["image"], unimodal_mask(q, b["text_mask"]))
        queries = model.qformer(b["image"])
        text = model.encode_text(b["text_ids"], b["text_mask"])
        queries64 = model64.qformer(b["image"].double())
        text64 = model64.encode_text(b["text_ids"], b["text_mask"])
    assert_within_noise(joint[:, :q], queries, "joint pass queries vs query-only pass",
                        noise=max_abs(queries, queries64))
    real = b["text_mask"]
    assert_within_noise(joint[:, q:][real], text[real], "joint pass text vs text-only pass",
                        noise=max_abs(text[real], text64[real]))


def test_itg_queries_never_see_text(model_and_batch):
    """Under the causal mask, changing the caption leaves query outputs unchanged and a later text
    token does not influence an earlier one."""
    model, b = model_and_batch
    q, ids, valid = CFG.num_queries, b["text_ids"], b["text_mask"]
    other = ids.clone()
    other[:, 3] = ord("z") + 4  # change text position 3 only
    with torch.no_grad():
        h1 = model.encode_joint(ids, b["image"], causal_multimodal_mask(q, valid))
        h2 = model.encode_joint(other, b["image"], causal_multimodal_mask(q, valid))
        hb = model.encode_joint(other, b["image"], bidirectional_mask(q, valid))
    # queries + text 0..2: the changed token is behind the mask (exact zeros) and every row is computed
    # from the same values, so bit-identical
    assert torch.equal(h1[:, : q + 3], h2[:, : q + 3])
    # 1e-3 of the scale is ~8000 fp32 ulps: a real change, not rounding (measured 0.75 and 0.24 of the scale)
    assert_differs(h2[:, q + 3:], h1[:, q + 3:], "text from position 3 on after changing position 3", rel=1e-3)
    assert_differs(hb[:, :q], h1[:, :q], "ITM queries (bidirectional) vs ITG queries", rel=1e-3)  # they see the text


def test_thirty_steps_lower_every_loss(model_and_batch):
    model, b = model_and_batch

    def evaluate():
        with torch.no_grad():  # same hard-negative draws before and after
            return {k: v.item() for k, v in model(b, generator=torch.Generator().manual_seed(5)).items()}

    before = evaluate()
    trainer = Stage1Trainer(model, lr=5e-3, weight_decay=0.0, seed=0)
    for _ in range(30):
        step = trainer.train_step(b)
    assert set(step) == {"loss_itc", "loss_itm", "loss_itg", "loss"}
    after = evaluate()
    print({k: (round(before[k], 4), round(after[k], 4)) for k in before})
    assert before["loss_itg"] == pytest.approx(torch.log(torch.tensor(260.0)).item(), abs=0.2)  # ~uniform start
    for k in ("loss_itc", "loss_itm", "loss_itg", "loss"):
        assert after[k] < 0.8 * before[k], (k, before[k], after[k])
    # ITM below the label prior (1/3 positives: 0.636) means it matches pairs, not just the base rate
    assert after["loss_itm"] < 0.6


def test_state_dict_loads_into_runtime_qformer(model_and_batch):
    model, b = model_and_batch
    trainer = Stage1Trainer(model, lr=5e-3, seed=0)
    for _ in range(3):
        trainer.train_step(b)
    sd = model.qformer_state_dict()
    runtime = QFormer(CFG)
    runtime.load_state_dict(sd, strict=True)  # raises on any missing / unexpected key
    with torch.no_grad():
        torch.testing.assert_close(runtime(b["image"]), model.qformer(b["image"]), atol=0, rtol=0)
    prefixed = model.qformer_state_dict("tower.connector.qformer.")
    assert all(k.startswith("tower.connector.qformer.") for k in prefixed) and len(prefixed) == len(sd)


def test_dec_token_and_shape_errors(model_and_batch):
    model, b = model_and_batch
    assert DEC not in b["text_ids"]  # [DEC] is put in by the ITG branch, not the tokenizer
    with pytest.raises(ShapeError, match="N >= 2"):
        model({k: v[:1] for k, v in b.items()})
    with pytest.raises(ShapeError, match="32"):
        model({**b, "image": b["image"][..., :16]})


def test_run_checkpoints_and_resumes(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(2)
    feats = torch.randn(6, 17, 32, generator=g)
    caps = CAPTIONS + ["a tiny dot", "three cubes"]
    full = run(CFG, feats, caps, out_dir=tmp_path / "a", steps=4, batch_size=3, lr=1e-3, save_every=2,
               progress=False)
    run(CFG, feats, caps, out_dir=tmp_path / "b", steps=2, batch_size=3, lr=1e-3, progress=False)
    resumed = run(CFG, feats, caps, out_dir=tmp_path / "b", steps=4, batch_size=3, lr=1e-3, progress=False)
    assert resumed["step"] == 4 and len(resumed["history"]) == 2
    # the resumed run draws the same batches and negatives as the uninterrupted one and restores weights and
    # optimizer state bit for bit, so it does the same arithmetic on the same values: the same losses
    assert resumed["history"][-1] == full["history"][-1]
    with safe_open(str(tmp_path / "a" / "qformer.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "4"
        runtime = QFormer(CFG)
        runtime.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)
