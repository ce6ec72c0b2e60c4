"""Text <-> token ids for the decoder: one :class:`Tokenizer` over HF ``tokenizers`` models.

Two sources build the same object:

- a transformers tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``): the file already
  describes the whole pipeline, we only read the special tokens, ``add_bos_token`` and the template;
- GGUF metadata (``tokenizer.ggml.*``): a vocabulary, merges or scores and token types, from which we
  build the ``tokenizers`` model llama.cpp would run. ``gpt2`` = byte-level BPE whose split regex is
  named by ``tokenizer.ggml.pre``; ``llama`` = SentencePiece-style BPE (``▁`` for spaces, ``<0xNN>``
  byte-fallback tokens, merges derived from the scores when the file has none).

Decoding works on bytes where the vocabulary says what each token's bytes are (byte-level and
GGUF SentencePiece vocabularies): ``decode`` and :class:`StreamDecoder` then share one definition,
so streamed pieces always concatenate to exactly ``decode(ids)`` and never split a UTF-8 character.

BOS is never taken from a post-processor: text is encoded without special tokens and BOS is
prepended here when ``add_bos`` (per call, else the checkpoint's default) says so. EOS is never
appended: every caller of this runtime encodes prompts that the model continues.

Documented conversion: in a byte-level vocabulary that lacks a token for some byte (SmolLM2 has
none for 21 bytes, e.g. 0x04 and 0xF1), that byte is dropped from the input, as transformers does.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from edgevlm.errors import CheckpointError, TokenizerError, WeightsNotFoundError

SPIECE_SPACE = "\u2581"  # "▁": SentencePiece's visible space


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to code points 256, 257, ... in byte order, so any byte string is printable."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    moved = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + moved.index(b)) for b in range(256)}


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

# Split rules for byte-level vocabularies, keyed by llama.cpp's ``tokenizer.ggml.pre`` names.
# GPT-2's own regex is the one ByteLevel(use_regex=True) applies.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_FAMILIES = {
    "gpt2": ("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"),
    # StarCoder-style: every digit is its own piece *before* the GPT-2 regex runs. SmolLM2 is one.
    # (transformers 5.x maps "smollm" to plain GPT-2 and so splits "  1" as Ġ,Ġ,1 instead of ĠĠ,1.)
    "digits": ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"),
    "llama3": ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"),
    "qwen2": ("qwen2", "deepseek-r1-qwen", "megrez"),
}
_PRE_FAMILY = {name: fam for fam, names in _PRE_FAMILIES.items() for name in names}


def _byte_level_pre(pre: str):
    fam = _PRE_FAMILY.get(pre)
    if fam is None:
        raise CheckpointError(f"tokenizer.ggml.pre {pre!r} is not supported; known: {sorted(_PRE_FAMILY)}")
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if fam == "gpt2":
        return gpt2
    if fam == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    split = _LLAMA3_SPLIT if fam == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class Tokenizer:
    """Encode/decode for one checkpoint. Build with :meth:`from_tokenizer_json` or :meth:`from_gguf_metadata`.

    Attributes: ``bos_id``/``eos_id``/``pad_id`` (``None`` where the checkpoint has none),
    ``bos_token``/``eos_token`` (their text, for chat templates), ``add_bos`` (default of
    :meth:`encode`), ``vocab_size`` (rows of the embedding table), ``special_ids`` (ids that
    ``skip_special`` drops), ``stop_ids`` (EOS plus end-of-turn ids the checkpoint names),
    ``chat_template`` (jinja source or ``None``).
    """

    def __init__(self, tk: _HFTokenizer, *, vocab_size: int, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None, add_bos: bool, special_ids: Iterable[int] = (), stop_ids: Iterable[int] = (),
                 chat_template: str | None = None, piece_bytes: list[bytes] | None = None,
                 strip_first_space: bool = False, continuation_tk: _HFTokenizer | None = None):
        self._tk = tk
        # Same model without the leading-space prefix: encodes text that continues an earlier piece.
        self._cont_tk = continuation_tk or tk
        self.vocab_size = int(vocab_size)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.special_ids = frozenset(special_ids)
        self.stop_ids = frozenset(i for i in (eos_id, *stop_ids) if i is not None)
        self.chat_template = chat_template
        self._piece_bytes = piece_bytes  # per id, the exact bytes the token stands for
        self._strip_first_space = strip_first_space  # SentencePiece: undo the prefix space once
        self.bos_token = self.id_to_token(bos_id) if bos_id is not None else ""
        self.eos_token = self.id_to_token(eos_id) if eos_id is not None else ""

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, add_bos={self.add_bos})")

    # ---------------------------------------------------------------------------------------- ids
    def token_to_id(self, token: str) -> int | None:
        """Id of a token spelled as in the vocabulary (``"<|im_end|>"``, ``"Ġthe"``), else ``None``."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:  # the vocabulary's spelling ("Ġthe")
        return self._tk.id_to_token(int(token_id))

    def encode(self, text: str, add_bos: bool | None = None, *, continuation: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become their ids.

        ``add_bos=None`` follows the checkpoint (``add_bos``). ``continuation=True`` encodes text that
        follows an earlier piece of the same prompt: no BOS and no SentencePiece prefix space.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"text is not valid Unicode (lone surrogate at index {e.start})") from None
        tk = self._cont_tk if continuation else self._tk
        ids = tk.encode(text, add_special_tokens=False).ids
        bos = self.add_bos if add_bos is None else add_bos
        if bos and not continuation:
            if self.bos_id is None:
                raise TokenizerError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def _check_ids(self, ids: Iterable[Any]) -> list[int]:
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError) as e:
            raise TokenizerError(f"token ids must be integers: {e}") from None
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return out

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes | None:
        """The bytes one token stands for (``None`` if this vocabulary cannot say token by token)."""
        if self._piece_bytes is None:
            return None
        if skip_special and token_id in self.special_ids:
            return b""
        return self._piece_bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``. Invalid UTF-8 (a model may emit half a character) becomes U+FFFD."""
        ids = self._check_ids(ids)
        if self._piece_bytes is None:
            return self._tk.decode(ids, skip_special_tokens=skip_special)
        text = b"".join(self.token_bytes(i, skip_special) for i in ids).decode("utf-8", errors="replace")
        if self._strip_first_space and text.startswith(" "):
            text = text[1:]
        return text

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    # ------------------------------------------------------------------------ tokenizer.json folder
    @classmethod
    def from_tokenizer_json(cls, path_or_dir: str | os.PathLike) -> "Tokenizer":
        """Load a transformers tokenizer folder (or a ``tokenizer.json`` path; its folder is read too).

        ``special_tokens_map.json`` overrides ``tokenizer_config.json`` for bos/eos/pad, as in
        transformers; the chat template comes from ``chat_template.jinja``, else the config, else
        ``chat_template.json``. Without ``add_bos_token`` in the config, BOS is added when the file's
        post-processor would add it.
        """
        path = os.fspath(path_or_dir)
        if os.path.isdir(path):
            folder, file = path, os.path.join(path, "tokenizer.json")
        else:
            folder, file = os.path.dirname(path), path
        if not os.path.isfile(file):
            raise WeightsNotFoundError(f"no tokenizer.json at {file!r}")
        try:
            tk = _HFTokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exception for malformed JSON
            raise CheckpointError(f"cannot read {file!r} as a tokenizers file: {e}") from None
        cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        cfg.update({k: v for k, v in _read_json(os.path.join(folder, "special_tokens_map.json")).items()
                    if k in ("bos_token", "eos_token", "pad_token", "unk_token")})

        def tid(key: str) -> int | None:
            name = _token_content(cfg.get(key))
            return None if name is None else tk.token_to_id(name)

        bos_id, eos_id, pad_id = tid("bos_token"), tid("eos_token"), tid("pad_token")
        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:
            probe = tk.encode("", add_special_tokens=True).ids
            add_bos = bool(probe) and probe[0] == bos_id
        added = tk.get_added_tokens_decoder()
        spec = json.loads(tk.to_str())
        n = tk.get_vocab_size(with_added_tokens=True)
        family, strip = _decoder_family(spec.get("decoder"))
        piece_bytes = None
        if family == "byte_level":
            piece_bytes = [_byte_level_bytes(tk.id_to_token(i) or "") for i in range(n)]
        elif family == "spm":  # LLaMA-2 style: "▁" spaces, <0xNN> byte fallback; added tokens as written
            piece_bytes = [(tk.id_to_token(i) or "").encode() if i in added else _spm_bytes(tk.id_to_token(i) or "", 6)
                           for i in range(n)]
        return cls(tk, vocab_size=n, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                   special_ids=[i for i, t in added.items() if t.special], chat_template=_read_template(folder, cfg),
                   piece_bytes=piece_bytes, strip_first_space=strip, continuation_tk=_without_prefix_space(tk, spec))

    # ------------------------------------------------------------------------------- GGUF metadata
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Build from GGUF key-values given as plain python values (see :func:`edgevlm.runtime.readers.gguf_reader.read_gguf_metadata`)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError("GGUF metadata has no usable tokenizer.ggml.tokens (a non-empty list of strings)")
        n = len(tokens)
        types = _list_of(meta, "tokenizer.ggml.token_type", n, int) or [1] * n
        if kind == "gpt2":
            tk, cont, strip = _gguf_byte_level(meta, tokens, types), None, False
            piece_bytes = [_byte_level_bytes(t) for t in tokens]
        elif kind == "llama":
            tk, cont, strip = _gguf_sentencepiece(meta, tokens, types)
            piece_bytes = [_spm_bytes(t, y) for t, y in zip(tokens, types)]
        else:
            raise CheckpointError(f"tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2', 'llama'")

        def tid(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            if v is None:
                return None
            if not isinstance(v, int) or not 0 <= v < n:
                raise CheckpointError(f"tokenizer.ggml.{key} = {v!r} is not a token id in [0, {n})")
            return v

        special = [i for i, y in enumerate(types) if y in (2, 3)]  # unknown, control
        default_bos = kind == "llama"  # llama.cpp adds BOS to SentencePiece vocabularies unless told not to
        return cls(tk, vocab_size=n, bos_id=tid("bos_token_id"), eos_id=tid("eos_token_id"),
                   pad_id=tid("padding_token_id"), add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
                   special_ids=special, stop_ids=(tid("eot_token_id"), tid("eom_token_id")),
                   chat_template=template if isinstance(template := meta.get("tokenizer.chat_template"), str) else None,
                   piece_bytes=piece_bytes,
                   strip_first_space=strip, continuation_tk=cont)

    # ------------------------------------------------------------------------------------- writing
    def save(self, folder: str | os.PathLike) -> None:
        """Write this tokenizer as a transformers tokenizer folder that :meth:`from_tokenizer_json` reads
        back: ``tokenizer.json`` (the whole ``tokenizers`` pipeline, built from GGUF or SentencePiece
        metadata or as read) and ``tokenizer_config.json`` (bos/eos/pad tokens, ``add_bos_token``, the chat
        template). What the folder cannot say (extra stop ids, a vocabulary whose spellings repeat) is not
        checked here; ``edgevlm convert`` reads the folder back and compares."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self._tk.save(os.path.join(folder, "tokenizer.json"))
        name = lambda i: self.id_to_token(i) if i is not None else None  # noqa: E731
        cfg = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "pad_token": name(self.pad_id),
               "add_bos_token": self.add_bos}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)


class StreamDecoder:
    """Incremental detokeniser: ``feed(id)`` returns the new text (possibly ``""``), ``flush()`` the rest.

    The pieces concatenate to exactly ``tokenizer.decode(ids, skip_special)``. A multi-byte character
    whose bytes arrive over several tokens is held back until it is complete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tok, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # for the SentencePiece prefix-space strip
        self._sent = 0  # generic path: characters of decode(ids) already returned

    def feed(self, token_id: int) -> str:
        (token_id,) = self.tok._check_ids([token_id])
        self.ids.append(token_id)
        if self.tok._piece_bytes is not None:
            return self._emit(self._utf8.decode(self.tok.token_bytes(token_id, self.skip_special)))
        # Decoders we cannot read token by token: decode everything again (fast, in Rust) and return
        # what is new, holding it back while it ends in U+FFFD (a character still incomplete).
        text = self.tok.decode(self.ids, self.skip_special)
        if text.endswith("\ufffd"):
            return ""
        new, self._sent = text[self._sent:], len(text)
        return new

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end becomes U+FFFD)."""
        if self.tok._piece_bytes is not None:
            return self._emit(self._utf8.decode(b"", final=True))
        text = self.tok.decode(self.ids, self.skip_special)
        new, self._sent = text[self._sent:], len(text)
        return new

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self.tok._strip_first_space and text.startswith(" "):
                text = text[1:]
        return text


# ----------------------------------------------------------------------------------- builders

def _list_of(meta: dict, key: str, n: int, kind: type | tuple[type, ...]) -> list | None:
    v = meta.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != n or not all(isinstance(x, kind) for x in v):
        raise CheckpointError(f"{key} must be a list of {n} numbers (one per token), "
                              f"got {type(v).__name__} of length {len(v) if hasattr(v, '__len__') else '?'}")
    return v


def _merges(meta: dict) -> list[tuple[str, str]] | None:
    raw = meta.get("tokenizer.ggml.merges")
    if raw is None:
        return None
    out = [m.partition(" ")[::2] if isinstance(m, str) else ("", "") for m in raw]
    for (a, b), m in zip(out, raw):
        if not (a and b):
            raise CheckpointError(f"tokenizer.ggml.merges entry {m!r} is not 'left right'")
    return out


def _first_ids(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated spelling keeps its first id: text can reach only one
    return vocab


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **kw) -> models.BPE:
    try:
        return models.BPE(vocab=vocab, merges=merges, **kw)
    except Exception as e:  # a merge naming a token that is not in the vocabulary
        raise CheckpointError(f"GGUF merges do not fit the vocabulary: {e}") from None


def _add_gguf_tokens(tk: _HFTokenizer, tokens: list[str], types: list[int], special_types: tuple[int, ...]) -> None:
    # Control tokens match whole (one id for "<|im_start|>") and count as special; user-defined
    # ones (type 4, e.g. "<think>") match whole but are ordinary text for skip_special.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, y in zip(tokens, types) if y in special_types])
    user = [AddedToken(t, special=False, normalized=False) for t, y in zip(tokens, types) if y == 4]
    if user:
        tk.add_tokens(user)


def _gguf_byte_level(meta: dict, tokens: list[str], types: list[int]) -> _HFTokenizer:
    merges = _merges(meta)
    if merges is None:
        raise CheckpointError("a 'gpt2' GGUF tokenizer needs tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    # LLaMA-3-style vocabularies take a whole word that is a token before merging (llama.cpp, HF alike)
    tk = _HFTokenizer(_bpe(_first_ids(tokens), merges, ignore_merges=_PRE_FAMILY.get(pre) == "llama3"))
    tk.pre_tokenizer = _byte_level_pre(pre)
    tk.decoder = decoders.ByteLevel()
    _add_gguf_tokens(tk, tokens, types, (3,))
    return tk


def _gguf_sentencepiece(meta: dict, tokens: list[str], types: list[int]) -> tuple[_HFTokenizer, _HFTokenizer, bool]:
    """SentencePiece BPE as llama.cpp runs it: spaces -> ``▁``, a ``▁`` prefix (``add_space_prefix``,
    default on), merge by score, unknown characters -> ``<0xNN>`` byte tokens."""
    scores = _list_of(meta, "tokenizer.ggml.scores", len(tokens), (int, float))
    vocab = _first_ids(tokens)
    merges = _merges(meta)
    if merges is None:
        if scores is None:
            raise CheckpointError("a 'llama' GGUF tokenizer needs tokenizer.ggml.scores or tokenizer.ggml.merges")
        # A pair may merge when both halves and the result are tokens; better-scored results merge first.
        ranked = []
        for i, (t, y) in enumerate(zip(tokens, types)):
            if y != 1:
                continue
            for cut in range(1, len(t)):
                a, b = t[:cut], t[cut:]
                if a in vocab and b in vocab:
                    ranked.append((-scores[i], vocab[a], vocab[b], a, b))
        merges = [(a, b) for *_, a, b in sorted(ranked)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))

    def build(with_prefix: bool) -> _HFTokenizer:
        tk = _HFTokenizer(_bpe(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
        steps = [normalizers.Prepend(SPIECE_SPACE)] if with_prefix else []
        tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_SPACE)])
        tk.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                        *([decoders.Strip(" ", 1, 0)] if with_prefix else [])])
        _add_gguf_tokens(tk, tokens, types, (2, 3))
        return tk

    return build(prefix), build(False), prefix


def _byte_level_bytes(token: str) -> bytes:
    # As the ByteLevel decoder does: a token spelled in the byte alphabet maps back byte by byte;
    # any other token (an added token such as "<| a |>") stands for its own UTF-8.
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _spm_bytes(token: str, token_type: int) -> bytes:
    if token_type == 6 and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace(SPIECE_SPACE, " ").encode("utf-8")


def _decoder_family(dec: dict | None) -> tuple[str | None, bool]:
    """Which tokenizer.json decoders we can read token by token: ``("byte_level", False)``,
    ``("spm", strip_first_space)`` for ▁-spaces with byte fallback, else ``(None, False)``."""
    dec = dec or {}
    steps = (dec.get("decoders") or []) if dec.get("type") == "Sequence" else [dec]
    kinds = [d.get("type") for d in steps]
    if kinds == ["ByteLevel"]:
        return "byte_level", False
    spaces = any(d.get("type") == "Replace" and d.get("pattern", {}).get("String") == SPIECE_SPACE
                 and d.get("content") == " " for d in steps)
    metaspace = [d for d in steps if d.get("type") == "Metaspace"]
    if "ByteFallback" not in kinds or not (spaces or metaspace) or not set(kinds) <= _SPM_DECODERS:
        return None, False
    strip = any(d.get("type") == "Strip" and d.get("content") == " " and d.get("start") == 1 for d in steps)
    strip |= any(d.get("prepend_scheme", "always") != "never" for d in metaspace)
    return "spm", strip


_SPM_DECODERS = {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}


def _without_prefix_space(tk: _HFTokenizer, spec: dict) -> _HFTokenizer | None:
    """A copy of a tokenizer.json pipeline that adds no SentencePiece prefix space (``None`` if it adds none)."""
    changed = False

    def walk(node: Any) -> Any:
        nonlocal changed
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == SPIECE_SPACE:
                changed = True
                return None
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
                changed = True
                return {**node, "prepend_scheme": "never", "add_prefix_space": False}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [x for x in (walk(v) for v in node) if x is not None]
        return node

    spec = {**spec, "normalizer": walk(spec.get("normalizer")), "pre_tokenizer": walk(spec.get("pre_tokenizer"))}
    return _HFTokenizer.from_str(json.dumps(spec)) if changed else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path!r}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(v: Any) -> str | None:
    if isinstance(v, dict):  # serialised AddedToken
        v = v.get("content")
    return v if isinstance(v, str) else None


def _read_template(folder: str, cfg: dict) -> str | None:
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    tpl = cfg.get("chat_template") or _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


# ---------------------------------------------------------------------------------- GGUF files

__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError", "BYTE_TO_CHAR", "CHAR_TO_BYTE"]
