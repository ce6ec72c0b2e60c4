"""Salesforce xGen-MM (BLIP-3) folders (``model_type: "xgenmm"``) -> edgevlm tower + decoder.

The released HF repos (``Salesforce/xgen-mm-phi3-mini-*-r-v1.5``) ship ``configuration_xgenmm.py`` /
``modeling_xgenmm.py`` (remote code; transformers has no class for them). Facts relied on, read from
the public open_flamingo code on the LAVIS ``xgen-mm`` branch (commit d699f7e5) and the HF remote
code that copies it:

* Config (``XGenMMConfig``): ``vision_encoder_config`` (``model_name``, ``anyres_grids``,
  ``image_aspect_ratio``, ``anyres_patch_sampling``), ``vision_tokenizer_config`` (``vis_feature_dim``,
  ``lang_embedding_dim``, ``num_vis_tokens`` = 128), ``text_config`` (a Phi-3 config plus
  ``initial_tokenizer_len`` and ``pad_token_id``, both required). The SigLIP architecture is *not* in
  the config: ``XGenMMModelForConditionalGeneration.__init__`` builds
  ``AutoModel.from_pretrained(vision_encoder_config.model_name).vision_model``.
* Weights (``XGenMMModelForConditionalGeneration.vlm``):
  ``vlm.vision_encoder.*`` a ``SiglipVisionTransformer``; ``vlm.vision_tokenizer.*`` open_flamingo's
  ``PerceiverResampler`` (LAVIS ``open_flamingo/src/xgenmm.py`` ``XGenMMPerceiver.__init__`` l.45-47:
  ``PerceiverResampler(dim=vis_feature_dim, dim_inner=lang_embedding_dim, num_latents=num_vision_tokens)``,
  the other arguments at their defaults depth=6, dim_head=96, heads=16, ff_mult=4,
  ``open_flamingo/src/helpers.py`` l.105-170); ``vlm.lang_model.*`` a ``Phi3ForCausalLM``.
* The vision features are ``SiglipVisionTransformer(...).last_hidden_state`` (post-LayerNorm applied,
  no pooling head; ``vlm.py`` ``_encode_vision_x`` l.324), then the resampler: per image
  ``proj(LN(latents))`` -> ``num_vis_tokens x lang_embedding_dim`` (``helpers.py`` l.196-204), put
  straight into the language stream with nothing after it.
* Special tokens (``XGenMMPerceiver._special_tokens``, ``xgenmm.py`` l.37-41): ``<image>``,
  ``<image placeholder>``, ``<|endofchunk|>``, added to the tokenizer after ``initial_tokenizer_len``
  ids (``factory.py`` ``create_model_and_transforms`` l.145 and l.157; the HF model's
  ``update_special_tokens``).
  ``_prepare_inputs_for_forward`` (``vlm.py`` l.690-760) replaces each ``<image>`` token, in order,
  by that image's vision tokens: several images interleave with text wherever their tokens stand.
* The language model's embedding and head are open_flamingo's ``DecoupledEmbedding`` /
  ``DecoupledLinear`` (``vlm.py`` ``VLM.__init__`` l.74-101; ``helpers.py`` l.430-690): ids up to
  ``initial_tokenizer_len - 1`` use ``embed_tokens.weight`` / ``lm_head.weight``, the special tokens
  ``embed_tokens.additional_embedding.weight`` / ``lm_head.additional_fc``; logits are
  ``cat(linear(x, W, b)[..., :initial_tokenizer_len], additional_fc(x))``. ``DecoupledLinear`` is built
  with ``bias=True`` around Phi-3's bias-free head, so ``lm_head.bias`` exists (frozen at its init).
  :func:`adapt_decoder_state` folds both into one table and one biased head of
  ``initial_tokenizer_len + n_special`` rows.
* Preprocessing, base view: resize to ``image_size`` squared ignoring aspect (bicubic), rescale to
  0..1, normalise with mean = std = 0.5 (``factory.py`` SigLIP branch l.80-94, the encoder being
  ``model.vision_model`` l.85; the HF ``Blip3ImageProcessor``
  ``resize_mode="squash"``).
* ``image_aspect_ratio="anyres"`` with ``anyres_patch_sampling=True`` (the released configs' setting and
  XGenMMPerceiver's defaults, ``xgenmm.py`` l.22-23): views are the base view (the image squashed to
  the base size) then the ``rows x cols`` tiles of the best grid (``any_res_data_utils.py``
  ``process_anyres_image`` l.174-202, ``select_best_resolution`` l.67-94, ``resize_and_pad_image``
  l.97-129: aspect kept, the other side ``ceil``'ed, centred on black). ``anyres_grids`` are
  ``[width, height]`` pixel pairs (open_flamingo's default ``(1,2),(2,1),(2,2),(3,1),(1,3)`` times the
  base size, ``sft_data_utils.py`` l.317-320), read here as ``(rows, cols)`` in the same order, since
  ties go to the earlier grid. ``_encode_vision_x_anyres`` (``vlm.py`` l.187-281) does not resample
  tile by tile: it stitches the tiles' tokens into one ``(rows*g, cols*g)`` map, masks it with
  ``unpad_image(keep_original_shape=True)`` on that map (``int()`` of the scaled side, ``(map - new)
  // 2`` cells off both ends, ``any_res_data_utils.py`` l.23-60), and cuts it with
  ``view(-1, rows, cols, g*g)`` (l.255, l.258) -- raster order, so with ``cols > 1`` a group is a
  horizontal strip, not a tile. The base view (all-ones mask) and each group are resampled on their
  own under their masks (``xgenmm.py`` l.123-139, ``helpers.py`` l.78-94) and joined base first, then
  the groups, with no separator (l.158-162): ``(1 + rows*cols) * num_vis_tokens`` tokens replace the
  image's ``<image>``. In edgevlm: ``TowerConfig.regroup`` (:class:`~edgevlm.config.StripRegroupConfig`)
  and :mod:`edgevlm.runtime.connectors.strip_regroup`, applied between the encoder and the resampler.

Refused with a :class:`CheckpointError`: ``anyres_patch_sampling=false`` (all of an image's tokens
resampled at once, padded across the batch, ``vlm.py`` l.262-303), a checkpoint with an ``image_newline``
(``vlm.py`` l.249-253; XGenMMPerceiver has none), other ``image_aspect_ratio`` values, grids that are not
multiples of the encoder's size. Token dropping (``keep_ratio < 1``) and ONNX export of an anyres
xGen-MM tower are refused with a ``ConfigError`` (the groups and their masks need every tile patch; the
exported graph would need the masks and the regrouping as inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgevlm.config import ResamplerConnectorConfig, StripRegroupConfig, TowerConfig, ViewConfig
from edgevlm.errors import CheckpointError

from .hf_vision import vit_from_hf
from .safetensors_io import load_safetensors_dir, read_json

SPECIAL_TOKENS = ("<image>", "<image placeholder>", "<|endofchunk|>")  # XGenMMPerceiver._special_tokens order
VISION_PREFIX = "vlm.vision_encoder."
RESAMPLER_PREFIX = "vlm.vision_tokenizer."
LM_PREFIX = "vlm.lang_model."
# PerceiverResampler's defaults, which XGenMMPerceiver does not override (helpers.py l.105-117).
RESAMPLER_DEPTH, RESAMPLER_HEADS, RESAMPLER_HEAD_DIM, RESAMPLER_FF_MULT = 6, 16, 96, 4
RESAMPLER_EPS = 1e-5  # nn.LayerNorm's default eps: open_flamingo passes none
# Vision encoders named by vision_encoder_config.model_name (hub ids; their config.json vision_config).
KNOWN_VISION_ENCODERS: dict[str, dict[str, Any]] = {
    "google/siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6),
}
SUPPORTED_ASPECT_RATIOS = ("pad", "anyres")  # base view only / base view + tiles regrouped into strips
# open_flamingo's default grids, (width, height) in multiples of the base size (instruction_finetune.py l.162,
# made pixels by sft_data_utils.py l.317-320); the released processor and configs use the same five, in this order
DEFAULT_ANYRES_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def _section(path: Path, hf: dict, key: str) -> dict:
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path / 'config.json'}: {key} must be an object, got {type(value).__name__}")
    return value


def _vision_config(path: Path, enc: dict) -> dict:
    """SigLIP's vision config for ``vision_encoder_config.model_name``: a known hub id, or (as
    ``AutoModel.from_pretrained`` allows) a folder with a SigLIP ``config.json``, relative paths taken
    from the checkpoint folder."""
    name = enc.get("model_name", "google/siglip-so400m-patch14-384")  # XGenMMVisionEncoderConfig's default
    if name in KNOWN_VISION_ENCODERS:
        return dict(KNOWN_VISION_ENCODERS[name])
    folder = (Path(name) if Path(name).is_absolute() else path / name) if isinstance(name, str) and name else None
    if folder is None or not (folder / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: vision_encoder_config.model_name {name!r} is neither a known "
                              f"vision encoder ({', '.join(KNOWN_VISION_ENCODERS)}) nor a folder with a config.json")
    hf = read_json(folder / "config.json")
    if hf.get("model_type") == "siglip":  # a whole SiglipModel: its vision half
        hf = {**(hf.get("vision_config") or {}), "model_type": "siglip_vision_model"}
    if hf.get("model_type") != "siglip_vision_model":
        raise CheckpointError(f"{folder / 'config.json'}: vision encoder model_type {hf.get('model_type')!r} is not "
                              "supported for xgenmm; supported: siglip, siglip_vision_model")
    return hf


def _check_preprocessor(path: Path, image_size: int) -> dict[str, Any]:
    """ViTConfig overrides from ``preprocessor_config.json`` (mean/std), after checking that it asks for
    the square bicubic resize the tower does."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return {}
    pp = read_json(file)
    size = pp.get("size")
    if isinstance(size, dict):
        size = [size.get("height"), size.get("width")]
    if size is not None and (not isinstance(size, (list, tuple)) or list(size) != [image_size, image_size]):
        raise CheckpointError(f"{file}: size {pp.get('size')!r} differs from the vision encoder's "
                              f"{image_size}x{image_size}")
    if pp.get("resize_mode", "squash") != "squash":
        raise CheckpointError(f"{file}: resize_mode {pp['resize_mode']!r} not supported; supported: squash")
    if pp.get("interpolation_mode", "bicubic") != "bicubic" or pp.get("resample", 3) != 3:
        raise CheckpointError(f"{file}: only bicubic resizing is supported")
    out = {}
    for key, field in (("image_mean", "mean"), ("image_std", "std")):
        v = pp.get(key)
        if v is not None:
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(c, (int, float)) for c in v)):
                raise CheckpointError(f"{file}: {key} must be 3 numbers, got {v!r}")
            out[field] = tuple(float(c) for c in v)
    return out


def _aspect_ratio(path: Path, enc: dict) -> str:
    mode = enc.get("image_aspect_ratio", "anyres")  # XGenMMPerceiver's default
    if mode not in SUPPORTED_ASPECT_RATIOS:
        raise CheckpointError(f"{path / 'config.json'}: vision_encoder_config.image_aspect_ratio {mode!r} is not "
                              f"supported; supported: {', '.join(SUPPORTED_ASPECT_RATIOS)}")
    if mode == "anyres" and enc.get("anyres_patch_sampling", True) is not True:  # XGenMMPerceiver's default: True
        raise CheckpointError(f"{path / 'config.json'}: vision_encoder_config.anyres_patch_sampling "
                              f"{enc.get('anyres_patch_sampling')!r} is not supported: edgevlm runs 'anyres' with "
                              "anyres_patch_sampling=true (tiles regrouped into strips, each resampled on its own); "
                              "without it the reference resamples all of an image's tokens at once, padded across "
                              "the batch (vlm.py l.262-303), which is not implemented")
    return mode


def _anyres_views(path: Path, enc: dict, base: int) -> ViewConfig:
    """``anyres_grids`` (``[width, height]`` in pixels, read as ``select_best_resolution`` reads them)
    -> ViewConfig ``(rows, cols)`` grids in the same order (ties go to the earlier grid), black canvas
    fill (``resize_and_pad_image``, any_res_data_utils.py l.124)."""
    grids = enc.get("anyres_grids")
    if grids is None:
        grids = [[base * m, base * n] for m, n in DEFAULT_ANYRES_GRIDS]
    where = f"{path / 'config.json'}: vision_encoder_config.anyres_grids"
    if not isinstance(grids, (list, tuple)) or not grids:
        raise CheckpointError(f"{where} must be a non-empty list of [width, height] pixel pairs, got {grids!r}")
    out = []
    for g in grids:
        ok = isinstance(g, (list, tuple)) and len(g) == 2 and \
            all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % base == 0 for v in g)
        if not ok:
            raise CheckpointError(f"{where}: entry {g!r} must be [width, height], positive multiples of the vision "
                                  f"encoder's image_size {base}")
        out.append((g[1] // base, g[0] // base))  # (rows, cols)
    return ViewConfig(kind="anyres", anyres_grids=tuple(out), anyres_fill=(0, 0, 0))


def _refuse_image_newline(path: Path, state: dict[str, torch.Tensor]) -> None:
    """``_encode_vision_x_anyres`` appends ``image_newline`` to every map row when the model has one
    (vlm.py l.249-253, l.268-272); XGenMMPerceiver never creates it, so a checkpoint holding it is
    another model."""
    extra = sorted(k for k in state if k.split(".")[-1] == "image_newline" or ".image_newline." in k)
    if extra:
        raise CheckpointError(f"{path}: checkpoint has {extra[0]!r}: an image_newline after each token-map row "
                              "is not implemented for xgenmm folders (the released models have none)")


def _resampler_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """open_flamingo names -> :class:`~edgevlm.runtime.connectors.resampler.PerceiverResampler` names:
    ``layers.{i}.0.*`` -> ``layers.{i}.attn.*``, ``layers.{i}.1.{0,1,3}`` -> ``layers.{i}.ff.{0,1,3}``."""
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        key = RESAMPLER_PREFIX + src
        if key not in state:
            raise CheckpointError(f"checkpoint lacks tensor {key!r} (the xGen-MM perceiver resampler)")
        out["connector.resampler." + dst] = state[key]

    take("latents", "latents")
    for w in ("weight", "bias"):
        take(f"norm.{w}", f"norm.{w}")
        take(f"projection.{w}", f"projection.{w}")
    for i in range(depth):
        for n in ("norm_media", "norm_latents"):
            for w in ("weight", "bias"):
                take(f"layers.{i}.0.{n}.{w}", f"layers.{i}.attn.{n}.{w}")
        for n in ("to_q", "to_kv", "to_out"):
            take(f"layers.{i}.0.{n}.weight", f"layers.{i}.attn.{n}.weight")
        for w in ("weight", "bias"):
            take(f"layers.{i}.1.0.{w}", f"layers.{i}.ff.0.{w}")
        take(f"layers.{i}.1.1.weight", f"layers.{i}.ff.1.weight")
        take(f"layers.{i}.1.3.weight", f"layers.{i}.ff.3.weight")
    extra = f"{RESAMPLER_PREFIX}layers.{depth}.0.to_q.weight"
    if extra in state:
        raise CheckpointError(f"checkpoint has more than {depth} resampler layers (found {extra!r})")
    return out


def read_xgenmm_tower(path: str | Path) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """An xGen-MM folder -> (TowerConfig, tower state): SigLIP (last hidden state, post-LayerNorm) ->
    perceiver resampler (``num_vis_tokens`` latents, projected to the LLM width), one base view per
    image stretched to the encoder's size. Every shape is checked against the config; a missing
    tensor is a :class:`CheckpointError` naming its key."""
    path = Path(path)
    hf = read_json(path / "config.json")
    if hf.get("model_type") != "xgenmm":
        raise CheckpointError(f"{path / 'config.json'}: model_type {hf.get('model_type')!r} is not 'xgenmm'")
    enc = _section(path, hf, "vision_encoder_config")
    tok = _section(path, hf, "vision_tokenizer_config")
    text = _section(path, hf, "text_config")
    mode = _aspect_ratio(path, enc)
    vision = _vision_config(path, enc)
    state = load_safetensors_dir(path, keep=lambda k: not k.startswith(LM_PREFIX))
    _refuse_image_newline(path, state)
    image_size = vision.get("image_size", 224)
    vit_cfg, vit_state = vit_from_hf(vision, state, VISION_PREFIX, name="siglip",
                                     **_check_preprocessor(path, image_size if isinstance(image_size, int) else 0))
    dim = int(tok.get("vis_feature_dim", 1152))
    # XGenMMModelForConditionalGeneration overwrites lang_embedding_dim with the LLM's width
    width = int(text.get("hidden_size", tok.get("lang_embedding_dim", 3072)))
    if dim != vit_cfg.width:
        raise CheckpointError(f"{path / 'config.json'}: vision_tokenizer_config.vis_feature_dim {dim} != the vision "
                              f"encoder's width {vit_cfg.width}")
    conn = ResamplerConnectorConfig(encoder=vit_cfg.name, in_width=dim, out_width=width, depth=RESAMPLER_DEPTH,
                                    heads=RESAMPLER_HEADS, head_dim=RESAMPLER_HEAD_DIM,
                                    num_latents=int(tok.get("num_vis_tokens", 128)), ff_mult=RESAMPLER_FF_MULT,
                                    norm_eps=RESAMPLER_EPS)
    if mode == "anyres":  # base view + tiles, the tiles' tokens regrouped into strips before the resampler
        tower = TowerConfig(encoders=(vit_cfg,), connector=conn, views=_anyres_views(path, enc, vit_cfg.image_size),
                            regroup=StripRegroupConfig())
    else:
        tower = TowerConfig(encoders=(vit_cfg,), connector=conn, views=ViewConfig(kind="stretch"))
    out = {"encoders." + vit_cfg.name + "." + k: v for k, v in vit_state.items()}
    out.update(_resampler_state(state, RESAMPLER_DEPTH))
    return tower, out


def check_special_tokens(path: Path, initial_len: int, n_special: int) -> None:
    """The folder's tokenizer must hold xGen-MM's special tokens among the ids the decoupled tables
    embed (``initial_tokenizer_len`` .. ``+ n_special - 1``)."""
    if not (path / "tokenizer.json").is_file():
        return  # the loader reads the tokenizer itself and says what is missing
    from edgevlm.runtime.tokenizer import Tokenizer

    tk = Tokenizer.from_tokenizer_json(path)
    ids = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise CheckpointError(f"{path}: the tokenizer lacks xGen-MM's special token(s) {missing}; add "
                              f"{list(SPECIAL_TOKENS)} as additional special tokens (ids {initial_len}..) as the model's "
                              "update_special_tokens(tokenizer) does, and save the tokenizer")
    bad = {t: i for t, i in ids.items() if not initial_len <= i < initial_len + n_special}
    if bad:
        raise CheckpointError(f"{path}: special token ids {bad} lie outside the decoupled embedding rows "
                              f"{initial_len}..{initial_len + n_special - 1} (initial_tokenizer_len={initial_len})")


def adapt_decoder_state(path: Path, hf: dict, text: dict, state: dict[str, torch.Tensor]
                        ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fold open_flamingo's decoupled embedding and head into one table and one biased ``lm_head`` of
    ``initial_tokenizer_len + n_special`` rows (see the module docstring); the rows past
    ``initial_tokenizer_len`` of the original tables are never read by the model and are dropped."""
    from .hf_decoders import LM_HEAD_BIAS_KEY

    n0 = text.get("initial_tokenizer_len")
    if not isinstance(n0, int) or isinstance(n0, bool) or n0 <= 0:
        raise CheckpointError(f"{path / 'config.json'}: text_config.initial_tokenizer_len must be a positive int, "
                              f"got {n0!r}")
    if text.get("tie_word_embeddings"):
        raise CheckpointError(f"{path / 'config.json'}: tied embeddings cannot be decoupled (xGen-MM's lm_head "
                              "has its own additional rows)")

    def get(key: str) -> torch.Tensor:
        if LM_PREFIX + key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks tensor {LM_PREFIX + key!r}")
        return state[LM_PREFIX + key]

    emb, head = get("model.embed_tokens.weight"), get("lm_head.weight")
    add_emb, add_head = get("model.embed_tokens.additional_embedding.weight"), get("lm_head.additional_fc.weight")
    n_add, hidden = add_emb.shape[0], emb.shape[1]
    for key, t, rows in (("model.embed_tokens.weight", emb, n0), ("lm_head.weight", head, n0)):
        if t.dim() != 2 or t.shape[0] < rows or t.shape[1] != hidden:
            raise CheckpointError(f"{path}: tensor {LM_PREFIX + key!r} has shape {tuple(t.shape)}; expected at least "
                                  f"initial_tokenizer_len={n0} rows of width {hidden}")
    for key, t in (("model.embed_tokens.additional_embedding.weight", add_emb), ("lm_head.additional_fc.weight", add_head)):
        if tuple(t.shape) != (n_add, hidden):
            raise CheckpointError(f"{path}: tensor {LM_PREFIX + key!r} has shape {tuple(t.shape)}, expected "
                                  f"({n_add}, {hidden})")
    # A head without a stored bias would get transformers' zero init; so does a missing additional one.
    bias = state.get(LM_PREFIX + "lm_head.bias")
    bias = head.new_zeros(head.shape[0]) if bias is None else bias
    add_bias = state.get(LM_PREFIX + "lm_head.additional_fc.bias")
    add_bias = add_head.new_zeros(n_add) if add_bias is None else add_bias
    if tuple(bias.shape) != (head.shape[0],) or tuple(add_bias.shape) != (n_add,):
        raise CheckpointError(f"{path}: lm_head biases have shapes {tuple(bias.shape)} / {tuple(add_bias.shape)}, "
                              f"expected ({head.shape[0]},) / ({n_add},)")
    check_special_tokens(path, n0, n_add)
    state = {k: v for k, v in state.items() if k.startswith(LM_PREFIX)}
    state[LM_PREFIX + "model.embed_tokens.weight"] = torch.cat([emb[:n0], add_emb.to(emb.dtype)])
    state[LM_PREFIX + "lm_head.weight"] = torch.cat([head[:n0], add_head.to(head.dtype)])
    state[LM_PREFIX + "lm_head.bias"] = torch.cat([bias[:n0], add_bias.to(bias.dtype)])
    return {**text, "vocab_size": n0 + n_add, LM_HEAD_BIAS_KEY: True}, state


__all__ = ["read_xgenmm_tower", "adapt_decoder_state", "check_special_tokens", "SPECIAL_TOKENS",
           "KNOWN_VISION_ENCODERS", "DEFAULT_ANYRES_GRIDS"]
