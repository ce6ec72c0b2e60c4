"""ConvNeXt encoder + transformers reader: parity with transformers' ConvNextModel on tiny random
checkpoints written by ``save_pretrained`` at test time, and typed errors on bad checkpoints."""

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

transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # fp32; both sides run the same ops, so observed errors are ~1e-6 or exactly 0


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    err = (got - want).abs()
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert err.max() <= atol, (f"{what}: max abs error {err.max():.3e} > {atol:.0e} at {idx} "
                               f"(got {got[idx]:.6f}, reference {want[idx]:.6f})")


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
    with torch.no_grad():
        ref = hf(pixel_values=x)
        feats, pooled, out = model.features(x), model.pooled(x), model(x)
    h, w = size
    assert out.shape == (3, dims[-1], h // cfg.stride, w // cfg.stride)
    assert_close(feats, ref.last_hidden_state, "map vs last_hidden_state")
    assert_close(pooled, ref.pooler_output, "pooled vs pooler_output")
    # final_norm: transformers' pooled-vector norm applied per position of the map (timm head norm).
    ln = hf.layernorm
    want = F.layer_norm(ref.last_hidden_state.permute(0, 2, 3, 1), ln.normalized_shape, ln.weight, ln.bias,
                        ln.eps).permute(0, 3, 1, 2)
    assert_close(out, want, "final-norm map")
    assert not torch.allclose(out, feats, atol=1e-2), "final norm had no effect"


def test_without_final_norm_drops_head(hf_ckpt):
    path, hf, dims = hf_ckpt
    cfg, sd = read_hf_convnext_dir(path, name="cnn")
    assert not any(k.startswith("head.") for k in sd)
    model = build_encoder(cfg).eval()  # through the registry, strict load
    model.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = model(x)
        assert_close(out, hf(pixel_values=x).last_hidden_state, "map without final norm")
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
    state = load_file(f)
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
