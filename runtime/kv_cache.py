"""A preallocated key/value cache for :class:`~edgevlm.runtime.decoder.Decoder`.

Layout: one K and one V tensor of shape ``[layers, batch, kv_heads, max_len, head_dim]``, allocated
once. Shapes never change while generating, which is what lets a later backend capture the decode
step in a CUDA graph over these very buffers. Every sequence of the batch has the same ``length``
(no per-row padding): the runtime serves one conversation at a time.

Writing protocol (what the decoder does in one forward over T new tokens)::

    start = cache.reserve(T)             # checks room, returns the write offset (= cache.length)
    for each layer i:
        k_all, v_all = cache.write(i, start, k, v)   # [B, Hkv, start + T, Dh] views of the buffers
    cache.commit(start + T)              # only now does `length` move

Committing once after all layers means a forward that fails half-way leaves ``length`` untouched.
``truncate(n)`` rewinds to a prefix (multi-turn reuse: keep the system prompt and the earlier turns,
re-run only what changed); stale entries past ``length`` are never read, so nothing is cleared.
"""

from __future__ import annotations

import torch

from edgevlm.config import DecoderConfig
from edgevlm.errors import ShapeError


class ContextLengthError(ShapeError):
    """A sequence would not fit the context (the KV cache or the model's ``max_seq_len``)."""


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, v in (("layers", layers), ("batch", batch), ("kv_heads", kv_heads), ("max_len", max_len),
                        ("head_dim", head_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ShapeError(f"KVCache {name} must be a positive int, got {v!r}")
        self._allocate((layers, batch, kv_heads, max_len, head_dim), dtype, device)
        self.length = 0

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S_max, Dh]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S_max, Dh]

    @classmethod
    def for_config(cls, cfg: DecoderConfig, batch: int = 1, max_len: int | None = None,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "KVCache":
        """A cache for ``cfg``; ``max_len`` defaults to (and may not exceed) ``cfg.max_seq_len``."""
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ContextLengthError(f"KV cache max_len {max_len} exceeds the decoder's max_seq_len {cfg.max_seq_len}")
        return cls(cfg.layers, batch, cfg.kv_heads, max_len, cfg.head_dim, dtype=dtype, device=device)

    # ---- shape facts --------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def free(self) -> int:
        return self.max_len - self.length

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def dtype(self) -> torch.dtype:
        """The dtype ``write`` returns (what attention computes in)."""
        return self.k.dtype

    # ---- bookkeeping ------------------------------------------------------------------------
    def reset(self) -> None:
        self.length = 0

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions (0 <= n <= length)."""
        if not isinstance(n, int) or not 0 <= n <= self.length:
            raise ShapeError(f"cannot truncate a KV cache holding {self.length} positions to {n!r}")
        self.length = n

    def reserve(self, t: int) -> int:
        """Check that ``t`` more positions fit; return the offset they will be written at."""
        if self.length + t > self.max_len:
            raise ContextLengthError(
                f"KV cache overflow: {self.length} cached + {t} new = {self.length + t} positions "
                f"exceed the cache size max_len={self.max_len}")
        return self.length

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ``[B, Hkv, T, Dh]`` at positions ``start..start+T`` of ``layer``.

        Returns views ``[B, Hkv, start + T, Dh]`` of everything cached for that layer so far.
        """
        end = self._check_write(start, k, v)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def _check_write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Shape and room checks of a write; returns its end position."""
        b, h, t, d = k.shape
        if (b, h, d) != (self.batch, self.kv_heads, self.head_dim) or v.shape != k.shape:
            raise ShapeError(f"KV cache holds [batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}]"
                             f" entries, got k {tuple(k.shape)} and v {tuple(v.shape)}")
        if start + t > self.max_len:
            raise ContextLengthError(f"KV cache overflow: writing positions {start}..{start + t} exceeds the cache "
                                     f"size max_len={self.max_len}")
        return start + t

    def commit(self, length: int) -> None:
        if not 0 <= length <= self.max_len:
            raise ContextLengthError(f"KV cache length {length} outside 0..max_len={self.max_len}")
        self.length = length

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.layers}, batch={self.batch}, kv_heads={self.kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}, length={self.length}, dtype={self.k.dtype})")


class Int8KVCache(KVCache):
    """K/V stored as int8 with one fp32 scale per (layer, row, head, position): a quarter of an fp32
    cache's memory (plus 1/16 for scales at head_dim 64), for long contexts on small devices.

    Each new K/V vector is quantised symmetrically (``scale = max|x| / 127``) when written; ``write``
    returns the cached prefix dequantised to ``dtype``. That dequantisation is a pass over the prefix
    per layer per step, so this cache trades time for memory on CPU; it changes no shapes, so
    prefix reuse and truncation work as with :class:`KVCache`.
    """

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        self._dtype = dtype
        self.k = torch.zeros(shape, dtype=torch.int8, device=device)  # [L, B, Hkv, S_max, Dh]
        self.v = torch.zeros(shape, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device)  # [L, B, Hkv, S_max, 1]
        self.v_scale = torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * (self.k.numel() + self.k_scale.numel() * 4)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.float().abs().amax(-1, keepdim=True) / 127.0  # [B, Hkv, T, 1]
        q = torch.round(x.float() / scale.clamp_min(1e-30)).clamp_(-127, 127).to(torch.int8)
        return q, scale

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._check_write(start, k, v)
        for store, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self._quantize(x)
            store[layer, :, :, start:end] = q
            scales[layer, :, :, start:end] = s
        k_all = (self.k[layer, :, :, :end].float() * self.k_scale[layer, :, :, :end]).to(self._dtype)
        v_all = (self.v[layer, :, :, :end].float() * self.v_scale[layer, :, :, :end]).to(self._dtype)
        return k_all, v_all  # [B, Hkv, end, Dh]


__all__ = ["KVCache", "Int8KVCache", "ContextLengthError"]
