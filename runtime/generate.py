"""The generation loop: prefill once, then decode one token at a time over a KV cache.

A Pipeline drives it with prompt ids, or with prompt embeddings in which image embeddings were
already spliced (``decoder.embed(ids)`` with rows replaced)::

    cache = decoder.new_cache(max_len=2048)
    stream = generate_tokens(decoder, cache, prompt_embeds=embeds, gen_cfg=GenerationConfig(...))
    matcher = StopStringMatcher(["</answer>"])
    for tok in stream:                              # token ids, stop ids never yielded
        text, stopped = matcher.feed(detok.piece(tok))
        ...; if stopped: break                      # breaking out ends generation
    stream.stats                                    # prefill ms, per-token decode ms, stop reason

The prompt continues whatever ``cache`` holds when ``continue_cache=True`` (multi-turn reuse: truncate
the cache to the shared prefix and pass only the new tokens); by default the cache is reset first.
When generation ends the cache holds the prompt and every yielded token except the last one (it was
never fed back), i.e. ``stats.prompt_tokens + stats.new_tokens - 1`` positions after the prefix.

Stop *strings* depend on detokenisation, which is the caller's; :class:`StopStringMatcher` does the
text side. Batch size is 1.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from edgevlm.errors import ConfigError, ShapeError

from .decoder import Decoder
from .kv_cache import ContextLengthError, KVCache
from .quant import kernel_threads


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Sampling settings. ``temperature == 0`` is greedy (top_k/top_p ignored); ``top_k == 0`` and
    ``top_p == 1`` disable those filters; ``seed=None`` draws a fresh seed per call."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class Sampler:
    """Picks the next token from logits ``[B, V]`` -> ids ``[B]``.

    Sampling order follows transformers' warpers: temperature, then top-k, then top-p (nucleus: the
    smallest set of most likely tokens whose probability reaches ``top_p``; the top token always
    stays). A draw is one uniform number per row from a private ``torch.Generator`` (a seed reproduces
    a run exactly and nothing else's randomness is disturbed), turned into a token by the inverse of
    the filtered distribution's CDF in :meth:`pick`: device-side ops only, so a captured decode step
    (:class:`~.cuda_graph.DecodeGraphs`) samples exactly as the ordinary path does.
    """

    def __init__(self, cfg: GenerationConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.seed if cfg.seed is not None else random.randrange(2**63))

    @property
    def greedy(self) -> bool:
        return self.cfg.temperature == 0

    @property
    def key(self) -> tuple:
        """What a captured step bakes in: the filters, not the seed."""
        return ("greedy",) if self.greedy else (self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits with filtered-out tokens at -inf (fp32), ``[B, V]``."""
        x = logits.float() / self.cfg.temperature
        if 0 < self.cfg.top_k < x.shape[-1]:
            kth = torch.topk(x, self.cfg.top_k, dim=-1).values[..., -1:]  # [B, 1]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.cfg.top_p < 1:
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = sorted_x.softmax(-1)
            # drop a token when the tokens above it already reach top_p
            drop = probs.cumsum(-1) - probs >= self.cfg.top_p
            drop[..., 0] = False
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return x

    def uniform(self, rows: int = 1) -> torch.Tensor:
        """The next draws, ``[rows, 1]`` in [0, 1), on the generator's device."""
        return torch.rand(rows, 1, generator=self.generator, device=self.generator.device)

    def pick(self, logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` and draws ``[B, 1]`` -> token ids ``[B]`` (argmax when greedy)."""
        if self.greedy:
            return logits.argmax(-1)
        probs = self.filtered_logits(logits).softmax(-1)  # [B, V], zero where filtered
        cdf = probs.cumsum(-1)
        # the first token whose CDF passes the draw: it has probability > 0, since the CDF rises there
        ids = (cdf <= uniform * cdf[..., -1:]).sum(-1).clamp_(max=probs.shape[-1] - 1)  # [B]
        # a draw within rounding of 1 can land on a zero-probability tail; the top token stands in
        chosen = probs.gather(-1, ids[:, None]).squeeze(-1)
        return torch.where(chosen > 0, ids, probs.argmax(-1))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        return self.pick(logits, self.uniform(logits.shape[0]).to(logits.device))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_prefix: int = 0  # positions already in the cache before this prompt
    new_tokens: int = 0  # tokens yielded
    prefill_ms: float = 0.0  # prompt forward + first sample (time to first token)
    decode_ms: list[float] = field(default_factory=list)  # one entry per token fed back (a forced chunk shares its step)
    stop_reason: str = ""  # "stop_token" | "max_new_tokens" | "callback" | "closed" (caller stopped iterating)
    stop_token: int | None = None
    capture_ms: float = 0.0  # CUDA-graph capture done during this call (lazily), not counted in decode_ms

    @property
    def mean_decode_ms(self) -> float:
        return sum(self.decode_ms) / len(self.decode_ms) if self.decode_ms else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 / self.mean_decode_ms if self.decode_ms else 0.0


class TokenStream(Iterator[int]):
    """The iterator :func:`generate_tokens` returns: yields token ids, exposes ``stats`` (filled as it
    runs) and ``tokens`` (everything yielded so far). ``close()`` (or dropping it) ends generation."""

    def __init__(self, gen: Iterator[int], stats: GenerationStats) -> None:
        self._gen, self.stats, self.tokens = gen, stats, []

    def __next__(self) -> int:
        tok = next(self._gen)
        self.tokens.append(tok)
        return tok

    def close(self) -> None:
        self._gen.close()


def _check_prompt(model: Decoder, cache: KVCache, prompt_ids, prompt_embeds) -> torch.Tensor:
    """-> embeddings [1, T, D] on the model's device and dtype."""
    if (prompt_ids is None) == (prompt_embeds is None):
        raise ShapeError("pass exactly one of prompt_ids [T] / [1, T] and prompt_embeds [T, D] / [1, T, D]")
    if cache.batch != 1:
        raise ShapeError(f"generate_tokens runs batch 1; the KV cache was built for batch {cache.batch}")
    if prompt_ids is not None:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ShapeError(f"prompt_ids must be [T] or [1, T] with T > 0, got {tuple(ids.shape)}")
        vocab = model.cfg.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:  # an embedding lookup out of range would crash CUDA
            raise ShapeError(f"prompt_ids must lie in [0, {vocab}), got min {int(ids.min())} max {int(ids.max())}")
        with torch.inference_mode():
            return model.embed(ids.to(model.device))
    emb = prompt_embeds[None] if prompt_embeds.dim() == 2 else prompt_embeds
    if emb.dim() != 3 or emb.shape[0] != 1 or emb.shape[1] == 0 or emb.shape[2] != model.cfg.hidden:
        raise ShapeError(f"prompt_embeds must be [T, {model.cfg.hidden}] or [1, T, {model.cfg.hidden}] with T > 0, "
                         f"got {tuple(prompt_embeds.shape)}")
    return emb.to(device=model.device, dtype=model.dtype)


def generate_tokens(model: Decoder, cache: KVCache, prompt_ids: torch.Tensor | Sequence[int] | None = None,
                    prompt_embeds: torch.Tensor | None = None, gen_cfg: GenerationConfig = GenerationConfig(),
                    on_token: Callable[[int], bool | None] | None = None, *,
                    continue_cache: bool = False,
                    force: Callable[[int], Sequence[int]] | None = None,
                    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    graphs: "DecodeGraphs | None" = None,  # noqa: F821
                    fused: "FusedDecodeStep | None" = None) -> TokenStream:  # noqa: F821
    """Stream generated token ids. Checks happen here, before anything runs:

    - the prompt (ids or embeddings, batch 1) is well formed;
    - cached prefix + prompt + ``max_new_tokens`` fits both the KV cache and ``max_seq_len``
      (:class:`~edgevlm.runtime.kv_cache.ContextLengthError`, a ShapeError, naming both lengths).

    Generation stops at a token in ``stop_token_ids`` (not yielded), after ``max_new_tokens``, when
    ``on_token(id)`` returns True (that token is yielded first), or when the caller stops iterating.

    ``force(id)``: token ids to put after ``id`` instead of sampling them (a grounding head writing a
    box, :class:`~.grounding_head.BoxWriter`); they are yielded and counted like sampled ones, fed to
    the decoder in one forward, and decoding goes on from the last of them.

    ``prior(logits [1, V]) -> logits [1, V]``: reweights the first token's logits before it is sampled
    (a grounding head's answer, :class:`~.grounding_head.AnswerPrior`); later tokens are the decoder's.

    ``graphs`` (:class:`~.cuda_graph.DecodeGraphs` over ``cache``): one-token steps run through its
    captured steps, which sample on the device; the prefill and a forced chunk take the ordinary path.
    Capture done lazily during the call is timed into ``stats.capture_ms``, not into ``decode_ms``.

    ``fused`` (:class:`~.quant.fused_decode.FusedDecodeStep` of ``model``): the prefill, each decode step
    and each forced chunk run every layer in one C++ call (CPU-quantised decoders); the final norm,
    ``lm_head`` and sampling stay the same modules.
    """
    if graphs is not None and graphs.cache is not cache:
        raise ConfigError("graphs were captured over another KV cache than the one passed")
    if graphs is not None and fused is not None:
        raise ConfigError("pass graphs (CUDA) or fused (CPU), not both")
    if fused is not None:
        if fused.decoder is not model:
            raise ConfigError("the fused decode step was built for another decoder than the one passed")
        fused.check(cache)  # once per generation: the decoder does not change while it runs
    if not continue_cache:
        cache.reset()
    x = _check_prompt(model, cache, prompt_ids, prompt_embeds)  # [1, T, D]
    prefix, t = cache.length, x.shape[1]
    need = prefix + t + gen_cfg.max_new_tokens
    limits = ((cache.max_len, "the KV cache size max_len"), (model.cfg.max_seq_len, "the decoder's max_seq_len"))
    for limit, what in limits:
        if need > limit:
            raise ContextLengthError(
                f"prompt of {t} tokens" + (f" after {prefix} cached" if prefix else "") +
                f" + max_new_tokens {gen_cfg.max_new_tokens} = {need} positions exceeds {what} {limit}; "
                "shorten the prompt or lower max_new_tokens")
    stats = GenerationStats(prompt_tokens=t, cached_prefix=prefix)
    sampler = Sampler(gen_cfg, device=model.device)
    stops = set(gen_cfg.stop_token_ids)

    @torch.inference_mode()
    def step(embeds: torch.Tensor | None = None, ids: list[int] | None = None, first: bool = False) -> int:
        # one forward of embeddings [1, T, D] or token ids + sample; inference_mode is entered per step
        # so it never leaks into the caller's code between yields.
        with kernel_threads(model):
            if fused is not None:  # every layer of the T tokens in one C++ call -> [1, V]
                if embeds is None:
                    embeds = model.embed(torch.tensor([ids], device=model.device))
                logits = fused.logits(embeds, cache, checked=True)
            elif embeds is not None:
                logits = model(cache=cache, last_only=True, inputs_embeds=embeds)[:, -1]  # [1, V]
            else:
                logits = model(cache=cache, last_only=True, input_ids=torch.tensor([ids], device=model.device))[:, -1]
            if first and prior is not None:
                logits = prior(logits)
            return int(sampler(logits)[0])  # int() waits for the device, so timings are real

    def run() -> Iterator[int]:
        stats.stop_reason = "closed"
        t0 = time.perf_counter()
        tok = step(embeds=x, first=True)
        stats.prefill_ms = (time.perf_counter() - t0) * 1e3
        while True:
            if tok in stops:
                stats.stop_reason, stats.stop_token = "stop_token", tok
                return
            pending, force_s = [tok], 0.0
            if force is not None:  # a forced chunk's decode time includes working it out
                t0 = time.perf_counter()
                pending += list(force(tok))[: max(0, gen_cfg.max_new_tokens - stats.new_tokens - 1)]
                force_s = time.perf_counter() - t0
            for t in pending:
                stats.new_tokens += 1
                yield t
                if on_token is not None and on_token(t):
                    stats.stop_reason = "callback"
                    return
            if stats.new_tokens >= gen_cfg.max_new_tokens:
                stats.stop_reason = "max_new_tokens"
                return
            t0 = time.perf_counter()
            if graphs is not None and len(pending) == 1:
                captured = graphs.capture_ms
                tok = graphs(pending[0], cache.length, sampler)
                stats.capture_ms += graphs.capture_ms - captured
                t0 += (graphs.capture_ms - captured) / 1e3
            else:
                tok = step(ids=pending)
            # one entry per token fed back, so that decode_per_token stays a per-token figure
            stats.decode_ms += [(time.perf_counter() - t0 + force_s) * 1e3 / len(pending)] * len(pending)

    return TokenStream(run(), stats)


class StopStringMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    ``feed(piece)`` returns ``(text, stopped)``: ``text`` is safe to show now; anything that could be
    the start of a stop string is held back (``held``) until the next piece settles it. When a stop
    string completes, ``text`` ends right before it, ``stopped`` is True and ``matched`` names it.
    At the natural end of generation ``flush()`` returns the held text.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.held = ""
        self.matched: str | None = None

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.matched is not None:
            return "", True
        buf = self.held + piece
        hits = [(i, s) for s in self.stop_strings if (i := buf.find(s)) >= 0]
        if hits:
            i, self.matched = min(hits)
            self.held = ""
            return buf[:i], True
        keep = 0  # longest tail of buf that is a proper prefix of some stop string
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


__all__ = ["GenerationConfig", "Sampler", "GenerationStats", "TokenStream", "generate_tokens", "StopStringMatcher"]
