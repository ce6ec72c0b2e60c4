"""`edgevlm plan`: the work counted on a weightless model equals the work of the loaded model, the
device figures reproduce NVIDIA's published ones, the roofline arithmetic holds, and docs/jetson.md
shows what the command prints."""

import json
import re
from pathlib import Path

import pytest
import torch

import edgevlm
from edgevlm.cli import main
from edgevlm.errors import ConfigError
from edgevlm.perf.devices import DEVICES, get_device
from edgevlm.perf.plan import GIB, _LiveBytes, count_work, plan, weight_bytes
from edgevlm.presets import get_preset

DOCS = Path(__file__).resolve().parents[1] / "docs" / "jetson.md"


@pytest.fixture(scope="module")
def tiny_work():
    return count_work(get_preset("tiny"), "tiny", text_tokens=8)


def test_device_rates_reproduce_nvidias_headline_tops():
    # The GPU's rate comes from SMs x clock; with the DLAs' share it must give the published figure.
    for d in DEVICES.values():
        assert d.gpu_sparse_int8_tops + d.dla_sparse_tops == pytest.approx(d.published_ai_tops, rel=0.03), d.name
    assert get_device("agx-orin").fp16_tflops == pytest.approx(42.6, abs=0.1)
    with pytest.raises(ConfigError, match="orin-nano"):
        get_device("orin-mini")


def test_tower_and_prefill_work_match_the_loaded_model(tiny_work):
    from edgevlm.perf.latency import _tower_flops, prefill_flops
    from edgevlm.runtime.image_io import load_image
    from edgevlm.cli import _asset

    pipe = edgevlm.load("tiny", quant="none")
    views = pipe.tower.preprocessor([load_image(_asset("scene_a.png"))]).views
    assert tiny_work.tower_flops == _tower_flops(pipe.tower, views) > 0
    assert tiny_work.visual_tokens == 135 and tiny_work.prompt_tokens == 143
    assert tiny_work.prefill_flops == prefill_flops(pipe.decoder.cfg, 143)


def test_decode_bytes_match_the_stored_weights(tiny_work):
    from edgevlm.perf.limits import decoder_step_bytes
    from edgevlm.runtime.quant import summary

    dec16 = edgevlm.load("tiny", quant="none", dtype="float16").decoder
    p = plan(tiny_work, get_device("orin-nano"), "fp16", context=256, new_tokens=2)
    kv = tiny_work.kv_values_per_position * 2 * (143 + 1)
    assert p.decode_mb_per_token * 1e6 == pytest.approx(decoder_step_bytes(dec16) + kv, abs=1)
    # quantised: the bytes the CPU kernels' packed layout stores (tiny's rows are whole 16-row blocks)
    for precision in ("int8", "int4", "int4-g64"):
        dec = edgevlm.load("tiny", quant=precision).decoder
        want = summary(dec)["quantized_bytes"]
        got = sum(weight_bytes(n, k, precision) for n, k in tiny_work.decoder_linears)
        assert got == pytest.approx(want, abs=1), precision


def test_fp16_weights_are_every_parameter_twice():
    for name in ("tiny", "demo"):
        cfg = get_preset(name)
        work = count_work(cfg, name)
        info = json.loads(_run(["info", name, "--json"]))
        params = info["decoder"]["params"] + sum(e["params"] for e in info["vision"]["encoders"]) \
            + info["vision"]["connector"]["params"] + (info["grounding_head"] or {}).get("params", 0)
        p = plan(work, get_device("agx-orin"), "fp16")
        assert p.weights_gib * GIB == pytest.approx(2 * params, abs=1), name


def test_roofline_arithmetic(tiny_work):
    d = get_device("orin-nx")
    p = plan(tiny_work, d, "fp16", context=512, new_tokens=2)
    assert p.decode_bound_ms == pytest.approx(p.decode_mb_per_token * 1e6 / (d.bandwidth_gbs * 1e9) * 1e3)
    assert p.decode_expected_ms == pytest.approx(p.decode_bound_ms / 0.75)
    tower_compute = tiny_work.tower_flops / (d.fp16_tflops * 1e12) * 1e3
    assert p.tower_bound_ms >= tower_compute and p.ttft_bound_ms == pytest.approx(p.tower_bound_ms + p.prefill_bound_ms)
    # an int8 tower halves the compute term and the weight bytes
    p8 = plan(tiny_work, d, "fp16", "int8", context=512, new_tokens=2)
    assert p8.tower_bound_ms == pytest.approx(p.tower_bound_ms / 2)
    # the KV cache grows with the context; int8 stores a byte per value and an fp32 scale per vector
    big = plan(tiny_work, d, "fp16", context=1024, new_tokens=2)
    assert big.kv_gib == pytest.approx(2 * p.kv_gib)
    kv8 = plan(tiny_work, d, "fp16", kv_cache="int8", context=512, new_tokens=2).kv_gib
    assert kv8 == pytest.approx(p.kv_gib * (1 + 4 / tiny_work.head_dim) / 2)
    with pytest.raises(ConfigError, match="cannot hold"):
        plan(tiny_work, d, "fp16", context=100)
    with pytest.raises(ConfigError, match="decoder precision"):
        plan(tiny_work, d, "int3")
    with pytest.raises(ConfigError, match="64 inputs.*group 128"):  # as the runtime refuses to quantise it
        plan(tiny_work, d, "int4-g128")


def test_live_bytes_tracks_the_eager_working_set():
    x = torch.empty(256, 256, device="meta", dtype=torch.float16)
    mb = 256 * 256 * 2
    with _LiveBytes() as live:
        a = x @ x  # 1 block
        b = a.relu()  # 2 live
        del a
        c = b.view(-1)  # a view costs nothing
        b.add_(1)  # in place: nothing
        d = c * 2  # 2 live again (b/c, d)
        del b, c, d
    assert live.peak == 2 * mb and live.now == 0


def test_cli_plan_json_and_bad_input(capsys):
    assert main(["plan", "tiny", "--device", "orin-nano", "--decoder", "fp16,int4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["decoder"] for r in rows] == ["fp16", "int4"] and all(r["device"] == "orin-nano" for r in rows)
    assert rows[1]["decode_bound_ms"] < rows[0]["decode_bound_ms"] / 2
    assert main(["plan", "tiny", "--decoder", "int3"]) == 2
    assert "--decoder takes" in capsys.readouterr().err
    assert main(["plan", "no-such-model"]) == 2
    assert main(["plan", "tiny", "--bandwidth-use", "1.5"]) == 2


def test_checkpoint_folder_is_planned_from_its_config(tmp_path, capsys):
    from edgevlm.runtime.checkpoint import CONFIG_NAME

    # what `edgevlm convert` writes beside the weights; plan reads only the config
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"edgevlm_format": 1, "config": get_preset("tiny").to_dict()}))
    assert main(["plan", str(tmp_path), "--decoder", "fp16", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["model"] == str(tmp_path) and row["visual_tokens"] == 135


def test_docs_show_what_the_command_prints():
    """docs/jetson.md's tables are the output of `edgevlm plan --device all` (regenerate them with it)."""
    text = DOCS.read_text()
    printed = _run(["plan", "--device", "all"])
    tables = re.findall(r"^\*\*Jetson.*?(?=\n\n[^|])", printed, flags=re.S | re.M)
    assert len(tables) == len(DEVICES)
    for table in tables:
        assert table in text, table.splitlines()[0]


def _run(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()
