"""Real English text available offline, for text-only training batches and perplexity checks.

Two sources from two domains, so that the text mixed into training cannot flatter the check:

* **training batches** — Python's own documentation as shipped in the standard library
  (``pydoc_data.topics``, ~460 kB of prose and examples), the text SPHINX-style joint training mixes
  into every step so an unfrozen or adapted LLM keeps its long-text ability;
* **perplexity** — scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``, ~43 kB of
  prose about real data sets), read in a fixed order.

Both are read at run time from installed packages, never copied into this repository.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgevlm.errors import WeightsNotFoundError

HELDOUT_FILES = ("iris", "wine_data", "breast_cancer", "diabetes", "digits", "linnerud", "california_housing",
                 "covtype", "kddcup99", "lfw", "olivetti_faces", "rcv1", "species_distributions",
                 "twenty_newsgroups")


def heldout_text() -> str:
    """The fixed evaluation text (about 10k SmolLM2 tokens), the files of :data:`HELDOUT_FILES` in order."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError("the perplexity text comes from scikit-learn's dataset descriptions; "
                                   "install scikit-learn (it is in edgevlm's [dev] extra)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "descr"
    parts = [(folder / f"{name}.rst").read_text(encoding="utf-8").strip()
             for name in HELDOUT_FILES if (folder / f"{name}.rst").is_file()]
    if len(parts) < len(HELDOUT_FILES) // 2:
        raise WeightsNotFoundError(f"{folder} lacks most of the expected dataset descriptions")
    return "\n\n".join(parts)


def training_paragraphs() -> list[str]:
    """Paragraphs of Python's documentation topics (each at least 200 characters), in a fixed order."""
    import pydoc_data.topics

    out = []
    for _, body in sorted(pydoc_data.topics.topics.items()):
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


__all__ = ["HELDOUT_FILES", "heldout_text", "training_paragraphs", "text_batches"]
