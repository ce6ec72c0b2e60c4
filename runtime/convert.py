"""``convert(source, out)``: any source :func:`~.loader.read_parts` loads, written as an edgevlm checkpoint.

The conversion is generic: whatever the source is (a transformers folder of a causal LM, LLaVA,
LLaVA-NeXT, BLIP-2 or InstructBLIP; a SPHINX folder; a ``.gguf`` file; an edgevlm checkpoint; any
source kind added to the loader later), it is read once into :class:`~.loader.ModelParts` with float
weights (``quant=None``: LoRA factors merged, GGUF blocks dequantised) and written from those parts::

    out/
      edgevlm.json          {"edgevlm_format": 1, "config": ModelConfig}  (tower, decoder, chat format,
                            image placement and token; no WeightsRef: every tensor is inside)
      model.safetensors     decoder.*, tower.* (and grounding_head.*) tensors (a tied lm_head is not stored twice)
      tokenizer.json        the decoder's tokenizer as one ``tokenizers`` pipeline, and
      tokenizer_config.json its bos/eos/pad tokens, add_bos_token and chat template
      qformer_tokenizer/    InstructBLIP only: the Q-Former's instruction tokenizer

Loading ``out`` then builds the same modules from the same tensors, so it runs the same operations
on the same values as loading the source. Before the folder is put in place it is read back and
compared with the parts it came from (config, tokenizer ids and specials, chat format, stop ids, the
Q-Former tokenizer); anything the checkpoint format cannot say is a :class:`~edgevlm.errors.CheckpointError`
naming it, and nothing is left behind. Writes go to a temporary folder beside ``out`` that is renamed
into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from edgevlm.config import ModelConfig
from edgevlm.errors import CheckpointError
from edgevlm.options import LoadOptions

from .chat import ChatFormat
from .checkpoint import load_checkpoint_config, save_checkpoint
from .grounding_head import PREFIX as GROUNDING_PREFIX
from .loader import DECODER_PREFIX, ModelParts, read_parts
from .source import resolve_source
from .tokenizer import Tokenizer
from .tower import TOWER_PREFIX

CONVERT_DTYPES = ("float32", "float16", "bfloat16")
# Texts whose ids must be the same through the written tokenizer as through the source's.
_PROBES = ("", " ", "Hello, world!", "  two  spaces\tand\nnewlines\n\n", "What is in the image?",
           "1234567 + 89 = 1234656", "naïve café, 東京, emoji 🙂", "<image>", "<s>x</s>", "A<image>\nB")


def model_config_of(parts: ModelParts) -> ModelConfig:
    """The :class:`ModelConfig` that makes :func:`~.loader.read_parts` of a checkpoint rebuild ``parts``:
    their tower and decoder configs (encoder WeightsRefs dropped: the checkpoint holds every tensor) and
    their chat format's kind, image placement and image token."""
    chat = parts.chat
    if chat.template_vars:
        raise CheckpointError(f"{parts.name}: its chat format passes template variables "
                              f"{sorted(chat.template_vars)}, which an edgevlm checkpoint cannot record")
    tower = None
    if parts.tower is not None:
        t = parts.tower.config
        tower = dataclasses.replace(t, encoders=tuple(dataclasses.replace(e, weights=None) for e in t.encoders))
    head = parts.grounding_head.cfg if parts.grounding_head is not None else None
    return ModelConfig(name=parts.name, tower=tower, decoder=parts.decoder.cfg, image_placement=chat.image_placement,
                       image_token=chat.image_token, chat_format=chat.kind, grounding_head=head)


def state_of(parts: ModelParts) -> dict[str, torch.Tensor]:
    """``decoder.*`` and ``tower.*`` tensors of the parts (float weights only)."""
    if parts.lora is not None:  # (gguf_raw may be set: it describes the file, the decoder holds floats)
        raise CheckpointError(f"{parts.name}: parts still hold unmerged LoRA factors; read them with quant=None")
    dec = parts.decoder.state_dict()
    if parts.decoder.cfg.tie_embeddings:  # the loader ties lm_head to the embeddings again
        dec.pop("lm_head.weight", None)
    state = {DECODER_PREFIX + k: v for k, v in dec.items()}
    if parts.tower is not None:
        state.update({TOWER_PREFIX + k: v for k, v in parts.tower.state_dict().items()})
    if parts.grounding_head is not None:
        state.update({GROUNDING_PREFIX + k: v for k, v in parts.grounding_head.state_dict().items()})
    packed = sorted(k for k, v in state.items() if not v.is_floating_point() and k.startswith(DECODER_PREFIX))
    if packed:  # a quantised layer: its packed blocks are no Decoder.from_state input
        raise CheckpointError(f"{parts.name}: decoder tensors {packed[:3]} are not float weights; read with quant=None")
    return state


def _check_out(out: Path, force: bool, source_path: Path | None) -> None:
    if source_path is not None:
        src, dst = source_path.resolve(), out.resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            raise CheckpointError(f"--out {out} overlaps the source {source_path}; write the checkpoint elsewhere")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder; choose another --out")
    if any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")


def convert(source: Any, out: str | os.PathLike, *, dtype: str = "float32", force: bool = False,
            progress: bool = True) -> Path:
    """Write ``source`` (anything :func:`~.source.resolve_source` takes) as an edgevlm checkpoint folder
    ``out`` with float weights in ``dtype``; returns ``out``.

    ``out`` must not exist or be an empty folder, unless ``force`` (then it is replaced, after the new
    folder is complete). Errors: the loader's typed errors for a bad source; :class:`CheckpointError`
    for an unusable ``out`` or for something the checkpoint format cannot record (module docstring)."""
    from edgevlm.progress import Stages

    if dtype not in CONVERT_DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(CONVERT_DTYPES)}, got {dtype!r}")
    out = Path(out)
    src = resolve_source(source)
    _check_out(out, force, src.path)
    stages = Stages(["read", "write", "verify", "rename"], desc=f"convert {src.name}", enabled=progress)
    try:
        with stages("read"):
            parts = read_parts(src, LoadOptions(device="cpu", dtype=dtype, quant=None, progress=False))
            cfg = model_config_of(parts)
            state = state_of(parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
        try:
            folder = tmp / "checkpoint"
            with stages("write"):
                save_checkpoint(folder, cfg, state, metadata={"converted_from": src.kind, "dtype": dtype})
                write_tokenizers(parts, folder)
            with stages("verify"):
                _verify(parts, cfg, folder)
            with stages("rename"):
                _check_out(out, force, src.path)  # again: another writer may have filled it meanwhile
                if out.exists():
                    os.replace(out, tmp / "replaced")
                os.replace(folder, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        stages.close()
    return out


def write_tokenizers(parts: ModelParts, folder: Path) -> None:
    """The files a converted (or trained) checkpoint prompts with, its config naming no tokenizer: the
    decoder's tokenizer, the chat format's template where the loader chose one the tokenizer does not
    carry, and an InstructBLIP Q-Former's tokenizer in ``qformer_tokenizer/``."""
    from .qformer_tokenizer import QFORMER_TOKENIZER_DIR, QFormerTokenizer

    parts.tokenizer.save(folder)
    if parts.chat.kind == "template" and parts.chat.template != parts.tokenizer.chat_template:
        # the chat format's own template (a loader may choose one the vocabulary does not carry) is what runs
        path = folder / "tokenizer_config.json"
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["chat_template"] = parts.chat.template
        if parts.chat.template is None:
            doc.pop("chat_template")
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    q = parts.instruction_tokenizer
    if q is not None:
        if not isinstance(q, QFormerTokenizer):
            raise CheckpointError(f"{parts.name}: its instruction tokenizer ({type(q).__name__}) has no checkpoint "
                                  "form; only an InstructBLIP QFormerTokenizer is written")
        q.save(folder / QFORMER_TOKENIZER_DIR)


def _differs(what: str, got: Any, want: Any) -> CheckpointError:
    return CheckpointError(f"the written checkpoint would not behave as its source: {what} reads back as "
                           f"{got!r:.200}, the source has {want!r:.200}")


def _verify(parts: ModelParts, cfg: ModelConfig, folder: Path) -> None:
    """Read what was written and compare it with the parts it came from (everything but the tensors,
    which safetensors writes as they are)."""
    back = load_checkpoint_config(folder)
    if back != cfg:
        raise _differs("edgevlm.json", back, cfg)
    want, got = parts.tokenizer, Tokenizer.from_tokenizer_json(folder)
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id", "add_bos", "special_ids"):
        if getattr(got, name) != getattr(want, name):
            raise _differs(f"tokenizer {name}", getattr(got, name), getattr(want, name))
    ids = range(want.vocab_size)
    for i in ids:
        if got.id_to_token(i) != want.id_to_token(i):
            raise _differs(f"token {i}", got.id_to_token(i), want.id_to_token(i))
    for skip in (False, True):
        if got.decode(ids, skip_special=skip) != want.decode(ids, skip_special=skip):
            raise _differs(f"the text of the whole vocabulary (skip_special={skip})", "other text", "its text")
    for text in (*_PROBES, parts.chat.image_token):
        for cont in (False, True):
            a, b = got.encode(text, continuation=cont), want.encode(text, continuation=cont)
            if a != b:
                raise _differs(f"the ids of {text!r} (continuation={cont})", a, b)
    chat = ChatFormat.from_config(cfg, got)
    if chat != parts.chat:
        raise _differs("the chat format", chat, parts.chat)
    if chat.stop_ids(got) != parts.chat.stop_ids(want):
        raise _differs("the stop ids", sorted(chat.stop_ids(got)), sorted(parts.chat.stop_ids(want)))
    q = parts.instruction_tokenizer
    if q is not None:
        from .qformer_tokenizer import QFORMER_TOKENIZER_DIR, QFormerTokenizer

        q2 = QFormerTokenizer.from_folder(folder / QFORMER_TOKENIZER_DIR, max_length=q.max_length)
        for name in ("vocab_size", "pad_id", "max_length"):
            if getattr(q2, name) != getattr(q, name):
                raise _differs(f"Q-Former tokenizer {name}", getattr(q2, name), getattr(q, name))
        for text in _PROBES:
            if q2.encode(text) != q.encode(text):
                raise _differs(f"the Q-Former ids of {text!r}", q2.encode(text), q.encode(text))


__all__ = ["convert", "model_config_of", "state_of", "write_tokenizers", "CONVERT_DTYPES"]
