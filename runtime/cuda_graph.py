"""One decode step of :class:`~edgevlm.runtime.decoder.Decoder` with static shapes, for CUDA graphs.

A decode step of a small model is launch-bound: ~10 kernels per layer, each a few microseconds of
work behind tens of microseconds of Python and launch overhead. A ``torch.cuda.CUDAGraph`` replays
all of them in one launch, but only if nothing in the step depends on a Python value that changes
from step to step. The ordinary cached path has three such values (the write offset ``start``, the
slice ``[:start + 1]`` of the cache that attention reads, and the RoPE positions built from
``start``), so this step keeps them all on the device instead::

    token    long [1, 1]     static input, copied in before each replay
    position long [1]        static input: where the new K/V go and what the token may attend to
    K/V                      written with index_copy_(dim=2, position) into the KVCache buffers
    mask     bool [1, 1, 1, S_max] = arange(S_max) <= position, built on device
    attention over the whole [B, Hkv, S_max, Dh] cache; masked positions weigh exactly 0
    logits   [1, V]          static output of the captured graph

The step reuses the decoder's own modules (embedding, norms, projections, rotary, ``lm_head``), so a
quantised or module-swapped decoder (:func:`~edgevlm.runtime.quant.quantize_decoder`,
:func:`~edgevlm.runtime.quant.swap_linears_for_triton`) is graphed as it is; only the attention
glue is written out here, because ``Attention.forward`` slices the cache with a Python int.

Attention reads all ``max_len`` cached positions every step (stale ones masked), so size the cache
to the conversation, not to the model's context. Dynamic-NTK RoPE is refused: its base depends on
the sequence length, a Python value. On CPU ``capture()`` is refused and the same code runs eagerly,
which is how the tests check it against the ordinary cached path.

Use::

    cache = decoder.new_cache(max_len=512)
    logits = decoder(prompt_ids, cache=cache, last_only=True)       # prefill, ordinary path
    step = GraphedDecodeStep(decoder, cache)
    step.capture()                                                   # CUDA only
    for _ in range(n):
        token = logits[:, -1].argmax(-1)                             # stays on the device
        logits = step(token, cache.length)                           # [1, V]; commits the position
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.errors import BackendUnavailableError, ConfigError, ShapeError

from .decoder import Decoder, apply_rope
from .kv_cache import ContextLengthError, KVCache


class GraphedDecodeStep:
    """A one-token decode step over a static :class:`KVCache` (batch 1), capturable in a CUDA graph."""

    def __init__(self, decoder: Decoder, cache: KVCache, warmup: int = 3) -> None:
        cfg = decoder.cfg
        if decoder.rotary is not None and decoder.rotary.length_dependent:
            raise ConfigError(f"GraphedDecodeStep cannot run rope_scaling={cfg.rope_scaling!r}: its frequencies depend "
                              "on the sequence length, which a captured step cannot see; use the ordinary cached "
                              "decoder path")
        if cache.batch != 1:
            raise ShapeError(f"GraphedDecodeStep decodes one sequence; the KV cache has batch {cache.batch}")
        if (cache.layers, cache.kv_heads, cache.head_dim) != (cfg.layers, cfg.kv_heads, cfg.head_dim):
            raise ShapeError(f"KV cache [layers={cache.layers}, kv_heads={cache.kv_heads}, head_dim={cache.head_dim}] "
                             f"does not fit the decoder [{cfg.layers}, {cfg.kv_heads}, {cfg.head_dim}]")
        if cache.k.device != decoder.device or cache.k.dtype != decoder.dtype:
            raise ShapeError(f"KV cache is {cache.k.dtype} on {cache.k.device}, the decoder {decoder.dtype} on "
                             f"{decoder.device}")
        self.decoder, self.cache, self.warmup = decoder, cache, warmup
        dev = decoder.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)  # [1, 1] static input
        self.position = torch.zeros(1, dtype=torch.long, device=dev)  # [1] static input
        self.key_positions = torch.arange(cache.max_len, device=dev)  # [S_max]
        if decoder.rotary is not None:
            decoder.rotary.inv_freq(self.position.device)  # the device copy must exist before capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [1, V] static output once captured

    # ---- the step itself: no Python value in here changes between steps ------------------------
    def _attend(self, attn: nn.Module, x: torch.Tensor, rope: tuple | None, mask: torch.Tensor) -> torch.Tensor:
        # Attention.forward with the cache write and read made position-independent. x [1, 1, D]
        h, hkv, dh = attn.heads, attn.kv_heads, attn.head_dim
        q = attn.q_proj(x).view(1, 1, h, dh).transpose(1, 2)  # [1, H, 1, Dh]
        k = attn.k_proj(x).view(1, 1, hkv, dh).transpose(1, 2)  # [1, Hkv, 1, Dh]
        v = attn.v_proj(x).view(1, 1, hkv, dh).transpose(1, 2)  # [1, Hkv, 1, Dh]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_all, v_all = self.cache.k[attn.layer_idx], self.cache.v[attn.layer_idx]  # [1, Hkv, S_max, Dh] views
        k_all.index_copy_(2, self.position, k)
        v_all.index_copy_(2, self.position, v)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=hkv != h)  # [1, H, 1, Dh]
        return attn.o_proj(out.transpose(1, 2).reshape(1, 1, h * dh))

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        dec = self.decoder
        x = dec.embed(self.token)  # [1, 1, D]
        x, rope = dec.positional(x, self.position)  # rope: (cos, sin) [1, 1, 1, Dr], or None
        # Keys at or before the position; the entries past it are stale or empty and weigh exactly 0.
        mask = (self.key_positions <= self.position)[None, None, None, :]  # [1, 1, 1, S_max]
        for layer in dec.layers:
            x = x + self._attend(layer.attn, layer.attn_norm(x), rope, mask)
            x = x + layer.mlp(layer.mlp_norm(x))
        return dec.lm_head(dec.norm(x))[:, -1]  # [1, V]

    # ---- capture and replay -------------------------------------------------------------------
    def capture(self) -> None:
        """Warm up on a side stream (lazy inits, Triton compilation, cuBLAS workspaces) and capture one
        step. The warm-up really runs, writing K/V at the static position: it is set to the next free
        slot, which the first real step overwrites before anything reads it."""
        if self.decoder.device.type != "cuda":
            raise BackendUnavailableError(f"CUDA graphs need a CUDA decoder; this one is on {self.decoder.device} "
                                          "(call the step without capture() to run it eagerly)")
        if self.cache.free == 0:
            raise ContextLengthError(f"KV cache is full ({self.cache.max_len} positions): nowhere to warm up")
        self.position.fill_(self.cache.length)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph

    def __call__(self, token_id: int | torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Decode ``token_id`` at ``position`` -> logits ``[1, V]`` (the static output buffer once
        captured: valid until the next call, clone it to keep it).

        An int ``position`` is checked against the cache and committed (``cache.length`` becomes
        ``position + 1``), so the ordinary decoder path can carry on afterwards. A tensor position is
        copied without a check or a commit: reading it would wait for the device."""
        if isinstance(token_id, torch.Tensor):
            self.token.copy_(token_id.reshape(1, 1))
        else:
            self.token.fill_(int(token_id))
        if isinstance(position, torch.Tensor):
            self.position.copy_(position.reshape(1))
        else:
            if not 0 <= position <= self.cache.length or position >= self.cache.max_len:
                raise ContextLengthError(f"decode position {position} must be in 0..{self.cache.length} (the cached "
                                         f"length) and below the cache size {self.cache.max_len}")
            self.position.fill_(position)
        if self.graph is None:
            out = self._step()
        else:
            self.graph.replay()
            out = self.logits
        if not isinstance(position, torch.Tensor):
            self.cache.commit(position + 1)
        return out


__all__ = ["GraphedDecodeStep"]
