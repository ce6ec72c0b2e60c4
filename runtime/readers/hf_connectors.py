"""transformers checkpoints -> edgevlm connector configs and state dicts.

- :func:`qformer_from_hf`: any BLIP-2-style Q-Former (``Blip2QFormerModel`` keys) under a prefix;
  also serves SPHINX, whose ``qformer`` is a whole ``Blip2Model`` (prefix ``qformer.qformer.``).
- :func:`blip2_connector_from_hf`: ``Blip2ForConditionalGeneration`` / ``Blip2Model`` -> Q-Former +
  ``language_projection``; with ``instruction=True`` ``InstructBlipForConditionalGeneration`` (an
  ``InstructBlipQFormerModel``: instruction embeddings and the text FFN too).
- :func:`llava_projector_from_hf`: ``LlavaForConditionalGeneration`` -> ``multi_modal_projector``.

The input ``state`` may be a whole checkpoint (vision tower, LLM and all); only the connector's
tensors are taken. Key prefixes differ between transformers versions and between in-memory and
saved layouts (``multi_modal_projector.`` on disk vs ``model.multi_modal_projector.`` in memory in
transformers 5), so they are probed, never assumed. Every expected tensor is checked against the
shape the edgevlm module will have; a mismatch raises CheckpointError naming key and both shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgevlm.config import MLPConnectorConfig, QFormerConfig, QFormerConnectorConfig, QFormerTextConfig
from edgevlm.errors import CheckpointError, ConfigError

from .safetensors_io import find_prefix, take

# transformers' hidden_act names -> edgevlm activation names (erf "gelu" is not "gelu_new").
_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
         "quick_gelu": "quick_gelu"}

# Defaults of transformers' Blip2QFormerConfig / Blip2Config, for config dicts that omit fields.
_QFORMER_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072, "cross_attention_frequency": 2, "layer_norm_eps": 1e-12,
                     "hidden_act": "gelu", "encoder_hidden_size": 1408}
# ... and of InstructBlipQFormerConfig's instruction input.
_QFORMER_TEXT_DEFAULTS = {"vocab_size": 30522, "max_position_embeddings": 512, "pad_token_id": 0}


def _expected_shapes(build: Callable[[], nn.Module]) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only, no memory
        return {k: v.shape for k, v in build().state_dict().items()}


def _gather(state: dict[str, torch.Tensor], mapping: dict[str, str], shapes: dict[str, torch.Size],
            what: str) -> dict[str, torch.Tensor]:
    """``{edgevlm key: state[hf key]}`` with shape checks, and a check that every module key is covered."""
    uncovered = sorted(set(shapes) - set(mapping))
    if uncovered:  # a bug in this file, not in the checkpoint
        raise RuntimeError(f"{what}: converter maps no checkpoint key to {uncovered[:5]}")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in mapping.items():
        t = take(state, theirs)
        want = shapes[ours]
        if t.shape != want:
            raise CheckpointError(f"{what}: tensor {theirs!r} has shape {tuple(t.shape)}, expected {tuple(want)} "
                                  f"(for {ours!r})")
        out[ours] = t
    return out


def _get(cfg: dict, key: str, defaults: dict):
    return cfg.get(key, defaults.get(key))


def qformer_from_hf(hf_qformer_config: dict, state: dict[str, torch.Tensor], prefix: str, query_tokens_key: str,
                    *, encoder: str, instruction: bool = False) -> tuple[QFormerConfig, dict[str, torch.Tensor]]:
    """Read a transformers ``Blip2QFormerModel`` (query path) into :class:`~edgevlm.runtime.connectors.qformer.QFormer`.

    ``prefix`` is where the Q-Former's own keys start (``"qformer."`` in a Blip2 checkpoint);
    ``query_tokens_key`` names the ``[1, Q, hidden]`` query tokens, which live outside the Q-Former
    module in transformers. ``hf_qformer_config["encoder_hidden_size"]`` must be the vision width (a
    saved Blip2Config sets it; :func:`blip2_connector_from_hf` fills it from ``vision_config``).
    Text-path weights (``intermediate``/``output`` with ``use_qformer_text_input``) are ignored.

    ``instruction=True`` reads an ``InstructBlipQFormerModel`` instead: the embedding LayerNorm sits
    at ``embeddings.layernorm``, and the instruction's ``embeddings.word_embeddings`` /
    ``position_embeddings`` and every layer's text FFN (``intermediate``/``output``) are read too,
    into ``QFormerConfig.text`` (vocabulary and position-table sizes from the config, checked against
    the tensors).
    """
    from edgevlm.runtime.connectors.qformer import QFormer

    c, d = hf_qformer_config, _QFORMER_DEFAULTS
    act = _get(c, "hidden_act", d)
    if act != "gelu":
        raise CheckpointError(f"Q-Former hidden_act {act!r} is not supported (edgevlm's Q-Former uses erf GELU)")
    qt = take(state, query_tokens_key)
    if qt.ndim != 3 or qt.shape[0] != 1:
        raise CheckpointError(f"{query_tokens_key!r} has shape {tuple(qt.shape)}, expected (1, num_queries, hidden)")
    text_cfg = None
    try:
        if instruction:
            td = _QFORMER_TEXT_DEFAULTS
            pad = _get(c, "pad_token_id", td)
            text_cfg = QFormerTextConfig(vocab_size=int(_get(c, "vocab_size", td)),
                                         max_positions=int(_get(c, "max_position_embeddings", td)),
                                         pad_id=int(pad if pad is not None else 0))
        cfg = QFormerConfig(encoder=encoder, encoder_width=int(_get(c, "encoder_hidden_size", d)),
                            num_queries=int(qt.shape[1]), hidden=int(_get(c, "hidden_size", d)),
                            layers=int(_get(c, "num_hidden_layers", d)), heads=int(_get(c, "num_attention_heads", d)),
                            intermediate=int(_get(c, "intermediate_size", d)),
                            cross_attention_every=int(_get(c, "cross_attention_frequency", d)),
                            norm_eps=float(_get(c, "layer_norm_eps", d)), text=text_cfg)
    except ConfigError as e:
        raise CheckpointError(f"Q-Former config is not usable: {e}") from None

    ln = f"{prefix}embeddings.layernorm" if instruction else f"{prefix}layernorm"
    m = {"query_tokens": query_tokens_key, "ln_query.weight": f"{ln}.weight", "ln_query.bias": f"{ln}.bias"}
    if instruction:
        m["text_embed.weight"] = f"{prefix}embeddings.word_embeddings.weight"
        m["text_pos_embed.weight"] = f"{prefix}embeddings.position_embeddings.weight"

    def attn(ours: str, theirs: str) -> None:
        for a, b in (("q_proj", "attention.query"), ("k_proj", "attention.key"), ("v_proj", "attention.value"),
                     ("o_proj", "output.dense"), ("norm", "output.LayerNorm")):
            for p in ("weight", "bias"):
                m[f"{ours}.{a}.{p}"] = f"{theirs}.{b}.{p}"

    for i in range(cfg.layers):
        src, dst = f"{prefix}encoder.layer.{i}", f"layers.{i}"
        attn(f"{dst}.self_attn", f"{src}.attention")
        has_cross = f"{src}.crossattention.attention.query.weight" in state
        if has_cross != (i % cfg.cross_attention_every == 0):
            raise CheckpointError(f"layer {i}: checkpoint {'has' if has_cross else 'lacks'} cross-attention "
                                  f"({src}.crossattention.*), but cross_attention_frequency is "
                                  f"{cfg.cross_attention_every}")
        if has_cross:
            attn(f"{dst}.cross_attn", f"{src}.crossattention")
        ffn = [("fc1", "intermediate_query.dense"), ("fc2", "output_query.dense"),
               ("ffn_norm", "output_query.LayerNorm")]
        if instruction:
            ffn += [("text_fc1", "intermediate.dense"), ("text_fc2", "output.dense"),
                    ("text_ffn_norm", "output.LayerNorm")]
        for a, b in ffn:
            for p in ("weight", "bias"):
                m[f"{dst}.{a}.{p}"] = f"{src}.{b}.{p}"
    if f"{prefix}encoder.layer.{cfg.layers}.attention.attention.query.weight" in state:
        raise CheckpointError(f"checkpoint has more Q-Former layers than num_hidden_layers={cfg.layers}")
    return cfg, _gather(state, m, _expected_shapes(lambda: QFormer(cfg)), "Q-Former")


def blip2_connector_from_hf(hf_config: dict, state: dict[str, torch.Tensor], *, encoder: str = "eva",
                            instruction: bool = False) -> tuple[QFormerConnectorConfig, dict[str, torch.Tensor]]:
    """A whole Blip2Config dict + checkpoint -> :class:`QFormerConnector` config and state dict
    (keys ``qformer.*`` and ``proj.*``). ``out_width`` is the ``language_projection`` output width.
    ``instruction=True``: an InstructBlipConfig + checkpoint (see :func:`qformer_from_hf`)."""
    qf_cfg = dict(hf_config.get("qformer_config") or {})
    vision_hidden = (hf_config.get("vision_config") or {}).get("hidden_size")
    if vision_hidden is not None:  # Blip2Config.__post_init__ ties these; trust the vision side
        qf_cfg["encoder_hidden_size"] = vision_hidden
    qprefix = find_prefix(state, ["qformer.", "model.qformer."],
                          "embeddings.layernorm.weight" if instruction else "layernorm.weight")
    tprefix = find_prefix(state, ["", "model."], "query_tokens")
    lprefix = find_prefix(state, ["language_projection.", "model.language_projection."], "weight")
    qcfg, qsd = qformer_from_hf(qf_cfg, state, qprefix, tprefix + "query_tokens", encoder=encoder,
                                instruction=instruction)
    n_q = hf_config.get("num_query_tokens")
    if n_q is not None and n_q != qcfg.num_queries:
        raise CheckpointError(f"num_query_tokens is {n_q} but {tprefix}query_tokens holds {qcfg.num_queries}")

    w, b = take(state, lprefix + "weight"), take(state, lprefix + "bias")
    if w.ndim != 2 or w.shape[1] != qcfg.hidden:
        raise CheckpointError(f"{lprefix}weight has shape {tuple(w.shape)}, expected (out_width, {qcfg.hidden})")
    out_width = int(w.shape[0])
    text = hf_config.get("text_config") or {}
    text_hidden = text.get("hidden_size", text.get("d_model"))  # decoder-only vs T5
    if text_hidden is not None and text_hidden != out_width:
        raise CheckpointError(f"{lprefix}weight projects to {out_width}, but text_config hidden size is {text_hidden}")
    if b.shape != (out_width,):
        raise CheckpointError(f"{lprefix}bias has shape {tuple(b.shape)}, expected ({out_width},)")
    cfg = QFormerConnectorConfig(qformer=qcfg, out_width=out_width)
    sd = {f"qformer.{k}": v for k, v in qsd.items()}
    sd.update({"proj.weight": w, "proj.bias": b})
    return cfg, sd


def llava_projector_from_hf(hf_config: dict, state: dict[str, torch.Tensor], *,
                            encoder: str = "clip") -> tuple[MLPConnectorConfig, dict[str, torch.Tensor]]:
    """A whole LlavaConfig dict + checkpoint -> :class:`MLPConnector` config and state dict (``fc1.*``, ``fc2.*``).

    ``multimodal_projector_bias=False`` checkpoints give a bias-free MLP. With a list ``vision_feature_layer`` the input width is
    the vision width times the number of layers (transformers concatenates them on channels).
    """
    act_hf = hf_config.get("projector_hidden_act", "gelu")
    if act_hf not in _ACTS:
        raise CheckpointError(f"LLaVA projector_hidden_act {act_hf!r} not supported; known: {sorted(_ACTS)}")
    p = find_prefix(state, ["multi_modal_projector.", "model.multi_modal_projector."], "linear_1.weight")
    w1, w2 = take(state, p + "linear_1.weight"), take(state, p + "linear_2.weight")
    if w1.ndim != 2 or w2.ndim != 2:
        raise CheckpointError(f"{p}linear_1/linear_2 weights must be matrices, "
                              f"got {tuple(w1.shape)}, {tuple(w2.shape)}")
    hidden, in_width = (int(s) for s in w1.shape)
    out_width = int(w2.shape[0])

    layers = hf_config.get("vision_feature_layer", -2)
    n_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
    vision_hidden = (hf_config.get("vision_config") or {}).get("hidden_size")
    if vision_hidden is not None and vision_hidden * n_layers != in_width:
        raise CheckpointError(f"{p}linear_1.weight has shape {tuple(w1.shape)}, expected "
                              f"(*, {vision_hidden * n_layers}) from vision hidden_size {vision_hidden} x "
                              f"{n_layers} feature layer(s)")
    text_hidden = (hf_config.get("text_config") or {}).get("hidden_size")
    if text_hidden is not None and (hidden, out_width) != (text_hidden, text_hidden):
        raise CheckpointError(f"{p}linear_1/linear_2 give widths {hidden}/{out_width}, expected text hidden_size "
                              f"{text_hidden}")
    has_bias = bool(hf_config.get("multimodal_projector_bias", True))
    cfg = MLPConnectorConfig(encoder=encoder, in_width=in_width, hidden=hidden, out_width=out_width,
                             act=_ACTS[act_hf], bias=has_bias)
    m = {"fc1.weight": w1, "fc2.weight": w2}
    want = {"fc1.weight": (hidden, in_width), "fc2.weight": (out_width, hidden)}
    if has_bias:
        m.update({"fc1.bias": take(state, p + "linear_1.bias"), "fc2.bias": take(state, p + "linear_2.bias")})
        want.update({"fc1.bias": (hidden,), "fc2.bias": (out_width,)})
    for k, t in m.items():
        if tuple(t.shape) != want[k]:
            theirs = p + k.replace("fc1", "linear_1").replace("fc2", "linear_2")
            raise CheckpointError(f"tensor {theirs!r} has shape {tuple(t.shape)}, expected {want[k]}")
    return cfg, m


__all__ = ["qformer_from_hf", "blip2_connector_from_hf", "llava_projector_from_hf"]
