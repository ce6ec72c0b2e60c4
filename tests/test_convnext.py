"""ConvNeXt encoder + transformers reader: parity with transformers' ConvNextModel on tiny random
checkpoints written by ``save_pretrained`` at test time, and typed errors on bad checkpoints.

Parity bounds are transformers' own fp32 rounding noise, measured by running a float64 copy of its model
on the same pixels (:func:`edgevlm_testkit.assert_within_noise`)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from edgevlm.errors import CheckpointError, ConfigError, ShapeError
from edgevlm.runtime.readers.hf_convnext import read_hf_convnext_dir
from edgevlm.runtime.vision import build_encoder
from edgevlm.runtime.vision.convnext import ConvNeXt
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs

transformers = pytest.importorskip("transformers")


def assert_close(got: torch.Tensor, want: torch.Tensor, want64: torch.Tensor, what: str) -> None:
    """``got`` against transformers' fp32 ``want`` within a few times that reference's own rounding noise
    (``want64``: the same reference in float64); the message names the worst position."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    try:
        assert_within_noise(got, want, what, noise=max_abs(want, want64))
    except AssertionError as e:
        err = (got - want).abs()
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(f"{e} (worst at {idx}: got {got[idx]:.6f}, reference {want[idx]:.6f})") from None


def _randomise(model: torch.nn.Module) -> None:
    # transformers initialises layer scale at 1e-6, which would make every block nearly the
    # identity and the parity test blind; use O(1) values everywhere instead.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif "layer_scale" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("weight"):
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.2)


# (name, hidden_sizes, depths, layer_scale_init_value, classification wrapper -> "convnext." prefix)
CASES = {
    "4stage": ((12, 20, 36, 44), (1, 2, 1, 1), 1e-6, False),
    "3stage_noscale_cls": ((10, 18, 30), (2, 1, 1), 0.0, True),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf_ckpt(request, tmp_path_factory):
    dims, depths, ls, wrapped = CASES[request.param]
    torch.manual_seed(1)
    cfg = transformers.ConvNextConfig(hidden_sizes=list(dims), depths=list(depths), num_stages=len(dims),
                                      layer_scale_init_value=ls, image_size=96, num_labels=5)
    model = (transformers.ConvNextForImageClassification if wrapped else transformers.ConvNextModel)(cfg)
    _randomise(model)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    base = model.convnext if wrapped else model
    return path, base.eval(), dims


@pytest.mark.parametrize("size", [(96, 96), (64, 96), (100, 75)])
def test_parity_with_transformers(hf_ckpt, size):
    path, hf, dims = hf_ckpt
    cfg, sd = read_hf_convnext_dir(path, final_norm=True)
    assert cfg.dims == dims and cfg.layer_scale == (hf.encoder.stages[0].layers[0].layer_scale_parameter is not None)
    model = ConvNeXt(cfg).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, *size)
    hf64 = float64_copy(hf)
    with torch.no_grad():
        ref, ref64 = hf(pixel_values=x), hf64(pixel_values=x.double())
        feats, pooled, out = model.features(x), model.pooled(x), model(x)
    h, w = size
    assert out.shape == (3, dims[-1], h // cfg.stride, w // cfg.stride)
    assert_close(feats, ref.last_hidden_state, ref64.last_hidden_state, "map vs last_hidden_state")
    assert_close(pooled, ref.pooler_output, ref64.pooler_output, "pooled vs pooler_output")

    # final_norm: transformers' pooled-vector norm applied per position of the map (timm head norm).
    def final_norm(m, last_hidden_state):
        ln = m.layernorm
        return F.layer_norm(last_hidden_state.permute(0, 2, 3, 1), ln.normalized_shape, ln.weight, ln.bias,
                            ln.eps).permute(0, 3, 1, 2)

    with torch.no_grad():
        want, want64 = final_norm(hf, ref.last_hidden_state), final_norm(hf64, ref64.last_hidden_state)
    assert_close(out, want, want64, "final-norm map")
    assert_differs(out, feats, "final-norm map vs the map without it", rel=0.1)


def test_without_final_norm_drops_head(hf_ckpt):
    path, hf, dims = hf_ckpt
    cfg, sd = read_hf_convnext_dir(path, name="cnn")
    assert not any(k.startswith("head.") for k in sd)
    model = build_encoder(cfg).eval()  # through the registry, strict load
    model.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = model(x)
        ref, ref64 = hf(pixel_values=x).last_hidden_state, float64_copy(hf)(pixel_values=x.double())
        assert_close(out, ref, ref64.last_hidden_state, "map without final norm")
    assert tuple(out.shape[-2:]) == cfg.grid  # the grid connectors are told about
    with pytest.raises(ConfigError, match="final_norm"):
        model.pooled(x)
    with pytest.raises(ShapeError, match=r"\[N, 3, H, W\]"):
        model(torch.randn(1, 4, 64, 64))


def _copy(hf_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_ckpt[0], dst)
    return dst


def test_truncated_safetensors_is_refused(hf_ckpt, tmp_path):
    dst = _copy(hf_ckpt, tmp_path)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_hf_convnext_dir(dst)


def test_config_weight_mismatch_names_key_and_shapes(hf_ckpt, tmp_path):
    dst = _copy(hf_ckpt, tmp_path)
    conf = json.loads((dst / "config.json").read_text())
    conf["hidden_sizes"] = [d + 2 for d in conf["hidden_sizes"]]
    (dst / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"embeddings\.patch_embeddings\.weight.*expected shape \(\d+, 3, 4, 4\)"):
        read_hf_convnext_dir(dst)


def test_missing_and_extra_tensors(hf_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = _copy(hf_ckpt, tmp_path)
    f = dst / "model.safetensors"
    # Cloned: before safetensors 0.8, load_file's tensors read from the mapped file, and writing over
    # that file below would truncate the mapping under them (SIGBUS, the whole pytest process dies).
    state = {k: v.clone() for k, v in load_file(f).items()}
    victim = next(k for k in state if k.endswith("pwconv2.weight"))
    save_file({k: v for k, v in state.items() if k != victim}, f)
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        read_hf_convnext_dir(dst)
    # A config.json that describes fewer blocks than the weights hold is caught too.
    save_file(state, f)
    conf = json.loads((dst / "config.json").read_text())
    conf["depths"] = [1] * len(conf["depths"])
    (dst / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="not described by config.json"):  # every case has a depth-2 stage
        read_hf_convnext_dir(dst)


def test_not_a_convnext_config(hf_ckpt, tmp_path):
    dst = _copy(hf_ckpt, tmp_path)
    conf = json.loads((dst / "config.json").read_text())
    conf["model_type"] = "convnextv2"
    (dst / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="convnextv2"):
        read_hf_convnext_dir(dst)
