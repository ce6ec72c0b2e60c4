"""transformers causal-LM checkpoints -> (DecoderConfig, state dict in :class:`~edgevlm.runtime.decoder.Decoder`'s
key names), for every decoder family edgevlm runs.

Each supported ``model_type`` is one :class:`Family` row: the class defaults a ``config.json`` may leave
out, how its fields become a DecoderConfig, and how its tensors are named (including fused ones that
are split on read). Checked by parity tests against transformers (tests/test_decoder.py,
tests/test_decoder_families.py):

- ``llama`` (LlamaForCausalLM; Vicuna is a LLaMA): every rope type the decoder has (default, linear,
  dynamic, llama3), explicit ``head_dim``, ``attention_bias`` / ``mlp_bias``, tied or untied embeddings.
- ``mistral``: the LLaMA block. Its sliding window only masks keys more than ``sliding_window``
  positions back, so attention is exactly LLaMA's while the context is no longer than the window;
  ``max_seq_len`` is clamped to the window and longer prompts are refused.
- ``phi3`` (Phi-3, the language model of xGen-MM / BLIP-3): fused ``qkv_proj`` and ``gate_up_proj``
  split into the LLaMA projections, LongRoPE (``longrope``, and its old names ``su`` / ``yarn``),
  ``partial_rotary_factor``, the sliding window as for Mistral.
- ``opt`` (OPTForCausalLM, BLIP-2's and MiniGPT-4 v1's language model): pre-LayerNorm blocks with
  biases everywhere, a ReLU MLP (``fc1`` / ``fc2`` become ``up_proj`` / ``down_proj``), learned
  positions offset by 2, tied embeddings. OPT-350m's post-norm blocks and ``project_in`` / ``out``
  are refused.

:func:`read_decoder_dir` opens a ``save_pretrained`` folder of a causal LM, or the language model
inside a multimodal folder (``llava``, ``llava_next``, ``blip-2``, ``instructblip``: its
``text_config`` and ``language_model`` weights; ``xgenmm``: ``vlm.lang_model`` with its decoupled
embedding and head folded by :mod:`.xgenmm`, a ``STATE_ADAPTERS`` row). :func:`decoder_from_hf` does the mapping for any
prefix, for readers of other checkpoints. Encoder-decoder language models (Flan-T5) are refused with
the list of what is supported.

Config dicts of both transformers generations are read: 5.x writes ``rope_parameters`` (with
``rope_theta`` inside), 4.x ``rope_theta`` plus ``rope_scaling`` (``type`` or ``rope_type``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from edgevlm.config import DecoderConfig
from edgevlm.errors import CheckpointError, ConfigError

from .safetensors_io import find_prefix, load_safetensors_dir, read_json

Getter = Callable[[str], Any]


# ---- config fields per family --------------------------------------------------------------------

def _rope(hf: dict[str, Any], get: Getter, aliases: dict[str, str]) -> dict[str, Any]:
    """DecoderConfig rope fields from either the 5.x ``rope_parameters`` or the 4.x ``rope_scaling``.
    ``aliases`` renames a family's legacy rope types (Phi-3's ``su`` and ``yarn`` are LongRoPE)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError("rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", get("rope_theta")))
    kind = merged.get("rope_type", merged.get("type", "default"))
    kind = aliases.get(kind, kind)
    out: dict[str, Any] = {"rope_theta": float(theta)}
    max_pos = int(get("max_position_embeddings"))
    if kind == "default":
        return out
    if kind == "longrope":
        original = int(merged.get("original_max_position_embeddings") or get("original_max_position_embeddings")
                       or max_pos)
        try:
            short, long = tuple(map(float, merged["short_factor"])), tuple(map(float, merged["long_factor"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("longrope rope parameters need numeric short_factor and long_factor lists") from None
        # As transformers: without an explicit factor, the context extension ratio; without an
        # explicit attention factor, sqrt(1 + ln(factor) / ln(original)) (LongRoPE's recommendation).
        factor = float(merged.get("factor") or max_pos / original)
        attention = merged.get("attention_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
        return {**out, "rope_scaling": "longrope", "rope_short_factor": short, "rope_long_factor": long,
                "rope_attention_factor": float(attention), "rope_original_max_len": original}
    if kind not in ("linear", "dynamic", "llama3"):
        raise CheckpointError(f"rope type {kind!r} is not supported; supported: default, linear, dynamic, llama3, "
                              "longrope (su)")
    if "factor" not in merged:
        raise CheckpointError(f"rope type {kind!r} needs a 'factor'")
    out.update(rope_scaling=kind, rope_scaling_factor=float(merged["factor"]))
    if kind == "dynamic":
        out["rope_original_max_len"] = max_pos  # transformers scales relative to the trained context
    elif kind == "llama3":
        try:
            out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                       rope_high_freq_factor=float(merged["high_freq_factor"]),
                       rope_original_max_len=int(merged["original_max_position_embeddings"]))
        except KeyError as e:
            raise CheckpointError(f"llama3 rope parameters lack {e}") from None
    return out


def _max_len(hf: dict[str, Any], get: Getter, rope: dict[str, Any], windowed: bool) -> int:
    max_len = int(get("max_position_embeddings"))
    if windowed:
        # An explicit null means "no window"; a missing key means the class default.
        window = hf.get("sliding_window", get("sliding_window"))
        if window is not None:
            max_len = min(max_len, int(window))  # exact only while the context fits in the window
    if rope.get("rope_scaling") == "dynamic":
        # max_position_embeddings is the trained context here; dynamic NTK exists to run past it,
        # by about its factor.
        max_len = int(max_len * rope["rope_scaling_factor"])
    return max_len


def _llama_like(hf: dict[str, Any], get: Getter, *, windowed: bool,
                aliases: dict[str, str] | None = None) -> dict[str, Any]:
    if get("hidden_act") != "silu":
        raise CheckpointError(f"{hf.get('model_type')}: hidden_act {get('hidden_act')!r} is not SwiGLU's silu")
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    head_dim = get("head_dim") or (hidden // heads if heads else None)
    rope = _rope(hf, get, aliases or {})
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    rotary = int(head_dim * partial) if head_dim else 0
    return dict(
        heads=heads, hidden=hidden, kv_heads=get("num_key_value_heads") or heads, intermediate=get("intermediate_size"),
        norm_eps=float(get("rms_norm_eps")), head_dim_override=0 if head_dim == hidden // heads else int(head_dim),
        attention_bias=bool(get("attention_bias")), mlp_bias=bool(get("mlp_bias")),
        rotary_dim=0 if rotary == head_dim else rotary, max_seq_len=_max_len(hf, get, rope, windowed), **rope)


def _opt(hf: dict[str, Any], get: Getter) -> dict[str, Any]:
    hidden = get("hidden_size")
    if not get("do_layer_norm_before") or get("_remove_final_layer_norm"):
        raise CheckpointError("OPT with post-norm blocks (do_layer_norm_before=false, OPT-350m) or without a final "
                              "layer norm is not supported")
    if get("word_embed_proj_dim") not in (None, hidden):
        raise CheckpointError(f"OPT with word_embed_proj_dim {get('word_embed_proj_dim')} != hidden_size {hidden} "
                              "(project_in / project_out, OPT-350m) is not supported")
    if not get("layer_norm_elementwise_affine"):
        raise CheckpointError("OPT without layer-norm weights (layer_norm_elementwise_affine=false) is not supported")
    act = get("activation_function")
    if act not in ("relu", "gelu"):
        raise CheckpointError(f"OPT activation_function {act!r} not supported; supported: relu, gelu")
    bias = bool(get("enable_bias"))
    heads = get("num_attention_heads")
    return dict(hidden=hidden, heads=heads, kv_heads=heads, intermediate=get("ffn_dim"), norm="layer", norm_eps=1e-5,
                mlp_act=act, mlp_gated=False, positions="learned", learned_pos_offset=2, attention_bias=bias,
                mlp_bias=bias, max_seq_len=int(get("max_position_embeddings")))


# ---- key names per family ------------------------------------------------------------------------

_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.{w}": f"self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for w in ("weight", "bias")},
    **{f"mlp.{p}.{w}": f"mlp.{p}.{w}" for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")},
}
_OPT_LAYER = {
    **{f"attn_norm.{w}": f"self_attn_layer_norm.{w}" for w in ("weight", "bias")},
    **{f"mlp_norm.{w}": f"final_layer_norm.{w}" for w in ("weight", "bias")},
    **{f"attn.{p}.{w}": f"self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")},
    **{f"attn.o_proj.{w}": f"self_attn.out_proj.{w}" for w in ("weight", "bias")},
    **{f"mlp.up_proj.{w}": f"fc1.{w}" for w in ("weight", "bias")},
    **{f"mlp.down_proj.{w}": f"fc2.{w}" for w in ("weight", "bias")},
}
_LLAMA_TOP = {"embed_tokens.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
_OPT_TOP = {"embed_tokens.weight": "embed_tokens.weight", "embed_positions.weight": "embed_positions.weight",
            "norm.weight": "final_layer_norm.weight", "norm.bias": "final_layer_norm.bias"}


@dataclass(frozen=True)
class Family:
    """One transformers ``model_type``. ``body``: where the decoder stack sits under the model prefix
    (OPT nests it in ``decoder.``); ``layer_keys`` / ``top_keys``: ours -> theirs; ``fused``: a tensor of
    theirs -> our tensors it holds, stacked on rows in that order (split by their shapes)."""

    defaults: dict[str, Any]
    config: Callable[[dict[str, Any], Getter], dict[str, Any]]
    layer_keys: dict[str, str]
    top_keys: dict[str, str]
    body: str = ""
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()


_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                       max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                       attention_bias=False, mlp_bias=False, head_dim=None)
FAMILIES: dict[str, Family] = {
    "llama": Family(_LLAMA_DEFAULTS, lambda hf, get: _llama_like(hf, get, windowed=False), _LLAMA_LAYER, _LLAMA_TOP),
    "mistral": Family({**_LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                       "max_position_embeddings": 131072, "sliding_window": 4096},
                      lambda hf, get: _llama_like(hf, get, windowed=True), _LLAMA_LAYER, _LLAMA_TOP),
    "phi3": Family({**_LLAMA_DEFAULTS, "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                    "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                    "sliding_window": None},
                   lambda hf, get: _llama_like(hf, get, windowed=True, aliases={"su": "longrope", "yarn": "longrope"}),
                   _LLAMA_LAYER, _LLAMA_TOP,
                   fused=(("self_attn.qkv_proj.weight", ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")),
                          ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")))),
    "opt": Family(dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                       max_position_embeddings=2048, do_layer_norm_before=True, _remove_final_layer_norm=False,
                       word_embed_proj_dim=None, num_attention_heads=12, activation_function="relu", enable_bias=True,
                       layer_norm_elementwise_affine=True, tie_word_embeddings=True),
                  _opt, _OPT_LAYER, _OPT_TOP, body="decoder."),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# multimodal folders whose text_config / language_model we can read -> their text_config's default model_type
# xgenmm: xGen-MM (BLIP-3), weights under vlm.lang_model.
WRAPPERS = {"llava": "llama", "llava_next": "llama", "blip-2": "opt", "instructblip": "llama", "xgenmm": "phi3"}
# wrapper model_type -> "module:function" (path, config.json, text config, state) -> (text config, state):
# a family whose language model stores its tensors in another shape than its causal LM does.
STATE_ADAPTERS: dict[str, str] = {"xgenmm": "edgevlm.runtime.readers.xgenmm:adapt_decoder_state"}
LM_HEAD_BIAS_KEY = "_edgevlm_lm_head_bias"  # an adapter's text config sets it: lm_head has a bias
_ENCODER_DECODERS = ("t5", "mt5", "umt5", "bart")


def _family(model_type: Any) -> Family:
    if model_type in _ENCODER_DECODERS:
        raise CheckpointError(f"model_type {model_type!r} is an encoder-decoder language model (e.g. BLIP-2's "
                              f"Flan-T5), which edgevlm does not run; supported decoders: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} is not a supported decoder; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} (and {', '.join(WRAPPERS)} folders)")
    return FAMILIES[model_type]


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    """A transformers text config dict (``config.json`` or a ``text_config``) -> DecoderConfig."""
    model_type = hf.get("model_type", "llama")
    fam = _family(model_type)

    def get(key: str) -> Any:
        v = hf.get(key)
        return fam.defaults.get(key) if v is None else v

    try:
        fields = fam.config(hf, get)
        if hf.get(LM_HEAD_BIAS_KEY):  # set by a STATE_ADAPTERS reader, never by transformers
            fields["lm_head_bias"] = True
        return DecoderConfig(vocab_size=get("vocab_size"), layers=get("num_hidden_layers"),
                             tie_embeddings=bool(get("tie_word_embeddings")), **fields)
    except (ConfigError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{model_type} config is not a valid decoder: {e}") from None


def decoder_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Decoder state holds for ``cfg`` (``lm_head.weight`` only when untied), read off
    the module built on the meta device, so this can never disagree with the model."""
    from edgevlm.runtime.decoder import Decoder

    with torch.device("meta"):
        model = Decoder(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _lm_head_candidates(prefix: str) -> list[str]:
    # "language_model.model." (5.x on disk) keeps its head at "language_model.lm_head.weight";
    # "model.language_model." (5.x in memory) and "model." (a causal LM) at "lm_head.weight".
    out = []
    if prefix.endswith("model."):
        out.append(prefix[: -len("model.")] + "lm_head.weight")
    out.append("lm_head.weight")
    return out


def _split_fused(fam: Family, cfg: DecoderConfig, expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor],
                 body: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.layers):
        for theirs, ours in fam.fused:
            src = f"{body}layers.{i}.{theirs}"
            if src not in state:
                continue  # a checkpoint may store them split after all; the plain lookup finds them
            parts = [f"layers.{i}.{o}" for o in ours]
            rows = [expected[p][0] for p in parts]
            t = state[src]
            if t.shape[0] != sum(rows) or tuple(t.shape[1:]) != expected[parts[0]][1:]:
                raise CheckpointError(f"fused tensor {src!r}: expected shape ({sum(rows)}, "
                                      f"{', '.join(map(str, expected[parts[0]][1:]))}), found {tuple(t.shape)}")
            out.update(zip(parts, torch.split(t, rows, dim=0)))
    return out


def decoder_from_hf(text_config: dict[str, Any], state: dict[str, torch.Tensor],
                    prefix: str = "model.") -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """Map the decoder under ``prefix`` (``"model."`` for a causal LM; probe multimodal layouts with
    :func:`find_decoder_prefix`) to Decoder names, checking every shape."""
    cfg = config_from_hf(text_config)
    fam = FAMILIES[text_config.get("model_type", "llama")]
    body = prefix + fam.body
    expected = decoder_shapes(cfg)
    out = _split_fused(fam, cfg, expected, state, body)
    for key, shape in expected.items():
        if key in out:
            continue
        if key == "lm_head.weight":
            src = next((k for k in _lm_head_candidates(prefix) if k in state), None)
            if src is None:
                raise CheckpointError(f"checkpoint lacks the untied lm_head (tried {_lm_head_candidates(prefix)})")
        elif key == "lm_head.bias":  # beside the head's weight (only with LM_HEAD_BIAS_KEY)
            tried = [k[: -len("weight")] + "bias" for k in _lm_head_candidates(prefix)]
            src = next((k for k in tried if k in state), None)
            if src is None:
                raise CheckpointError(f"checkpoint lacks the lm_head bias (tried {tried})")
        elif key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            src = f"{body}layers.{i}.{fam.layer_keys[rest]}"
        else:
            src = body + fam.top_keys[key]
        if src not in state:
            fused = [t for t, ours in fam.fused if key.split(".", 2)[-1] in ours]
            hint = f" or its fused {fused[0]!r}" if fused else ""
            raise CheckpointError(f"checkpoint lacks tensor {src!r}{hint} (for decoder {key!r})")
        out[key] = state[src]
    for key, shape in expected.items():
        if tuple(out[key].shape) != shape:
            raise CheckpointError(f"decoder tensor {key!r}: expected shape {shape} for {cfg.hidden=} {cfg.heads=} "
                                  f"{cfg.kv_heads=} {cfg.head_dim=}, found {tuple(out[key].shape)}")
    return cfg, out


def find_decoder_prefix(state: dict[str, torch.Tensor], text_config: dict[str, Any], candidates: list[str]) -> str:
    """The first of ``candidates`` under which ``text_config``'s decoder keeps its token embeddings."""
    fam = _family(text_config.get("model_type", "llama"))
    return find_prefix(state, candidates, fam.body + "embed_tokens.weight")


def text_config_of(path: Path, hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``config.json`` of a causal LM or a multimodal wrapper -> (the decoder's config, prefixes to probe)."""
    model_type = hf.get("model_type")
    if model_type in WRAPPERS:
        text = hf.get("text_config") or {}
        if not isinstance(text, dict):
            raise CheckpointError(f"{path / 'config.json'}: text_config is not an object")
        return {"model_type": WRAPPERS[model_type], **text}, ["language_model.model.", "model.language_model.",
                                                               "language_model.", "vlm.lang_model.model."]
    if model_type in FAMILIES or model_type in _ENCODER_DECODERS:
        _family(model_type)
        return hf, ["model.", ""]
    raise CheckpointError(f"{path / 'config.json'}: model_type {model_type!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES + tuple(WRAPPERS))}")


def read_decoder_dir(path: str | os.PathLike) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """A transformers ``save_pretrained`` folder (config.json + safetensors) -> (DecoderConfig, state)."""
    path = Path(path)
    hf = read_json(path / "config.json")
    text, prefixes = text_config_of(path, hf)
    config_from_hf(text)  # fail on the config before reading gigabytes of weights
    state = load_safetensors_dir(path)
    if hf.get("model_type") in STATE_ADAPTERS:
        import importlib

        module, fn = STATE_ADAPTERS[hf["model_type"]].split(":")
        text, state = getattr(importlib.import_module(module), fn)(path, hf, text, state)
    try:
        return decoder_from_hf(text, state, find_decoder_prefix(state, text, prefixes))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def to_transformers(decoder):
    """A float LLaMA-kind Decoder -> transformers' ``LlamaForCausalLM`` sharing its tensors (no copies),
    for peers in benchmarks and parity checks. Plain RoPE only; quantised decoders have no float weights."""
    import transformers

    c = decoder.cfg
    if c.rope_scaling != "none" or c.norm != "rms" or not c.mlp_gated or c.positions != "rope" or c.rotary_dim:
        raise ConfigError("to_transformers maps LLaMA-kind decoders with plain RoPE only (rms norm, gated MLP, "
                          f"full rotary); this one is {c}")
    state = {}
    for key, t in decoder.state_dict().items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            if rest not in _LLAMA_LAYER:
                raise ConfigError(f"to_transformers: {key!r} has no transformers name (a quantised decoder?)")
            state[f"model.layers.{i}.{_LLAMA_LAYER[rest]}"] = t
        else:
            state[key if key == "lm_head.weight" else "model." + key] = t
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.intermediate, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        hidden_act=c.mlp_act, attention_bias="layers.0.attn.q_proj.bias" in decoder.state_dict(),
        mlp_bias="layers.0.mlp.gate_proj.bias" in decoder.state_dict())
    model = transformers.LlamaForCausalLM(hf_cfg)  # on CPU: non-persistent buffers (RoPE's) are made here
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ConfigError(f"to_transformers: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if c.tie_embeddings:
        model.tie_weights()
    return model.eval()


__all__ = ["FAMILIES", "Family", "SUPPORTED_MODEL_TYPES", "WRAPPERS", "config_from_hf", "decoder_from_hf",
           "find_decoder_prefix", "text_config_of", "read_decoder_dir", "decoder_shapes", "to_transformers"]
