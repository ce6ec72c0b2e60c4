"""MiniGPT-4 (v1, Vicuna V0) -> an edgevlm :class:`~edgevlm.config.ModelConfig` and state dict.

References are to Vision-CAIR/MiniGPT-4 @ d94738a7 (``file Lnn``).

MiniGPT-4 is BLIP-2's EVA ViT-g + Q-Former (frozen) whose 32 query outputs go through one trained
``llama_proj = nn.Linear(768, 4096)`` (``minigpt4/models/minigpt4.py`` L73-75, applied at L137) into a
Vicuna LLaMA. The released ``pretrained_minigpt4*.pth`` is ``{"model": {"llama_proj.weight": [4096, 768],
"llama_proj.bias": [4096]}}``: MiniGPT-4 reads ``ckpt["model"]`` into the whole model with
``strict=False`` (minigpt4.py L189-193), so only the trained projection needs to be in it.

A MiniGPT-4 source is the eval config users already have (``eval_configs/minigpt4_eval.yaml``), as a
``.yaml`` file or a folder holding exactly one ``*.yaml`` / ``*.yml`` with ``model.arch: minigpt4``.
MiniGPT-4 merges the eval config's ``model:`` section over ``minigpt4/configs/models/minigpt4_vicuna0.yaml``
(``minigpt4/common/config.py`` L58-82), so the fields it normally takes from that file may be written in
the eval config. edgevlm reads only the eval config, whose ``model:`` section must give:

``ckpt``            the MiniGPT-4 ``.pth`` (minigpt4_eval.yaml L8); read with ``torch.load(weights_only=True)``:
                    a file that needs code to unpickle is refused. ``ckpt["model"]`` must hold
                    ``llama_proj.weight`` [LLM hidden, Q-Former hidden] and ``llama_proj.bias``; any other
                    key of ``ckpt["model"]`` (a fine-tuned Q-Former, say) is refused rather than ignored.
``llama_model``     the Vicuna folder (minigpt4_vicuna0.yaml L18): a transformers ``LlamaForCausalLM`` folder
                    (config.json + safetensors) with ``tokenizer.model`` (read first, as MiniGPT-4's
                    ``LlamaTokenizer(use_fast=False)`` does, ``minigpt4/models/base_model.py`` L174) or
                    ``tokenizer.json``.
``q_former_model``  where the EVA ViT-g, ``ln_vision`` and Q-Former come from. MiniGPT-4's default is the URL
                    of LAVIS's ``blip2_pretrained_flant5xxl.pth`` (minigpt4.py L28, L150; loaded at L65),
                    which edgevlm cannot download. Give instead a local transformers ``blip-2`` folder
                    (``Blip2ForConditionalGeneration`` / ``Blip2Model`` saved with ``save_pretrained``):
                    transformers converted LAVIS's BLIP-2 models into these classes (EVA ViT-g with
                    ``ln_vision`` as ``vision_model.post_layernorm``, the Q-Former, 32 query tokens).
                    ``Salesforce/blip2-flan-t5-xxl`` is the one MiniGPT-4 uses: transformers'
                    ``convert_blip_2_original_to_pytorch.py`` builds it from LAVIS ``pretrain_flant5xxl``,
                    whose weights are ``blip2_pretrained_flant5xxl.pth`` (LAVIS
                    ``lavis/configs/models/blip2/blip2_pretrain_flant5xxl.yaml``). Only its vision model,
                    Q-Former and query tokens are read; its ``language_projection`` is replaced by
                    ``llama_proj``, and its language model is never loaded.

Relative paths are taken from the YAML's folder; ``~`` is expanded. An absent field, MiniGPT-4's
"please set this value ..." placeholder, a URL or a path that does not exist raises
:class:`~edgevlm.errors.CheckpointError` / :class:`~edgevlm.errors.WeightsNotFoundError` naming the field.

Checked when given (else MiniGPT-4's defaults hold): ``model_type`` must be ``pretrain_vicuna0``
(``pretrain_llama2`` uses another conversation, ``conversation.py`` L120-128), ``vit_model`` must be
``eva_clip_g`` (base_model.py L147), ``has_qformer`` true (minigpt4.py L59-71), ``num_query_token`` the
Q-Former's query count, ``image_size`` and ``datasets.cc_sbu_align.vis_processor.train.image_size`` (the
processor ``demo.py`` L69 uses) the ViT's input size. ``prompt_template``, ``end_sym``, ``max_txt_len`` and
``low_resource`` only matter for training or fp16/8-bit loading and are ignored.

The prompt (:func:`edgevlm.runtime.chat.minigpt4_prompt`) is ``CONV_VISION_Vicuna0``'s
(``minigpt4/conversation/conversation.py`` L110-118) and the image's 32 embeddings replace
``<ImageHere>`` as ``get_context_emb`` does (``minigpt4/models/minigpt_base.py`` L68-81). Pixels: a
bicubic resize to the ViT's square size and CLIP mean/std (``minigpt4/processors/blip_processors.py``
L19-25, L114-121), which is the BLIP-2 tower's own view recipe.

Prompt ids: get_context_emb (``minigpt_base.py`` L68-78, called from ``Chat.answer_prepare``,
``conversation.py`` L162) splits the prompt at ``<ImageHere>`` and calls the tokenizer once per piece, with
``add_special_tokens`` only for the first (BOS); training's ``prompt_wrap`` (L110-121) also tokenises each
piece on its own. The
slow ``LlamaTokenizer`` it uses (base_model.py L174; transformers 4.30, ``environment.yml`` L22) runs
SentencePiece per call, so every piece after an image starts with its own dummy-prefix "▁" (``"</Img> What"``
-> ``▁</Img>▁What``), not as a continuation of the text before the image. The ``"minigpt4"`` chat format
is in :data:`~edgevlm.runtime.chat.SEPARATE_SEGMENT_FORMATS`, so
:func:`~edgevlm.runtime.chat.build_multimodal_ids` encodes the pieces the same way (``separate_segments``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgevlm.config import ModelConfig, TowerConfig
from edgevlm.errors import BackendUnavailableError, CheckpointError, WeightsNotFoundError

from .safetensors_io import read_json

ARCH = "minigpt4"
MODEL_TYPE = "pretrain_vicuna0"  # the Vicuna V0 model config (minigpt4.py L20-23)
IMAGE_TOKEN = "<ImageHere>"  # conversation.py L228, minigpt_base.py L70
PROJ_KEYS = ("llama_proj.weight", "llama_proj.bias")
_ARCH_LINE = re.compile(r"^\s+arch:\s*['\"]?minigpt4['\"]?\s*(#.*)?$", re.MULTILINE)
_YAML_SUFFIXES = (".yaml", ".yml")
_MAX_YAML_BYTES = 1 << 20  # eval configs are a few hundred bytes


# ---- finding and reading the eval config ---------------------------------------------------------

def is_minigpt4_config(path: str | os.PathLike) -> bool:
    """A ``.yaml`` / ``.yml`` file whose ``model:`` section says ``arch: minigpt4`` (a text check; the
    file is parsed by :func:`read_eval_config`)."""
    path = Path(path)
    if path.suffix not in _YAML_SUFFIXES or not path.is_file() or path.stat().st_size > _MAX_YAML_BYTES:
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return bool(_ARCH_LINE.search(text))


def is_minigpt4_dir(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(is_minigpt4_config(p) for p in folder.iterdir())


def find_eval_config(path: str | os.PathLike) -> Path:
    """The eval config: ``path`` itself, or the one MiniGPT-4 YAML in folder ``path``."""
    path = Path(path)
    if path.is_file():
        if not is_minigpt4_config(path):
            raise CheckpointError(f"{path}: not a MiniGPT-4 eval config (a .yaml whose model.arch is {ARCH!r})")
        return path
    found = sorted(p for p in path.iterdir() if is_minigpt4_config(p)) if path.is_dir() else []
    if not found:
        raise WeightsNotFoundError(f"{path}: no MiniGPT-4 eval config (a .yaml whose model.arch is {ARCH!r})")
    if len(found) > 1:
        raise CheckpointError(f"{path}: several MiniGPT-4 eval configs ({[p.name for p in found]}); "
                              "keep one per folder, or load the .yaml file itself")
    return found[0]


@dataclass(frozen=True)
class MiniGPT4Config:
    """The eval config's fields that edgevlm uses, paths resolved (see the module docstring)."""

    yaml: Path
    ckpt: Path
    llama_model: Path
    q_former_model: Path
    num_query_token: int | None = None
    image_sizes: tuple[tuple[str, int], ...] = ()  # (field, size) pairs that must match the ViT


def _load_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError:
        raise BackendUnavailableError(f"{path}: reading a MiniGPT-4 eval config needs PyYAML "
                                      "(pip install pyyaml)") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # plain data only: no tags that run code
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable YAML file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: a MiniGPT-4 eval config has a `model:` mapping at the top level")
    return data


def _is_url(value: str) -> bool:
    # MiniGPT-4 downloads http(s) URLs (minigpt4/common/utils.py L41-43, base_model.py L211-215); any other
    # scheme:// is no local path either.
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value) is not None


def _path_field(yaml_path: Path, model: dict, field: str, *, folder: bool, what: str) -> Path:
    """``model[field]`` as a local path (relative to the YAML's folder), checked to exist."""
    value = model.get(field)
    where = f"{yaml_path}: model.{field}"
    if value is None or value == "":
        raise CheckpointError(f"{where} is not set; it must name {what}")
    if not isinstance(value, str):
        raise CheckpointError(f"{where} must be a path string, got {type(value).__name__}")
    if value.startswith("please set this value"):  # MiniGPT-4's placeholder (minigpt4_eval.yaml L8)
        raise CheckpointError(f"{where} still holds MiniGPT-4's placeholder {value!r}; it must name {what}")
    if _is_url(value):
        raise CheckpointError(f"{where} is a URL ({value}); edgevlm does not download weights: "
                              f"give a local path to {what}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = yaml_path.parent / path
    if not path.exists():
        raise WeightsNotFoundError(f"{where} = {value!r}: {path} does not exist; it must name {what}")
    if folder and not path.is_dir():
        raise CheckpointError(f"{where} = {value!r}: {path} is a file; it must name {what}")
    if not folder and not path.is_file():
        raise CheckpointError(f"{where} = {value!r}: {path} is a folder; it must name {what}")
    return path


def _int_field(yaml_path: Path, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{yaml_path}: {where} must be an integer, got {value!r}")
    return value


def read_eval_config(path: str | os.PathLike) -> MiniGPT4Config:
    """A MiniGPT-4 eval config (file, or a folder holding one) -> its checked fields."""
    yaml_path = find_eval_config(path)
    data = _load_yaml(yaml_path)
    model = data["model"]
    if model.get("arch") != ARCH:
        raise CheckpointError(f"{yaml_path}: model.arch is {model.get('arch')!r}, expected {ARCH!r}")
    model_type = model.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"{yaml_path}: model.model_type {model_type!r} is not supported; only {MODEL_TYPE!r} "
                              "(MiniGPT-4 with Vicuna V0 and its ###Human/###Assistant conversation)")
    if model.get("vit_model", "eva_clip_g") != "eva_clip_g":
        raise CheckpointError(f"{yaml_path}: model.vit_model {model.get('vit_model')!r} is not supported; "
                              "MiniGPT-4 requires 'eva_clip_g'")
    if model.get("has_qformer", True) is not True:
        raise CheckpointError(f"{yaml_path}: model.has_qformer must be true (the Q-Former-free variant feeds "
                              "4 ViT tokens per LLM token, which edgevlm does not read)")
    n_q = model.get("num_query_token")
    sizes = []
    if model.get("image_size") is not None:
        sizes.append(("model.image_size", _int_field(yaml_path, "model.image_size", model["image_size"])))
    proc = (((data.get("datasets") or {}).get("cc_sbu_align") or {}).get("vis_processor") or {}).get("train") or {}
    if isinstance(proc, dict) and proc.get("image_size") is not None:
        where = "datasets.cc_sbu_align.vis_processor.train.image_size"
        sizes.append((where, _int_field(yaml_path, where, proc["image_size"])))
    return MiniGPT4Config(
        yaml=yaml_path,
        ckpt=_path_field(yaml_path, model, "ckpt", folder=False,
                         what="the MiniGPT-4 checkpoint (.pth holding llama_proj)"),
        llama_model=_path_field(yaml_path, model, "llama_model", folder=True,
                                what="the Vicuna folder (transformers LlamaForCausalLM + tokenizer)"),
        q_former_model=_path_field(yaml_path, model, "q_former_model", folder=True,
                                   what="a transformers blip-2 folder (e.g. Salesforce/blip2-flan-t5-xxl) for "
                                        "the EVA ViT-g and Q-Former"),
        num_query_token=None if n_q is None else _int_field(yaml_path, "model.num_query_token", n_q),
        image_sizes=tuple(sizes))


# ---- the parts --------------------------------------------------------------------------------------

def read_llama_proj(cfg: MiniGPT4Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``ckpt["model"]["llama_proj.weight"]`` and ``.bias`` (torch.load with weights_only=True)."""
    from .sphinx_pth import _torch_load

    where = f"model.ckpt ({cfg.ckpt})"
    try:
        obj = _torch_load(cfg.ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg.yaml}: {where}: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        keys = f" with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else ""
        raise CheckpointError(f"{cfg.yaml}: {where} must hold {{'model': state dict}} (minigpt4.py L192-193), "
                              f"got {type(obj).__name__}{keys}")
    state = obj["model"]
    extra = sorted(str(k) for k in state if k not in PROJ_KEYS)
    if extra:  # MiniGPT-4 would load these over the BLIP-2 / Vicuna weights (strict=False); never drop them silently
        raise CheckpointError(f"{cfg.yaml}: {where} holds tensors other than {list(PROJ_KEYS)}: {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''}; edgevlm reads only the trained llama_proj")
    missing = [k for k in PROJ_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{cfg.yaml}: {where} has no {missing} (the MiniGPT-4 projection)")
    w, b = (state[k] for k in PROJ_KEYS)
    tensors = isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
    if not tensors or w.ndim != 2 or tuple(b.shape) != (w.shape[0],):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (w, b)]
        raise CheckpointError(f"{cfg.yaml}: {where}: llama_proj.weight must be [out, in] and llama_proj.bias [out], "
                              f"got {shapes[0]} and {shapes[1]}")
    return w.float().contiguous(), b.float().contiguous()


def _check_blip2_folder(cfg: MiniGPT4Config) -> None:
    config_json = cfg.q_former_model / "config.json"
    if not config_json.is_file():
        raise WeightsNotFoundError(f"{cfg.yaml}: model.q_former_model ({cfg.q_former_model}) has no config.json; "
                                   "it must be a transformers blip-2 folder (a LAVIS .pth is not read)")
    model_type = read_json(config_json).get("model_type")
    if model_type != "blip-2":
        raise CheckpointError(f"{cfg.yaml}: model.q_former_model ({cfg.q_former_model}) is a {model_type!r} folder; "
                              "it must be a transformers blip-2 folder (EVA ViT-g + Q-Former)")


def minigpt4_tower(cfg: MiniGPT4Config) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """BLIP-2's tower from ``q_former_model`` with its ``language_projection`` replaced by ``llama_proj``."""
    from .hf_models import read_blip2_tower

    _check_blip2_folder(cfg)
    tower, state = read_blip2_tower(cfg.q_former_model)
    qformer = tower.connector.qformer
    if cfg.num_query_token is not None and cfg.num_query_token != qformer.num_queries:
        raise CheckpointError(f"{cfg.yaml}: model.num_query_token is {cfg.num_query_token}, but the Q-Former in "
                              f"model.q_former_model ({cfg.q_former_model}) has {qformer.num_queries} query tokens")
    vit_size = tower.encoders[0].image_size
    for where, size in cfg.image_sizes:
        if size != vit_size:
            raise CheckpointError(f"{cfg.yaml}: {where} is {size}, but the ViT in model.q_former_model "
                                  f"({cfg.q_former_model}) takes {vit_size}x{vit_size} images")
    w, b = read_llama_proj(cfg)
    if w.shape[1] != qformer.hidden:
        raise CheckpointError(f"{cfg.yaml}: model.ckpt ({cfg.ckpt}): llama_proj.weight has shape {tuple(w.shape)}, "
                              f"expected (LLM hidden, {qformer.hidden}): the Q-Former in model.q_former_model "
                              f"outputs {qformer.hidden} channels")
    tower = dataclasses.replace(tower, connector=dataclasses.replace(tower.connector, out_width=int(w.shape[0])))
    return tower, {**state, "connector.proj.weight": w, "connector.proj.bias": b}


def read_minigpt4_tower(path: str | os.PathLike) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """:data:`~edgevlm.runtime.tower.CONTAINER_TOWERS` entry: the eval config -> (tower config, state)."""
    return minigpt4_tower(read_eval_config(path))


def minigpt4_tokenizer(folder: Path):
    """-> (Tokenizer, where it came from): the Vicuna folder's ``tokenizer.model`` first (MiniGPT-4 loads
    ``LlamaTokenizer(use_fast=False)``, base_model.py L174), else its ``tokenizer.json``."""
    from edgevlm.runtime.tokenizer import Tokenizer

    from .spm_model import read_spm_metadata

    spm = folder / "tokenizer.model"
    if spm.is_file():
        return Tokenizer.from_gguf_metadata(read_spm_metadata(spm)), str(spm)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_tokenizer_json(folder), str(folder / "tokenizer.json")
    raise WeightsNotFoundError(f"{folder}: the Vicuna folder (model.llama_model) has no tokenizer.model and no "
                               "tokenizer.json")


@dataclass(frozen=True)
class MiniGPT4Checkpoint:
    """What :func:`read_minigpt4` returns: ``state`` has ``tower.*`` and ``decoder.*`` keys."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: Any
    sources: dict[str, str]


def read_minigpt4(path: str | os.PathLike) -> MiniGPT4Checkpoint:
    """A MiniGPT-4 eval config (file or folder) -> model config, weights, Vicuna tokenizer."""
    from .hf_decoders import read_decoder_dir

    cfg = read_eval_config(path)
    tower, tower_state = minigpt4_tower(cfg)
    llm_type = read_json(cfg.llama_model / "config.json").get("model_type") \
        if (cfg.llama_model / "config.json").is_file() else None
    if llm_type != "llama":  # MiniGPT-4 loads it with LlamaForCausalLM (base_model.py L178-188)
        raise CheckpointError(f"{cfg.yaml}: model.llama_model ({cfg.llama_model}) must be a transformers LLaMA "
                              f"folder (config.json model_type 'llama'), got {llm_type!r}")
    dec_cfg, dec_state = read_decoder_dir(cfg.llama_model)
    if tower.out_width != dec_cfg.hidden:
        raise CheckpointError(f"{cfg.yaml}: model.ckpt's llama_proj projects to {tower.out_width}, but the LLM in "
                              f"model.llama_model ({cfg.llama_model}) has hidden size {dec_cfg.hidden}")
    tokenizer, tokenizer_src = minigpt4_tokenizer(cfg.llama_model)
    if tokenizer.vocab_size > dec_cfg.vocab_size:
        raise CheckpointError(f"{tokenizer_src}: {tokenizer.vocab_size} tokens, but the LLM in model.llama_model "
                              f"embeds only {dec_cfg.vocab_size}")
    config = ModelConfig(name=cfg.yaml.parent.name if cfg.yaml.parent.name else cfg.yaml.stem, tower=tower,
                         decoder=dec_cfg, image_placement="placeholder", image_token=IMAGE_TOKEN, chat_format=ARCH)
    state = {**{f"tower.{k}": v for k, v in tower_state.items()}, **{f"decoder.{k}": v for k, v in dec_state.items()}}
    sources = {"tower": f"blip-2: {cfg.q_former_model} + llama_proj from {cfg.ckpt}",
               "decoder": f"llama: {cfg.llama_model}", "tokenizer": tokenizer_src, "config": str(cfg.yaml)}
    return MiniGPT4Checkpoint(config, state, tokenizer, sources)


__all__ = ["IMAGE_TOKEN", "MiniGPT4Checkpoint", "MiniGPT4Config", "find_eval_config", "is_minigpt4_config",
           "is_minigpt4_dir", "minigpt4_tokenizer", "minigpt4_tower", "read_eval_config", "read_llama_proj",
           "read_minigpt4", "read_minigpt4_tower"]
