"""A multi-turn conversation about one frame (or none) that keeps the KV prefix between turns.

::

    chat = pipe.session(frame, system="You are a robot's eyes.")
    chat.ask("What is on the table?")          # prefills the image and the question
    chat.ask("Which one is closest?")          # prefills only the new turn: the image is not re-encoded
    chat.messages                              # the OpenAI-style history, image part included

Each ``ask`` sends the whole history as chat messages; the Pipeline's prefix reuse finds the previous
turn's positions in its KV cache, so only the new turn is computed. Another call on the same Pipeline
in between (another thread, another session) evicts that cache: the next turn is then recomputed from
scratch, with the same answer.
"""

from __future__ import annotations

from typing import Any

from edgevlm.errors import PromptError


class Session:
    def __init__(self, pipe, image=None, *, system: str | None = None):
        self.pipe = pipe
        self.image = image
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.outputs: list = []

    def ask(self, text: str, **gen):
        """One user turn -> its :class:`~edgevlm.runtime.pipeline.GenerateOutput` (the answer joins the history)."""
        if not isinstance(text, str) or not text.strip():
            raise PromptError("a session turn needs non-empty text")
        content: Any = text
        if not self.messages and self.image is not None:  # the image belongs to the first user turn
            content = [{"type": "image"}, {"type": "text", "text": text}]
        turn = {"role": "user", "content": content}
        out = self.pipe.generate(self.image, self.messages + [turn], system=self.system, **gen)
        self.messages += [turn, {"role": "assistant", "content": out.text}]
        self.outputs.append(out)
        return out

    def reset(self) -> None:
        """Forget the history (the image stays)."""
        self.messages, self.outputs = [], []


__all__ = ["Session"]
