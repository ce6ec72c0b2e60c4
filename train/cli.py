"""``edgevlm train ...`` and ``edgevlm eval``: the training recipes behind the shipped demo model.

    edgevlm train demo --out runs/demo          # the whole demo recipe: stage 1, stage 2, export, eval
    edgevlm train stage1 --out runs/s1          # alignment only (captions), connector trains
    edgevlm train stage2 --init runs/s1/checkpoint --out runs/s2
    edgevlm train grounding --model runs/s2/checkpoint --out runs/gh   # a box head on a trained model
    edgevlm train answer-weight --model runs/gh/checkpoint   # how much the head's short answers count
    edgevlm train qformer --out runs/qf         # BLIP-2 Q-Former pre-training (ITC + ITM + ITG), tiny recipe
    edgevlm train flip --out runs/flip          # FLIP masked image-encoder steps
    edgevlm train mix A B --beta 0.5 --out C    # weight mixing of two checkpoints
    edgevlm eval --model demo                   # held-out metrics of a model

Everything is seeded; long work shows progress bars; ``--out`` folders hold a resumable state
(``resume/``), the exported edgevlm checkpoint (``checkpoint/``) and a ``log.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgevlm.cli_args import QUANT_HELP, add_vision_args, set_threads, vision_kwargs

if TYPE_CHECKING:  # the CLI imports torch and the runtime only when a command runs
    from edgevlm.config import ModelConfig
    from edgevlm.runtime.decoder import Decoder
    from edgevlm.runtime.preprocess import Preprocessor
    from edgevlm.runtime.qformer_tokenizer import QFormerTokenizer
    from edgevlm.runtime.tokenizer import Tokenizer
    from edgevlm.runtime.tower import VisionTowerModel

# The shipped demo model was trained with exactly these settings (see docs/training.md).
DEMO_DATA = dict(n_scenes=1500, n_digits=600, seed=0)
DEMO_STAGE1 = dict(stage="stage1", steps=100, batch_size=8, lr=3e-3, lora_rank=0)
DEMO_STAGE2 = dict(stage="stage2", steps=600, batch_size=4, lr=3e-3, lora_rank=8, lora_lr=2e-3, text_batch=2,
                   pack=True, text_objective="kl_base")
DEMO_EVAL = dict(n_scenes=60, n_digits=60, seed=0)


@dataclass(frozen=True)
class TrainComponents:
    """What :class:`~edgevlm.train.vlm.VLMTrainer` trains, read from a source by :func:`training_components`.

    ``instruction_tokenizer``: the Q-Former's tokenizer of a tower that reads the question (InstructBLIP),
    else None. ``write_extra(folder)``: writes the tokenizers (and a chat template the tokenizer does not
    carry) into an exported checkpoint whose config names none; None for presets."""

    config: ModelConfig
    tower: VisionTowerModel
    decoder: Decoder
    tokenizer: Tokenizer
    preprocessor: Preprocessor
    instruction_tokenizer: QFormerTokenizer | None = None
    write_extra: Callable[[Path], None] | None = None


def training_components(model, threads: int = 0) -> TrainComponents:
    """What to train, from ``model``: anything ``edgevlm.load`` takes.

    A preset (or a ModelConfig) is its base model: the trained weights shipped beside it and its LoRA are
    left out, as the demo recipe starts from. Any other source (an edgevlm checkpoint folder, a
    transformers LLaVA / LLaVA-NeXT / BLIP-2 / InstructBLIP folder, a MiniGPT-4 eval config, ...) is
    trained as it loads: its connector continues from its weights, LoRA it carries is merged into the
    decoder, and the exported checkpoint holds every tensor (its config names no WeightsRef, as
    ``edgevlm convert`` writes one) and, through ``write_extra(folder)``, the tokenizers ``edgevlm
    convert`` would write (an InstructBLIP Q-Former's in ``qformer_tokenizer/``).
    """
    import torch

    from edgevlm.errors import ConfigError
    from edgevlm.options import LoadOptions
    from edgevlm.runtime.loader import assemble, read_parts
    from edgevlm.runtime.source import resolve_source

    if threads:
        torch.set_num_threads(threads)
    src = resolve_source(model)
    if src.kind == "config":
        src = resolve_source(replace(src.config, weights=None, lora=None, grounding_head=None))
    # quant=None: training needs float nn.Linear layers (a GGUF decoder would keep its blocks), LoRA merged
    opts = LoadOptions(quant=None, progress=False)
    parts = read_parts(src, opts)
    if parts.tower is None:
        raise ConfigError(f"{src.name}: a model without a vision tower has no connector to train")
    cfg, write_extra = src.config, None
    if src.kind != "config":
        from functools import partial

        # The writer edgevlm convert uses (its output is read back and compared with the source there and in
        # test_convert.py): the decoder's tokenizer, a chat template the loader chose that the tokenizer does
        # not carry (InstructBLIP's plain prompt) and the Q-Former tokenizer, so the export prompts as its source.
        from edgevlm.runtime.convert import write_tokenizers, model_config_of

        cfg, write_extra = model_config_of(parts), partial(write_tokenizers, parts)
    pipe = assemble(parts, opts)
    t = pipe.tower
    return TrainComponents(cfg, t.model, pipe.decoder, pipe.tokenizer, t.preprocessor,
                           instruction_tokenizer=t.instruction_tokenizer, write_extra=write_extra)


def run_stage(train_kw: dict, out: Path, *, model: str | ModelConfig = "demo", data_kw: dict | None = None,
              init: Path | None = None, threads: int = 0, progress: bool = True,
              feature_cache: Path | None = None) -> Path:
    """Train one stage into ``out`` (resumable) and export ``out/checkpoint``; returns that folder."""
    from .data import build_split
    from .text_corpus import text_batches
    from .vlm import TrainConfig, VLMTrainer

    tc = TrainConfig(**train_kw)
    data_kw = data_kw or DEMO_DATA
    c = training_components(model, threads)
    init_state = _init_state(init) if init else None
    samples = build_split("train", data_kw["n_scenes"], data_kw["n_digits"], seed=data_kw["seed"],
                          per_task=data_kw.get("per_task", 1))
    t0 = time.perf_counter()
    trainer = VLMTrainer(c.config, tc, tower_model=c.tower, decoder=c.decoder, tokenizer=c.tokenizer,
                         preprocessor=c.preprocessor, samples=samples, init_state=init_state,
                         feature_cache=feature_cache or out / "features.safetensors",
                         text_source=text_batches(c.tokenizer, tc.text_len, tc.text_batch, tc.seed),
                         instruction_tokenizer=c.instruction_tokenizer)
    history = trainer.train(out, progress=progress)
    ckpt = trainer.export(out / "checkpoint", write_extra=c.write_extra)
    log = {"train_config": asdict(tc), "data": data_kw, "init": str(init) if init else None,
           "examples": len(trainer.examples), "images": len(trainer.views_per_image),
           "encode_seconds": trainer.encode_s, "seconds": time.perf_counter() - t0,
           "autocast": trainer.autocast_dtype, "history": history}
    (out / "log.json").write_text(json.dumps(log, indent=1))
    return ckpt


def _init_state(init: Path) -> dict:
    """The tensors a run starts from: an edgevlm checkpoint folder's, or a bare ``.safetensors`` file of
    trained tensors such as the shipped ``edgevlm/assets/demo/model.safetensors`` (to train it further)."""
    from edgevlm.errors import WeightsNotFoundError
    from edgevlm.runtime.checkpoint import load_checkpoint
    from edgevlm.runtime.readers.safetensors_io import load_safetensors

    if init.suffix == ".safetensors":
        if not init.is_file():
            raise WeightsNotFoundError(f"--init file {init} does not exist")
        return {k: v.float() for k, v in load_safetensors(init).items()}
    return load_checkpoint(init)[1]


def _model_with_projector(model, proj_hidden: int | None):
    """``model`` (a preset name) with its SPHINX fusion's projection replaced: ``proj_hidden`` > 0 makes
    it a two-layer MLP (:class:`~edgevlm.config.SphinxFusionConfig`), 0 SPHINX's Linear; None leaves it."""
    if proj_hidden is None:
        return model
    from edgevlm.config import SphinxFusionConfig
    from edgevlm.errors import ConfigError
    from edgevlm.presets import PRESETS, get_preset

    if model not in PRESETS:
        raise ConfigError(f"--proj-hidden changes a preset's projector; {model!r} is not a preset (a checkpoint "
                          "keeps the projector it was trained with)")
    cfg = get_preset(model)
    if not isinstance(cfg.tower.connector, SphinxFusionConfig):
        raise ConfigError(f"--proj-hidden applies to SPHINX fusion; preset {model!r} has a "
                          f"{type(cfg.tower.connector).__name__}")
    return replace(cfg, tower=replace(cfg.tower, connector=replace(cfg.tower.connector, proj_hidden=proj_hidden)))


def cmd_demo(args) -> int:
    out = Path(args.out)
    t0 = time.perf_counter()
    cache = out / "features.safetensors"  # frozen-encoder outputs, shared by both stages
    model = _model_with_projector("demo", args.proj_hidden)
    s1 = run_stage({**DEMO_STAGE1, **_overrides(args)}, out / "stage1", model=model, threads=args.threads,
                   feature_cache=cache, progress=not args.json)
    s2 = run_stage({**DEMO_STAGE2, **_overrides(args)}, out / "stage2", model=model, init=s1, threads=args.threads,
                   feature_cache=cache, progress=not args.json)
    minutes = (time.perf_counter() - t0) / 60
    if args.json:
        print(json.dumps({"checkpoint": str(s2), "minutes": round(minutes, 2),
                          "logs": [str(out / stage / "log.json") for stage in ("stage1", "stage2")]}, indent=2))
    else:
        print(f"trained in {minutes:.1f} min -> {s2}")
        print(f"ship it: cp {s2}/model.safetensors edgevlm/assets/demo/model.safetensors")
    if args.csv:
        logs = [json.loads((out / stage / "log.json").read_text()) for stage in ("stage1", "stage2")]
        _append_row(Path(args.csv), {
            "out": str(out), "overrides": json.dumps(_overrides(args)) if _overrides(args) else "",
            "proj_hidden": args.proj_hidden or 0,
            # encode_seconds is ~0 when the feature cache already existed and is part of stage1_s; the stage
            # times cover this invocation only (a resumed run reports the resumed part)
            "encode_s": round(logs[0]["encode_seconds"] + logs[1]["encode_seconds"], 1),
            **_stage_fields("stage1", logs[0]), **_stage_fields("stage2", logs[1]),
            "autocast": logs[1]["autocast"], "total_min": round(minutes, 2)})
    return 0


def cmd_stage(args) -> int:
    kw = dict(DEMO_STAGE1 if args.command == "stage1" else DEMO_STAGE2)
    kw.update(_overrides(args))
    data = {**DEMO_DATA, **{k: getattr(args, k) for k in ("n_scenes", "n_digits", "per_task")
                            if getattr(args, k) is not None}}
    ckpt = run_stage(kw, Path(args.out), model=_model_with_projector(args.model, args.proj_hidden), data_kw=data, init=Path(args.init) if args.init else None,
                     threads=args.threads, progress=not args.json)
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "log": str(Path(args.out) / "log.json")}, indent=2))
    else:
        print(f"checkpoint: {ckpt}")
    if args.csv:
        log = json.loads((Path(args.out) / "log.json").read_text())
        _append_row(Path(args.csv), {
            "out": args.out, "overrides": json.dumps(_overrides(args)) if _overrides(args) else "",
            "proj_hidden": args.proj_hidden or 0, "init": args.init or "", "autocast": log["autocast"],
            "tasks": ",".join(log["train_config"]["tasks"]), "per_task": data.get("per_task", 1),
            "encode_s": round(log["encode_seconds"], 1), **_stage_fields(args.command, log),
            "total_min": round(log["seconds"] / 60, 2)})
    return 0


def cmd_grounding(args) -> int:
    from .grounding import GroundingTrainConfig, train_grounding

    kw = {k: getattr(args, k) for k in ("steps", "per_task", "seed", "n_scenes", "n_digits", "tasks", "drop_share")
          if getattr(args, k) is not None}
    out = Path(args.out)
    ckpt = train_grounding(args.model, out, GroundingTrainConfig(**kw), threads=args.threads, progress=not args.json)
    log = json.loads((out / "log.json").read_text())
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "log": str(out / "log.json")}, indent=2))
    else:
        print(f"checkpoint: {ckpt} ({log['questions']} questions, {log['seconds'] / 60:.1f} min)")
    if args.csv:
        _append_row(Path(args.csv), {
            "out": args.out, "init": args.model, "overrides": json.dumps(kw) if kw else "",
            "encode_s": round(log["encode_seconds"], 1), "grounding_s": round(log["train_seconds"], 1),
            "grounding_steps": log["train_config"]["steps"], "grounding_final_loss": round(log["final_loss"], 4),
            "per_task": log["train_config"]["per_task"], "tasks": ",".join(log["train_config"]["tasks"]),
            "total_min": round(log["seconds"] / 60, 2)})
    return 0


def cmd_answer_weight(args) -> int:
    """Fit the grounding head's ``answer_weight`` on held-out draws (train/answer_weight.py)."""
    import edgevlm

    from .answer_weight import HEAD_TASKS, WEIGHTS, accuracy, choose, collect
    from .data import build_split

    from edgevlm.errors import ConfigError
    from edgevlm.runtime.checkpoint import is_checkpoint_dir, load_checkpoint_config, save_checkpoint_config

    if args.write and not is_checkpoint_dir(args.model):
        raise ConfigError(f"--write needs an edgevlm checkpoint folder, got {args.model!r}; for a preset, set "
                          "answer_weight in its GroundingHeadConfig (edgevlm/presets.py)")
    set_threads(args)
    pipe = edgevlm.load(args.model, quant=args.quant, progress=not args.json, **vision_kwargs(args))
    if pipe.grounding_head is None or not pipe.grounding_head.cfg.answers:
        raise ConfigError(f"model {args.model!r} has no grounding head with short answers; nothing to weigh")
    records = []
    for seed in args.seeds:
        samples = build_split("heldout", args.n_scenes, args.n_digits, seed=seed, tasks=HEAD_TASKS)
        records += collect(pipe, samples, seed, progress=not args.json)
    weights = args.weights or WEIGHTS
    best = choose(records, weights)
    current = pipe.grounding_head.cfg.answer_weight
    rows = [("decoder alone", 0.0), *((f"{w:g}", w) for w in weights), ("head alone", None)]
    table = {name: accuracy(records, w) for name, w in rows}
    tasks = [t for t in (*HEAD_TASKS, "all") if t in table[rows[0][0]]]
    written = None
    if args.write:
        cfg = load_checkpoint_config(args.model)
        cfg = replace(cfg, grounding_head=replace(cfg.grounding_head, answer_weight=best))
        written = str(save_checkpoint_config(args.model, cfg))
    if args.json:
        print(json.dumps({"model": args.model, "seeds": list(args.seeds), "chosen": best, "current": current,
                          "written": written,
                          "accuracy": {k: {t: v[t][0] / v[t][1] for t in tasks} for k, v in table.items()}}, indent=2))
    else:
        print(f"first-token accuracy on held-out seeds {','.join(map(str, args.seeds))} "
              f"({table[rows[0][0]]['all'][1]} questions)")
        print(f"  {'answer_weight':<14}" + "".join(f"{t:>9}" for t in tasks))
        for name, _ in rows:
            mark = "  <- chosen" if name == f"{best:g}" else ""
            print(f"  {name:<14}" + "".join(f"{100 * table[name][t][0] / table[name][t][1]:8.1f}%" for t in tasks) + mark)
        print(f"chosen answer_weight: {best:g} (the model's config said {current:g}); "
              + (f"written to {written}" if written else "set it in the model's GroundingHeadConfig, or rerun "
                 "with --write on a checkpoint folder"))
    if args.csv:
        for name, w in rows:
            _append_row(Path(args.csv), {
                "model": args.model, "quant": args.quant, "seeds": ",".join(map(str, args.seeds)),
                "n_scenes": args.n_scenes, "n_digits": args.n_digits, "answer_weight": name,
                "chosen": w == best, **{f"{t}_accuracy": f"{table[name][t][0] / table[name][t][1]:.4f}" for t in tasks},
                **{f"n_{t}": table[name][t][1] for t in tasks}})
    return 0


def _stage_fields(stage: str, log: dict, last: int = 20) -> dict:
    """A stage's columns of a training row: its seconds, steps, and the mean image-task loss of its last
    ``last`` steps (the text batches' KL is not in it)."""
    tail = [r["loss_vlm"] for r in log["history"][-last:]]
    return {f"{stage}_s": round(log["seconds"], 1), f"{stage}_steps": log["train_config"]["steps"],
            f"{stage}_final_loss": round(sum(tail) / max(1, len(tail)), 4)}


def _overrides(args) -> dict:
    out = {}
    for k in ("steps", "batch_size", "lr", "lora_lr", "lora_rank", "seed", "tasks", "loss_weighting", "visual_scale",
              "autocast"):
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    return out


def cmd_eval(args) -> int:
    """Held-out task metrics through the Pipeline, the LLM's perplexity on held-out real text (and the
    untuned base decoder's, to show what tuning cost), and "Paris"; rows go to ``--csv``."""
    import edgevlm

    from .data import build_split
    from .evaluate import evaluate_samples, perplexity
    from .text_corpus import heldout_text

    set_threads(args)
    pipe = edgevlm.load(args.model, quant=args.quant, grounding_head=not args.no_head, **vision_kwargs(args))
    samples = build_split(args.split, args.n_scenes, args.n_digits, seed=args.seed,
                          **({"tasks": args.tasks} if args.tasks else {}))
    metrics, records = evaluate_samples(pipe, samples, max_new_tokens=args.max_new_tokens)
    text = heldout_text()
    ppl, n_tok = perplexity(pipe.decoder, pipe.tokenizer, text)
    metrics.update({"perplexity": ppl, "perplexity_tokens": n_tok})
    paris = pipe.generate(None, "What is the capital of France?", max_new_tokens=32).text
    metrics["paris"] = "Paris" in paris
    base_cfg = _untuned_config(args.model)
    if base_cfg is not None:  # the same LLM before tuning: what the adapters cost on general text
        base = edgevlm.load(base_cfg, quant="none")  # the float reference, whatever --quant says
        metrics["perplexity_base"] = perplexity(base.decoder, base.tokenizer, text)[0]
        metrics["perplexity_change"] = metrics["perplexity"] / metrics["perplexity_base"] - 1
    doc = {"model": str(args.model), "n": len(samples), "metrics": metrics, "paris_answer": paris}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for k, v in metrics.items():
            print(f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}")
        print(f"  paris answer           {paris!r}")
    if args.records:
        Path(args.records).write_text(json.dumps(records, indent=1))
    if args.csv:
        _append_eval_row(Path(args.csv), args, metrics)
    return 0


def _untuned_config(model: str):
    """The model's config without its trained layers (LoRA, shipped weights) when its decoder comes
    from a WeightsRef, else None (nothing to compare with)."""
    from edgevlm.presets import PRESETS, get_preset
    from edgevlm.runtime.checkpoint import is_checkpoint_dir, load_checkpoint_config

    if model in PRESETS:
        cfg = get_preset(model)
    elif is_checkpoint_dir(model):
        cfg = load_checkpoint_config(model)
    else:
        return None
    if cfg.decoder_weights is None or (cfg.lora is None and cfg.weights is None):
        return None
    return replace(cfg, lora=None, weights=None, grounding_head=None)


def _append_eval_row(path: Path, args, metrics: dict) -> None:
    _append_row(path, {"model": args.model, "quant": args.quant, "vision_backend": args.vision_backend,
                       "vision_precision": args.vision_precision if args.vision_backend != "torch" else "",
                       "keep_ratio": args.keep_ratio, "keep_mode": args.keep_mode,
                       "split": args.split, "n_scenes": args.n_scenes, "n_digits": args.n_digits, "seed": args.seed,
                       "tasks": ",".join(args.tasks or ()), "head": "off" if args.no_head else "",
                       **{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items()}})


def _append_row(path: Path, fields: dict) -> None:
    """Append ``fields`` to a CSV after the columns every result row carries: when, which commit, where."""
    import platform
    import subprocess
    from datetime import datetime, timezone

    import torch

    from edgevlm.perf.limits import cpu_flags, cpu_model
    from edgevlm.perf.results import append_rows

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    row = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
           "machine": platform.processor() or platform.machine(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
           "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, **fields}
    append_rows(path, [row])


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (resumable; re-running continues)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    # Unset options keep the demo recipe's value (DEMO_STAGE1 / DEMO_STAGE2); `train demo` applies a set one
    # to both stages.
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="images per step")
    p.add_argument("--lr", type=float, default=None, help="connector learning rate")
    p.add_argument("--lora-lr", dest="lora_lr", type=float, default=None, help="LoRA learning rate")
    p.add_argument("--autocast", choices=("auto", "bf16", "none"), default=None,
                   help="bf16 autocast of the matmuls: auto (where the hardware has bf16: AMX, AVX512-BF16, a bf16 "
                        "GPU; emulated bf16 is several times slower than fp32), bf16 or none (default: auto)")
    p.add_argument("--lora-rank", dest="lora_rank", type=int, default=None, help="LoRA rank (0: no LoRA)")
    p.add_argument("--seed", type=int, default=None,
                   help="training seed: initialisation and batch order (default: 0; the data keep theirs)")
    p.add_argument("--loss-weighting", dest="loss_weighting", choices=("token", "answer"), default=None,
                   help="answer tokens share the loss per token (long boxes and captions dominate) or per answer "
                        "(every answer weighs one); default: the demo recipe's")
    p.add_argument("--visual-scale", dest="visual_scale", choices=("learned", "text"), default=None,
                   help="a fresh connector's output scale: as initialised, or rescaled to the decoder's token "
                        "embeddings before the first step; default: the demo recipe's")
    p.add_argument("--proj-hidden", dest="proj_hidden", type=int, default=None,
                   help="train a preset's SPHINX fusion with a two-layer MLP projection of this hidden width "
                        "(Linear -> GELU -> Linear -> LayerNorm) instead of SPHINX's Linear -> LayerNorm; the "
                        "checkpoint's config records it (default: the preset's projection)")
    p.add_argument("--json", action="store_true", help="print the checkpoint and log paths as JSON (no progress bar)")


def add_parsers(sub) -> None:
    """Register ``train`` (with its own subcommands) and ``eval`` on the top-level CLI."""
    train = sub.add_parser("train", help="training recipes (demo VLM, grounding head, Q-Former, FLIP, weight mixing)")
    tsub = train.add_subparsers(dest="train_command", required=True)
    demo = tsub.add_parser("demo", help="the shipped demo model's whole recipe: stage 1 then stage 2")
    _add_train_args(demo)
    demo.add_argument("--csv", default=None, help="append a row (machine, versions, commit, stage times) to this CSV")
    demo.set_defaults(func=cmd_demo)
    for name, what in (("stage1", "vision-language alignment on captions (connector only)"),
                       ("stage2", "instruction tuning on all tasks (connector + LoRA)")):
        p = tsub.add_parser(name, help=what)
        _add_train_args(p)
        p.add_argument("--model", "-m", default="demo",
                       help="what to train, as edgevlm.load takes it: a preset (its base model), an edgevlm "
                            "checkpoint folder, a transformers LLaVA / LLaVA-NeXT / BLIP-2 / InstructBLIP folder, "
                            "a MiniGPT-4 eval YAML, ... (default: demo)")
        p.add_argument("--n-scenes", dest="n_scenes", type=int, default=None,
                       help=f"training scenes (default: {DEMO_DATA['n_scenes']})")
        p.add_argument("--n-digits", dest="n_digits", type=int, default=None,
                       help=f"training digit images (default: {DEMO_DATA['n_digits']})")
        p.add_argument("--per-task", dest="per_task", type=_positive_int, default=None,
                       help="questions drawn per scene and task, repeats dropped (default: 1); with --tasks ground, "
                            "3 gives up to three grounding questions per scene")
        p.add_argument("--init", default=None, help="checkpoint folder to start from (e.g. stage 1's), or a .safetensors "
                       "file of trained tensors (edgevlm/assets/demo/model.safetensors: train the shipped model further)")
        p.add_argument("--tasks", type=_task_list, default=None,
                       help="comma-separated tasks to train on, a subset of edgevlm.train.data.TASKS (caption, "
                            "color, shape, count, ground, digit); default: stage1 caption, stage2 all. Short-answer "
                            "tasks fit decoders with few positions")
        p.add_argument("--csv", default=None,
                       help="append a row (machine, versions, commit, steps, time, autocast) to this CSV")
        p.set_defaults(func=cmd_stage, command=name)
    gh = tsub.add_parser("grounding", help="a grounding head (boxes and short answers read off the visual tokens) "
                                           "for a trained model")
    gh.add_argument("--model", "-m", default="demo",
                    help="a preset with trained weights or an edgevlm checkpoint folder with a trained SPHINX fusion "
                         "(default: demo)")
    gh.add_argument("--out", required=True, help="output folder: checkpoint/ (the model + head), log.json, feature cache")
    gh.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    gh.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default: 4000)")
    gh.add_argument("--n-scenes", dest="n_scenes", type=_positive_int, default=None,
                    help=f"training scenes (default: {DEMO_DATA['n_scenes']})")
    gh.add_argument("--n-digits", dest="n_digits", type=int, default=None,
                    help="training digit images (default: 4311, three renders of each of the 1,437 training-pool "
                         "digits; beyond 1,437 the digits repeat on new paper, size and offset); the encoders' "
                         "outputs are cached in OUT/features.safetensors for the next run with the same images")
    gh.add_argument("--per-task", dest="per_task", type=_positive_int, default=None,
                    help="questions drawn per training scene and task, repeats dropped (default: 8)")
    gh.add_argument("--tasks", type=_task_list, default=None,
                    help="comma-separated tasks the head learns, a subset of ground, color, shape, count, digit "
                         "(default: all five; ground alone: a head that writes boxes only)")
    gh.add_argument("--drop-share", dest="drop_share", type=float, default=None,
                    help="share of the steps that see 40-90 %% of the grid cells, as token dropping leaves them; "
                         "> 0 gives a head the runtime also uses with uniform keep_ratio < 1 (default: 0.3)")
    gh.add_argument("--seed", type=int, default=None, help="initialisation and batch order (default: 0)")
    gh.add_argument("--csv", default=None, help="append a row (machine, versions, commit, time, loss) to this CSV")
    gh.add_argument("--json", action="store_true", help="print the checkpoint and log paths as JSON (no progress bar)")
    gh.set_defaults(func=cmd_grounding)
    aw = tsub.add_parser("answer-weight", help="fit how much the grounding head's short answers count against the "
                                               "decoder's (answer_weight) on held-out draws")
    aw.add_argument("--model", "-m", default="demo", help="a model with a grounding head that has answers (default: demo)")
    aw.add_argument("--seeds", type=_int_list, default=(2, 3, 4),
                    help="held-out draws to fit on, comma-separated; keep them apart from the draws you report "
                         "(default: 2,3,4; the README reports 0 and 1)")
    aw.add_argument("--n-scenes", dest="n_scenes", type=int, default=DEMO_EVAL["n_scenes"])
    aw.add_argument("--n-digits", dest="n_digits", type=int, default=DEMO_EVAL["n_digits"])
    aw.add_argument("--weights", type=_float_list, default=None,
                    help="candidate weights, comma-separated (default: 0.5,1,1.5,2,3,4,6)")
    aw.add_argument("--threads", type=int, default=0)
    aw.add_argument("--quant", default="none",
                    help="decoder weights, as for edgevlm eval (default: none, as the README's held-out table)")
    add_vision_args(aw)
    aw.add_argument("--write", action="store_true",
                    help="write the chosen weight into the checkpoint folder's edgevlm.json (weights untouched)")
    aw.add_argument("--json", action="store_true")
    aw.add_argument("--csv", default=None, help="append a row per weight (machine, versions, commit, accuracies) to this CSV")
    aw.set_defaults(func=cmd_answer_weight)
    for name, module, what in (("qformer", "qformer_pretrain", "BLIP-2 Q-Former pre-training (ITC, ITM, ITG)"),
                               ("flip", "flip", "FLIP masked image-encoder training"),
                               ("mix", "mix", "weight mixing of two checkpoints")):
        # Options go to the module's own parser (``edgevlm train mix --help`` shows them).
        p = tsub.add_parser(name, help=what, add_help=False)
        p.set_defaults(func=_delegate(module), delegate=True)

    ev = sub.add_parser("eval", help="held-out metrics of a model (scenes, digits) and its text perplexity")
    ev.add_argument("--model", "-m", default="demo", help="preset, checkpoint folder, ... (default: demo)")
    ev.add_argument("--n-scenes", type=int, default=DEMO_EVAL["n_scenes"])
    ev.add_argument("--n-digits", type=int, default=DEMO_EVAL["n_digits"])
    ev.add_argument("--seed", type=int, default=DEMO_EVAL["seed"])
    ev.add_argument("--tasks", type=_task_list, default=None,
                    help="score only these tasks, comma-separated (default: all); each task draws its questions "
                         "from its own random stream, so they are the same questions a full run asks")
    ev.add_argument("--split", choices=("heldout", "novel"), default="heldout",
                    help="heldout: new scenes and digits rendered as in training; novel: also other image sizes, "
                         "backgrounds, object sizes, ink and question phrasings than training saw")
    ev.add_argument("--max-new-tokens", type=int, default=80,
                    help="answer length limit; a box list takes about 21 tokens per box (default: 80)")
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--quant", default="auto", help=QUANT_HELP + "; the untuned baseline perplexity stays float")
    add_vision_args(ev)
    ev.add_argument("--no-head", dest="no_head", action="store_true",
                    help="leave the model's grounding head out: the decoder alone writes boxes and short answers "
                         "(what the head adds)")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--records", default=None, help="write every question, answer and prediction to this JSON file")
    ev.add_argument("--csv", default=None, help="append a result row (machine, versions, commit, metrics) to this CSV")
    ev.set_defaults(func=cmd_eval)


def _task_list(text: str) -> tuple[str, ...]:
    # imported here, not at the top: building the parser must not import numpy and the scenes
    from .data import TASKS

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(TASKS)}, got {text!r}")
    return tasks


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected weights > 0, got {text!r}")
    return out


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def _delegate(module: str):
    def run(args) -> int:
        import importlib

        return importlib.import_module(f"edgevlm.train.{module}").main(args.rest) or 0

    return run


__all__ = ["add_parsers", "run_stage", "training_components", "TrainComponents", "DEMO_DATA", "DEMO_STAGE1",
           "DEMO_STAGE2", "DEMO_EVAL"]
