"""The tower's image-embedding cache: keyed by decoded content, bounded by bytes, least recently used
out first, and off (no hashing, no entries) at capacity 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm.runtime.embed_cache import EmbeddingCache, image_digest


def test_lru_by_bytes():
    c = EmbeddingCache(capacity_bytes=3 * 400)  # room for three [10, 10] float32 tensors
    t = {k: torch.full((10, 10), float(i)) for i, k in enumerate("abcd")}
    for k in "abc":
        c.put(k, t[k])
    assert c.get("a") is t["a"]  # a is now the most recent
    c.put("d", t["d"])  # evicts b, the least recently used
    assert c.get("b") is None and len(c) == 3 and c.nbytes == 1200
    c.put("a", torch.zeros(10, 10))  # replacing keeps the byte count right
    assert c.nbytes == 1200 and c.get("a").sum() == 0
    c.put("huge", torch.zeros(100, 100))  # larger than the whole cache: not stored, nothing evicted
    assert c.get("huge") is None and len(c) == 3
    assert (c.hits, c.misses) == (2, 2)
    with pytest.raises(ValueError):
        EmbeddingCache(-1)


def test_digest_follows_content_and_shape():
    a = np.zeros((4, 6, 3), np.uint8)
    assert image_digest(a) == image_digest(a.copy())
    assert image_digest(a) != image_digest(a.reshape(6, 4, 3))
    b = a.copy()
    b[3, 5, 2] = 1
    assert image_digest(a) != image_digest(b)


def test_tower_reuses_and_can_turn_off(tmp_path):
    pipe = edgevlm.load("tiny")
    tower = pipe.tower
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    first = tower.embed_each([img])[0]
    assert tower.last_timings["cached_images"] == 0
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "same.png")  # same pixels by another route: same entry
    again = tower.embed_each([str(tmp_path / "same.png"), img[::-1].copy()])
    assert tower.last_timings["cached_images"] == 1
    assert torch.equal(again[0], first) and not torch.equal(again[1], first)

    off = edgevlm.load("tiny", embedding_cache_bytes=0)
    off.tower.embed_each([img])
    off.tower.embed_each([img])
    assert off.tower.last_timings["cached_images"] == 0 and len(off.tower.embedding_cache) == 0
    with pytest.raises(edgevlm.ConfigError, match="embedding_cache_bytes"):
        edgevlm.load("tiny", embedding_cache_bytes=-5)


def test_tensor_digest_follows_values_dtype_and_shape():
    from edgevlm.runtime.embed_cache import tensor_digest

    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t) != tensor_digest(t.view(4, 3))
    assert tensor_digest(t) != tensor_digest(t.to(torch.bfloat16))
    assert tensor_digest(t.t()) == tensor_digest(t.t().contiguous())  # layout does not matter, values do
