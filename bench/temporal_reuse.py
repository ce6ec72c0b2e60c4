"""What temporal token reuse saves and costs, against re-encoding every frame whole, on rendered video.

    .venv/bin/python -P bench/temporal_reuse.py                    # demo, 4 kinds x 6 thresholds, 24 frames
    .venv/bin/python -P bench/temporal_reuse.py --kinds moving --thresholds 4,8 --frames 12 --out /tmp/r.csv

Video (:mod:`edgevlm.scene_video`, held-out scenes, sensor noise of 2 levels on every frame): ``static``
(noise only), ``moving`` (an object slides across a still scene), ``pan`` (the camera pans), ``flicker``
(the light's brightness jumps by up to 4 % between frames). For each kind every frame is encoded whole
(the reference), then, per threshold, by a :class:`~edgevlm.runtime.temporal.TemporalTower` that carries
its state from frame to frame. Per row (frames after the first, which both encode whole):

* ``reencoded``: the mean fraction of cells encoded (1 for a frame encoded whole);
* ``full_ms`` / ``reuse_ms``: the tower's mean time per frame (encoders + connector; preprocessing is
  the same on both sides and not included; a frame found unchanged costs ~0), and the speedup;
* ``cos_mean`` / ``cos_min``: the cosine between reused and whole embeddings per visual token, averaged
  over tokens and frames, and the worst token of any frame;
* ``agree``: of two questions per frame (detect an object: the moving one where there is one; "How many
  objects are there?"), the fraction whose greedy answer text is identical from both embeddings;
  ``same_box``: the fraction of frames whose detected boxes overlap (IoU >= 0.5) from both;
  ``iou_full`` / ``iou_reuse``: the detected box against the rendered ground truth, mean over frames.
* ``whole_vs_prev``: the baseline for ``agree``: how often the whole encode's answers equal those of
  the frame before, also whole. Sensor noise alone moves a small model's answers (the demo's detection
  flips between two objects on a still scene), so agreement is read against it.

The limit beside the tower time is the whole encode itself: reuse can only skip work, and a frame in
which every cell changed costs what ``full_ms`` does. Rows go to ``--out`` (``bench/results/temporal_reuse.csv``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys

import torch

import edgevlm
from edgevlm.perf.limits import cpu_model, git_commit
from edgevlm.perf.results import append_rows
from edgevlm.runtime.boxes import iou
from edgevlm.runtime.embed_cache import EmbeddingCache
from edgevlm.runtime.image_embedding import ImageEmbedding
from edgevlm.runtime.temporal import CameraState, TemporalReuse, TemporalTower
from edgevlm.scene_video import KINDS, scene_video

COUNT_Q = "How many objects are there?"
SCENES = {"static": 7, "moving": 6, "pan": 2, "flicker": 5}  # held-out scenes the demo detects well when still


def answers(pipe, emb: torch.Tensor, target: str, size, truth) -> tuple[list[str], float, tuple | None]:
    """-> (the two answers' texts, the box's IoU with the ground truth, the box)."""
    e = ImageEmbedding(emb)
    found = pipe.detect(e, target, size=size)
    count = pipe.generate(e, COUNT_Q, max_new_tokens=6)
    box = found[0].box if len(found) else None
    return [found.output.text, count.text], iou(box, truth) if box and truth is not None else 0.0, box


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--thresholds", default="2,4,8,12,16,24")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--refresh-every", type=int, default=30)
    ap.add_argument("--context-refresh", type=float, default=TemporalReuse.context_refresh,
                    help="TemporalReuse.context_refresh (flat cells; above 1: never)")
    ap.add_argument("--speed", type=float, default=4.0, help="pixels per frame (moving, pan)")
    ap.add_argument("--out", default="bench/results/temporal_reuse.csv")
    args = ap.parse_args()

    pipe = edgevlm.load(args.model)
    tower = pipe.tower
    tower.embedding_cache = EmbeddingCache(0)  # the reference encodes every frame, even a repeated one
    common = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "cpu_model": cpu_model() or platform.processor(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "model": args.model, "frames": args.frames,
              "refresh_every": args.refresh_every, "context_refresh": args.context_refresh, "noise_levels": 2.0}
    rows = []
    for kind in args.kinds.split(","):
        video = scene_video(kind, args.frames, index=SCENES.get(kind, 0), speed=args.speed)
        target = video[0].mover or video[0].objects[0][0]
        truth = [dict(v.objects).get(target) for v in video]
        size = video[0].image.shape[:2]
        full, full_ms, full_ans, full_iou, full_box = [], [], [], [], []
        for v, box in zip(video, truth):
            emb = tower.embed_each([v.image])[0]
            full_ms.append(tower.last_timings["vision_ms"])
            full.append(emb)
            a, i, b = answers(pipe, emb, target, size, box)
            full_ans.append(a), full_iou.append(i), full_box.append(b)
        prev = [x == y for k in range(1, len(video)) for x, y in zip(full_ans[k], full_ans[k - 1])]
        print(f"{kind:8s} whole: tower {statistics.mean(full_ms[1:]):.1f} ms/frame, target {target!r}, answers equal "
              f"the previous frame's {sum(prev) / len(prev):.2f}")
        for th in [float(t) for t in args.thresholds.split(",")]:
            tt = TemporalTower(tower, TemporalReuse(threshold=th, refresh_every=args.refresh_every,
                                                    context_refresh=args.context_refresh))
            st = CameraState()
            fr, ms, cos_mean, cos_min, agree, ious, same = [], [], [], [], [], [], []
            for k, (v, box) in enumerate(zip(video, truth)):
                (emb, rep), = tt.encode([v.image], [st])
                if k == 0:
                    continue  # both sides encode the first frame whole
                fr.append(rep.fraction)
                ms.append(tt.last_timings["vision_ms"])
                c = torch.nn.functional.cosine_similarity(emb.float(), full[k].float(), dim=-1)
                cos_mean.append(float(c.mean())), cos_min.append(float(c.min()))
                a, i, b = answers(pipe, emb, target, size, box)
                agree += [x == y for x, y in zip(a, full_ans[k])]
                ious.append(i)
                same.append(b is not None and full_box[k] is not None and iou(b, full_box[k]) >= 0.5)
            fm, rm = statistics.mean(full_ms[1:]), statistics.mean(ms)
            row = {**common, "kind": kind, "threshold": th, "reencoded": round(statistics.mean(fr), 3),
                   "full_ms": round(fm, 1), "reuse_ms": round(rm, 1), "speedup": round(fm / rm, 2) if rm else "",
                   "ms_saved": round(fm - rm, 1),
                   "cos_mean": round(statistics.mean(cos_mean), 5), "cos_min": round(min(cos_min), 4),
                   "agree": round(sum(agree) / len(agree), 3), "answers": len(agree),
                   "whole_vs_prev": round(sum(prev) / len(prev), 3), "same_box": round(sum(same) / len(same), 3),
                   "iou_full": round(statistics.mean(full_iou[1:]), 3), "iou_reuse": round(statistics.mean(ious), 3)}
            rows.append(row)
            print(f"{kind:8s} threshold {th:5.1f}: re-encoded {row['reencoded']:.2f}, tower {rm:.1f} vs {fm:.1f} ms "
                  f"({row['speedup']}x), cos mean {row['cos_mean']:.4f} min {row['cos_min']:.3f}, "
                  f"answers agree {row['agree']:.2f} (whole vs previous whole {row['whole_vs_prev']:.2f}), same box "
                  f"{row['same_box']:.2f}, IoU {row['iou_reuse']:.2f} (whole {row['iou_full']:.2f})")
    append_rows(args.out, rows)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
