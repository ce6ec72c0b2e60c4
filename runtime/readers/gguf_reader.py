"""GGUF (llama.cpp) checkpoints -> DecoderConfig, Decoder state, raw quantised blocks and tokenizer data.

Parsing goes through the ``gguf`` package's ``GGUFReader``, after a bounds-checked scan of the header
of our own: ``GGUFReader`` trusts the counts it reads (a corrupt array length makes it loop, a
truncated file gives short arrays), so every length, count and tensor extent is checked against the
file size first and a bad file becomes a :class:`~edgevlm.errors.CheckpointError` naming it.

Dequantisation of F32, F16, BF16, Q8_0, Q4_0 and Q4_1 is written out here (bit-identical to
``gguf.quants.dequantize``, which the tests check); other types fall back to ``gguf.quants``.
Block layouts (32 weights per block, little-endian)::

    Q8_0  [d: f16][q: 32 x int8]                     w = d * q
    Q4_0  [d: f16][16 bytes: lo nibbles = w0..15,   w = d * (q - 8)
                   hi nibbles = w16..31]
    Q4_1  [d: f16][m: f16][16 bytes as Q4_0]         w = d * q + m

Architectures (:data:`ARCHITECTURES`, what llama.cpp's converter writes): ``llama`` (also Mistral,
Vicuna) and ``phi3``. llama.cpp has no OPT architecture. For ``llama`` the converter permutes the rows
of ``attn_q``/``attn_k`` so each head's rotary pairs are interleaved (GPT-J style RoPE, what ggml
computes for that architecture); the Decoder uses transformers' rotate-half RoPE, so those rows are
put back. ``phi3`` runs NeoX-style (rotate-half) RoPE in llama.cpp and is stored unpermuted, with
fused ``attn_qkv`` and ``ffn_up`` (gate rows, then up rows) and LongRoPE's factors as the tensors
``rope_factors_short`` / ``rope_factors_long``. Fused tensors are split and q/k rows reordered in
``state`` and in ``raw`` alike: both move whole rows of blocks, so the quantised bytes stay exact.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from edgevlm.config import DecoderConfig
from edgevlm.errors import BackendUnavailableError, CheckpointError, ConfigError, WeightsNotFoundError

from .hf_decoders import decoder_shapes

@dataclass(frozen=True)
class Architecture:
    """How llama.cpp stores one architecture. ``fused``: a block tensor -> the Decoder projections it
    stacks on rows, in order (split by their shapes)."""

    permuted_qk: bool
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    windowed: bool = False


ARCHITECTURES = {
    "llama": Architecture(permuted_qk=True),
    "phi3": Architecture(permuted_qk=False, windowed=True,
                         fused={"attn_qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                                "ffn_up": ("mlp.gate_proj", "mlp.up_proj")}),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
_MAX_DIMS = 4  # GGML_MAX_DIMS


class RawTensor(NamedTuple):
    """One tensor exactly as stored: ``data`` is uint8 ``[rows, row_bytes]`` (``[row_bytes]`` for 1-D),
    ``shape`` the logical PyTorch shape (``[out, in]`` for a Linear weight)."""

    ggml_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]


@dataclass(frozen=True)
class GGUFTokenizer:
    """The ``tokenizer.ggml.*`` metadata, unparsed. ``model`` is ``"gpt2"`` (byte-level BPE: tokens in
    GPT-2's byte-to-unicode alphabet, ``merges`` apply) or ``"llama"`` (SentencePiece: ``scores``
    apply, '▁' marks spaces). ``token_types``: 1 normal, 2 unknown, 3 control, 4 user-defined,
    5 unused, 6 byte. ``add_bos``/``add_eos``/``add_space_prefix`` are None when the file is silent."""

    model: str
    pre: str | None
    tokens: list[str]
    scores: list[float] | None
    token_types: list[int] | None
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None


@dataclass
class GGUFModel:
    path: Path
    config: DecoderConfig
    state: dict[str, torch.Tensor]  # Decoder names, dequantised (empty with dequantize=False)
    raw: dict[str, RawTensor]  # Decoder names, as stored (q/k rows in rotate-half order)
    metadata: dict[str, Any]  # every key-value of the file
    tokenizer: GGUFTokenizer | None
    chat_template: str | None
    types: dict[str, str] = field(default_factory=dict)  # Decoder name -> ggml type name

    def decoder(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        from edgevlm.runtime.decoder import Decoder

        if not self.state:
            raise CheckpointError(f"{self.path}: read with dequantize=False, no dense state to build from")
        return Decoder.from_state(self.config, self.state, dtype=dtype, device=device)


# ---- dequantisation ----------------------------------------------------------------------------

def _f16(col: np.ndarray) -> np.ndarray:  # [nb, 2] uint8 -> [nb, 1] float32
    return np.ascontiguousarray(col).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:  # [nb, 16] uint8 -> [nb, 32] uint8, low nibbles first
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def dequantize(data: np.ndarray, ggml_type: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes of one tensor -> float32 array of the logical ``shape``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from gguf import quants

    b = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if ggml_type == T.F32:
        out = b.view(np.float32).copy()
    elif ggml_type == T.F16:
        out = b.view(np.float16).astype(np.float32)
    elif ggml_type == T.BF16:
        out = (b.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    elif ggml_type == T.Q8_0:
        blk = b.reshape(-1, 34)
        out = _f16(blk[:, :2]) * blk[:, 2:].view(np.int8).astype(np.float32)
    elif ggml_type == T.Q4_0:
        blk = b.reshape(-1, 18)
        q = _nibbles(blk[:, 2:]).astype(np.int8) - np.int8(8)
        out = _f16(blk[:, :2]) * q.astype(np.float32)
    elif ggml_type == T.Q4_1:
        blk = b.reshape(-1, 20)
        out = _f16(blk[:, :2]) * _nibbles(blk[:, 4:]).astype(np.float32) + _f16(blk[:, 2:4])
    else:
        block, size = GGML_QUANT_SIZES[ggml_type]
        try:
            out = quants.dequantize(b.reshape(-1, size), ggml_type)
        except NotImplementedError:
            raise CheckpointError(f"cannot dequantise ggml type {T(ggml_type).name}") from None
    return out.reshape(shape)


# ---- header scan -------------------------------------------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


class _Scan:
    """Walks a GGUF header with every read bounds-checked against the file size."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)
        self.order = "<"

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF: {what} needs {n} bytes at offset "
                                  f"{self.pos}, the file has {self.end}")

    def unpack(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", what + " length")
        self.need(n, what)
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[vtype], what)
            self.pos += _SCALAR_SIZES[vtype]
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY and depth == 0:
            itype, count = self.unpack("I", what), self.unpack("Q", what + " count")
            if itype in _SCALAR_SIZES:
                self.need(count * _SCALAR_SIZES[itype], f"{what} ({count} items)")
                self.pos += count * _SCALAR_SIZES[itype]
            else:
                self.need(count * 8, f"{what} ({count} items)")  # each item is at least a length
                for _ in range(count):
                    self.value(itype, what, depth + 1)
        else:
            raise CheckpointError(f"{self.path}: corrupt GGUF: {what} has unknown value type {vtype}")


def _scan_header(path: Path) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: {size} bytes is too short to be a GGUF file (truncated?)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        s = _Scan(buf, path)
        if buf[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
        s.pos = 4
        version = s.unpack("I", "version")
        if version & 0xFFFF == 0:  # written on a big-endian host
            s.order, version = ">", struct.unpack(">I", buf[4:8])[0]
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = s.unpack("Q", "tensor count"), s.unpack("Q", "key-value count")
        alignment = 32
        for i in range(n_kv):
            key = s.string(f"key {i}").decode("utf-8", "replace")
            vtype = s.unpack("I", f"type of {key!r}")
            at = s.pos
            s.value(vtype, f"value of {key!r}")
            if key == "general.alignment" and vtype == 4:
                alignment = struct.unpack_from(s.order + "I", buf, at)[0]
        if alignment == 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{path}: corrupt GGUF: alignment {alignment} is not a power of two")
        extents = []
        for i in range(n_tensors):
            name = s.string(f"tensor {i} name").decode("utf-8", "replace")
            n_dims = s.unpack("I", f"dims of {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise CheckpointError(f"{path}: corrupt GGUF: tensor {name!r} has {n_dims} dims")
            dims = [s.unpack("Q", f"dims of {name!r}") for _ in range(n_dims)]
            raw_type = s.unpack("I", f"type of {name!r}")
            offset = s.unpack("Q", f"offset of {name!r}")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
            except (ValueError, KeyError):
                raise CheckpointError(f"{path}: corrupt GGUF: tensor {name!r} has unknown ggml type "
                                      f"{raw_type}") from None
            n = int(np.prod(dims, dtype=object))
            if dims[0] % block:
                raise CheckpointError(f"{path}: corrupt GGUF: tensor {name!r} row of {dims[0]} is not a multiple "
                                      f"of its block size {block}")
            extents.append((name, offset, n // block * type_size))
        data_start = -(-s.pos // alignment) * alignment
        for name, offset, nbytes in extents:
            if data_start + offset + nbytes > size:
                raise CheckpointError(f"{path}: truncated GGUF: tensor {name!r} needs bytes up to "
                                      f"{data_start + offset + nbytes}, the file has {size}")


# ---- config, names, tokenizer ------------------------------------------------------------------

def _f32(v: float) -> float:
    # GGUF stores floats as f32; print-shortest gives back the value the converter wrote (1e-05, not 9.99e-06).
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


def _architecture(meta: dict[str, Any], path: Path) -> tuple[str, Architecture]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch, ARCHITECTURES[arch]


def _config(meta: dict[str, Any], names: set[str], path: Path, extras: dict[str, np.ndarray]) -> DecoderConfig:
    """``extras``: the small float tensors that are configuration, not weights (LongRoPE's factors)."""
    arch, spec = _architecture(meta, path)

    def get(key: str, default: Any = KeyError) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        if isinstance(v, list):
            raise CheckpointError(f"{path}: {arch}.{key} is per-layer ({len(v)} values); only uniform models are read")
        return v

    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path}: per-dimension rope_freqs (Llama 3.1 scaling in GGUF) is not supported yet")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    if vocab is None:
        raise CheckpointError(f"{path}: GGUF metadata gives no vocab size")
    scaling, factor = get("rope.scaling.type", "none"), _f32(get("rope.scaling.factor", 1.0))
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported in GGUF; supported: none, linear")
    rope: dict[str, Any] = {"rope_scaling": scaling, "rope_scaling_factor": factor if scaling == "linear" else 1.0}
    max_len = int(get("context_length"))
    if "rope_factors_long.weight" in extras:  # Phi-3's LongRoPE
        original = int(get("rope.scaling.original_context_length", max_len))
        ratio = max_len / original
        default_attn = float(np.sqrt(1 + np.log(ratio) / np.log(original))) if ratio > 1 else 1.0
        rope = {"rope_scaling": "longrope", "rope_original_max_len": original,
                "rope_short_factor": tuple(_f32(v) for v in extras["rope_factors_short.weight"]),
                "rope_long_factor": tuple(_f32(v) for v in extras["rope_factors_long.weight"]),
                "rope_attention_factor": _f32(get("rope.scaling.attn_factor")) if meta.get(
                    f"{arch}.rope.scaling.attn_factor") is not None else default_attn}
    window = get("attention.sliding_window", None) if spec.windowed else None
    if window:  # exact while the context fits in the window (as for transformers folders)
        max_len = min(max_len, int(window))
    try:
        return DecoderConfig(
            vocab_size=int(vocab), hidden=hidden, layers=int(get("block_count")), heads=heads,
            kv_heads=int(get("attention.head_count_kv", heads)), intermediate=int(get("feed_forward_length")),
            norm_eps=_f32(get("attention.layer_norm_rms_epsilon")), rope_theta=_f32(get("rope.freq_base", 10000.0)),
            max_seq_len=max_len, tie_embeddings="output.weight" not in names,
            head_dim_override=0 if head_dim == hidden // heads else head_dim,
            rotary_dim=0 if rope_dim == head_dim else rope_dim,
            attention_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
            mlp_bias="blk.0.ffn_gate.bias" in names, **rope)
    except ConfigError as e:
        raise CheckpointError(f"{path}: GGUF metadata is not a valid decoder: {e}") from None


_LAYER_NAMES = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
                "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj",
                "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
_CONFIG_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def decoder_names(gguf_name: str, arch: Architecture | None = None) -> list[str]:
    """``blk.3.attn_q.weight`` -> ``["layers.3.attn.q_proj.weight"]``; a fused tensor of ``arch`` -> the
    names it splits into, in row order; ``[]`` for tensors the Decoder lacks."""
    if gguf_name in _TOP_NAMES:
        return [_TOP_NAMES[gguf_name]]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk":
        return []
    fused = arch.fused if arch is not None else {}
    if parts[2] in fused:
        return [f"layers.{parts[1]}.{n}.{parts[3]}" for n in fused[parts[2]]]
    if parts[2] in _LAYER_NAMES:
        return [f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"]
    return []


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: ``w_hf = w_gguf[perm]``.

    llama.cpp writes row ``h*Dh + 2i + j`` from transformers' row ``h*Dh + j*Dh/2 + i`` (pair i's two
    halves side by side); reading in this order puts halves back.
    """
    head_dim = n_rows // n_head
    return np.arange(n_rows).reshape(n_head, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def _tokenizer(meta: dict[str, Any]) -> GGUFTokenizer | None:
    if "tokenizer.ggml.tokens" not in meta:
        return None

    def opt(key: str, cast=lambda v: v):
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else cast(v)

    return GGUFTokenizer(model=str(meta.get("tokenizer.ggml.model", "")), pre=opt("pre", str),
                         tokens=meta["tokenizer.ggml.tokens"], scores=opt("scores"), token_types=opt("token_type"),
                         merges=meta.get("tokenizer.ggml.merges") or [], bos_id=opt("bos_token_id", int),
                         eos_id=opt("eos_token_id", int), unk_id=opt("unknown_token_id", int),
                         pad_id=opt("padding_token_id", int), add_bos=opt("add_bos_token", bool),
                         add_eos=opt("add_eos_token", bool), add_space_prefix=opt("add_space_prefix", bool))


# ---- entry point -------------------------------------------------------------------------------

def _open(path: Path) -> tuple[Any, dict[str, Any]]:
    """-> (``gguf.GGUFReader``, key-values), after the bounds-checked scan of the header."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a declared dependency
        raise BackendUnavailableError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    if not path.is_file():
        raise WeightsNotFoundError(f"no such GGUF file: {path}")
    try:
        _scan_header(path)
    except CheckpointError as e:
        raise CheckpointError(f"not a readable GGUF file: {e}") from None
    try:
        reader = GGUFReader(path)
        return reader, {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # the header scan passed, so this is corruption the scan cannot see
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key-values of a GGUF file as plain python values (str, int, float, bool, lists of them),
    without reading its tensors: what a tokenizer needs.

    Raises :class:`WeightsNotFoundError` for a missing file and :class:`CheckpointError` ("not a
    readable GGUF file: ...") for one the header scan or the reader refuses.
    """
    _, meta = _open(Path(path))
    return {name: _plain(v) for name, v in meta.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v.item() if hasattr(v, "item") else v


def read_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              dequantize_weights: bool = True) -> GGUFModel:
    """Read a llama-architecture GGUF file. ``dequantize_weights=False`` skips building ``state``
    (the raw blocks are memory-mapped views, so that costs almost nothing)."""
    path = Path(path)
    reader, meta = _open(path)
    try:
        names = {t.name for t in reader.tensors}
        _, arch = _architecture(meta, path)
        extras = {t.name: dequantize(np.asarray(t.data).view(np.uint8), t.tensor_type,
                                     tuple(int(d) for d in reversed(t.shape.tolist())))
                  for t in reader.tensors if t.name in _CONFIG_TENSORS}
        cfg = _config(meta, names, path, extras)
        expected = decoder_shapes(cfg)
        state: dict[str, torch.Tensor] = {}
        raw: dict[str, RawTensor] = {}
        types: dict[str, str] = {}
        for t in reader.tensors:
            keys = decoder_names(t.name, arch)
            if not keys:
                continue  # e.g. the rope factors read above; other extras are not the Decoder's
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims innermost first
            parts = [expected.get(k) for k in keys]
            if None in parts or any(p[1:] != shape[1:] for p in parts) or sum(p[0] for p in parts) != shape[0]:
                raise CheckpointError(f"{path}: tensor {t.name!r} has shape {shape}, expected "
                                      f"{parts if len(parts) > 1 else parts[0] or 'no such tensor'} for {cfg}")
            data = np.asarray(t.data).view(np.uint8)
            data = data.reshape(shape[0], -1) if len(shape) == 2 else data.reshape(-1)  # [rows, row_bytes]
            start = 0
            for key, part in zip(keys, parts):
                if len(keys) > 1:  # a fused tensor: this part's rows (a 1-D one's elements, as rows of bytes)
                    rows = data.reshape(shape[0], -1)[start:start + part[0]]
                    rows = rows.reshape(-1) if len(part) == 1 else rows
                else:
                    rows = data
                start += part[0]
                kind = key.split(".")[-2]
                if arch.permuted_qk and kind in ("q_proj", "k_proj"):
                    rows = rows[unpermute_rows(part[0], cfg.heads if kind == "q_proj" else cfg.kv_heads)]
                raw[key] = RawTensor(t.tensor_type, rows, part)
                types[key] = t.tensor_type.name
                if dequantize_weights:
                    state[key] = torch.from_numpy(dequantize(rows, t.tensor_type, part)).to(dtype)
        tokenizer = _tokenizer(meta)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:  # metadata of the wrong type/value
        raise CheckpointError(f"{path}: inconsistent GGUF contents ({type(e).__name__}: {e})") from None
    missing = sorted(set(expected) - set(raw))
    if missing:
        raise CheckpointError(f"{path}: GGUF lacks {len(missing)} decoder tensors, e.g. {missing[:3]}")
    template = meta.get("tokenizer.chat_template")
    return GGUFModel(path=path, config=cfg, state=state, raw=raw, metadata=meta, tokenizer=tokenizer,
                     chat_template=template if isinstance(template, str) else None, types=types)


__all__ = ["ARCHITECTURES", "Architecture", "SUPPORTED_ARCHITECTURES", "RawTensor", "GGUFTokenizer", "GGUFModel",
           "read_gguf", "read_gguf_metadata", "dequantize", "decoder_names", "unpermute_rows"]
