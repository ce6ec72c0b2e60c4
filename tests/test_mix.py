"""Weight mixing of two checkpoints (train/mix.py): θ = β·θa + (1 − β)·θb with config/key/shape checks."""

import dataclasses

import pytest
import torch
from edgevlm_testkit import assert_close_rel
from safetensors import safe_open

from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.presets import get_preset
from edgevlm.runtime.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, save_checkpoint
from edgevlm.train.mix import first_difference, main, mix_checkpoints, mix_state_dicts


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tower.connector.proj.weight": torch.randn(6, 5, generator=g),  # fp32
        "tower.connector.proj.bias": torch.randn(6, generator=g).to(torch.bfloat16),  # low precision
        "decoder.norm.weight": torch.randn(5, generator=g, dtype=torch.float64),
        "tower.encoders.cnn.bn.num_batches_tracked": torch.tensor(7),  # integer: copied when equal
        "decoder.flags": torch.tensor([True, False]),
    }


@pytest.fixture()
def ckpts(tmp_path):
    cfg = get_preset("tiny")
    a = save_checkpoint(tmp_path / "a", cfg, _state(1))
    b = save_checkpoint(tmp_path / "b", cfg, _state(2))
    return tmp_path, a, b


def test_endpoints_are_exact_and_half_is_average():
    a, b = _state(1), _state(2)
    a["decoder.norm.weight"][0] = -0.0  # signs of zero and infinities in the other side must not leak
    b["decoder.norm.weight"][0] = float("inf")
    for beta, ref in ((1.0, a), (0.0, b), (1, a), (0, b)):
        out = mix_state_dicts(a, b, beta)
        assert out.keys() == ref.keys()
        for k in ref:
            assert out[k].dtype == ref[k].dtype and torch.equal(out[k], ref[k]), (beta, k)
    a, b = _state(1), _state(2)
    half = mix_state_dicts(a, b, 0.5)
    w = "tower.connector.proj.weight"
    # 0.5·a and 0.5·b are exact in fp32, so the blend rounds once, like (a + b) / 2: a budget of 1 ulp of the
    # scale allows one more rounding for another formula (b + β(a − b)), nothing else.
    assert_close_rel(half[w], (a[w] + b[w]) / 2, "beta 0.5 vs the average", ulps=1)
    bias = "tower.connector.proj.bias"  # blended in fp32, then rounded once to bf16
    assert half[bias].dtype == torch.bfloat16
    assert torch.equal(half[bias], ((a[bias].float() + b[bias].float()) / 2).to(torch.bfloat16))
    assert half["decoder.norm.weight"].dtype == torch.float64
    assert torch.equal(half["tower.encoders.cnn.bn.num_batches_tracked"], torch.tensor(7))
    quarter = mix_state_dicts(a, b, 0.25)
    # 0.25·a is exact; 0.75·b and the sum round once each, by half an ulp of values within 2x of max|want|
    # for these randn tensors: 2 ulps of the scale
    assert_close_rel(quarter[w], 0.25 * a[w] + 0.75 * b[w], "beta 0.25 vs 0.25 a + 0.75 b", ulps=2)


def test_state_dict_errors_name_the_problem():
    a, b = _state(1), _state(2)
    b_missing = {k: v for k, v in b.items() if k != "decoder.flags"}
    with pytest.raises(CheckpointError, match=r"only in a.*decoder\.flags"):
        mix_state_dicts(a, b_missing, 0.5)
    b_extra = {**b, "decoder.extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"only in b.*decoder\.extra"):
        mix_state_dicts(a, b_extra, 0.5)
    b_shape = {**b, "tower.connector.proj.weight": torch.zeros(6, 4)}
    with pytest.raises(CheckpointError, match=r"'tower\.connector\.proj\.weight'.*\(6, 5\).*\(6, 4\)"):
        mix_state_dicts(a, b_shape, 0.5)
    b_int = {**b, "tower.encoders.cnn.bn.num_batches_tracked": torch.tensor(8)}
    with pytest.raises(CheckpointError, match="num_batches_tracked.*must be equal"):
        mix_state_dicts(a, b_int, 0.5)
    b_dtype = {**b, "tower.connector.proj.weight": b["tower.connector.proj.weight"].half()}
    with pytest.raises(CheckpointError, match="dtype"):
        mix_state_dicts(a, b_dtype, 0.5)
    for bad in (-0.01, 1.01, float("nan"), True, "0.5"):
        with pytest.raises(ConfigError, match="beta"):
            mix_state_dicts(a, b, bad)


def test_mix_checkpoints_writes_complete_folder(ckpts):
    tmp, a, b = ckpts
    out = mix_checkpoints(a, b, 0.5, tmp / "mixed", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert sorted(p.name for p in tmp.iterdir()) == ["a", "b", "mixed"]  # no temporary folder left behind
    cfg, state = load_checkpoint(out)
    assert cfg == get_preset("tiny")
    ref = mix_state_dicts(_state(1), _state(2), 0.5)
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    assert float(meta["mix_beta"]) == 0.5 and meta["mix_a"] == str(a.resolve()) and meta["mix_b"] == str(b.resolve())
    with pytest.raises(CheckpointError, match="exists"):
        mix_checkpoints(a, b, 0.5, tmp / "mixed", progress=False)
    with pytest.raises(CheckpointError, match="overwrite an input"):
        mix_checkpoints(a, b, 0.5, a, progress=False, overwrite=True)


def test_mix_checkpoints_endpoints_via_cli(ckpts, capsys):
    tmp, a, b = ckpts
    for beta, src in (("1", a), ("0", b)):
        assert main([str(a), str(b), "--beta", beta, "--out", str(tmp / f"m{beta}"), "--no-progress"]) == 0
        _, got = load_checkpoint(tmp / f"m{beta}")
        _, ref = load_checkpoint(src)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse rejects beta outside [0, 1]
        main([str(a), str(b), "--beta", "1.5", "--out", str(tmp / "bad")])
    assert not (tmp / "bad").exists()


def test_config_mismatch_names_first_field(ckpts):
    tmp, a, _ = ckpts
    cfg = get_preset("tiny")
    other = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, intermediate=96))
    c = save_checkpoint(tmp / "c", other, _state(2))
    with pytest.raises(CheckpointError, match=r"'decoder\.intermediate': 128 .* vs 96"):
        mix_checkpoints(a, c, 0.5, tmp / "out", progress=False)
    assert not (tmp / "out").exists()
    with pytest.raises(ConfigError, match="beta"):  # checked before any checkpoint is read
        mix_checkpoints(tmp / "missing", c, 2.0, tmp / "out")


def test_first_difference_paths():
    assert first_difference({"a": {"b": [1, {"c": 2}]}}, {"a": {"b": [1, {"c": 3}]}}) == ("a.b[1].c", 2, 3)
    assert first_difference({"a": 1}, {"a": 1, "z": 2}) == ("z", "<absent>", 2)
    assert first_difference({"t": [1, 2]}, {"t": [1]}) == ("t", [1, 2], [1])
    assert first_difference({"a": 1}, {"a": 1}) is None
