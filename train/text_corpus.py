"""Real English text available offline, for text-only training batches and perplexity checks.

The source is Python's own documentation as shipped in the standard library (``pydoc_data.topics``:
~460 kB of prose and examples about the language), read at run time rather than copied into this
repository. A fixed set of topics is held out for perplexity; the rest feeds the text-only batches
that SPHINX mixes into every step so an unfrozen LLM keeps its long-text ability.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Held out from training: prose-heavy topics, together well over 2,000 tokens.
HELDOUT_TOPICS = ("execmodel", "exceptions", "naming", "import", "typesseq")


def _topics() -> dict[str, str]:
    import pydoc_data.topics

    return dict(pydoc_data.topics.topics)


def heldout_text(min_chars: int = 12_000) -> str:
    """The fixed evaluation text: the held-out topics in order, cut at a paragraph boundary."""
    topics = _topics()
    text = "\n\n".join(topics[t].strip() for t in HELDOUT_TOPICS if t in topics)
    if len(text) < min_chars:
        raise RuntimeError(f"pydoc_data.topics has only {len(text)} characters of held-out text")
    cut = text.find("\n\n", min_chars)
    return text[: cut if cut > 0 else len(text)]


def training_paragraphs() -> list[str]:
    """Paragraphs of the non-held-out topics (each at least 200 characters), in a fixed order."""
    out = []
    for name, body in sorted(_topics().items()):
        if name in HELDOUT_TOPICS:
            continue
        out.extend(p.strip() for p in body.split("\n\n") if len(p.strip()) >= 200)
    return out


def text_batches(tokenizer, seq_len: int, batch_size: int, seed: int) -> Iterator[list[list[int]]]:
    """Endless batches of ``batch_size`` token windows (``seq_len`` ids each) cut from the training
    paragraphs in a seeded order."""
    ids: list[int] = []
    for p in training_paragraphs():
        ids.extend(tokenizer.encode(p + "\n\n"))
    ids_arr = np.asarray(ids, dtype=np.int64)
    n = len(ids_arr) - seq_len - 1
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, n, size=batch_size)
        yield [ids_arr[s: s + seq_len].tolist() for s in starts]


__all__ = ["HELDOUT_TOPICS", "heldout_text", "training_paragraphs", "text_batches"]
