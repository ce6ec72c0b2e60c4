"""An image already through a vision tower, handed to a Pipeline in place of the image.

A robot can run the tower where the camera is (its exported ONNX / TensorRT graph, or an embedded
``VisionTower``) and send only the embedding to a server that decodes (``edgevlm serve``; the role of
TensorRT-LLM's prompt table and Dynamo's precomputed embeddings)::

    emb = ImageEmbedding.of(tower, frame)        # [visual_tokens, decoder width], with its digest
    pipe.generate(emb, "What is on the table?")  # same answer as pipe.generate(frame, ...)

The digest (SHA-1 of the values, dtype and shape: :func:`~.embed_cache.tensor_digest`) keys the KV
prefix reuse exactly as an image's embedding does; one that is sent along is checked against the
values, so a tensor damaged on the way is refused rather than answered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgevlm.errors import ShapeError

from .embed_cache import tensor_digest


@dataclass(frozen=True)
class ImageEmbedding:
    """``tokens`` [visual_tokens, width]: what the tower gives for one image; ``digest``: its
    :func:`~.embed_cache.tensor_digest` (computed when None, checked when given)."""

    tokens: torch.Tensor
    digest: str | None = None

    def __post_init__(self) -> None:
        t = self.tokens
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1 or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShapeError(f"an image embedding is a float tensor [visual_tokens, width], got {shape}")
        actual = tensor_digest(t)
        if self.digest is not None and self.digest != actual:
            raise ShapeError(f"the image embedding's values do not match its digest {self.digest[:12]}... "
                             f"(they hash to {actual[:12]}...): damaged on the way?")
        object.__setattr__(self, "digest", actual)

    @classmethod
    def of(cls, tower, image) -> "ImageEmbedding":
        """Runs ``tower`` (a :class:`~.tower.VisionTower`) on one image."""
        return cls(tower.embed_each([image])[0])


__all__ = ["ImageEmbedding"]
