"""Held-out evaluation of a VLM (task metrics through the runtime Pipeline) and perplexity of its LLM.

Evaluation goes through :class:`~edgevlm.runtime.pipeline.Pipeline` — the code path users run — so
the numbers describe the deployed model, not a training-time stand-in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.inference_mode()
def perplexity(decoder, tokenizer, text: str, window: int = 512) -> tuple[float, int]:
    """Perplexity of ``text`` in non-overlapping windows of ``window`` tokens -> (ppl, tokens scored)."""
    ids = tokenizer.encode(text, add_bos=False)
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s: s + window + 1]
        if len(chunk) < 2:
            break
        x = torch.tensor([chunk[:-1]], device=decoder.device)
        logits = decoder(input_ids=x)[0].float()  # [T, V]
        nll += F.cross_entropy(logits, torch.tensor(chunk[1:], device=logits.device), reduction="sum").item()
        n += len(chunk) - 1
    return math.exp(nll / n), n


def evaluate_samples(pipe, samples: Sequence, *, max_new_tokens: int = 80, progress: bool = True,
                     desc: str = "evaluating") -> tuple[dict[str, float], list[dict]]:
    """Greedy answers for ``samples`` -> (aggregate metrics, per-sample records)."""
    from .metrics import aggregate, score

    records, scores = [], []
    t0 = time.perf_counter()
    for s in tqdm(samples, desc=desc, unit="q", disable=not progress):
        out = pipe.generate(s.image, s.question, max_new_tokens=max_new_tokens)
        sc = score(s, out.text)
        scores.append(sc)
        records.append({"task": s.task, "question": s.question, "answer": s.answer, "prediction": out.text,
                        **{k: v for k, v in sc.items() if isinstance(v, (int, float, bool, str))}})
    metrics = aggregate(scores)
    metrics["seconds"] = time.perf_counter() - t0
    return metrics, records


__all__ = ["perplexity", "evaluate_samples"]
