"""Visual embeddings remembered by image content, so asking again about the same picture skips the
vision tower.

Keys are SHA-1 digests of the decoded pixels (shape included), taken after decoding, so a path, a PIL
image and an array of the same picture share one entry. SHA-1 because CPUs with SHA extensions hash a
1920x1080 RGB frame in about 3 ms -- small beside the tower, but not free: a camera loop whose frames
never repeat can turn the cache off (``capacity_bytes=0``), which also skips the hashing.

A tower whose Q-Former reads the prompt (InstructBLIP) keys on the instruction's token ids too
(:func:`instruction_digest`): the same picture under two prompts is two entries.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch


def image_digest(array: np.ndarray) -> str:
    """Content key of a decoded HWC uint8 image."""
    h = hashlib.sha1(repr((array.shape, str(array.dtype))).encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """Content key of a tensor's values (its bytes as stored; dtype and shape included)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha1(repr((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def instruction_digest(image_key: str, instruction_ids: Sequence[int] | None) -> str:
    """Key of an image's embedding made with an instruction (an InstructBLIP Q-Former reads the prompt):
    ``image_key`` itself without one, else a digest of both, so two prompts on one image never share an
    entry. Keyed on the real token ids (padding excluded): the embedding does not depend on the batch."""
    if instruction_ids is None:
        return image_key
    h = hashlib.sha1(image_key.encode())
    h.update(b"\0instruction:")
    h.update(np.asarray(list(instruction_ids), dtype=np.int64).tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """Least-recently-used map digest -> embedding tensor, bounded by the tensors' total bytes."""

    def __init__(self, capacity_bytes: int = 64 << 20):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.capacity_bytes:  # would evict everything and still not fit
            return
        if key in self._items:
            old = self._items.pop(key)
            self.nbytes -= old.numel() * old.element_size()
        self._items[key] = value
        self.nbytes += size
        while self.nbytes > self.capacity_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


__all__ = ["EmbeddingCache", "image_digest", "instruction_digest", "tensor_digest"]
