"""transformers LLaMA-family checkpoints -> (DecoderConfig, state dict in LlamaDecoder's key names).

Supported ``model_type`` values (checked by parity tests against transformers):

- ``llama`` (LlamaForCausalLM): every rope type LlamaDecoder has (default, linear, dynamic, llama3),
  explicit ``head_dim``, ``attention_bias`` / ``mlp_bias``, tied or untied embeddings.
- ``mistral`` (MistralForCausalLM): the same block. Its sliding window only masks keys more than
  ``sliding_window`` positions back, so attention is exactly LLaMA's while the context is no longer
  than the window; ``max_seq_len`` is clamped to the window and longer prompts are refused.

:func:`read_llama_dir` opens a ``save_pretrained`` folder of a causal LM, or of a ``llava`` model (its
``text_config`` and ``language_model`` weights). :func:`llama_from_hf` does the mapping for any prefix,
for readers of other multimodal checkpoints.

Config dicts of both transformers generations are read: 5.x writes ``rope_parameters`` (with
``rope_theta`` inside), 4.x ``rope_theta`` plus ``rope_scaling`` (``type`` or ``rope_type``). Keys a
config.json leaves out take transformers' class defaults for that model type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from edgevlm.config import DecoderConfig
from edgevlm.errors import CheckpointError, ConfigError

from .safetensors_io import find_prefix, load_safetensors_dir, read_json

# transformers' config-class defaults for the keys we read (config.json may omit default values).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                  mlp_bias=False, head_dim=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=131072,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                    mlp_bias=False, head_dim=None, sliding_window=4096),
}
SUPPORTED_MODEL_TYPES = tuple(_DEFAULTS)
_WRAPPERS = ("llava",)  # multimodal folders whose text_config/language_model we can read

# LlamaDecoder name -> transformers name, relative to the LlamaModel prefix; {i} = layer.
_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.{w}": f"self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
       for w in ("weight", "bias")},
    **{f"mlp.{p}.{w}": f"mlp.{p}.{w}" for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")},
}


def _rope(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """DecoderConfig rope fields from either the 5.x ``rope_parameters`` or the 4.x ``rope_scaling``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError("rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
    kind = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind not in ("linear", "dynamic", "llama3"):
        raise CheckpointError(f"rope type {kind!r} is not supported; supported: default, linear, dynamic, llama3")
    if "factor" not in merged:
        raise CheckpointError(f"rope type {kind!r} needs a 'factor'")
    out.update(rope_scaling=kind, rope_scaling_factor=float(merged["factor"]))
    if kind == "dynamic":
        # transformers scales relative to max_position_embeddings (the trained context).
        out["rope_original_max_len"] = int(hf.get("max_position_embeddings", defaults["max_position_embeddings"]))
    elif kind == "llama3":
        try:
            out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                       rope_high_freq_factor=float(merged["high_freq_factor"]),
                       rope_original_max_len=int(merged["original_max_position_embeddings"]))
        except KeyError as e:
            raise CheckpointError(f"llama3 rope parameters lack {e}") from None
    return out


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    """A transformers text config dict (``config.json`` or a ``text_config``) -> DecoderConfig."""
    model_type = hf.get("model_type", "llama")
    if model_type not in _DEFAULTS:
        raise CheckpointError(f"model_type {model_type!r} is not a supported decoder; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} (and {', '.join(_WRAPPERS)} folders)")
    d = _DEFAULTS[model_type]

    def get(key: str) -> Any:
        v = hf.get(key)
        return d.get(key) if v is None else v

    if get("hidden_act") != "silu":
        raise CheckpointError(f"{model_type}: hidden_act {get('hidden_act')!r} is not SwiGLU's silu")
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    head_dim = get("head_dim")
    max_len = int(get("max_position_embeddings"))
    # An explicit null means "no window"; a missing key means the class default (4096).
    window = hf.get("sliding_window", d.get("sliding_window")) if model_type == "mistral" else None
    if window is not None:
        max_len = min(max_len, int(window))  # exact only while the context fits in the window
    rope = _rope(hf, d)
    if rope.get("rope_scaling") == "dynamic":
        # max_position_embeddings is the trained context here; dynamic NTK exists to run past it,
        # by about its factor.
        max_len = int(max_len * rope["rope_scaling_factor"])
    try:
        return DecoderConfig(
            vocab_size=get("vocab_size"), hidden=hidden, layers=get("num_hidden_layers"), heads=heads,
            kv_heads=get("num_key_value_heads") or heads, intermediate=get("intermediate_size"),
            norm_eps=float(get("rms_norm_eps")), max_seq_len=max_len, tie_embeddings=bool(get("tie_word_embeddings")),
            head_dim_override=0 if head_dim in (None, hidden // heads) else int(head_dim),
            attention_bias=bool(get("attention_bias")), mlp_bias=bool(get("mlp_bias")), **rope)
    except (ConfigError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{model_type} config is not a valid decoder: {e}") from None


def decoder_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaDecoder state holds for ``cfg`` (``lm_head.weight`` only when untied)."""
    d, q, kv, f = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.intermediate
    per_layer = {"attn_norm.weight": (d,), "mlp_norm.weight": (d,),
                 "attn.q_proj.weight": (q, d), "attn.k_proj.weight": (kv, d), "attn.v_proj.weight": (kv, d),
                 "attn.o_proj.weight": (d, q),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    if cfg.attention_bias:
        per_layer.update({"attn.q_proj.bias": (q,), "attn.k_proj.bias": (kv,), "attn.v_proj.bias": (kv,),
                          "attn.o_proj.bias": (d,)})
    if cfg.mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)})
    out = {"embed_tokens.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    for i in range(cfg.layers):
        out.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    return out


def _lm_head_candidates(prefix: str) -> list[str]:
    # "language_model.model." (5.x on disk) keeps its head at "language_model.lm_head.weight";
    # "model.language_model." (5.x in memory) and "model." (a causal LM) at "lm_head.weight".
    out = []
    if prefix.endswith("model."):
        out.append(prefix[: -len("model.")] + "lm_head.weight")
    out.append("lm_head.weight")
    return out


def llama_from_hf(text_config: dict[str, Any], state: dict[str, torch.Tensor],
                  prefix: str = "model.") -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """Map the LlamaModel under ``prefix`` (``"model."`` for a causal LM; probe multimodal layouts with
    ``find_prefix(state, [...], "embed_tokens.weight")``) to LlamaDecoder names, checking every shape."""
    cfg = config_from_hf(text_config)
    out: dict[str, torch.Tensor] = {}
    for key, shape in decoder_shapes(cfg).items():
        if key == "lm_head.weight":
            src = next((k for k in _lm_head_candidates(prefix) if k in state), None)
            if src is None:
                raise CheckpointError(f"checkpoint lacks the untied lm_head (tried {_lm_head_candidates(prefix)})")
        elif key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            src = f"{prefix}layers.{i}.{_LAYER_KEYS[rest]}"
        else:
            src = prefix + key
        if src not in state:
            raise CheckpointError(f"checkpoint lacks tensor {src!r} (for decoder {key!r})")
        t = state[src]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {src!r}: expected shape {shape} for {cfg.hidden=} {cfg.heads=} "
                                  f"{cfg.kv_heads=} {cfg.head_dim=}, found {tuple(t.shape)}")
        out[key] = t
    return cfg, out


def read_llama_dir(path: str | os.PathLike) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """A transformers ``save_pretrained`` folder (config.json + safetensors) -> (DecoderConfig, state)."""
    path = Path(path)
    hf = read_json(path / "config.json")
    model_type = hf.get("model_type")
    if model_type in _WRAPPERS:
        text = hf.get("text_config") or {"model_type": "llama"}
        if not isinstance(text, dict):
            raise CheckpointError(f"{path / 'config.json'}: text_config is not an object")
        text = {"model_type": "llama", **text}
        prefixes = ["language_model.model.", "model.language_model.", "language_model."]
    elif model_type in _DEFAULTS:
        text, prefixes = hf, ["model.", ""]
    else:
        raise CheckpointError(f"{path / 'config.json'}: model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES + _WRAPPERS)}")
    config_from_hf(text)  # fail on the config before reading gigabytes of weights
    state = load_safetensors_dir(path)
    prefix = find_prefix(state, prefixes, "embed_tokens.weight")
    try:
        return llama_from_hf(text, state, prefix)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def to_transformers(decoder):
    """A float LlamaDecoder -> transformers' ``LlamaForCausalLM`` sharing its tensors (no copies), for
    peers in benchmarks and parity checks. Plain RoPE only; quantised decoders have no float weights."""
    import transformers

    c = decoder.cfg
    if c.rope_scaling != "none":
        raise ConfigError(f"to_transformers maps plain RoPE only, not rope_scaling={c.rope_scaling!r}")
    state = {}
    for key, t in decoder.state_dict().items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            if rest not in _LAYER_KEYS:
                raise ConfigError(f"to_transformers: {key!r} has no transformers name (a quantised decoder?)")
            state[f"model.layers.{i}.{_LAYER_KEYS[rest]}"] = t
        else:
            state[key if key == "lm_head.weight" else "model." + key] = t
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.intermediate, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        attention_bias="layers.0.attn.q_proj.bias" in decoder.state_dict(),
        mlp_bias="layers.0.mlp.gate_proj.bias" in decoder.state_dict())
    model = transformers.LlamaForCausalLM(hf_cfg)  # on CPU: non-persistent buffers (RoPE's) are made here
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ConfigError(f"to_transformers: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if c.tie_embeddings:
        model.tie_weights()
    return model.eval()


__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "llama_from_hf", "read_llama_dir", "decoder_shapes",
           "to_transformers"]
