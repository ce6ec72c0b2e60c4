"""`edgevlm chat`, `edgevlm bench` and the flags every subcommand shares; the latency suite underneath
(edgevlm.perf.latency: per-stage timings, bounds, failure rows) and its PNG; TextStream and Session.stream.

Nothing here judges speed (that is the bench's job): the tests check that every stage is measured and
accounted for, that the work counted for the bounds matches torch's own FLOP counter, and that the
command line does what --help says."""

import csv
import io
import json

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm.cli import _asset, build_parser, main
from edgevlm.perf.latency import BenchConfig, BenchRun, default_suite, measure, prefill_flops, run_suite

SCENE = _asset("scene_a.png")


@pytest.fixture(scope="module")
def tiny():
    return edgevlm.load("tiny")


# ---- the latency suite -----------------------------------------------------------------------

def test_measure_accounts_for_every_stage_of_the_first_token():
    row = measure(BenchConfig(label="t", model="tiny", quant="none"),
                  BenchRun(image=SCENE, new_tokens=4, repeat=2, warmup=1))
    stages = [row[f"{k}_ms"] for k in ("decode_image", "preprocess", "tower", "projector", "prefill")]
    assert all(v > 0 for v in stages), row
    # ttft is timed by Pipeline.generate, the stages one by one: the parts cannot exceed the whole by
    # more than run-to-run noise, and the whole adds only tokenisation and splicing to them.
    assert row["ttft_ms"] >= row["prefill_ms"]
    assert row["new_tokens"] == 4 and row["visual_tokens"] == 135 and row["prompt_tokens"] > 135
    for k in ("tower_bound_ms", "prefill_bound_ms", "decode_bound_ms", "rss_peak_mb", "bandwidth_gbs"):
        assert row[k] > 0, k
    assert row["weights"] == "real" and row["note"] == ""


def test_prefill_flops_match_torchs_counter_on_the_projections():
    from edgevlm.perf.limits import count_flops

    dec = edgevlm.load("tiny", quant="none").decoder
    ids = torch.randint(0, dec.cfg.vocab_size, (1, 1))
    counted = count_flops(lambda: dec(ids, last_only=True))  # T = 1: attention is negligible
    assert prefill_flops(dec.cfg, 1) == pytest.approx(counted, rel=0.01)
    # more tokens: linear in T for the projections, the LM head once
    assert prefill_flops(dec.cfg, 9) > 8 * (prefill_flops(dec.cfg, 1) - 2 * dec.cfg.hidden * dec.cfg.vocab_size)


def test_decode_bytes_count_packed_weights():
    from edgevlm.perf.limits import decoder_step_bytes

    f32 = decoder_step_bytes(edgevlm.load("tiny", quant="none").decoder)
    i4 = decoder_step_bytes(edgevlm.load("tiny", quant="int4").decoder)
    assert i4 < f32 / 4  # 4-bit codes + fp16 scale/zero per 32 vs 32-bit floats


def test_transformers_peer_row_has_only_decoder_stages():
    pytest.importorskip("transformers", reason="the transformers peer needs transformers (the dev extra)")
    row = measure(BenchConfig(label="p", model="tiny", quant="none", peer="transformers"),
                  BenchRun(image=SCENE, new_tokens=3, repeat=1, warmup=0))
    assert row["prefill_ms"] > 0 and row["decode_token_ms"] > 0
    assert "tower_ms" not in row and "ttft_ms" not in row and "transformers" in row["note"]


def test_a_failing_config_gives_a_row_that_says_why():
    rows = run_suite([BenchConfig(label="broken", model="no-such-model")],
                     BenchRun(image=SCENE, new_tokens=2, repeat=1), progress=False)
    assert rows[0]["label"] == "broken" and rows[0]["note"].startswith("failed")
    assert "UnknownPresetError" in rows[0]["note"]


def test_default_suite_covers_backends_and_precisions():
    labels = [c.label for c in default_suite("demo", "cpu")]
    assert any("decoder fp32" in x for x in labels) and any("int4" in x for x in labels)
    assert any(x.startswith("ORT int8") for x in labels) and any("keep 0.5" in x for x in labels)
    cuda = default_suite("demo", "cuda", random_weights=True)
    assert {c.dtype for c in cuda} >= {"float32", "float16", "bfloat16"} and all(c.random_weights for c in cuda)
    assert {c.decode_graphs for c in cuda} == {"off", "on"}  # eager and graphed decode side by side
    with pytest.raises(edgevlm.errors.ConfigError):
        BenchRun(image=SCENE, repeat=0)


def test_plot_draws_every_row(tmp_path):
    from PIL import Image

    from edgevlm.perf.plot import draw_breakdown

    rows = [{"label": "a", "decode_image_ms": 1, "preprocess_ms": 1, "tower_ms": 10, "projector_ms": 1,
             "prefill_ms": 20, "ttft_ms": 35, "decode_token_ms": 5, "decode_bound_ms": 1, "prefill_bound_ms": 5,
             "tower_bound_ms": 2, "rss_peak_mb": 900},
            {"label": "b", "note": "failed: BackendUnavailableError: no GPU"}]
    path = draw_breakdown(rows, tmp_path / "p.png", "title")
    img = Image.open(path)
    assert img.size[0] > 1000 and img.size[1] >= 90 + 2 * 30
    px = np.asarray(img.convert("RGB"))
    tower_colour = np.array([0, 158, 115])
    assert (px == tower_colour).all(-1).sum() > 100  # row a's tower segment was drawn


# ---- the CLI ---------------------------------------------------------------------------------

def test_cli_bench_writes_rows_and_plot(tmp_path, capsys):
    out, png = tmp_path / "e2e.csv", tmp_path / "e2e.png"
    argv = ["bench", "-m", "tiny", "--only", "decoder fp32", "--no-peer", "--repeat", "1", "--warmup", "0",
            "--new-tokens", "2", "--out", str(out), "--plot", str(png), "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["eager fp32 | decoder fp32"] and rows[0]["note"] == ""
    saved = list(csv.DictReader(out.open()))
    assert saved[0]["commit"] and saved[0]["torch"] == torch.__version__ and float(saved[0]["ttft_ms"]) > 0
    assert png.stat().st_size > 1000
    assert main(["bench", "-m", "tiny", "--only", "nothing-like-this"]) == 2


@pytest.mark.parametrize("argv, error", [
    (["--image", "no/such.png"], "ImageDecodeError"),
    (["-m", "some/folder", "--random-weights"], "ConfigError"),
] + ([(["--device", "cuda"], "BackendUnavailableError")] if not torch.cuda.is_available() else []))
def test_cli_bench_refuses_hopeless_runs_up_front(argv, error, capsys):
    assert main(["bench", *argv, "--out", "", "--plot", ""]) == 2
    assert error in capsys.readouterr().err


def test_cli_chat_json_lines_keep_the_conversation(monkeypatch, capsys):
    lines = ["What is this?", "/image no/such/file.png", "And now?", f"/image {SCENE}", "Again?", "/reset",
             "Once more?", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "-m", "tiny", "-i", SCENE, "--max-new-tokens", "3", "--json"]) == 0
    captured = capsys.readouterr()
    turns = [json.loads(x) for x in captured.out.splitlines()]
    assert [t["question"] for t in turns] == ["What is this?", "And now?", "Again?", "Once more?"]
    assert "ImageDecodeError" in captured.err  # the bad image is reported and the chat goes on
    assert turns[0]["visual_tokens"] == 135 and turns[0]["cached_tokens"] == 0
    assert turns[1]["turn"] == 2 and turns[1]["cached_tokens"] > 135  # same image, the KV prefix reused
    assert turns[2]["turn"] == 1 and turns[3]["turn"] == 1  # /image and /reset start the history again


def test_cli_chat_streams_and_reuses_the_kv_prefix(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nHi again\n"))
    assert main(["chat", "-m", "tiny", "-i", SCENE, "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count("first token") == 2 and "prompt positions reused" in err


@pytest.mark.parametrize("command", ["run", "chat", "info", "bench", "export", "eval", "train stage1"])
def test_model_and_json_flags_mean_the_same_everywhere(command):
    extra = {"run": ["hi"], "export": ["--out", "x"], "train stage1": ["--out", "x"]}.get(command, [])
    args, rest = build_parser().parse_known_args([*command.split(), *extra, "-m", "tiny", "--json"])
    assert not rest and args.model == "tiny" and args.json


# ---- TextStream and Session.stream ---------------------------------------------------------

def test_text_stream_carries_its_own_output(tiny):
    stream = tiny.stream(SCENE, "hi", max_new_tokens=4)
    assert stream.output is None
    text = "".join(stream)
    ref = tiny.generate(SCENE, "hi", max_new_tokens=4)
    assert stream.output.text == text == ref.text and stream.output.token_ids == ref.token_ids
    t = stream.output.timings
    assert t["ttft"] >= t["prefill"] > 0


def test_session_stream_joins_the_history_even_when_stopped_early(tiny):
    s = tiny.session(SCENE)
    pieces = list(s.stream("hi", max_new_tokens=3))
    assert s.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    it = s.stream("more", max_new_tokens=8)
    first = next(it)
    it.close()  # the caller stops after one piece
    assert len(s.outputs) == 2 and s.messages[-2]["content"] == "more"
    assert s.outputs[-1].stop_reason == "closed" and s.messages[-1]["content"] == first
