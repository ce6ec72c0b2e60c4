"""Perceiver resampler vs an independent float64 reference written from the BLIP-3 description
(explicit concat of media and latents, masked softmax with max subtraction)."""


import pytest
import torch
import torch.nn.functional as F
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs

from edgevlm.config import ResamplerConnectorConfig, TowerConfig, ViTConfig
from edgevlm.errors import ShapeError
from edgevlm.runtime.connectors import build_connector
from edgevlm.runtime.connectors.resampler import resampler_attention

DIM, T, N, LATENTS, HEADS, HEAD_DIM, OUT = 24, 37, 3, 5, 3, 10, 16  # 37 = 1 + 6x6; inner 30 != DIM


def _connector(depth=2):
    vit = ViTConfig(name="siglip", image_size=36, patch_size=6, width=DIM, depth=1, heads=2, mlp_dim=32)  # 37 tokens
    cfg = ResamplerConnectorConfig(encoder="siglip", in_width=DIM, out_width=OUT, depth=depth, heads=HEADS,
                                   head_dim=HEAD_DIM, num_latents=LATENTS, ff_mult=2)
    conn = build_connector(cfg, TowerConfig(encoders=(vit,), connector=cfg)).eval()
    with torch.no_grad():  # non-identity norms so that every LayerNorm's parameters matter
        norms = [m for m in conn.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert len(norms) == 3 * depth + 1
        for m in norms:
            m.weight.copy_(1 + 0.2 * torch.randn(DIM))
            m.bias.copy_(0.1 * torch.randn(DIM))
    return cfg, conn


def _reference(sd: dict, cfg: ResamplerConnectorConfig, x: torch.Tensor, mask: torch.Tensor | None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Straight from the description, float64 (or ``dtype``), no shared code with the module."""
    sd = {k.removeprefix("resampler."): v.to(dtype) for k, v in sd.items()}
    x = x.to(dtype)
    n, t, d = x.shape
    eps, h, hd = cfg.norm_eps, cfg.heads, cfg.head_dim

    def ln(v, key):
        return F.layer_norm(v, (d,), sd[f"{key}.weight"], sd[f"{key}.bias"], eps)

    lat = sd["latents"].unsqueeze(0).repeat(n, 1, 1)  # [N, L, D]
    for i in range(cfg.depth):
        a = f"layers.{i}.attn"
        xm, xl = ln(x, f"{a}.norm_media"), ln(lat, f"{a}.norm_latents")
        q = xl @ sd[f"{a}.to_q.weight"].T  # [N, L, H*hd]
        kv_in = torch.cat([xm, xl], dim=1)  # [N, T+L, D], the explicit concat
        k, v = (kv_in @ sd[f"{a}.to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = (z.reshape(n, -1, h, hd).permute(0, 2, 1, 3) for z in (q, k, v))
        sim = torch.einsum("nhid,nhjd->nhij", q * hd ** -0.5, k)
        if mask is not None:
            keep = torch.cat([mask, torch.ones(n, lat.shape[1], dtype=torch.bool)], dim=1)
            sim = sim.masked_fill(~keep[:, None, None, :], float("-inf"))
        sim = sim - sim.amax(dim=-1, keepdim=True)
        out = torch.einsum("nhij,nhjd->nhid", sim.softmax(dim=-1), v).permute(0, 2, 1, 3).reshape(n, -1, h * hd)
        lat = out @ sd[f"{a}.to_out.weight"].T + lat
        f = f"layers.{i}.ff"
        hid = F.gelu(ln(lat, f"{f}.0") @ sd[f"{f}.1.weight"].T)
        lat = hid @ sd[f"{f}.3.weight"].T + lat
    return ln(lat, "norm") @ sd["projection.weight"].T + sd["projection.bias"]


def _check_against_reference(ours, conn, cfg, x, mask, what):
    """ours vs the float64 reference, within the fp32 noise of the reference itself (fp32 vs fp64)."""
    ref = _reference(conn.state_dict(), cfg, x, mask)
    noise = max_abs(_reference(conn.state_dict(), cfg, x, mask, torch.float32), ref)
    err = assert_within_noise(ours, ref, what, noise=noise)
    print(f"{what}: max abs err {err:.2e}, reference fp32 noise {noise:.2e}")


def _mask():
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 25:] = False  # anyres tile with a padded tail
    mask[1, 1::4] = False  # scattered
    return mask  # view 2 fully real


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_matches_float64_reference(masked):
    cfg, conn = _connector()
    x, mask = torch.randn(N, T, DIM), (_mask() if masked else None)
    with torch.no_grad():
        ours = conn({"siglip": x}, {"siglip": mask} if masked else None)
    assert ours.shape == (N, LATENTS, OUT)
    what = f"resampler vs float64 reference ({'mask' if masked else 'no mask'})"
    _check_against_reference(ours, conn, cfg, x, mask, what)


def test_masked_media_values_do_not_matter():
    _, conn = _connector()
    x, mask = torch.randn(N, T, DIM), _mask()
    y = x.clone()
    y[~mask] = torch.randn(int((~mask).sum()), DIM) * 100
    with torch.no_grad():
        a, b = conn({"siglip": x}, {"siglip": mask}), conn({"siglip": y}, {"siglip": mask})
        unmasked_x, unmasked_y = conn({"siglip": x}), conn({"siglip": y})
    # Masked keys get -inf scores and add exact zeros; every other row of every GEMM sees the same
    # values, so the two runs are bit-identical.
    assert torch.equal(a, b)
    # Without the mask the same change is visible: 1e-3 of the scale is ~8000 fp32 ulps (measured: 6.6e-2).
    assert_differs(unmasked_y, unmasked_x, "unmasked resampler output after changing padded media", rel=1e-3)


def test_all_real_mask_equals_no_mask():
    _, conn = _connector()
    x = torch.randn(N, T, DIM)
    with torch.no_grad():
        a = conn({"siglip": x}, {"siglip": torch.ones(N, T, dtype=torch.bool)})
        b = conn({"siglip": x})
        b64 = float64_copy(conn)({"siglip": x.double()})
    # masked and unmasked attention are different kernels: equal up to the module's fp32 noise
    assert_within_noise(a, b, "all-real mask vs no mask", noise=max_abs(b, b64))


def test_fully_padded_view_stays_finite():
    # The latent keys are never masked, so even an all-padding tile has a well-defined softmax.
    cfg, conn = _connector()
    x, mask = torch.randn(N, T, DIM), _mask()
    mask[2] = False
    with torch.no_grad():
        out = conn({"siglip": x}, {"siglip": mask})
    assert torch.isfinite(out).all()
    _check_against_reference(out, conn, cfg, x, mask, "resampler with a fully padded view vs float64 reference")


def test_resampler_attention_matches_explicit_softmax():
    n, h, t, l, d = 2, 3, 11, 4, 8
    q, km, vm, kl, vl = (torch.randn(n, h, s, d) for s in (l, t, t, l, l))
    mask = torch.rand(n, t) > 0.3
    out = resampler_attention(q, km, vm, kl, vl, mask)

    def explicit(dt):
        k, v = torch.cat([km, kl], 2).to(dt), torch.cat([vm, vl], 2).to(dt)
        sim = (q.to(dt) @ k.transpose(-1, -2)) / d ** 0.5
        sim = sim.masked_fill(~torch.cat([mask, torch.ones(n, l, dtype=torch.bool)], 1)[:, None, None], -torch.inf)
        return sim.softmax(-1) @ v

    ref = explicit(torch.float32)
    assert_within_noise(out, ref, "resampler_attention vs explicit softmax",
                        noise=max_abs(ref, explicit(torch.float64)))


def test_shape_errors():
    _, conn = _connector(depth=1)
    with pytest.raises(ShapeError, match=rf"\[N, {T}, {DIM}\]"):
        conn({"siglip": torch.randn(N, T - 1, DIM)})
    with pytest.raises(ShapeError, match="bool mask"):
        conn({"siglip": torch.randn(N, T, DIM)}, {"siglip": torch.ones(N, T)})
