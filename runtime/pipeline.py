"""The user-facing Pipeline: images + prompt -> text, with per-stage timings.

::

    pipe = edgevlm.load("demo")
    out = pipe.generate(image, "What is on the table?", max_new_tokens=64)
    out.text, out.token_ids, out.timings
    for piece in pipe.stream(image, "Describe the scene."): print(piece, end="")

Data flow per call: images -> vision tower (preprocess, encoders, connector) -> visual embeddings
spliced into the prompt's embeddings at the chat format's image positions -> prefill into a static
KV cache -> decode loop (sampler, stop ids) -> streaming detokeniser (stop strings).

One Pipeline serves one generation at a time; calls from several threads are serialised by a lock,
and each ``generate`` returns its own output. A ``stream`` holds the lock until it is consumed or
closed. ``deadline_s`` and a ``cancel`` event stop a generation at the next token.

Between calls the Pipeline keeps what it computed: the KV cache of the last conversation (a follow-up
whose prompt starts with the previous prompt and answer prefills only the new tokens) and the tower's
embeddings of recent images (the same picture again skips the vision stages). ``reset()`` drops both.
A call with ``kv_slot=key`` uses that key's own KV cache, so conversations that take turns (sessions,
cameras: :mod:`edgevlm.streams`) each keep their prefix; :attr:`Pipeline.max_kv_slots` caches are kept,
the least recently used dropped first.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgevlm.errors import ConfigError, PromptError, ShapeError
from edgevlm.options import DECODE_GRAPHS, KV_CACHES

from .chat import ChatFormat
from .cuda_graph import DecodeGraphs
from .decoder import Decoder
from .embed_cache import tensor_digest
from .generate import GenerationConfig, StopStringMatcher, generate_tokens
from .grounding_head import AnswerPrior, BoxWriter, GroundingHead, HeadQuestion, answer_ids, trigger_id
from .image_embedding import ImageEmbedding
from .kv_cache import KVCache
from .quant.cpu_linear import cpu_kernel_info
from .quant.fused_decode import FusedDecodeStep
from .token_keep import select_cells
from .tokenizer import Tokenizer
from .tower import VisionTower


@dataclass
class GenerateOutput:
    """What :meth:`Pipeline.generate` returns.

    ``timings`` (milliseconds): ``decode_image`` (file/array decoding, content hashing), ``preprocess``
    (views), ``vision`` (encoders + connector; ~0 for images the tower remembers), ``prefill`` (forward
    of the positions not reused from the last call + first token = time to first token after the image
    stages), ``ttft`` (the call to its first token: every stage before it, tokenisation included),
    ``decode_per_token`` (mean), ``total``.
    """

    text: str
    token_ids: list[int]
    timings: dict[str, float]
    prompt_tokens: int = 0  # the whole prompt, visual positions included
    cached_tokens: int = 0  # of those, reused from the previous call's KV cache (not prefilled again)
    visual_tokens: int = 0
    stop_reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """A decoder, its tokenizer and chat format, and optionally a vision tower."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, chat: ChatFormat, *,
                 tower: VisionTower | None = None, name: str = "", max_context: int = 2048,
                 sources: dict[str, str] | None = None, reuse_prefix: bool = True, kv_cache: str = "float",
                 grounding_head: GroundingHead | None = None, decode_graphs: str = "off", fused_decode: bool = True):
        """``max_context``: positions of the static KV cache (capped at the decoder's limit);
        ``reuse_prefix``: keep the last conversation's KV cache for a follow-up; ``kv_cache``:
        ``"float"`` (the weights' dtype) or ``"int8"`` (a scale per vector, a quarter of the memory);
        ``grounding_head``: writes the boxes of a box answer about one image and, if it has answers, weighs
        in on a short answer's first token (:mod:`.grounding_head`); ``decode_graphs``: ``"on"`` decodes
        through CUDA graphs captured here, one per context bucket (:class:`~.cuda_graph.DecodeGraphs`),
        ``"eager"`` runs those static-shape steps uncaptured, ``"off"`` the ordinary step;
        ``fused_decode``: a CPU-quantised decoder decodes one token per C++ call over all its layers
        (:class:`~.quant.fused_decode.FusedDecodeStep`) wherever that step supports the model and
        cache; False, or the environment variable ``EDGEVLM_FUSED_DECODE=0`` (read here), keeps the
        ordinary step. ``info()["fused_decode"]`` says which runs and, if not the fused one, why."""
        if kv_cache not in KV_CACHES:
            raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
        if decode_graphs not in DECODE_GRAPHS:
            raise ConfigError(f"decode_graphs must be one of {', '.join(DECODE_GRAPHS)}, got {decode_graphs!r}")
        self.decoder = decoder.eval()
        self.tokenizer = tokenizer
        self.chat = chat
        self.tower = tower
        self.grounding_head = grounding_head
        self._box_trigger = trigger_id(grounding_head.cfg, tokenizer) if grounding_head is not None else None
        self._answer_ids = (answer_ids(grounding_head.cfg, tokenizer)
                            if grounding_head is not None and grounding_head.cfg.answers else None)
        self.name = name
        self.max_context = min(int(max_context), decoder.cfg.max_seq_len)
        self.sources = dict(sources or {})
        self._cache: KVCache | None = None
        self.reuse_prefix = reuse_prefix
        self.kv_int8 = kv_cache == "int8"
        self._cache_keys: list = []  # one key per position held in the KV cache (see _position_keys)
        # KV slots: the active one is _cache/_cache_keys, named _slot (None: the default); the others wait
        # in _parked, least recently used first.
        self._slot: Hashable | None = None
        self._parked: OrderedDict = OrderedDict()
        # One caller at a time owns the decoder and its KV cache (the turn, _Turn). The lock is held only
        # while that caller computes, never while a stream waits for its consumer between pieces, so a
        # stream abandoned without close() cannot block the others: it loses the turn (below).
        self._lock = threading.RLock()  # reentrant: an abandoned stream may be collected inside a call
        self._turn_changed = threading.Condition(self._lock)
        self._holder: _Turn | None = None
        self.last_output: GenerateOutput | None = None
        self._graphs: DecodeGraphs | None = None
        if decode_graphs != "off":
            if self.kv_int8:
                raise ConfigError("decode_graphs needs kv_cache='float': the captured step writes K/V in the weights' "
                                  "dtype")
            self._graphs = DecodeGraphs(self.decoder, self._cache_for(), capture=decode_graphs == "on")
            # the greedy step of every bucket now, so no answer pays for capturing it
            self._graphs.warm()
        self._fused: FusedDecodeStep | None = None
        self._fused_reason = self._fused_refusal(fused_decode)
        if self._fused_reason is None:
            self._fused = FusedDecodeStep(self.decoder)  # the cache is bound when the first answer needs it

    # ---- prompt assembly -------------------------------------------------------------------
    def _images(self, image) -> list:
        if image is None:
            return []
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if images and self.tower is None:
            raise PromptError(f"model {self.name or '(text-only)'} has no vision tower; pass image=None")
        return images

    def _check_embeddings(self, given: list["ImageEmbedding"]) -> None:
        if self.tower.takes_instruction:
            raise PromptError("this model's Q-Former reads the prompt while it encodes the image, so it takes the "
                              "image itself, not an embedding made without the prompt")
        width = self.decoder.cfg.hidden
        for e in given:
            if e.tokens.shape[1] != width:
                raise ShapeError(f"image embedding is {e.tokens.shape[1]} wide; this model's decoder takes {width} "
                                 f"([visual_tokens, {width}], as its own tower gives)")

    def _messages(self, prompt, system: str | None) -> list[dict]:
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
            msgs = [dict(m) for m in prompt]
        else:
            raise PromptError("prompt must be a string or a list of chat messages ({'role': ..., 'content': ...})")
        if system is not None:
            msgs = [{"role": "system", "content": system}] + [m for m in msgs if m.get("role") != "system"]
        return msgs

    @staticmethod
    def _instruction(prompt, raw: bool) -> str:
        """The text a text-conditioned tower reads: the raw prompt, or the last user message's text."""
        if raw or isinstance(prompt, str):
            return prompt if isinstance(prompt, str) else ""
        from .chat import flatten_messages

        users = [m["content"] for m in flatten_messages(prompt, None) if m["role"] == "user"]
        return users[-1] if users else ""

    def _prepare(self, image, prompt, raw: bool,
                 system: str | None) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor], list]:
        """-> (inputs_embeds [1, T, D], image-stage timings, each image's visual embeddings, position keys)."""
        images = self._images(image)
        timings: dict[str, float] = {}
        embeds: list[torch.Tensor] = []
        given = [im for im in images if isinstance(im, ImageEmbedding)]  # already through a tower elsewhere
        if given:
            self._check_embeddings(given)
        pixels = [im for im in images if not isinstance(im, ImageEmbedding)]
        if pixels:
            # InstructBLIP's Q-Former reads the user's words (not the chat-templated text), as its processor does
            instruction = self._instruction(prompt, raw) if self.tower.takes_instruction else None
            encoded = iter(self.tower.embed_each(pixels, instruction=instruction))  # one [T_i, D] per image
            t = self.tower.last_timings
            timings = {"decode_image": t["decode_ms"], "preprocess": t["preprocess_ms"], "vision": t["vision_ms"]}
        elif images:  # every image arrived as its embedding: no image stage ran here
            timings = {"decode_image": 0.0, "preprocess": 0.0, "vision": 0.0}
        if images:
            dev, dt = self.decoder.device, self.decoder.dtype
            embeds = [im.tokens.to(dev, dt) if isinstance(im, ImageEmbedding) else next(encoded) for im in images]
        tpi = [e.shape[0] for e in embeds]
        if raw:
            if not isinstance(prompt, str):
                raise PromptError("raw=True needs the prompt as one string")
            mp = self.chat.encode(self.tokenizer, prompt, tpi)  # the format's placement and segment encoding
        else:
            mp = self.chat.build(self.tokenizer, self._messages(prompt, system), tpi)
        x = mp.embed(self.decoder.embed, embeds)  # [1, T, D]
        return x, timings, embeds, _position_keys(mp, embeds)

    def _head_helpers(self, embeds: list[torch.Tensor], prompt,
                      raw: bool) -> tuple[BoxWriter | None, AnswerPrior | None]:
        """The grounding head's box writer and answer prior for this answer. The head reads one image's
        grid: the whole grid, or under uniform token dropping the kept cells if the head was trained
        with cells missing (``dropped_cells``); otherwise the decoder answers alone."""
        head = self.grounding_head
        if head is None or len(embeds) != 1:
            return None, None
        cells = None
        if self.tower.keep_ratio < 1.0:
            uniform = self.tower.keep_mode == "uniform" and self.tower.keep_scorer is None  # the same cells every image
            if not (head.cfg.dropped_cells and uniform and self.tower.model.keep_plan().grid == head.cfg.grid):
                return None, None
            cells = select_cells(1, head.cfg.grid, self.tower.keep_ratio, "uniform", device=embeds[0].device)[0]
        question = HeadQuestion(self.tokenizer, self._instruction(prompt, raw), self.decoder.embed, embeds[0].device)
        writer = BoxWriter(head, self.tokenizer, self._box_trigger, embeds[0], question, cells)
        prior = AnswerPrior(head, self._answer_ids, embeds[0], question, cells) if self._answer_ids else None
        return writer, prior

    def _fused_refusal(self, wanted: bool) -> str | None:
        """Why the fused CPU decode step is not used (None: it is)."""
        if not wanted:
            return "turned off (fused_decode=False)"
        if os.environ.get("EDGEVLM_FUSED_DECODE", "1").strip() == "0":
            return "turned off (EDGEVLM_FUSED_DECODE=0)"
        if self._graphs is not None:
            return "decode_graphs runs the one-token steps"
        if self.kv_int8:
            return "kv_cache='int8': the fused step writes a float KV cache"
        return FusedDecodeStep.supports(self.decoder)

    def _fused_for(self, cache: KVCache) -> FusedDecodeStep | None:
        """The fused step, bound to ``cache``; if the decoder changed into something it cannot run,
        the ordinary step from now on (the reason goes to info())."""
        if self._fused is not None:
            try:
                self._fused.check(cache)
            except ConfigError as e:
                self._fused, self._fused_reason = None, str(e)
        return self._fused

    @property
    def decode_graphs(self) -> DecodeGraphs | None:
        """The captured (or static-shape) decode steps over this Pipeline's KV cache, if it has them."""
        return self._graphs

    @property
    def fused_decode(self) -> FusedDecodeStep | None:
        """The fused CPU step this Pipeline prefills and decodes with, if it uses one (``info()["fused_decode"]``
        says why not): pass it to :func:`~.generate.generate_tokens` to time what the Pipeline runs."""
        return self._fused

    def _cache_for(self) -> KVCache:
        if self._cache is None:
            self._cache = self.decoder.new_cache(batch=1, max_len=self.max_context, kv_int8=self.kv_int8)
        return self._cache

    #: KV caches kept at once (each ``max_context`` positions: ``info()["kv_cache"]["bytes"]``), the active
    #: one included; using one more drops the least recently used.
    max_kv_slots: int = 8

    def _use_slot(self, key: Hashable | None) -> None:
        """Makes ``key``'s KV cache (and what it holds) the active one; called holding the turn."""
        if key == self._slot or self._graphs is not None:  # captured steps write one cache: every slot shares it
            return
        self._parked[self._slot] = (self._cache, self._cache_keys)
        self._cache, self._cache_keys = self._parked.pop(key, (None, []))
        self._slot = key
        while self._parked and len(self._parked) >= max(1, int(self.max_kv_slots)):
            self._parked.popitem(last=False)

    def _reusable(self, keys: list) -> int:
        """How many leading positions of a prompt with ``keys`` the KV cache already holds; at least
        one position is always left to prefill, since its logits start the answer."""
        if not self.reuse_prefix:
            return 0
        old, n = self._cache_keys, 0
        limit = min(len(old), len(keys) - 1)
        while n < limit and old[n] == keys[n]:
            n += 1
        return n

    # ---- the turn ------------------------------------------------------------------------------
    #: Seconds a stream may sit between pieces, its consumer not asking for the next one, before a caller
    #: waiting for the decoder takes it over; the idle stream then ends with stop_reason "preempted".
    stream_idle_s: float = 5.0

    def _take_turn(self, me: "_Turn") -> None:
        """Waits (holding ``_lock`` on return) until no one holds the turn or its holder has sat idle for
        :attr:`stream_idle_s`, then takes it. A stream preempted that way kept the cache in a state its
        own bookkeeping would have recorded only at its end, so the cached prefix is forgotten."""
        self._lock.acquire()
        while (h := self._holder) is not None:
            if h.idle_since is None:
                self._turn_changed.wait()
                continue
            idle = time.monotonic() - h.idle_since
            if idle >= self.stream_idle_s:
                h.preempted = True
                self._cache_keys = []
                break
            self._turn_changed.wait(self.stream_idle_s - idle)
        self._holder = me

    def _give_turn(self, me: "_Turn") -> None:
        """Releases ``_lock`` (taken by _take_turn or on resuming) and, if ``me`` still holds it, the turn."""
        if self._holder is me:
            self._holder = None
            self._turn_changed.notify_all()
        self._lock.release()

    def reset(self) -> None:
        """Forget the cached conversation and image embeddings (the next call computes everything)."""
        me = _Turn()
        self._take_turn(me)
        try:
            self._cache_keys = []
            if self._cache is not None:
                self._cache.reset()
            self._parked.clear()
            if self.tower is not None:
                self.tower.embedding_cache.clear()
        finally:
            self._give_turn(me)

    # ---- generation ------------------------------------------------------------------------
    def stream(self, image, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), raw: bool = False,
               system: str | None = None, deadline_s: float | None = None,
               cancel: threading.Event | None = None, kv_slot: Hashable | None = None) -> "TextStream":
        """Yield the answer's text pieces as they are decoded. After the loop the returned stream's
        ``output`` holds this call's :class:`GenerateOutput` (ids, timings, stop reason), whichever thread
        called last; ``pipe.last_output`` holds the latest call's.

        ``deadline_s``: a latency budget in seconds from the call; decoding stops at the first token
        boundary past it (``stop_reason="deadline"``; the image stages and prefill always complete).
        ``cancel``: a :class:`threading.Event` another thread may set; decoding stops at the next token
        (``stop_reason="cancelled"``). Either way the text so far is returned and the KV cache stays
        consistent for a follow-up.

        Calls run one at a time. A stream holds the decoder only while it computes a piece: if its
        consumer does not ask for the next piece within :attr:`stream_idle_s` (default 5 s) while
        another call waits, that call takes over and the idle stream ends at its next ``next()``
        (``stop_reason="preempted"``, the text so far in ``output``). An abandoned, unclosed stream so
        never blocks the others.

        ``kv_slot``: any hashable key (a session, a camera's name); the call uses that key's own KV
        cache, so that conversations taking turns on one Pipeline each keep their prefix (None: the
        default cache; with ``decode_graphs`` every call shares the one cache the graphs were captured
        on). See :attr:`max_kv_slots`.
        """
        _check_deadline(deadline_s)
        _check_slot(kv_slot)
        sink: list[GenerateOutput] = []
        return TextStream(self._stream(image, prompt, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                           top_k=top_k, top_p=top_p, seed=seed),
                                       stop, raw, system, deadline_s, cancel, sink=sink, kv_slot=kv_slot), sink)

    def _stream(self, image, prompt, sampling: dict, stop: Sequence[str], raw: bool, system: str | None,
                deadline_s: float | None, cancel: threading.Event | None, sink: list | None,
                kv_slot: Hashable | None = None) -> Iterator[str]:
        # The output goes to ``self.last_output`` and into ``sink`` (the caller's) under the lock, so a
        # caller never reads another thread's answer. Between pieces the lock is released, the turn kept.
        me = _Turn()
        self._take_turn(me)
        try:
            t_start = time.perf_counter()
            x, timings, embeds, keys = self._prepare(image, prompt, raw, system)
            n_visual = sum(e.shape[0] for e in embeds)
            writer, prior = self._head_helpers(embeds, prompt, raw)
            gen = GenerationConfig(**sampling, stop_token_ids=tuple(sorted(self.chat.stop_ids(self.tokenizer))))
            self._use_slot(kv_slot)
            cache = self._cache_for()
            reused = self._reusable(keys)
            cache.truncate(min(reused, cache.length))
            self._cache_keys = self._cache_keys[:reused]
            tokens = generate_tokens(self.decoder, cache, prompt_embeds=x[:, reused:], gen_cfg=gen,
                                     continue_cache=True, force=writer, prior=prior, graphs=self._graphs,
                                     fused=self._fused_for(cache))
            detok = self.tokenizer.stream_decoder(skip_special=True)
            stops = StopStringMatcher(tuple(self.chat.stop_strings) + tuple(stop))
            parts: list[str] = []
            stopped = False
            interrupted = ""  # "deadline" | "cancelled" | "preempted"
            t_end = t_start + deadline_s if deadline_s is not None else None
            t_ready = time.perf_counter()  # image stages, tokenisation and embedding done; prefill is next
            try:
                vocab = self.tokenizer.vocab_size
                for tok in tokens:
                    # Embedding tables are often padded past the tokenizer's vocabulary; such rows
                    # have no text, so they contribute nothing to the answer (the id is kept).
                    text, stopped = stops.feed(detok.feed(tok) if tok < vocab else "")
                    if text:
                        parts.append(text)
                        yield from self._hand_out(me, text)
                        if me.preempted:
                            interrupted = "preempted"
                            break
                    if stopped:
                        break
                    if cancel is not None and cancel.is_set():
                        interrupted = "cancelled"
                    elif t_end is not None and time.perf_counter() >= t_end:
                        interrupted = "deadline"
                    if interrupted:
                        break
                if not stopped and interrupted != "preempted":
                    tail, _ = stops.feed(detok.flush())
                    tail += stops.flush()
                    if tail:
                        parts.append(tail)
                        yield from self._hand_out(me, tail)
            finally:
                tokens.close()  # touches no shared state: safe even after losing the turn
                # what the cache now holds: the prompt, then the answer tokens that were fed back
                if not me.preempted:
                    self._cache_keys = (keys + list(tokens.tokens))[:cache.length]
                s = tokens.stats
                timings.update({"prefill": s.prefill_ms, "ttft": (t_ready - t_start) * 1e3 + s.prefill_ms,
                                "decode_per_token": s.mean_decode_ms,
                                "total": (time.perf_counter() - t_start) * 1e3,
                                **({"graph_capture": s.capture_ms} if s.capture_ms else {})})
                out = GenerateOutput(
                    text="".join(parts), token_ids=list(tokens.tokens), timings=timings,
                    prompt_tokens=len(keys), cached_tokens=reused, visual_tokens=n_visual,
                    stop_reason="stop_string" if stopped else (interrupted or s.stop_reason),
                    info={"decode_tokens_per_s": s.decode_tokens_per_s,
                          **({"boxes_from_head": len(writer.boxes)} if writer and writer.boxes is not None else {}),
                          **({"answer_head": prior.info} if prior and prior.info is not None else {})})
                if not me.preempted:
                    self.last_output = out
                if sink is not None:
                    sink.append(out)
        finally:
            self._give_turn(me)

    def _hand_out(self, me: "_Turn", text: str) -> Iterator[str]:
        """Yields ``text`` with the lock released and the turn marked idle, so a caller that waits can
        take over a stream whose consumer went away; on resuming the lock is taken again (a stream that
        lost the turn sees ``me.preempted``)."""
        me.idle_since = time.monotonic()
        self._turn_changed.notify_all()  # waiters start timing this stream's idleness
        self._lock.release()
        try:
            yield text
        finally:
            self._lock.acquire()
            me.idle_since = None

    def generate(self, image, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), raw: bool = False,
                 system: str | None = None, deadline_s: float | None = None,
                 cancel: threading.Event | None = None, kv_slot: Hashable | None = None) -> GenerateOutput:
        """Run to completion; see :meth:`stream` for the arguments. ``image`` may be None, one image
        (path, PIL image, HWC uint8 array, or an :class:`~.image_embedding.ImageEmbedding` made by a
        tower elsewhere) or a list; ``raw=True`` sends ``prompt`` verbatim.

        Safe to call from several threads: calls run one at a time, and each returns its own output."""
        _check_deadline(deadline_s)
        _check_slot(kv_slot)
        sink: list[GenerateOutput] = []
        for _ in self._stream(image, prompt, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                  top_k=top_k, top_p=top_p, seed=seed),
                              stop, raw, system, deadline_s, cancel, sink, kv_slot):
            pass
        return sink[0]

    def generate_many(self, images: Sequence, prompt, **kwargs) -> list[GenerateOutput]:
        """The same prompt about each frame of a batch: one [frames] tower batch (all views of all frames
        through each encoder together), then one answer per frame, in order. Decoding is per frame.
        The batch reaches the answers through the tower's embedding cache; with that cache off
        (``embedding_cache_bytes=0``) each frame is simply answered in turn."""
        frames = list(images)
        if frames and self.tower is not None and self.tower.embedding_cache.enabled:
            self.tower.embed_each(frames)  # one batched tower call; the answers below hit its embedding cache
        return [self.generate(f, prompt, **kwargs) for f in frames]

    # ---- asyncio ---------------------------------------------------------------------------
    async def agenerate(self, image, prompt, **kwargs) -> GenerateOutput:
        """:meth:`generate` for asyncio code: runs in a worker thread, so the event loop stays free."""
        import asyncio

        return await asyncio.to_thread(self.generate, image, prompt, **kwargs)

    async def astream(self, image, prompt, **kwargs):
        """:meth:`stream` for asyncio code: ``async for piece in pipe.astream(...)``. Decoding runs in a
        worker thread; breaking out of the loop cancels it at the next token."""
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = kwargs.pop("cancel", None) or threading.Event()
        done = object()

        def work() -> None:
            try:
                for piece in self.stream(image, prompt, cancel=cancel, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # handed to the awaiting side, raised there
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = loop.run_in_executor(None, work)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()  # a consumer that stops early frees the Pipeline at the next token
            await worker

    def session(self, image=None, *, system: str | None = None):
        """A multi-turn conversation about ``image`` that keeps its KV prefix (:class:`~edgevlm.runtime.session.Session`)."""
        from .session import Session

        return Session(self, image, system=system)

    # ---- structured answers (runtime/structured.py) ------------------------------------------
    def detect(self, image, phrase: str, **kwargs):
        """Boxes of ``phrase`` in one frame, in its pixels: a :class:`~edgevlm.runtime.structured.Grounding`."""
        from .structured import detect

        return detect(self, image, phrase, **kwargs)

    def ground(self, image, **kwargs):
        """A grounded caption as labelled boxes in the frame's pixels (see :mod:`edgevlm.runtime.structured`)."""
        from .structured import ground

        return ground(self, image, **kwargs)

    def keypoints(self, image, prompt: str, **kwargs):
        """Points the model prints, in the frame's pixels -> (list of Keypoint, GenerateOutput)."""
        from .structured import keypoints

        return keypoints(self, image, prompt, **kwargs)

    # ---- introspection ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        from .quant import QuantLinear, describe

        qlins = [m for m in self.decoder.modules() if isinstance(m, QuantLinear)]
        tied = self.decoder.cfg.tie_embeddings  # a quantised lm_head is a copy of the embedding, not more parameters
        params = sum(p.numel() for p in self.decoder.parameters()) + sum(
            m.in_features * m.out_features for m in qlins if not (tied and m is self.decoder.lm_head))
        dec_bytes = sum(t.numel() * t.element_size() for t in (*self.decoder.parameters(), *self.decoder.buffers()))
        c = self.decoder.cfg
        per = 1 + 4 / c.head_dim if self.kv_int8 else self.decoder.dtype.itemsize  # int8 values + fp32 scale per vector
        kv_bytes = int(2 * c.layers * c.kv_heads * c.head_dim * self.max_context * per)
        out: dict[str, Any] = {
            "name": self.name,
            "decoder": {"layers": c.layers, "hidden": c.hidden, "heads": c.heads, "kv_heads": c.kv_heads,
                        "vocab": c.vocab_size, "params": params, "weights_bytes": dec_bytes,
                        "dtype": str(self.decoder.dtype).replace("torch.", ""), "device": str(self.decoder.device),
                        "weights": self.sources.get("decoder", "?"), "quantization": describe(self.decoder)},
            "kv_cache": {"max_context": self.max_context, "bytes": kv_bytes,
                         "slots": sum(c is not None for c, _ in list(self._parked.values())) + (self._cache is not None),
                         "max_slots": self.max_kv_slots,
                         "dtype": "int8" if self.kv_int8 else str(self.decoder.dtype).replace("torch.", "")},
            "decode_graphs": self._graphs.info() if self._graphs is not None else None,
            "fused_decode": ({"used": True, **self._fused.info()} if self._fused is not None
                             else {"used": False, "reason": self._fused_reason}),
            "cpu_kernels": cpu_kernel_info(),
            "tokenizer": {"vocab": self.tokenizer.vocab_size, "bos": self.tokenizer.bos_id,
                          "eos": self.tokenizer.eos_id, "source": self.sources.get("tokenizer", "?")},
            "chat": {"format": self.chat.kind, "image_placement": self.chat.image_placement,
                     "template": "checkpoint" if self.chat.template else "default"},
            "vision": self.tower.info() if self.tower is not None else None,
            "grounding_head": ({"params": sum(p.numel() for p in self.grounding_head.parameters()),
                                "trigger": self.grounding_head.cfg.trigger, "grid": self.grounding_head.cfg.grid,
                                "answers": list(self.grounding_head.cfg.answers)}
                               if self.grounding_head is not None else None),
            "backends": backends(),
        }
        return out


class _Turn:
    """One call's claim on the decoder and KV cache (Pipeline._take_turn)."""

    __slots__ = ("idle_since", "preempted")

    def __init__(self) -> None:
        self.idle_since: float | None = None  # monotonic time its stream last handed out a piece, while it waits
        self.preempted = False


class TextStream:
    """What :meth:`Pipeline.stream` returns: iterate it for the answer's text pieces; ``output`` is this
    call's :class:`GenerateOutput` once the iteration has ended or been closed (None before)."""

    def __init__(self, pieces: Iterator[str], sink: list[GenerateOutput]) -> None:
        self._pieces, self._sink = pieces, sink

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop decoding now (the KV cache stays consistent, ``output`` is filled)."""
        self._pieces.close()

    @property
    def output(self) -> GenerateOutput | None:
        return self._sink[0] if self._sink else None


def _check_deadline(deadline_s) -> None:
    if deadline_s is not None and not (isinstance(deadline_s, (int, float)) and deadline_s > 0):
        raise PromptError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")


def _check_slot(key) -> None:
    try:
        hash(key)
    except TypeError:
        raise ConfigError(f"kv_slot must be a hashable key (a str, an int, an object), got {type(key).__name__}") from None


def _position_keys(mp, embeds: Sequence[torch.Tensor]) -> list:
    """One comparable key per prompt position: the token id, or (digest of the image's embedding, index)
    for a visual position -- so two prompts share a cached prefix only where the same tokens and the same
    visual embeddings stand at the same positions."""
    digests = [tensor_digest(e) for e in embeds]
    keys: list = []
    for kind, v in mp.segments:
        if kind == "text":
            keys.extend(v)
        else:
            keys.extend((digests[v], j) for j in range(mp.tokens_per_image[v]))
    return keys


def backends() -> dict[str, str]:
    """Which optional backends and extensions this process can use (shown by ``edgevlm info``)."""
    import importlib.util

    out = {"torch": torch.__version__, "cuda": torch.version.cuda or "no"}
    try:
        from edgevlm import _C  # noqa: F401

        out["cpp_ext"] = "built"
    except ImportError as e:
        out["cpp_ext"] = f"missing ({e})"
    for mod in ("onnxruntime", "tensorrt", "triton"):
        out[mod] = "installed" if importlib.util.find_spec(mod) else "not installed"
    out["cuda_available"] = str(torch.cuda.is_available())
    from edgevlm.kernels.triton_support import kernel_backend

    if kernel_backend() == "triton":
        from edgevlm.kernels.attention_dispatch import shipped_table

        out["vision_kernels"] = (f"Triton token gather; attention by the table measured on "
                                 f"{shipped_table().measured_on} (Triton where it won, else SDPA)")
    else:
        out["vision_kernels"] = "PyTorch references (SDPA, gather)"
    return out


__all__ = ["Pipeline", "GenerateOutput", "TextStream", "backends"]
