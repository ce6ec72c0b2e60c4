"""From a conversation to the token ids and embedding positions the decoder consumes.

Three steps, each usable alone:

1. **Flatten** messages. OpenAI-style content parts (``[{"type": "image"}, {"type": "text", "text": "Hi"}]``)
   become one string: parts in order, joined by ``"\\n"``, an image part written as the image token
   (``"<image>\\nHi"``), or dropped when the model places images after BOS (SPHINX), whose text
   never mentions them. ``None`` content is ``""``.
2. **Render** the prompt text: the checkpoint's jinja chat template in a sandbox
   (:func:`render_chat_template`), SPHINX's fixed format (:func:`sphinx_prompt`), MiniGPT-4's
   (:func:`minigpt4_prompt`), or
   :data:`DEFAULT_CHAT_TEMPLATE` when the checkpoint has no template. :class:`ChatFormat` picks
   one from ``ModelConfig.chat_format`` and knows the stop strings.
3. **Place images** (:func:`build_multimodal_ids`): text is split at each image token and the pieces
   encoded separately, so the image token is never tokenised as text; the result lists text and
   image segments and builds ``inputs_embeds`` from a token-embedding function and image embeddings.
   Pieces after the first continue it, except in formats listed in :data:`SEPARATE_SEGMENT_FORMATS`,
   whose reference code encodes every piece as a string of its own (MiniGPT-4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

from edgevlm.config import CHAT_FORMATS, IMAGE_PLACEMENTS
from edgevlm.errors import ChatTemplateError, ConfigError, PromptError, ShapeError
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from edgevlm.config import ModelConfig

SPHINX_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SPHINX_STOP = "\n###"

# MiniGPT-4 (Vicuna V0): CONV_VISION_Vicuna0, Vision-CAIR/MiniGPT-4 @ d94738a7
# minigpt4/conversation/conversation.py L110-118 (system, roles "Human: " / "Assistant: ", sep "###").
MINIGPT4_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. "
                   "You will be able to see the image once I provide it to you. Please answer my questions.")
MINIGPT4_IMAGE = "<Img><ImageHere></Img>"  # one uploaded image's Human message (conversation.py L228)
MINIGPT4_STOP = "###"  # demo.py L72 stops on "###" ids; Chat.answer cuts the text there (conversation.py L190)

# Chat formats whose reference code tokenises the text between images one piece at a time, each a fresh
# string (BOS on the first piece only), so with a SentencePiece vocabulary every later piece gets its own
# dummy-prefix "▁". MiniGPT-4: get_context_emb, minigpt4/models/minigpt_base.py L68-78 @ d94738a7
# (and prompt_wrap, L110-121, the same way in training). Every other format encodes later pieces as
# continuations of the first. ChatFormat.separate_segments defaults to membership here.
SEPARATE_SEGMENT_FORMATS = frozenset({"minigpt4"})

# Used when chat_format="template" and the checkpoint ships no template: plain text, no special
# tokens (so it works with any vocabulary), one turn per line; generation stops at the next "\nUser:".
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_STOP = "\nUser:"

# Special tokens that end a turn in common chat vocabularies; generation stops on any the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

IMAGE_SLOT_ID = -1  # fills image positions in MultimodalPrompt.input_ids; never a valid embedding row


# ---------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------

_IMAGE_PARTS = ("image", "image_url", "input_image")
_TEXT_PARTS = ("text", "input_text")


def flatten_messages(messages: Sequence[dict], image_token: str | None) -> list[dict[str, Any]]:
    """Plain copies of ``messages`` whose content is a string (rule in the module docstring).

    ``image_token=None`` drops image parts. Extra keys of a message are kept (copied).
    """
    if not isinstance(messages, (list, tuple)):
        raise PromptError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise PromptError(f"message {n} must be a dict with a string 'role', got {m!r:.80}")
        content = m.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, (list, tuple)):
            parts = []
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind in _TEXT_PARTS and isinstance(p.get("text"), str):
                    parts.append(p["text"])
                elif kind in _IMAGE_PARTS:
                    if image_token is not None:
                        parts.append(image_token)
                else:
                    raise PromptError(f"message {n}: content part {p!r:.80} is not a text or image part")
            text = "\n".join(parts)
        else:
            raise PromptError(f"message {n}: content must be a string or a list of parts, got {type(content).__name__}")
        out.append({**m, "content": text})
    return out


def count_images(messages: Sequence[dict], image_token: str) -> int:
    """Image parts plus image tokens written in string content."""
    return sum(m["content"].count(image_token) for m in flatten_messages(messages, image_token))


def _insert_placeholders(messages: list[dict], n_images: int, image_token: str) -> list[dict]:
    """LLaVA's convention for prompts that name no image: ``"<image>\\n" * n`` at the start of the
    first user message."""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            return [*messages[:i], {**m, "content": (image_token + "\n") * n_images + m["content"]}, *messages[i + 1:]]
    raise PromptError(f"{n_images} image(s) given but the conversation has no user message to attach them to")


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

class _TemplateRaised(Exception):
    pass


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # transformers' {% generation %} marks assistant text for training masks; rendering ignores it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise _TemplateRaised(str(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes <, >, & for HTML; chat templates (and transformers) want plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class _Namespace(jinja2.utils.Namespace):
        # the sandbox blocks reading "_x" attributes; refuse storing them too (as transformers does)
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")
            super().__setitem__(name, value)

    class _Sandbox(ImmutableSandboxedEnvironment):
        # jinja returns a silent Undefined for an unsafe attribute (``x.__class__`` prints ""); a
        # template reaching for Python internals is hostile or broken, so refuse it loudly instead.
        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    # Immutable sandbox: no attribute starting with "_", no calls that mutate lists/dicts, no
    # access to Python objects beyond the plain data we pass. trim/lstrip_blocks as transformers.
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=_Namespace)
    return env.from_string(template)


def _plain(v: Any) -> Any:
    # Templates see plain data only: no caller objects whose methods the sandbox would expose.
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    item = getattr(v, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(v, "ndim", 1) == 0:
        return _plain(item())
    return None  # images, tensors and other objects: a template has no use for them


def render_chat_template(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", *, max_chars: int = 1 << 22, **extra) -> str:
    """Render a (possibly untrusted) jinja chat template as transformers' ``apply_chat_template``.

    ``messages`` are passed as given (content parts included; see :func:`flatten_messages`).
    ``extra`` (``tools``, ``documents``, ``enable_thinking``...) become template variables.
    Raises :class:`ChatTemplateError` naming the problem; output over ``max_chars`` is refused.
    """
    import jinja2

    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    ctx = _plain({"messages": list(messages), "add_generation_prompt": bool(add_generation_prompt),
                  "bos_token": bos_token, "eos_token": eos_token, **extra})
    try:
        compiled = _compile(template)
        out, size = [], 0
        for chunk in compiled.generate(**ctx):  # streamed so a runaway loop is cut off early
            out.append(chunk)
            size += len(chunk)
            if size > max_chars:
                raise ChatTemplateError(f"chat template output exceeds {max_chars} characters")
        return "".join(out)
    except ChatTemplateError:
        raise
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template refused by the sandbox: {e}") from None
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template raised an error for these messages: {e}") from None
    except Exception as e:  # UndefinedError, TypeError in template expressions, recursion...
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def sphinx_prompt(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """SPHINX's conversation format (LLaMA2-Accessory ``conv_v1_2``, reference/architecture.md §1.6).

    ``system + "\\n\\n###" + " Human: {q}\\n###" + " Assistant: {a}\\n###" ...`` then ``" Assistant:"``.
    A leading system message replaces the default system text. Image parts are dropped: SPHINX
    places images after BOS, not in the text.
    """
    msgs = flatten_messages(messages, None)
    system = SPHINX_SYSTEM
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    out = [system, "\n\n###"]
    for n, m in enumerate(msgs):
        role = {"user": "Human", "assistant": "Assistant"}.get(m["role"])
        if role is None:
            raise PromptError(f"SPHINX prompts take user/assistant turns after one optional system message; "
                              f"message {n} has role {m['role']!r}")
        out.append(f" {role}: {m['content']}\n###")
    if add_generation_prompt:
        out.append(" Assistant:")
    return "".join(out)


def minigpt4_prompt(messages: Sequence[dict], add_generation_prompt: bool = True, n_images: int = 0) -> str:
    """MiniGPT-4 (Vicuna V0)'s conversation: ``Conversation.get_prompt`` with SINGLE separators
    (minigpt4/conversation/conversation.py L38-46 @ d94738a7) on ``CONV_VISION_Vicuna0`` (L110-118)::

        system + "###" + "Human: " + q + "###" + "Assistant: " + a + "###" ... + "Assistant: "

    A turn with empty content writes its role only (L44-45). A leading system message replaces the
    default system text. An image part is written ``<Img><ImageHere></Img>`` (``Chat.upload_img``, L228)
    and parts are joined by a space, as ``Chat.ask`` joins the question to the image message (L151-156).
    With ``n_images`` > 0 but no ``<ImageHere>`` in the messages, ``n_images`` such markers go before the
    first user message's text: ``"<Img><ImageHere></Img> question"``.
    """
    def joined(m):  # content parts flattened one by one, so that they join with " " (not "\n")
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, (list, tuple)):
            return m
        parts = [flatten_messages([{**m, "content": [p]}], MINIGPT4_IMAGE)[0]["content"] for p in content]
        return {**m, "content": " ".join(p for p in parts if p)}

    if isinstance(messages, (list, tuple)):
        messages = [joined(m) for m in messages]
    msgs = flatten_messages(messages, MINIGPT4_IMAGE)  # validates roles and content
    system = MINIGPT4_SYSTEM
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    if n_images and not any("<ImageHere>" in m["content"] for m in msgs):
        first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if first is None:
            raise PromptError(f"{n_images} image(s) given but the conversation has no user message to attach them to")
        text = " ".join([MINIGPT4_IMAGE] * n_images + ([msgs[first]["content"]] if msgs[first]["content"] else []))
        msgs = [*msgs[:first], {**msgs[first], "content": text}, *msgs[first + 1:]]
    out = [system, "###"]
    for n, m in enumerate(msgs):
        role = {"user": "Human: ", "assistant": "Assistant: "}.get(m["role"])
        if role is None:
            raise PromptError(f"MiniGPT-4 prompts take user/assistant turns after one optional system message; "
                              f"message {n} has role {m['role']!r}")
        out.append(role + m["content"] + "###" if m["content"] else role)
    if add_generation_prompt:
        out.append("Assistant: ")
    return "".join(out)


def qa_prompt(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """BLIP-2's prompt (its OPT / Flan language models have no chat template): each user turn is
    ``"Question: ..."``, each answer ``"Answer: ..."``, joined by spaces, ending in ``"Answer:"``.
    A system message is written first, as plain text; images are placed outside the text."""
    out = []
    for m in flatten_messages(messages, None):
        text = m["content"].strip()
        if m["role"] == "system":
            out.append(text)
        elif m["role"] == "user":
            out.append(f"Question: {text}")
        else:
            out.append(f"Answer: {text}")
    if add_generation_prompt:
        out.append("Answer:")
    return " ".join(t for t in out if t)


@dataclass(frozen=True)
class ChatFormat:
    """How a model's conversations become prompt text: ``kind`` = ``"template"`` | ``"sphinx"`` | ``"qa"`` |
    ``"minigpt4"``."""

    kind: str = "template"
    template: str | None = None  # the checkpoint's; None -> DEFAULT_CHAT_TEMPLATE
    bos_token: str = ""
    eos_token: str = ""
    image_placement: str = "after_bos"
    image_token: str = "<image>"
    template_vars: dict = field(default_factory=dict)  # extra variables for the template
    # Encode each text piece between images as a fresh string (see build_multimodal_ids); None: True
    # for the formats in SEPARATE_SEGMENT_FORMATS, else False.
    separate_segments: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in CHAT_FORMATS:
            raise ConfigError(f"chat format must be one of {CHAT_FORMATS}, got {self.kind!r}")
        if self.image_placement not in IMAGE_PLACEMENTS:
            raise ConfigError(f"image_placement must be one of {IMAGE_PLACEMENTS}, got {self.image_placement!r}")
        if self.separate_segments is None:  # frozen: derived defaults go through object.__setattr__
            object.__setattr__(self, "separate_segments", self.kind in SEPARATE_SEGMENT_FORMATS)
        elif not isinstance(self.separate_segments, bool):
            raise ConfigError(f"separate_segments must be a bool or None, got {self.separate_segments!r}")

    @classmethod
    def from_config(cls, config: "ModelConfig", tokenizer: Tokenizer) -> "ChatFormat":
        """From a ``ModelConfig`` (chat_format, image_placement, image_token) and the model's tokenizer."""
        return cls(kind=config.chat_format, template=tokenizer.chat_template, bos_token=tokenizer.bos_token,
                   eos_token=tokenizer.eos_token, image_placement=config.image_placement, image_token=config.image_token)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends the answer (cut it off); checkpoint templates rely on stop ids instead."""
        if self.kind == "sphinx":
            return (SPHINX_STOP,)
        if self.kind == "minigpt4":
            return (MINIGPT4_STOP,)
        return () if self.template else (DEFAULT_STOP,)

    def stop_ids(self, tokenizer: Tokenizer) -> frozenset[int]:
        """EOS, the checkpoint's end-of-turn ids, and the well-known end-of-turn special tokens it has."""
        known = (tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS)
        return tokenizer.stop_ids | {i for i in known if i is not None and i in tokenizer.special_ids}

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, n_images: int = 0) -> str:
        """Prompt text. With ``placeholder`` placement and ``n_images`` > 0 but no image named in the
        messages, ``n_images`` image tokens go at the start of the first user message."""
        if self.kind == "sphinx":
            return sphinx_prompt(messages, add_generation_prompt)
        if self.kind == "minigpt4":
            return minigpt4_prompt(messages, add_generation_prompt, n_images)
        if self.kind == "qa":
            return qa_prompt(messages, add_generation_prompt)
        placeholder = self.image_placement == "placeholder"
        msgs = flatten_messages(messages, self.image_token if placeholder else None)
        if placeholder and n_images and not any(self.image_token in m["content"] for m in msgs):
            msgs = _insert_placeholders(msgs, n_images, self.image_token)
        return render_chat_template(self.template or DEFAULT_CHAT_TEMPLATE, msgs, add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **self.template_vars)

    def build(self, tokenizer: Tokenizer, messages: Sequence[dict], tokens_per_image: Sequence[int] = (),
              add_generation_prompt: bool = True) -> "MultimodalPrompt":
        """``render`` + :func:`build_multimodal_ids`: one call from messages to positions."""
        text = self.render(messages, add_generation_prompt, n_images=len(tokens_per_image))
        return self.encode(tokenizer, text, tokens_per_image)

    def encode(self, tokenizer: Tokenizer, prompt_text: str,
               tokens_per_image: Sequence[int] = ()) -> "MultimodalPrompt":
        """Already rendered (or raw) prompt text -> positions, with this format's image placement, image
        token and segment encoding (:func:`build_multimodal_ids`)."""
        return build_multimodal_ids(tokenizer, prompt_text, len(tokens_per_image), tokens_per_image,
                                    self.image_placement, self.image_token, separate_segments=self.separate_segments)


# ---------------------------------------------------------------------------------------------
# image placement
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MultimodalPrompt:
    """A prompt as ordered segments: ``("text", (id, ...))`` and ``("image", i)`` (image ``i`` fills
    ``tokens_per_image[i]`` consecutive positions). Positions are 0..length-1 in segment order."""

    segments: tuple[tuple[str, Any], ...]
    tokens_per_image: tuple[int, ...]

    def _len(self, seg: tuple[str, Any]) -> int:
        return len(seg[1]) if seg[0] == "text" else self.tokens_per_image[seg[1]]

    @property
    def length(self) -> int:
        return sum(self._len(s) for s in self.segments)

    @property
    def input_ids(self) -> list[int]:
        """All positions; image positions hold IMAGE_SLOT_ID (-1), so they cannot be embedded by mistake."""
        out: list[int] = []
        for kind, v in self.segments:
            out.extend(v if kind == "text" else [IMAGE_SLOT_ID] * self.tokens_per_image[v])
        return out

    @property
    def text_ids(self) -> list[int]:
        return [i for kind, v in self.segments if kind == "text" for i in v]

    @property
    def image_spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` positions of image 0, 1, ..."""
        spans, pos = {}, 0
        for seg in self.segments:
            if seg[0] == "image":
                spans[seg[1]] = (pos, pos + self._len(seg))
            pos += self._len(seg)
        return [spans[i] for i in sorted(spans)]

    def embed(self, embed_tokens: Callable, image_embeds: Sequence):
        """``inputs_embeds [1, T, D]`` for the decoder's prefill.

        ``embed_tokens``: LongTensor ``[1, N]`` -> ``[1, N, D]`` (the decoder's token embedding), called
        once on all text ids. ``image_embeds[i]``: ``[tokens_per_image[i], D]`` (or ``[1, T_i, D]``), cast
        to the text embeddings' dtype and device.
        """
        import torch

        if len(image_embeds) != len(self.tokens_per_image):
            raise ShapeError(f"expected {len(self.tokens_per_image)} image embeddings, got {len(image_embeds)}")
        text = torch.tensor([self.text_ids], dtype=torch.long)  # [1, N_text]
        text_emb = embed_tokens(text)  # [1, N_text, D]
        if text_emb.dim() != 3 or text_emb.shape[:2] != text.shape:
            raise ShapeError(f"embed_tokens must map [1, {text.shape[1]}] to [1, {text.shape[1]}, D], "
                             f"got {tuple(text_emb.shape)}")
        d = text_emb.shape[-1]
        pieces, t = [], 0
        for kind, v in self.segments:
            if kind == "text":
                pieces.append(text_emb[0, t:t + len(v)])  # [n, D]
                t += len(v)
                continue
            img = image_embeds[v]
            img = img[0] if img.dim() == 3 and img.shape[0] == 1 else img
            want = (self.tokens_per_image[v], d)
            if tuple(img.shape) != want:
                raise ShapeError(f"image {v} embeddings: expected shape {want}, got {tuple(image_embeds[v].shape)}")
            pieces.append(img.to(dtype=text_emb.dtype, device=text_emb.device))
        return torch.cat(pieces, dim=0).unsqueeze(0)  # [1, T, D]


def build_multimodal_ids(tokenizer: Tokenizer, prompt_text: str, n_images: int, tokens_per_image: Sequence[int],
                         placement: str, image_token: str = "<image>", add_bos: bool | None = None, *,
                         separate_segments: bool = False) -> MultimodalPrompt:
    """Token ids and image positions for one prompt.

    - ``after_bos`` (SPHINX): all image blocks, in order, right after the first token when it is BOS,
      else at position 0. Image tokens written in the text are removed (there must be none, or one
      per image).
    - ``before_bos`` (BLIP-2, InstructBLIP): all image blocks at position 0, before BOS and the text.
    - ``placeholder`` (LLaVA, BLIP-3): image ``i`` replaces the ``i``-th image token. With none in the
      text, the blocks go where ``after_bos`` would put them (the start of a raw prompt;
      :meth:`ChatFormat.render` puts placeholders at the start of the first user turn instead).

    The text is split at each image token and the pieces encoded separately: BOS only on the first
    piece (per ``add_bos``), later pieces as continuations (no SentencePiece prefix space), or with
    ``separate_segments`` each as a fresh string without BOS, as ``tokenizer(piece,
    add_special_tokens=False)`` would (a SentencePiece vocabulary gives each piece its own dummy-prefix
    "▁": ``"</Img> Hi"`` -> ``▁</Img>▁Hi``). A BOS the template wrote itself is not doubled.
    """
    if placement not in IMAGE_PLACEMENTS:
        raise ConfigError(f"image placement must be one of {IMAGE_PLACEMENTS}, got {placement!r}")
    tpi = tuple(int(t) for t in tokens_per_image)
    if len(tpi) != n_images or any(t <= 0 for t in tpi):
        raise PromptError(f"tokens_per_image must hold {n_images} positive counts, got {list(tokens_per_image)}")
    if not image_token:
        raise ConfigError("image_token must be a non-empty string")
    if not isinstance(prompt_text, str):
        raise PromptError(f"prompt_text must be a string, got {type(prompt_text).__name__}")
    pieces = prompt_text.split(image_token)
    found = len(pieces) - 1
    if found and found != n_images:
        raise PromptError(f"the prompt has {found} {image_token!r} placeholder(s) but {n_images} image(s) were given")

    if placement != "placeholder" or not found:
        ids = _dedupe_bos(tokenizer, tokenizer.encode("".join(pieces), add_bos))
        head = 1 if placement != "before_bos" and ids and ids[0] == tokenizer.bos_id else 0
        segs = [("text", tuple(ids[:head])), *(("image", i) for i in range(n_images)), ("text", tuple(ids[head:]))]
    else:
        segs = []
        for j, piece in enumerate(pieces):
            if j == 0:
                ids = _dedupe_bos(tokenizer, tokenizer.encode(piece, add_bos))
            elif separate_segments:
                ids = tokenizer.encode(piece, add_bos=False)  # a string of its own: prefix space, no BOS
            else:
                ids = tokenizer.encode(piece, continuation=True)
            segs.append(("text", tuple(ids)))
            if j < n_images:
                segs.append(("image", j))
    prompt = MultimodalPrompt(tuple(s for s in segs if s[0] == "image" or s[1]), tpi)
    if prompt.length == 0:
        raise PromptError("the prompt is empty: no text tokens and no images")
    return prompt


def _dedupe_bos(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    # A template that writes {{ bos_token }} plus a tokenizer that adds BOS would give two.
    if len(ids) >= 2 and ids[0] == ids[1] == tokenizer.bos_id:
        return ids[1:]
    return ids


__all__ = [
    "ChatFormat", "ChatTemplateError", "PromptError", "MultimodalPrompt", "build_multimodal_ids",
    "render_chat_template", "sphinx_prompt", "qa_prompt", "flatten_messages", "count_images", "SPHINX_SYSTEM", "SPHINX_STOP",
    "minigpt4_prompt", "MINIGPT4_SYSTEM", "MINIGPT4_IMAGE", "MINIGPT4_STOP", "SEPARATE_SEGMENT_FORMATS",
    "DEFAULT_CHAT_TEMPLATE", "DEFAULT_STOP", "END_OF_TURN_TOKENS", "IMAGE_SLOT_ID",
]
