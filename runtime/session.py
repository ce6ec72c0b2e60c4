"""A multi-turn conversation about one frame (or none) that keeps the KV prefix between turns.

::

    chat = pipe.session(frame, system="You are a robot's eyes.")
    chat.ask("What is on the table?")          # prefills the image and the question
    chat.ask("Which one is closest?")          # prefills only the new turn: the image is not re-encoded
    chat.messages                              # the OpenAI-style history, image part included

Each ``ask`` sends the whole history as chat messages; the Pipeline's prefix reuse finds the previous
turn's positions in the session's own KV cache (a ``kv_slot`` of the Pipeline), so only the new turn is
computed, also when other calls and sessions ran in between. When more sessions are in use than the
Pipeline keeps caches (``Pipeline.max_kv_slots``) the least recently used one loses its cache: its next
turn is then recomputed from scratch, with the same answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edgevlm.errors import PromptError


class Session:
    def __init__(self, pipe, image=None, *, system: str | None = None):
        self.pipe = pipe
        self.image = image
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.outputs: list = []
        self._slot = _SlotKey()  # this session's KV cache in the Pipeline (not self: a cache must not keep it alive)

    def ask(self, text: str, **gen):
        """One user turn -> its :class:`~edgevlm.runtime.pipeline.GenerateOutput` (the answer joins the history)."""
        turn = self._turn(text)
        out = self.pipe.generate(self.image, self.messages + [turn], system=self.system, kv_slot=self._slot, **gen)
        self._record(turn, out)
        return out

    def stream(self, text: str, **gen) -> Iterator[str]:
        """:meth:`ask`, yielding the answer's text pieces as they decode. The answer joins the history
        when the stream ends, also when the caller stops early (then with the text so far)."""
        turn = self._turn(text)
        pieces = self.pipe.stream(self.image, self.messages + [turn], system=self.system, kv_slot=self._slot, **gen)
        try:
            yield from pieces
        finally:
            pieces.close()
            if pieces.output is not None:
                self._record(turn, pieces.output)

    def _turn(self, text: str) -> dict[str, Any]:
        if not isinstance(text, str) or not text.strip():
            raise PromptError("a session turn needs non-empty text")
        content: Any = text
        if not self.messages and self.image is not None:  # the image belongs to the first user turn
            content = [{"type": "image"}, {"type": "text", "text": text}]
        return {"role": "user", "content": content}

    def _record(self, turn: dict[str, Any], out) -> None:
        self.messages += [turn, {"role": "assistant", "content": out.text}]
        self.outputs.append(out)

    def reset(self) -> None:
        """Forget the history (the image stays)."""
        self.messages, self.outputs = [], []


class _SlotKey:
    """A session's KV slot key: hashable by identity, shown by its id."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<session {id(self):#x}>"


__all__ = ["Session"]
