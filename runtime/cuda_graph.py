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

Attention reads the first ``bucket`` cached positions every step (stale ones masked; all ``max_len``
by default), so a step captured for a short bucket costs less than one over the whole cache:
:class:`DecodeGraphs` keeps one captured step per bucket and moves up as the context grows. With a
``pick`` function the step also chooses the next token on the device (greedy, or sampling from a
uniform number drawn before each replay), so nothing but the token id comes back to the host.
Dynamic-NTK RoPE is refused: its base depends on the sequence length, a Python value. On CPU
``capture()`` is refused and the same code runs eagerly, which is how the tests check it against the
ordinary cached path.

Use::

    cache = decoder.new_cache(max_len=512)
    logits = decoder(prompt_ids, cache=cache, last_only=True)       # prefill, ordinary path
    step = GraphedDecodeStep(decoder, cache)
    step.capture()                                                   # CUDA only
    for _ in range(n):
        token = logits[:, -1].argmax(-1)                             # stays on the device
        logits = step(token, cache.length)                           # [1, V]; commits the position

What a Pipeline uses (``decode_graphs="on"``), through :func:`~.generate.generate_tokens`::

    graphs = DecodeGraphs(decoder, cache)                            # buckets 128, 256, ... max_len
    graphs.warm()                                                    # capture the greedy steps now
    next_id = graphs(token_id, cache.length, sampler)                # int; commits the position
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.errors import BackendUnavailableError, ConfigError, ShapeError

from .decoder import Decoder, apply_rope
from .kv_cache import ContextLengthError, KVCache


@dataclass(frozen=True)
class StepInputs:
    """The static inputs of a step, shared by every step captured over one cache."""

    token: torch.Tensor  # long [1, 1]
    position: torch.Tensor  # long [1]
    uniform: torch.Tensor  # float32 [1, 1]: the draw a sampling step turns into a token

    @classmethod
    def on(cls, device: torch.device) -> "StepInputs":
        return cls(torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device),
                   torch.zeros(1, 1, dtype=torch.float32, device=device))


Pick = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [1, V], uniform [1, 1]) -> token [1]


class GraphedDecodeStep:
    """A one-token decode step over a static :class:`KVCache` (batch 1), capturable in a CUDA graph.

    ``bucket``: cache positions attention reads (default all ``max_len``); positions at or past it are
    refused. ``pick``: also choose the next token in the step, which then returns token ids ``[1]``
    instead of logits. ``inputs`` / ``pool``: static inputs and a graph memory pool shared with other
    steps over the same cache (:class:`DecodeGraphs`)."""

    def __init__(self, decoder: Decoder, cache: KVCache, warmup: int = 3, *, bucket: int | None = None,
                 pick: Pick | None = None, inputs: StepInputs | None = None, pool=None) -> None:
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
        bucket = cache.max_len if bucket is None else bucket
        if not 0 < bucket <= cache.max_len:
            raise ShapeError(f"bucket must be in 1..{cache.max_len} (the KV cache size), got {bucket}")
        self.decoder, self.cache, self.warmup = decoder, cache, warmup
        self.bucket, self.pick, self.pool = bucket, pick, pool
        dev = decoder.device
        self.inputs = inputs if inputs is not None else StepInputs.on(dev)
        self.token, self.position = self.inputs.token, self.inputs.position  # [1, 1], [1] static inputs
        self.key_positions = torch.arange(bucket, device=dev)  # [S_b]
        if decoder.rotary is not None:
            decoder.rotary.inv_freq(self.position.device)  # the device copy must exist before capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [1, V] (or the token [1] with pick) static output once captured

    # ---- the step itself: no Python value in here changes between steps ------------------------
    def _attend(self, attn: nn.Module, x: torch.Tensor, rope: tuple | None, mask: torch.Tensor) -> torch.Tensor:
        # Attention.forward with the cache write and read made position-independent. x [1, 1, D]
        h, hkv, dh = attn.heads, attn.kv_heads, attn.head_dim
        q = attn.q_proj(x).view(1, 1, h, dh).transpose(1, 2)  # [1, H, 1, Dh]
        k = attn.k_proj(x).view(1, 1, hkv, dh).transpose(1, 2)  # [1, Hkv, 1, Dh]
        v = attn.v_proj(x).view(1, 1, hkv, dh).transpose(1, 2)  # [1, Hkv, 1, Dh]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        i, b = attn.layer_idx, self.bucket
        k_all, v_all = self.cache.k[i, :, :, :b], self.cache.v[i, :, :, :b]  # [1, Hkv, S_b, Dh] views
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
        mask = (self.key_positions <= self.position)[None, None, None, :]  # [1, 1, 1, S_b]
        for layer in dec.layers:
            x = x + self._attend(layer.attn, layer.attn_norm(x), rope, mask)
            x = x + layer.mlp(layer.mlp_norm(x))
        logits = dec.lm_head(dec.norm(x))[:, -1]  # [1, V]
        return logits if self.pick is None else self.pick(logits, self.inputs.uniform)  # [1, V] or token [1]

    # ---- capture and replay -------------------------------------------------------------------
    def capture(self) -> None:
        """Warm up on a side stream (lazy inits, Triton compilation, cuBLAS workspaces) and capture one
        step. The warm-up really runs, writing K/V at the static position: it is set to the next free
        slot, which the first real step overwrites before anything reads it."""
        if self.decoder.device.type != "cuda":
            raise BackendUnavailableError(f"CUDA graphs need a CUDA decoder; this one is on {self.decoder.device} "
                                          "(call the step without capture() to run it eagerly)")
        if self.cache.free == 0 or self.cache.length >= self.bucket:
            raise ContextLengthError(f"the next free position {self.cache.length} is past the {self.bucket} positions "
                                     "this step reads: nowhere to warm up")
        self.position.fill_(self.cache.length)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits = self._step()
        self.graph = graph

    def __call__(self, token_id: int | torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Decode ``token_id`` at ``position`` -> logits ``[1, V]``, or with ``pick`` the next token ``[1]``
        (the static output buffer once captured: valid until the next call, clone it to keep it).

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
            if not 0 <= position <= self.cache.length or position >= self.bucket:
                raise ContextLengthError(f"decode position {position} must be in 0..{self.cache.length} (the cached "
                                         f"length) and below the {self.bucket} positions this step reads")
            self.position.fill_(position)
        if self.graph is None:
            out = self._step()
        else:
            self.graph.replay()
            out = self.logits
        if not isinstance(position, torch.Tensor):
            self.cache.commit(position + 1)
        return out


class DecodeGraphs:
    """Captured decode steps over one static :class:`KVCache`: one per context bucket and sampling
    setting, sharing their static inputs and one graph memory pool; what ``generate_tokens`` decodes
    through when given ``graphs=``.

    ``buckets``: the context lengths a step reads, ascending, the last the cache size (default: 128,
    256, ... doubling, then ``max_len``). A step for position p is the smallest bucket above p, so a
    short answer reads a short cache. Each (bucket, sampling) step is captured the first time it is
    needed, or ahead of time by :meth:`warm`; ``capture_ms`` adds up what capturing took, so a caller
    can report it apart from the decode time. ``capture=False`` runs the same steps without graphs (any
    device): the tests compare it with the ordinary path, and it isolates a graph problem from a
    static-shape one."""

    def __init__(self, decoder: Decoder, cache: KVCache, *, buckets: tuple[int, ...] | None = None,
                 capture: bool = True) -> None:
        if capture and decoder.device.type != "cuda":
            raise BackendUnavailableError(f"CUDA graphs need a CUDA decoder; this one is on {decoder.device} "
                                          "(capture=False runs the same steps without graphs)")
        top = cache.max_len
        if buckets is None:
            buckets, b = [], 128
            while b < top:
                buckets.append(b)
                b *= 2
            buckets = (*buckets, top)
        buckets = tuple(int(b) for b in buckets)
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] != top:
            raise ConfigError(f"buckets must ascend from >= 1 and end at the KV cache size {top}, got {buckets}")
        self.decoder, self.cache, self.buckets, self.capture = decoder, cache, buckets, capture
        self.inputs = StepInputs.on(decoder.device)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps: dict[tuple[int, tuple], GraphedDecodeStep] = {}
        self.capture_ms = 0.0
        GraphedDecodeStep(decoder, cache, bucket=1, inputs=self.inputs)  # refuses what no step can run, now

    def bucket_for(self, position: int) -> int:
        """The smallest bucket that holds ``position`` (positions 0..bucket-1)."""
        for b in self.buckets:
            if position < b:
                return b
        raise ContextLengthError(f"decode position {position} is past the KV cache size {self.cache.max_len}")

    def _step(self, bucket: int, sampler) -> GraphedDecodeStep:
        key = (bucket, sampler.key)
        step = self.steps.get(key)
        if step is None:
            step = GraphedDecodeStep(self.decoder, self.cache, bucket=bucket, pick=sampler.pick,
                                     inputs=self.inputs, pool=self.pool)
            if self.capture:
                t0 = time.perf_counter()
                step.capture()
                torch.cuda.synchronize(self.decoder.device)
                self.capture_ms += (time.perf_counter() - t0) * 1e3
            self.steps[key] = step
        return step

    def warm(self, sampler=None) -> float:
        """Capture every bucket's step for ``sampler`` (default: greedy) now; -> ms it took."""
        from .generate import GenerationConfig, Sampler

        sampler = sampler if sampler is not None else Sampler(GenerationConfig(), device=self.decoder.device)
        before = self.capture_ms
        length = self.cache.length
        for b in self.buckets:
            if length < b:  # a capture warms up at the next free position, which must be inside the bucket
                self._step(b, sampler)
        return self.capture_ms - before

    def __call__(self, token_id: int, position: int, sampler) -> int:
        """Decode ``token_id`` at ``position`` (the cache's length) and pick the next token with
        ``sampler`` (:class:`~.generate.Sampler`) -> its id. Commits the position."""
        if position != self.cache.length:
            raise ContextLengthError(f"decode position {position} must be the cached length {self.cache.length}")
        step = self._step(self.bucket_for(position), sampler)
        if not sampler.greedy:
            self.inputs.uniform.copy_(sampler.uniform())
        return int(step(token_id, position)[0])  # int() waits for the device

    def info(self) -> dict:
        return {"buckets": list(self.buckets), "captured": len(self.steps) if self.capture else 0,
                "capture_ms": round(self.capture_ms, 1), "graphs": self.capture}


__all__ = ["GraphedDecodeStep", "StepInputs", "DecodeGraphs"]
