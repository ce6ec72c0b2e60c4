"""The instruction tokenizer of an InstructBLIP Q-Former (BERT WordPiece), separate from the decoder's.

InstructBLIP folders carry it in a subfolder: ``InstructBlipProcessor.save_pretrained`` writes the
decoder's tokenizer at the top and each further tokenizer under its attribute name, so the Q-Former's
lives in ``<folder>/qformer_tokenizer/`` (``tokenizer.json`` + ``tokenizer_config.json``; the Hub's
Salesforce/instructblip-* repos have the same layout). The ``tokenizer.json`` describes the whole
pipeline (BERT normaliser and pre-tokeniser, WordPiece, the ``[CLS] $A [SEP]`` template), so it is run
as written through the ``tokenizers`` package, special tokens included, as
``InstructBlipProcessor`` does (``qformer_tokenizer(text)``, ``add_special_tokens=True``).

:class:`edgevlm.runtime.tokenizer.Tokenizer` is not used: it serves decoders (no template tokens, only
an optional BOS), while the Q-Former needs ``[CLS] ... [SEP]``.

One documented difference from transformers: an instruction longer than the Q-Former's position
table (``max_positions``, 512 for InstructBLIP) is truncated to it, keeping ``[CLS]``/``[SEP]``, where
transformers would fail with an index error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer

from edgevlm.errors import CheckpointError, TokenizerError, WeightsNotFoundError

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"  # InstructBlipProcessor's attribute name = its subfolder


def find_qformer_tokenizer(folder: str | os.PathLike) -> Path | None:
    """The Q-Former tokenizer folder of a transformers model folder (``<folder>/qformer_tokenizer``), or
    ``folder`` itself when it is that tokenizer folder; ``None`` when there is none."""
    folder = Path(folder)
    if (folder / QFORMER_TOKENIZER_DIR / "tokenizer.json").is_file():
        return folder / QFORMER_TOKENIZER_DIR
    # A tokenizer folder itself; a model folder's own tokenizer.json is the decoder's, never the Q-Former's.
    if (folder / "tokenizer.json").is_file() and not (folder / "config.json").is_file():
        return folder
    return None


class QFormerTokenizer:
    """Instruction text -> Q-Former input ids. Build with :meth:`from_folder`.

    ``encode(text) -> list[int]`` (``[CLS] ... [SEP]``, at most ``max_length`` ids);
    ``__call__(texts) -> (ids int64 [N, L], mask bool [N, L])``, right-padded with ``pad_id`` to the
    longest row (True = real token); :meth:`pad` does the same for id lists. ``vocab_size`` is the
    vocabulary size, added tokens included.
    """

    def __init__(self, tk: _HFTokenizer, *, pad_id: int, max_length: int | None = None):
        self._tk = tk
        self._tk.no_padding()  # padding is ours (pad); a saved file may carry its last call's settings
        if max_length is not None:
            if max_length < 2:
                raise TokenizerError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
            self._tk.enable_truncation(max_length)  # truncates the text, keeps the template's tokens
        else:
            self._tk.no_truncation()
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        if not 0 <= pad_id < self.vocab_size:
            raise TokenizerError(f"pad_id {pad_id} is outside the vocabulary [0, {self.vocab_size})")
        self.pad_id = int(pad_id)
        self.max_length = max_length

    def __repr__(self) -> str:
        return f"QFormerTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, max_length={self.max_length})"

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, max_length: int | None = None,
                    pad_id: int | None = None) -> "QFormerTokenizer":
        """Load from an InstructBLIP model folder (its ``qformer_tokenizer/`` subfolder) or from the
        tokenizer folder itself. ``pad_id`` defaults to the id of ``tokenizer_config.json``'s
        ``pad_token``, else the file's own padding id, else ``[PAD]``'s."""
        found = find_qformer_tokenizer(path)
        if found is None:
            raise WeightsNotFoundError(f"no Q-Former tokenizer at {os.fspath(path)!r}: expected "
                                       f"{QFORMER_TOKENIZER_DIR}/tokenizer.json (as InstructBlipProcessor saves it)")
        file = found / "tokenizer.json"
        try:
            tk = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception for malformed JSON
            raise CheckpointError(f"cannot read {str(file)!r} as a tokenizers file: {e}") from None
        if pad_id is None:
            pad_id = _pad_id(tk, found / "tokenizer_config.json")
        if pad_id is None:
            raise CheckpointError(f"{found}: the Q-Former tokenizer names no pad token; pass pad_id")
        return cls(tk, pad_id=pad_id, max_length=max_length)

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (its pad token) to ``folder``, a folder
        :meth:`from_folder` reads back (truncation is set again from its ``max_length``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(folder / "tokenizer.json"))
        cfg = {"pad_token": self._tk.id_to_token(self.pad_id)}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """Ids of one instruction, with the file's template tokens (``[CLS] ... [SEP]`` for BERT)."""
        if not isinstance(text, str):
            raise TokenizerError(f"an instruction must be a str, got {type(text).__name__}")
        return self._tk.encode(text, add_special_tokens=True).ids

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Id lists -> ``(ids int64 [N, L], mask bool [N, L])``, right-padded with ``pad_id``; L = longest row."""
        return pad_ids(rows, self.pad_id)

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One instruction or a list -> ``(ids [N, L], mask [N, L])`` as ``InstructBlipProcessor``'s
        ``qformer_input_ids`` / ``qformer_attention_mask`` with ``padding=True`` (mask as bool)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.pad([self.encode(t) for t in texts])


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists -> ``(ids int64 [N, L], mask bool [N, L])``, right-padded with ``pad_id`` (BERT pads on
    the right); L is the longest row, True marks real tokens."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def _pad_id(tk: _HFTokenizer, config_file: Path) -> int | None:
    name = None
    if config_file.is_file():
        try:
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {config_file}: {e}") from None
        tok = cfg.get("pad_token")
        name = tok.get("content") if isinstance(tok, dict) else tok
    if isinstance(name, str) and tk.token_to_id(name) is not None:
        return tk.token_to_id(name)
    if tk.padding is not None and "pad_id" in tk.padding:
        return int(tk.padding["pad_id"])
    return tk.token_to_id("[PAD]")


def load_qformer_tokenizer(folder: str | os.PathLike, *, max_length: int | None = None,
                           pad_id: int | None = None) -> QFormerTokenizer | None:
    """:meth:`QFormerTokenizer.from_folder` when ``folder`` has a Q-Former tokenizer, else ``None``."""
    if find_qformer_tokenizer(folder) is None:
        return None
    return QFormerTokenizer.from_folder(folder, max_length=max_length, pad_id=pad_id)


__all__ = ["QFormerTokenizer", "QFORMER_TOKENIZER_DIR", "find_qformer_tokenizer", "load_qformer_tokenizer",
           "pad_ids"]
