"""Temporal token reuse (runtime/temporal.py, ViT.forward_rows): against a whole encode, and against a
reference of what reuse means written with the ordinary Block.forward.

Reuse recomputes rows R of a view and keeps the other rows' values from the frame they were last
computed in. At every layer that is the ordinary block run on a *mixed* sequence (rows R: this frame's
hidden states; other rows: the earlier frame's at that layer) and read at R: the reference below does
exactly that, in float64, through Block.forward, so it shares no code with the packed path under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm.config import ConvNeXtConfig, SphinxFusionConfig, TowerConfig, ViTConfig
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.runtime.temporal import CameraState, TemporalReuse, TemporalTower
from edgevlm.runtime.tower import VisionTower, build_tower_model
from edgevlm.runtime.vision.vit import ViT
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs, randomize_params


def _vit(class_token: bool = True, layers=None) -> ViT:
    cfg = ViTConfig(name="vit", image_size=64, patch_size=8, width=24, depth=3, heads=2, mlp_dim=32,
                    class_token=class_token, layer_scale=True, feature_layers=layers or ())
    m = ViT(cfg)
    randomize_params(m, 3, scale=0.2)
    return m.eval()


def _reference(m: ViT, old: torch.Tensor, new: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Reuse's meaning, in float64 through the ordinary blocks: rows of ``new`` recomputed over a
    sequence whose other rows are ``old``'s hidden states at each layer."""
    m = float64_copy(m)
    old, new = old.double(), new.double()
    with torch.no_grad():
        h_old = [m.embed(old)]
        for blk in m.blocks:
            h_old.append(blk(h_old[-1]))
        x = h_old[0].clone()
        x[:, rows] = m.embed(new)[:, rows]
        mixed = [x]
        for i, blk in enumerate(m.blocks, start=1):
            y = h_old[i].clone()
            y[:, rows] = blk(mixed[-1])[:, rows]
            mixed.append(y)
        return m._features({i: mixed[i] for i in set(m.cfg.selected_layers)})


@pytest.mark.parametrize("class_token,layers", [(True, None), (False, None), (True, (-1, 1, 0))])
def test_forward_rows_whole_equals_forward(class_token, layers):
    m = _vit(class_token, layers)
    px = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        whole = m(px)
        got, states = m.forward_rows(px, [None, None], [None, None])
    ref = float64_copy(m)(px.double())
    assert_within_noise(got, whole, "forward_rows with every row vs forward", noise=max_abs(whole, ref))
    assert len(states) == 2 and all(len(s.kv) == 3 and s.kv[0].k.shape == (2, s.kv[0].tokens, 12) for s in states)


@pytest.mark.parametrize("class_token,layers", [(True, None), (False, None), (True, (-1, 1, 0))])
def test_forward_rows_partial_matches_reference(class_token, layers):
    m = _vit(class_token, layers)
    old = torch.randn(1, 3, 64, 64)
    new = old.clone()
    new[..., 8:24, 16:40] += torch.randn(1, 3, 16, 24)  # patches (1..2, 2..4) of the 8x8 grid change
    cls = int(class_token)
    patches = torch.tensor([r * 8 + c for r in (1, 2) for c in (2, 3, 4)])
    rows = torch.cat([torch.arange(cls), patches + cls])
    with torch.inference_mode():
        _, states = m.forward_rows(old, [None], [None])
        got, _ = m.forward_rows(new, [rows], states)
        whole = m(new)
    want = _reference(m, old, new, rows)
    assert_within_noise(got, want, "partial re-encode vs its float64 reference", noise=max_abs(m(new).double(), float64_copy(m)(new.double())))
    # and it is an approximation of the whole encode of the new frame, not equal to it
    assert max_abs(got, whole) > 1e-4


def test_forward_rows_every_row_of_a_new_frame_equals_its_whole_encode():
    # Recomputing every row replaces every layer's K/V before its attention: nothing of the old frame remains.
    m = _vit()
    old, new = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    every = torch.arange(65)
    with torch.inference_mode():
        _, states = m.forward_rows(old, [None, None], [None, None])
        got, _ = m.forward_rows(new, [every, every], states)
        whole = m(new)
    assert_within_noise(got, whole, "every row recomputed vs whole encode", noise=max_abs(whole, float64_copy(m)(new.double())))


def test_forward_rows_packs_views_with_different_row_counts():
    # Two views through the layers together, one whole and one partial, give what each gives alone.
    m = _vit()
    a_old, a_new, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    rows = torch.tensor([0, 5, 6, 13, 40])
    with torch.inference_mode():
        _, (sa,) = m.forward_rows(a_old, [None], [None])
        _, (sa2,) = m.forward_rows(a_old, [None], [None])
        alone_a, _ = m.forward_rows(a_new, [rows], [sa])
        alone_b, _ = m.forward_rows(b, [None], [None])
        both, _ = m.forward_rows(torch.cat([a_new, b]), [rows, None], [sa2, None])
    noise = max_abs(m(b), float64_copy(m)(b.double()))
    assert_within_noise(both[:1], alone_a, "packed view a vs alone", noise=noise)
    assert_within_noise(both[1:], alone_b, "packed view b vs alone", noise=noise)
    with pytest.raises(ShapeError, match="exactly when it has no state"):
        m.forward_rows(b, [rows], [None])


# ---- the tower: cells, thresholds, refreshes --------------------------------------------------------

def _tower(**reuse):
    vit = ViTConfig(name="vit", image_size=64, patch_size=8, width=24, depth=2, heads=2, mlp_dim=32)
    cnn = ConvNeXtConfig(name="cnn", image_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), final_norm=True)
    fusion = SphinxFusionConfig(encoders=("vit", "cnn"), in_widths=(24, 32), grid=4, out_width=16, pos_embed=True)
    cfg = TowerConfig(encoders=(vit, cnn), connector=fusion)
    model, _ = build_tower_model(cfg, allow_random=True)
    randomize_params(model, 11, scale=0.2)
    tower = VisionTower(model, device=torch.device("cpu"), dtype=torch.float32,
                                        embedding_cache_bytes=0)
    return tower, TemporalTower(tower, TemporalReuse(**reuse))


def _frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_first_frame_is_whole_and_an_unchanged_frame_is_reused():
    tower, tt = _tower()
    f = _frame()
    st = CameraState()
    (emb, rep), = tt.encode([f], [st])
    assert rep.mode == "full" and rep.reason == "first frame" and rep.fraction == 1.0
    assert torch.equal(emb, tower.embed_each([f])[0])  # the same torch tower on the same views
    (emb2, rep2), = tt.encode([f.copy()], [st])
    assert rep2.mode == "reused" and rep2.encoded == 0 and emb2 is emb
    assert st.frames == 2 and st.since_full == 1 and st.nbytes > 0


def test_only_changed_cells_are_encoded_and_small_changes_are_not():
    tower, tt = _tower(threshold=8.0)
    f = _frame()
    st = CameraState()
    tt.encode([f], [st])
    g = f.copy()
    g[0:16, 16:32] = 255 - g[0:16, 16:32]  # cell (0, 1) of the 4x4 keep grid, large change
    g[48:64, 48:64] = np.clip(g[48:64, 48:64].astype(int) + 3, 0, 255).astype(np.uint8)  # cell (3, 3): +3 levels
    (emb, rep), = tt.encode([g], [st])
    assert rep.mode == "partial" and rep.encoded == 1 and rep.cells == 16, rep
    whole = tower.embed_each([g])[0]
    # the changed cell's token moves towards the whole encode's; the rest stays near it
    cos = torch.nn.functional.cosine_similarity(emb, whole, dim=-1)
    assert float(cos.min()) > 0.9, cos
    # the re-encoded cell's pixels are now its reference: the same frame again is reused
    (_, rep2), = tt.encode([g], [st])
    assert rep2.mode == "reused", rep2


def test_refresh_and_max_changed_encode_whole():
    tower, tt = _tower(threshold=1.0, refresh_every=3, max_changed=0.5)
    st = CameraState()
    f = _frame()
    modes = []
    for i in range(5):
        g = f.copy()
        g[0:16, 0:16] = (i * 60) % 256  # one cell changes every frame
        (_, rep), = tt.encode([g], [st])
        modes.append((rep.mode, rep.reason.split(" ")[0]))
    # frames 0 and 3 whole (every 3rd), the others one cell
    assert modes == [("full", "first"), ("partial", "1"), ("partial", "1"), ("full", "refresh"), ("partial", "1")], modes
    (emb, rep), = tt.encode([_frame(5)], [st])  # every cell changes
    assert rep.mode == "full" and "cells changed" in rep.reason
    assert torch.equal(emb, tower.embed_each([_frame(5)])[0])


def test_flat_cells_follow_the_scene_around_them():
    # A flat bottom row (padding, a blank wall): its tokens come from their context, so once a quarter of
    # the grid was re-encoded around them they are re-encoded too, and only then.
    _, tt = _tower(threshold=8.0, context_refresh=0.25)
    f = _frame()
    f[48:64] = 128
    st = CameraState()
    tt.encode([f], [st])
    assert st.flat.tolist() == [[False] * 12 + [True] * 4]
    rng = np.random.default_rng(9)
    reasons = []
    for rows in (slice(0, 16), slice(16, 32), slice(0, 16)):
        f = f.copy()
        f[rows, 0:32] = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)  # two textured cells change
        (_, rep), = tt.encode([f], [st])
        reasons.append((rep.encoded, rep.reason))
    assert reasons == [(2, "2 of 16 cells changed"), (6, "2 of 16 cells changed (+4 flat cells refreshed)"),
                       (2, "2 of 16 cells changed")], reasons


def test_cameras_batched_equal_cameras_alone():
    _, tt = _tower(threshold=4.0)
    frames0, frames1 = [_frame(1), _frame(2)], [_frame(1), _frame(2)]
    frames1[0][0:16, 0:32] = 0  # camera 0: two cells change; camera 1: nothing
    together = [CameraState(), CameraState()]
    alone = [CameraState(), CameraState()]
    tt.encode(frames0, together)
    out = tt.encode(frames1, together)
    for i in range(2):
        tt.encode([frames0[i]], [alone[i]])
        (emb, rep), = tt.encode([frames1[i]], [alone[i]])
        assert rep.mode == out[i][1].mode
        assert_within_noise(out[i][0], emb, f"camera {i} batched vs alone", noise=1e-6)
    assert [r.mode for _, r in out] == ["partial", "reused"]


def test_a_failure_resets_the_camera_state(monkeypatch):
    tower, tt = _tower(threshold=1.0)
    st = CameraState()
    tt.encode([_frame()], [st])
    g = _frame()
    g[0:16, 0:16] = 0

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(tower.model, "forward_rows", broken)
    with pytest.raises(RuntimeError, match="boom"):
        tt.encode([g], [st])
    assert st.embedding is None and st.vit is None
    monkeypatch.undo()
    (_, rep), = tt.encode([g], [st])
    assert rep.mode == "full" and rep.reason == "first frame"


def test_bad_settings_and_towers_are_refused():
    tower, tt = _tower()
    for bad in (dict(threshold=-1), dict(threshold=300), dict(refresh_every=0), dict(max_changed=0.0),
                dict(threshold=True), dict(flat_std=-1), dict(context_refresh="often")):
        with pytest.raises(ConfigError):
            TemporalReuse(**bad)
    st = CameraState()
    with pytest.raises(ConfigError, match="same CameraState"):
        tt.encode([_frame(), _frame()], [st, st])
    with pytest.raises(ShapeError, match="one state per frame"):
        tt.encode([_frame()], [])
    tower.set_token_keep(0.5)
    with pytest.raises(ConfigError, match="token dropping"):
        TemporalTower(tower)
    tower.set_token_keep(1.0)
    tower.backend, tower.runner = "onnxruntime", object()
    with pytest.raises(ConfigError, match="torch tower"):
        TemporalTower(tower)
