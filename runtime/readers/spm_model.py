"""A SentencePiece ``tokenizer.model`` (a serialized ``ModelProto``) -> GGUF-style tokenizer metadata.

LLaMA-family checkpoints outside transformers (Meta's releases, LLaMA2-Accessory's SPHINX folders) ship
their vocabulary as this protobuf. The ``sentencepiece`` package is not needed: the few fields that
define a BPE vocabulary are read straight from the wire format, and the result is the metadata
llama.cpp's converter writes for the same file (``tokenizer.ggml.*``), which
:meth:`edgevlm.runtime.tokenizer.Tokenizer.from_gguf_metadata` already turns into a tokenizer.

Fields read (``sentencepiece_model.proto``)::

    ModelProto      1 pieces (repeated SentencePiece)  2 trainer_spec  3 normalizer_spec
    SentencePiece   1 piece (string)  2 score (float)  3 type (enum; NORMAL=1 UNKNOWN=2 CONTROL=3
                    USER_DEFINED=4 UNUSED=5 BYTE=6, the same numbers GGUF's token types use)
    TrainerSpec     3 model_type (UNIGRAM=1 default, BPE=2)
                    40 unk_id (0)  41 bos_id (1)  42 eos_id (2)  43 pad_id (-1)
    NormalizerSpec  1 name  3 add_dummy_prefix (true)  4 remove_extra_whitespaces (true)

Only what the runtime's SentencePiece-BPE emulation reproduces is accepted: BPE models whose
normaliser is ``identity`` and keeps whitespace as it is (LLaMA's, TinyLlama's). Anything else is a
:class:`~edgevlm.errors.CheckpointError` that says to put a ``tokenizer.json`` beside the model instead.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgevlm.errors import CheckpointError, WeightsNotFoundError

_MAX_BYTES = 64 << 20  # LLaMA's tokenizer.model is 0.5 MB; a 256k-piece vocabulary stays under 10 MB
_BPE = 2


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of one message: ints for varint/fixed, bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        if pos > len(buf):
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _int32(v: int) -> int:  # proto int32 is sent as a 64-bit two's-complement varint
    return v - (1 << 64) if v >= 1 << 63 else v


def _message(buf: bytes, wanted: dict[int, int]) -> dict[int, Any]:
    """The last value of each wanted field (``number -> wire type``), as protobuf merges scalars."""
    out: dict[int, Any] = {}
    for number, wire, value in _fields(buf):
        if number in wanted:
            if wire != wanted[number]:
                raise ValueError(f"field {number} has wire type {wire}, expected {wanted[number]}")
            out[number] = value
    return out


def read_spm_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``tokenizer.model`` -> ``tokenizer.ggml.*`` metadata (model ``"llama"``: SentencePiece BPE)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"no SentencePiece model at {path}")
    size = path.stat().st_size
    if size > _MAX_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is too large for a SentencePiece model (limit {_MAX_BYTES})")
    buf = path.read_bytes()
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer = normalizer = b""
    try:
        for number, wire, value in _fields(buf):
            if number == 1 and wire == 2:
                p = _message(value, {1: 2, 2: 5, 3: 0})
                tokens.append(p.get(1, b"").decode("utf-8"))
                scores.append(struct.unpack("<f", p[2])[0] if 2 in p else 0.0)
                types.append(p.get(3, 1))
            elif number == 2 and wire == 2:
                trainer = value
            elif number == 3 and wire == 2:
                normalizer = value
        spec = _message(trainer, {3: 0, 40: 0, 41: 0, 42: 0, 43: 0})
        norm = _message(normalizer, {1: 2, 3: 0, 4: 0})
        name = norm.get(1, b"").decode("utf-8")
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from None
    if not tokens or any(not t for t in tokens):
        raise CheckpointError(f"{path}: not a SentencePiece model (no pieces, or an empty piece)")
    bad_types = sorted({t for t in types if not 1 <= t <= 6})
    if bad_types:
        raise CheckpointError(f"{path}: unknown piece types {bad_types}")

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}; edgevlm reads SentencePiece BPE models with identity "
                               "normalisation (LLaMA's). Put the model's tokenizer.json (+ tokenizer_config.json) "
                               "beside it instead")

    if spec.get(3, 1) != _BPE:
        raise refuse(f"model_type {spec.get(3, 1)} is not BPE (2)")
    if name not in ("", "identity"):
        raise refuse(f"normaliser {name!r} rewrites the text")
    if norm.get(4, 1):
        raise refuse("remove_extra_whitespaces is on")

    n = len(tokens)

    def special(field: int, default: int) -> int | None:
        i = _int32(spec.get(field, default))
        if i < 0:
            return None
        if i >= n:
            raise CheckpointError(f"{path}: special token id {i} (trainer_spec field {field}) is not in [0, {n})")
        return i

    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": bool(norm.get(3, 1)),
        "tokenizer.ggml.add_bos_token": True,  # LLaMA-style: BOS is prepended by the caller, as Meta's encode(bos=True)
    }
    for key, field, default in (("unknown", 40, 0), ("bos", 41, 1), ("eos", 42, 2), ("padding", 43, -1)):
        i = special(field, default)
        if i is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    return meta


__all__ = ["read_spm_metadata"]
