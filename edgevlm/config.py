"""Frozen, validated configuration dataclasses for every component, with JSON round-tripping.

A model is described by one :class:`ModelConfig`: a :class:`TowerConfig` (vision encoders, the
connector that turns their features into LLM embeddings, and the view recipe) plus a
:class:`DecoderConfig`. Configs validate themselves on construction and raise
:class:`~edgevlm.errors.ConfigError` naming the offending field. Derived values (token counts,
grids, widths) are properties, never stored, so they cannot drift from the fields they come from.

Polymorphic fields (an encoder, a connector) are tagged by the class attribute ``kind`` and written
to JSON as ``{"kind": ..., **fields}``. Named presets live in :mod:`edgevlm.presets`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from .errors import ConfigError

RGB = tuple[float, float, float]

# Normalisation constants (see reference/architecture.md §1.2).
CLIP_MEAN: RGB = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: RGB = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: RGB = (0.485, 0.456, 0.406)
IMAGENET_STD: RGB = (0.229, 0.224, 0.225)
HALF_MEAN: RGB = (0.5, 0.5, 0.5)  # SigLIP
HALF_STD: RGB = (0.5, 0.5, 0.5)
# TF EfficientNet-Lite's inception-style input, (x_uint8 - 127) / 128, on [0, 1] pixels.
LITE_MEAN: RGB = (127 / 255, 127 / 255, 127 / 255)
LITE_STD: RGB = (128 / 255, 128 / 255, 128 / 255)
# SPHINX/LLaVA pad colour: the CLIP mean as uint8, int(m * 255) per channel.
CLIP_MEAN_RGB8: tuple[int, int, int] = (122, 116, 104)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
               f"{type(obj).__name__}.{n} must be a positive int, got {v!r}")


# --------------------------------------------------------------------------------------------
# Weights locations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class WeightsRef:
    """Where a component's real weights live and which reader understands them.

    ``format`` names a reader registered in :mod:`edgevlm.runtime.readers` (never guessed from the
    file name). ``path`` is relative to the folder of the installed package ``package`` (located with
    ``importlib.util.find_spec``, never imported), or absolute when ``package`` is empty.
    """

    format: str
    path: str
    package: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.format), "WeightsRef.format must name a reader")
        _check(bool(self.path), "WeightsRef.path must not be empty")


# --------------------------------------------------------------------------------------------
# Vision encoders
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Fields every vision encoder has. Subclasses define the architecture and output layout.

    Output layout contract (what connectors rely on): an encoder returns tokens ``[N, tokens, feature_width]``
    where, if ``global_token`` is true, token 0 is a global token (a ViT class token) followed by the
    ``grid`` in row-major order; CNN encoders return maps ``[N, feature_width, grid_h, grid_w]``.
    ``feature_width`` is ``width`` unless the encoder concatenates several layers' features.
    """

    kind: ClassVar[str] = ""
    name: str
    image_size: int
    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD
    weights: WeightsRef | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name) and self.name.isidentifier(),
               f"encoder name must be a Python identifier (it prefixes weight keys), got {self.name!r}")
        _positive(self, "image_size")
        _check(len(self.mean) == 3 and len(self.std) == 3, f"{self.name}: mean/std need 3 channels")
        _check(all(s > 0 for s in self.std), f"{self.name}: std must be positive, got {self.std}")

    @property
    def grid(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def width(self) -> int:  # overridden by a dataclass field in ViTConfig
        raise NotImplementedError

    @property
    def feature_width(self) -> int:
        """Channels of the features the encoder returns (what a connector reads)."""
        return self.width

    @property
    def global_token(self) -> bool:
        return False

    @property
    def tokens(self) -> int:
        gh, gw = self.grid
        return int(self.global_token) + gh * gw


MLP_ACTS = ("gelu", "quick_gelu", "gelu_tanh", "swiglu")


@dataclass(frozen=True, kw_only=True)
class ViTConfig(EncoderConfig):
    """A plain ViT covering CLIP/OpenCLIP, DINOv2, SigLIP and EVA (BLIP-2) variants.

    ``feature_layer`` indexes the list [embeddings, block 1, ..., block depth] like transformers'
    ``hidden_states``: -1 is the last block's output, -2 the penultimate (LLaVA), 0 the embeddings.
    ``feature_layers`` (instead of ``feature_layer``) selects several such layers, whose features are
    concatenated on channels in that order (transformers' list ``vision_feature_layer``):
    ``feature_width = width * len(feature_layers)``.
    ``pos_grid`` is the side of the grid the position table was trained for; the table is
    interpolated bicubically when the input grid differs (DINOv2 trains at 37x37).
    """

    kind: ClassVar[str] = "vit"
    patch_size: int = 14
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    mlp_act: str = "gelu"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    patch_bias: bool = True
    class_token: bool = True
    pre_norm: bool = False  # CLIP's ln_pre
    layer_scale: bool = False  # DINOv2's per-channel residual scales
    pos_grid: int = 0  # 0: trained at this config's own grid
    feature_layer: int = -1
    feature_layers: tuple[int, ...] = ()  # several layers, concatenated on channels; replaces feature_layer
    final_norm: bool = True
    keep_class_token: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "patch_size", "width", "depth", "heads", "mlp_dim")
        _check(self.width % self.heads == 0,
               f"{self.name}: width {self.width} is not divisible by heads {self.heads}")
        _check(self.image_size >= self.patch_size,
               f"{self.name}: image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        _check(self.mlp_act in MLP_ACTS, f"{self.name}: mlp_act must be one of {MLP_ACTS}, got {self.mlp_act!r}")
        for layer in (self.feature_layer, *self.feature_layers):
            _check(isinstance(layer, int) and not isinstance(layer, bool) and -self.depth - 1 <= layer <= self.depth,
                   f"{self.name}: feature layer {layer!r} outside [-{self.depth + 1}, {self.depth}]")
        _check(not self.feature_layers or self.feature_layer == -1,
               f"{self.name}: set feature_layer ({self.feature_layer}) or feature_layers "
               f"({self.feature_layers}), not both")
        _check(self.pos_grid >= 0, f"{self.name}: pos_grid must be >= 0")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def trained_grid(self) -> int:
        return self.pos_grid or self.grid[0]

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def selected_layers(self) -> tuple[int, ...]:
        """The feature layers as non-negative indices into [embeddings, block 1, ..., block depth]."""
        return tuple(i if i >= 0 else self.depth + 1 + i for i in (self.feature_layers or (self.feature_layer,)))

    @property
    def blocks_run(self) -> int:
        """Number of transformer blocks actually evaluated for the selected feature layer(s)."""
        return max(self.selected_layers)

    @property
    def feature_width(self) -> int:
        return self.width * len(self.selected_layers)

    @property
    def global_token(self) -> bool:
        return self.class_token and self.keep_class_token


@dataclass(frozen=True, kw_only=True)
class ConvNeXtConfig(EncoderConfig):
    """ConvNeXt (transformers' ConvNextModel / timm layout). Output: the last stage's map.

    ``final_norm`` applies a channel LayerNorm to the output map, as timm's head norm does in the
    OpenCLIP ConvNeXt that SPHINX uses (transformers only normalises the pooled vector).
    """

    kind: ClassVar[str] = "convnext"
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    norm_eps: float = 1e-6
    layer_scale: bool = True
    final_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.depths) == len(self.dims) and len(self.dims) > 0,
               f"{self.name}: depths {self.depths} and dims {self.dims} must have the same non-zero length")
        _check(all(d > 0 for d in self.depths) and all(d > 0 for d in self.dims),
               f"{self.name}: depths and dims must be positive")
        _check(self.image_size >= self.stride, f"{self.name}: image_size {self.image_size} < stride {self.stride}")

    @property
    def stride(self) -> int:
        return 4 * 2 ** (len(self.dims) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.stride
        return (g, g)

    @property
    def width(self) -> int:
        return self.dims[-1]


@dataclass(frozen=True, kw_only=True)
class EfficientNetConfig(EncoderConfig):
    """EfficientNet-Lite (no squeeze-excitation, ReLU6, fixed stem and head), TF 'same' padding.

    ``feature`` picks the output map: ``"head"`` (after the 1x1 head conv, ``head_width`` channels)
    or ``"blocks"`` (the last MBConv stage). ``num_classes`` keeps the ImageNet classifier for
    checks; the tower never uses it.
    """

    kind: ClassVar[str] = "efficientnet"
    width_mult: float = 1.0
    depth_mult: float = 1.0
    head_width: int = 1280
    bn_eps: float = 1e-3
    num_classes: int = 1000
    feature: str = "head"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.width_mult > 0 and self.depth_mult > 0, f"{self.name}: multipliers must be positive")
        _check(self.feature in ("head", "blocks"), f"{self.name}: feature must be 'head' or 'blocks'")
        _check(self.num_classes >= 0, f"{self.name}: num_classes must be >= 0")

    @property
    def grid(self) -> tuple[int, int]:
        g = math.ceil(self.image_size / 32)  # 'same' padding rounds up at each stride-2 stage
        return (g, g)

    @property
    def width(self) -> int:
        if self.feature == "head":
            return self.head_width
        return round_filters(320, self.width_mult)


def round_filters(filters: int, width_mult: float, divisor: int = 8) -> int:
    """EfficientNet channel rounding: scale, round to a multiple of ``divisor``, never drop >10 %."""
    if width_mult == 1.0:
        return filters
    f = filters * width_mult
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    if new < 0.9 * f:
        new += divisor
    return int(new)


# --------------------------------------------------------------------------------------------
# Connectors
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class QFormerTextConfig:
    """InstructBLIP's instruction input to the Q-Former: token ids of a BERT-style vocabulary of
    ``vocab_size`` with learned absolute positions ``0 .. max_positions - 1``; ``pad_id`` fills the
    padded tail of a batch of instructions (masked out, so its value never reaches the output)."""

    vocab_size: int = 30522
    max_positions: int = 512
    pad_id: int = 0

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "max_positions")
        _check(isinstance(self.pad_id, int) and not isinstance(self.pad_id, bool)
               and 0 <= self.pad_id < self.vocab_size,
               f"QFormerTextConfig.pad_id must be a token id in [0, {self.vocab_size}), got {self.pad_id!r}")


@dataclass(frozen=True, kw_only=True)
class QFormerConfig:
    """BLIP-2 Q-Former: learned queries, self-attention in every layer, cross-attention onto
    ``encoder``'s tokens every ``cross_attention_every`` layers, query FFN.

    ``text`` set (InstructBLIP): the Q-Former also reads an instruction; its tokens join the queries'
    self-attention and have their own FFN. ``None`` (BLIP-2): the query path only."""

    encoder: str
    encoder_width: int
    num_queries: int = 32
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    cross_attention_every: int = 2
    norm_eps: float = 1e-12
    text: QFormerTextConfig | None = None

    def __post_init__(self) -> None:
        _positive(self, "encoder_width", "num_queries", "hidden", "layers", "heads", "intermediate",
                  "cross_attention_every")
        _check(self.hidden % self.heads == 0, f"QFormer hidden {self.hidden} not divisible by heads {self.heads}")
        _check(self.text is None or isinstance(self.text, QFormerTextConfig),
               f"QFormerConfig.text must be a QFormerTextConfig or None, got {type(self.text).__name__}")


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    kind: ClassVar[str] = ""
    out_width: int

    def __post_init__(self) -> None:
        _positive(self, "out_width")

    def encoder_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def tokens_per_view(self, tower: "TowerConfig") -> int:
        raise NotImplementedError

    def token_drop_encoders(self) -> tuple[str, ...]:
        """Token dropping (:mod:`edgevlm.runtime.token_keep`): the encoders whose tokens this connector
        takes in any number (a token-wise projection then gives fewer outputs, a Q-Former or resampler
        attends to fewer keys), laid on the one cell grid of :meth:`token_drop_grid`. Empty: the
        connector needs a fixed token count and token dropping is refused."""
        return ()

    def token_drop_grid(self) -> int | None:
        """Side of the square grid whose cells token dropping keeps; None: the dropped encoder's own patch
        grid (one patch per cell)."""
        return None

    def reads_token_masks(self) -> bool:
        """Whether the connector's output depends on the per-token padding masks of ``anyres`` views
        (attention over an encoder's tokens does; a token-wise projection does not). Export uses it: a
        graph of a connector that reads none needs no mask inputs."""
        return True


@dataclass(frozen=True, kw_only=True)
class LinearConnectorConfig(ConnectorConfig):
    kind: ClassVar[str] = "linear"
    encoder: str
    in_width: int
    bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "in_width")

    def encoder_names(self) -> tuple[str, ...]:
        return (self.encoder,)

    def token_drop_encoders(self) -> tuple[str, ...]:
        return (self.encoder,)  # token-wise: K kept tokens give K outputs

    def tokens_per_view(self, tower: "TowerConfig") -> int:
        return tower.encoder(self.encoder).tokens

    def reads_token_masks(self) -> bool:
        return False  # token-wise: padded tokens are projected like the others


@dataclass(frozen=True, kw_only=True)
class MLPConnectorConfig(ConnectorConfig):
    """LLaVA's ``mlp2x_gelu``: Linear(in, hidden) -> GELU -> Linear(hidden, out)."""

    kind: ClassVar[str] = "mlp"
    encoder: str
    in_width: int
    hidden: int
    act: str = "gelu"
    bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "in_width", "hidden")
        _check(self.act in ("gelu", "gelu_tanh", "quick_gelu"), f"MLP act {self.act!r} not supported")

    def encoder_names(self) -> tuple[str, ...]:
        return (self.encoder,)

    def token_drop_encoders(self) -> tuple[str, ...]:
        return (self.encoder,)  # token-wise: K kept tokens give K outputs (LLaVA's decoder gets K)

    def tokens_per_view(self, tower: "TowerConfig") -> int:
        return tower.encoder(self.encoder).tokens

    def reads_token_masks(self) -> bool:
        return False  # token-wise: padded tokens are projected like the others


@dataclass(frozen=True, kw_only=True)
class QFormerConnectorConfig(ConnectorConfig):
    """BLIP-2 / MiniGPT-4: Q-Former then one Linear(hidden -> out_width)."""

    kind: ClassVar[str] = "qformer"
    qformer: QFormerConfig

    def encoder_names(self) -> tuple[str, ...]:
        return (self.qformer.encoder,)

    def token_drop_encoders(self) -> tuple[str, ...]:
        return (self.qformer.encoder,)  # cross-attention keys: still num_queries outputs

    def tokens_per_view(self, tower: "TowerConfig") -> int:
        return self.qformer.num_queries


@dataclass(frozen=True, kw_only=True)
class ResamplerConnectorConfig(ConnectorConfig):
    """BLIP-3 perceiver resampler: latents attend to concat(media, latents); media padding mask."""

    kind: ClassVar[str] = "resampler"
    encoder: str
    in_width: int
    depth: int = 6
    heads: int = 16
    head_dim: int = 96
    num_latents: int = 128
    ff_mult: int = 4
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "in_width", "depth", "heads", "head_dim", "num_latents", "ff_mult")

    def encoder_names(self) -> tuple[str, ...]:
        return (self.encoder,)

    def token_drop_encoders(self) -> tuple[str, ...]:
        return (self.encoder,)  # media keys: still num_latents outputs

    def tokens_per_view(self, tower: "TowerConfig") -> int:
        return self.num_latents


@dataclass(frozen=True, kw_only=True)
class SphinxFusionConfig(ConnectorConfig):
    """SPHINX mixing of encoders (reference/architecture.md §1.4).

    Every encoder in ``encoders`` is brought to one layout, ``[global token] + grid x grid``
    (maps average-pooled when the source grid is a multiple of ``grid``, nearest-upsampled when
    ``grid`` is a multiple of it, antialiased-bilinear otherwise; a ViT's class token, or else the
    mean of the resized grid, is the global token), concatenated on channels and projected
    by Linear+LayerNorm. Optional Q-Former tokens (Linear+LayerNorm) go in front, and a learned
    start/end pair wraps every view: ``[s] qformer(Q) fused(1 + grid^2) [e]``.
    """

    kind: ClassVar[str] = "sphinx"
    encoders: tuple[str, ...]
    in_widths: tuple[int, ...]
    grid: int = 16
    qformer: QFormerConfig | None = None
    separators: bool = True
    norm_eps: float = 1e-5
    # A learned 2-D position table added to the fused tokens (initialised with sin-cos). Not in
    # SPHINX, whose LLM learns positions from sequence order at scale; a small model trained briefly
    # needs it to ground objects.
    pos_embed: bool = False
    # 0: SPHINX's projection, Linear -> LayerNorm. N > 0: Linear(fused, N) -> GELU -> Linear(N, out) ->
    # LayerNorm, LLaVA-1.5's two-layer MLP before the same norm; a nonlinearity lets the projector combine
    # one cell's colour and shape features before the LLM reads them. Not in SPHINX (its checkpoints have 0).
    proj_hidden: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.encoders) > 0, "SphinxFusionConfig.encoders must name at least one encoder")
        _check(self.proj_hidden >= 0, f"SphinxFusionConfig.proj_hidden must be >= 0, got {self.proj_hidden}")
        _check(len(self.encoders) == len(self.in_widths),
               f"SphinxFusionConfig: {len(self.encoders)} encoders but {len(self.in_widths)} in_widths")
        _check(len(set(self.encoders)) == len(self.encoders), f"duplicate encoder in fusion: {self.encoders}")
        _positive(self, "grid")

    @property
    def fused_width(self) -> int:
        return sum(self.in_widths)

    def encoder_names(self) -> tuple[str, ...]:
        return self.encoders + ((self.qformer.encoder,) if self.qformer else ())

    def tokens_per_view(self, tower: "TowerConfig") -> int:
        q = self.qformer.num_queries if self.qformer else 0
        return 2 * int(self.separators) + q + 1 + self.grid * self.grid

    def token_drop_encoders(self) -> tuple[str, ...]:
        q = self.qformer.encoder if self.qformer else None  # the Q-Former's encoder sees whole views
        return tuple(n for n in self.encoders if n != q)  # laid on the fused grid, cells picked

    def token_drop_grid(self) -> int | None:
        return self.grid  # one fused grid, so that every concatenated encoder keeps the same regions

    def reads_token_masks(self) -> bool:
        return self.qformer is not None  # grid encoders see whole views; only the Q-Former attends under masks


# --------------------------------------------------------------------------------------------
# Views and the tower
# --------------------------------------------------------------------------------------------

VIEW_KINDS = ("pad_square", "stretch", "anyres")


@dataclass(frozen=True, kw_only=True)
class ViewConfig:
    """How one image becomes views (reference/architecture.md §1.2, §1.5, §3.2, §5.2).

    - ``pad_square``: pad to a square with ``pad_rgb`` (image centred), bicubic resize; with
      ``crop_grid = n > 0`` the square is resized to n x size, the global view is that canvas
      resized to size, followed by the n x n crops in row-major order (TL, TR, BL, BR for n=2).
    - ``stretch``: resize to size x size ignoring aspect (BLIP-2's processor).
    - ``anyres``: a base view (stretch) followed by the tiles of the best grid in
      ``anyres_grids`` (rows, cols), chosen as LLaVA-NeXT / BLIP-3 do; the image keeps its aspect on
      a canvas filled with ``anyres_fill``.
    """

    kind: str = "pad_square"
    crop_grid: int = 0
    pad_rgb: tuple[int, int, int] = CLIP_MEAN_RGB8
    anyres_grids: tuple[tuple[int, int], ...] = ()
    anyres_fill: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        _check(self.kind in VIEW_KINDS, f"ViewConfig.kind must be one of {VIEW_KINDS}, got {self.kind!r}")
        _check(self.crop_grid >= 0, f"ViewConfig.crop_grid must be >= 0, got {self.crop_grid}")
        _check(self.kind == "pad_square" or self.crop_grid == 0, "crop_grid applies to pad_square views only")
        for rgb in (self.pad_rgb, self.anyres_fill):
            _check(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb), f"colour {rgb} must be 3 values in 0..255")
        if self.kind == "anyres":
            _check(len(self.anyres_grids) > 0, "anyres views need anyres_grids, e.g. ((1, 2), (2, 1), (2, 2))")
            _check(all(len(g) == 2 and g[0] > 0 and g[1] > 0 for g in self.anyres_grids),
                   f"anyres_grids must be positive (rows, cols) pairs, got {self.anyres_grids}")

    @property
    def max_views(self) -> int:
        if self.kind == "pad_square":
            return 1 + self.crop_grid ** 2 if self.crop_grid else 1
        if self.kind == "stretch":
            return 1
        return 1 + max(r * c for r, c in self.anyres_grids)

    @property
    def fixed_views(self) -> bool:
        return self.kind != "anyres"


ENCODER_KINDS: dict[str, type[EncoderConfig]] = {c.kind: c for c in (ViTConfig, ConvNeXtConfig, EfficientNetConfig)}
CONNECTOR_KINDS: dict[str, type[ConnectorConfig]] = {
    c.kind: c for c in (LinearConnectorConfig, MLPConnectorConfig, QFormerConnectorConfig,
                        ResamplerConnectorConfig, SphinxFusionConfig)
}


@dataclass(frozen=True, kw_only=True)
class AnyresPackConfig:
    """How the views of one ``anyres`` image become one token sequence (LLaVA-NeXT's ``spatial_unpad``).

    Every view's connector output must be the first encoder's ``gh x gw`` patch grid (no global
    token). The tiles' grids are stitched into one ``rows*gh x cols*gw`` feature map of the canvas;
    with ``unpad`` the map's rows (or columns) that show only canvas padding are dropped, judged from
    the original image size as transformers' ``unpad_image`` does; with ``newline`` a learned
    ``[out_width]`` token (``pack.newline``) ends every row of the map. The image's sequence is the
    base view's tokens, then the map row by row, so its length depends on the image's size
    (:mod:`edgevlm.runtime.connectors.anyres`).
    """

    unpad: bool = True
    newline: bool = True


@dataclass(frozen=True, kw_only=True)
class StripRegroupConfig:
    """xGen-MM's (BLIP-3's) ``anyres_patch_sampling``: before the connector, the tiles' tokens of one
    ``anyres`` image are stitched into the canvas's ``rows*g x cols*g`` token map, which is cut in
    raster order into ``rows*cols`` groups of ``g*g`` tokens (horizontal strips when ``cols > 1``,
    not tiles), each with a padding mask from ``unpad_image`` on that map; the base view stays as it
    is. The connector then runs on each group under its mask
    (:mod:`edgevlm.runtime.connectors.strip_regroup`). No fields: the layout follows from the views,
    the first encoder's grid and each image's size."""


@dataclass(frozen=True, kw_only=True)
class TowerConfig:
    """Vision encoders + connector + view recipe: images in, LLM-width embeddings out.

    ``pack`` (``anyres`` views only): the views of an image are packed into one sequence
    (:class:`AnyresPackConfig`) instead of following each other."""

    encoders: tuple[EncoderConfig, ...]
    connector: ConnectorConfig
    views: ViewConfig = field(default_factory=ViewConfig)
    pack: AnyresPackConfig | None = None
    regroup: StripRegroupConfig | None = None

    def __post_init__(self) -> None:
        _check(len(self.encoders) > 0, "TowerConfig needs at least one encoder")
        names = [e.name for e in self.encoders]
        _check(len(set(names)) == len(names), f"duplicate encoder names in tower: {names}")
        for n in self.connector.encoder_names():
            _check(n in names, f"connector reads encoder {n!r}, but the tower has only {names}")
        unused = [n for n in names if n not in self.connector.encoder_names()]
        _check(not unused, f"encoders {unused} are not read by the connector")
        self._check_widths()
        if self.pack is not None:
            _check(isinstance(self.pack, AnyresPackConfig),
                   f"TowerConfig.pack must be an AnyresPackConfig or None, got {type(self.pack).__name__}")
            _check(self.views.kind == "anyres", f"pack applies to anyres views only, not {self.views.kind!r}")
            gh, gw = self.pack_grid
            _check(self.tokens_per_view == gh * gw,
                   f"pack needs each view's {self.tokens_per_view} tokens to be encoder "
                   f"{self.encoders[0].name!r}'s {gh}x{gw} patch grid (no global token)")
        if self.regroup is not None:
            self._check_regroup()

    def _check_regroup(self) -> None:
        _check(isinstance(self.regroup, StripRegroupConfig),
               f"TowerConfig.regroup must be a StripRegroupConfig or None, got {type(self.regroup).__name__}")
        _check(self.views.kind == "anyres", f"regroup applies to anyres views only, not {self.views.kind!r}")
        _check(self.pack is None, "regroup and pack are two ways to join anyres views; set one")
        _check(len(self.encoders) == 1, f"regroup needs one encoder, got {[e.name for e in self.encoders]}")
        e = self.encoders[0]
        _check(not e.global_token and e.grid[0] == e.grid[1],
               f"regroup needs encoder {e.name!r} to give a square patch grid without a global token, got "
               f"grid {e.grid} global_token={e.global_token}")
        _check(self.connector.reads_token_masks(),
               f"regroup masks padding tokens; the {self.connector.kind!r} connector does not read token masks")

    def _check_widths(self) -> None:
        c = self.connector
        if isinstance(c, (LinearConnectorConfig, MLPConnectorConfig, ResamplerConnectorConfig)):
            w = self.encoder(c.encoder).feature_width
            _check(c.in_width == w, f"{c.kind} connector in_width {c.in_width} != encoder {c.encoder!r} width {w}")
        if isinstance(c, SphinxFusionConfig):
            for n, w in zip(c.encoders, c.in_widths):
                _check(self.encoder(n).feature_width == w,
                       f"fusion in_width for {n!r} is {w}, encoder width is {self.encoder(n).feature_width}")
        q = getattr(c, "qformer", None)
        if q is not None:
            w = self.encoder(q.encoder).feature_width
            _check(q.encoder_width == w, f"Q-Former encoder_width {q.encoder_width} != encoder {q.encoder!r} width {w}")

    def encoder(self, name: str) -> EncoderConfig:
        for e in self.encoders:
            if e.name == name:
                return e
        raise ConfigError(f"no encoder named {name!r}; the tower has {[e.name for e in self.encoders]}")

    @property
    def out_width(self) -> int:
        return self.connector.out_width

    @property
    def tokens_per_view(self) -> int:
        return self.connector.tokens_per_view(self)

    @property
    def views_per_image(self) -> int:
        """Views per image (the maximum for ``anyres``)."""
        return self.views.max_views

    @property
    def pack_grid(self) -> tuple[int, int]:
        """The ``(gh, gw)`` token grid of one view that ``pack`` stitches: the first encoder's."""
        return self.encoders[0].grid

    @property
    def visual_tokens_per_image(self) -> int:
        """LLM positions one image occupies (the maximum for ``anyres``)."""
        if self.pack is not None:  # base view + the largest grid's map, a newline per map row
            gh, gw = self.pack_grid
            nl = int(self.pack.newline)
            return gh * gw + max(r * gh * (c * gw + nl) for r, c in self.views.anyres_grids)
        return self.views_per_image * self.tokens_per_view

    def visual_tokens_for_views(self, n_views: int) -> int:
        return n_views * self.tokens_per_view

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TowerConfig":
        return from_dict(cls, data)


# --------------------------------------------------------------------------------------------
# Decoder and whole model
# --------------------------------------------------------------------------------------------

DECODER_NORMS = ("rms", "layer")
DECODER_ACTS = ("silu", "gelu", "gelu_tanh", "relu")
DECODER_POSITIONS = ("rope", "learned")
ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "longrope")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """A decoder-only transformer of the LLaMA / Mistral / Phi-3 / OPT kinds, its differences as data
    (the way llama.cpp's architecture table describes them, one model class for all):

    ========  =====  =======  =====  ==================  =====================================
    family    norm   mlp_act  gated  positions           biases / notes
    ========  =====  =======  =====  ==================  =====================================
    LLaMA     rms    silu     yes    rope                none (``attention_bias`` optional)
    Mistral   rms    silu     yes    rope                none; the window clamps the context
    Phi-3     rms    silu     yes    rope (+ longrope)   none; fused qkv / gate_up split on read
    OPT       layer  relu     no     learned (+2 rows)   every linear and norm
    ========  =====  =======  =====  ==================  =====================================

    Fused projections in a checkpoint (Phi-3's ``qkv_proj`` / ``gate_up_proj``) are split by its
    reader, and the quantiser fuses q/k/v and gate/up again for the CPU kernels, so the model has one
    set of names for every family.

    RoPE scaling follows transformers' ``rope_type``: ``linear`` divides the frequencies by
    ``rope_scaling_factor``; ``dynamic`` (NTK) raises the base once a sequence grows past
    ``rope_original_len``; ``llama3`` rescales low/medium frequencies with ``rope_low_freq_factor``,
    ``rope_high_freq_factor`` and ``rope_original_max_len`` (Llama 3.1's 1.0 / 4.0 / 8192);
    ``longrope`` (Phi-3's "su") divides each frequency by ``rope_short_factor`` (sequences up to
    ``rope_original_len``) or ``rope_long_factor`` (longer) and scales cos/sin by
    ``rope_attention_factor``. ``rotary_dim`` < head_dim rotates only the first dims of each head.
    ``max_seq_len`` is the context this runtime allows (the largest KV cache; the learned position
    table's size for ``positions="learned"``).
    """

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    norm_eps: float = 1e-5
    norm: str = "rms"  # "rms": RMSNorm (weight) | "layer": LayerNorm (weight and bias)
    mlp_act: str = "silu"
    mlp_gated: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (OPT's fc1/fc2)
    positions: str = "rope"  # "rope" | "learned" (a table added to the input embeddings)
    learned_pos_offset: int = 0  # OPT's table starts 2 rows in
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # one of ROPE_SCALINGS
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 0  # dynamic/llama3/longrope: the pre-training context; 0 means max_seq_len
    rope_short_factor: tuple[float, ...] = ()  # longrope only: one divisor per frequency (rotary_dim / 2)
    rope_long_factor: tuple[float, ...] = ()
    rope_attention_factor: float = 1.0  # longrope only: cos/sin multiplier
    rotary_dim: int = 0  # 0: the whole head
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim_override: int = 0  # 0: hidden // heads; set when a checkpoint says otherwise (Mistral-Nemo)
    attention_bias: bool = False  # biases on q/k/v/o projections (LlamaConfig.attention_bias)
    mlp_bias: bool = False  # biases on gate/up/down projections (LlamaConfig.mlp_bias)
    # a bias on the output projection (xGen-MM / BLIP-3: open_flamingo's DecoupledLinear gives lm_head one)
    lm_head_bias: bool = False

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden", "layers", "heads", "kv_heads", "intermediate", "max_seq_len")
        _check(isinstance(self.head_dim_override, int) and self.head_dim_override >= 0,
               f"decoder head_dim_override must be an int >= 0, got {self.head_dim_override!r}")
        if self.head_dim_override == 0:
            _check(self.hidden % self.heads == 0, f"decoder hidden {self.hidden} not divisible by heads {self.heads}")
        _check(self.heads % self.kv_heads == 0, f"decoder heads {self.heads} not a multiple of kv_heads {self.kv_heads}")
        _check(self.norm in DECODER_NORMS, f"decoder norm must be one of {DECODER_NORMS}, got {self.norm!r}")
        _check(self.mlp_act in DECODER_ACTS, f"decoder mlp_act must be one of {DECODER_ACTS}, got {self.mlp_act!r}")
        _check(self.positions in DECODER_POSITIONS,
               f"decoder positions must be one of {DECODER_POSITIONS}, got {self.positions!r}")
        _check(self.learned_pos_offset >= 0, "learned_pos_offset must be >= 0")
        _check(self.rope_scaling in ROPE_SCALINGS, f"rope_scaling {self.rope_scaling!r} not supported; "
               f"supported: {ROPE_SCALINGS}")
        _check(self.rope_theta > 0 and self.rope_scaling_factor > 0, "rope_theta and rope_scaling_factor must be > 0")
        _check(self.rope_original_max_len >= 0, "rope_original_max_len must be >= 0")
        _check(0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
               f"rotary_dim {self.rotary_dim} must be even and in 0..head_dim {self.head_dim}")
        if self.positions == "rope":
            _check(self.rope_dim % 2 == 0, f"decoder rotary dims {self.rope_dim} must be even for RoPE")
        if self.rope_scaling == "llama3":
            _check(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                   f"llama3 rope needs 0 < rope_low_freq_factor < rope_high_freq_factor, got "
                   f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")
        if self.rope_scaling == "longrope":
            n = self.rope_dim // 2
            _check(len(self.rope_short_factor) == n and len(self.rope_long_factor) == n,
                   f"longrope needs rope_short_factor and rope_long_factor of {n} values each (rotary dims / 2), "
                   f"got {len(self.rope_short_factor)} and {len(self.rope_long_factor)}")
            _check(all(f > 0 for f in self.rope_short_factor + self.rope_long_factor),
                   "longrope factors must be > 0")
            _check(self.rope_attention_factor > 0, "rope_attention_factor must be > 0")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads

    @property
    def rope_dim(self) -> int:
        """How many dims of each head RoPE rotates (the rest pass through)."""
        return self.rotary_dim or self.head_dim

    @property
    def rope_original_len(self) -> int:
        """The context length the RoPE scaling is relative to (dynamic NTK, llama3, longrope)."""
        return self.rope_original_max_len or self.max_seq_len


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adapters on the decoder's linear layers: ``W + (alpha / rank) * B @ A``.

    Applied from outside the model (a module swap, :mod:`edgevlm.runtime.lora`); merged into the
    dense weights for inference and export, so a LoRA-tuned model runs exactly like any other.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        _positive(self, "rank")
        _check(self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _check(bool(self.targets) and not bad, f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {bad}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, kw_only=True)
class GroundingHeadConfig:
    """A box head beside the decoder (:mod:`edgevlm.runtime.grounding_head`): when the decoder opens a box
    answer with ``trigger``, the head reads the image's visual tokens and the question's token embeddings
    and writes the boxes, in the model's own box text (``[x1,y1,x2,y2;...]``, ``decimals`` digits).

    The visual tokens' grid cells are ``grid * grid`` consecutive tokens from ``first_cell``, row-major
    over the padded square (SPHINX fusion: separator and global token first). Each cell scores whether
    an asked-for object is centred in it and regresses that object's box; cells scoring above
    ``threshold`` give the boxes (at least one: the decoder already decided to answer with a box).

    With ``answers`` the head also picks one of those short answers (a colour, a shape, a count, a
    digit) for a question about the image. That choice is fused with the decoder's first answer token:
    the decoder keeps the probability it gives to the ``answers`` tokens as a whole, and within them the
    fused probability is the decoder's times the head's to the power ``answer_weight``. The decoder
    decides whether the answer is one of these words at all; head and decoder together decide which
    one. The answers must start with distinct tokens of the model's tokenizer (the first token decides;
    the decoder writes the rest of a longer word).

    ``dropped_cells``: the head was trained with grid cells missing, as token dropping leaves them
    (``keep_ratio < 1``); a learned vector stands in for each, and the runtime uses the head with
    uniform token dropping too. Without it the head needs the whole grid and stands aside there.

    ``global_token``: the token just before the grid (SPHINX fusion's global token) joins the cells."""

    visual_width: int
    first_cell: int
    grid: int
    width: int = 128
    layers: int = 2
    heads: int = 4
    query_heads: int = 4  # attention pools over the question's token embeddings
    trigger: str = "["
    threshold: float = 0.5
    decimals: int = 2
    answers: tuple[str, ...] = ()
    answer_weight: float = 1.0
    dropped_cells: bool = False
    global_token: bool = False

    def __post_init__(self) -> None:
        _positive(self, "visual_width", "grid", "width", "layers", "heads", "query_heads", "decimals")
        object.__setattr__(self, "answers", tuple(self.answers))
        _check(all(isinstance(a, str) and a and a == a.strip() for a in self.answers),
               f"answers must be non-empty strings without surrounding spaces, got {self.answers!r}")
        _check(len(set(self.answers)) == len(self.answers), f"answers must be distinct, got {self.answers!r}")
        _check(self.answer_weight > 0, f"answer_weight must be > 0, got {self.answer_weight}")
        _check(not self.global_token or self.first_cell >= 1, "global_token reads the token before the grid; "
               f"first_cell must be >= 1, got {self.first_cell}")
        _check(self.first_cell >= 0, f"first_cell must be >= 0, got {self.first_cell}")
        _check(self.width % self.heads == 0, f"width {self.width} must be a multiple of heads {self.heads}")
        _check(0.0 < self.threshold < 1.0, f"threshold must be in (0, 1), got {self.threshold}")
        _check(bool(self.trigger), "trigger must be a non-empty string")

    @property
    def cells(self) -> int:
        return self.grid * self.grid


QUANT_SCHEMES = ("int8", "int4")
QUANT_GROUPS = (32, 64, 128)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Weight-only quantisation of the decoder's linear layers, applied to a finished model
    (:func:`edgevlm.runtime.quant.quantize_decoder`).

    ``int8``: symmetric, one scale per output channel (``group=0``) or per ``group`` inputs.
    ``int4``: asymmetric (scale and zero point in fp16) per ``group`` inputs, the GGUF Q4_1 recipe.
    ``lm_head`` also quantises the output projection (with tied embeddings the embedding table
    itself stays float: a lookup reads one row per token).
    """

    scheme: str
    group: int = 0
    lm_head: bool = True

    def __post_init__(self) -> None:
        _check(self.scheme in QUANT_SCHEMES, f"QuantConfig.scheme must be one of {QUANT_SCHEMES}, got {self.scheme!r}")
        allowed = ((0,) if self.scheme == "int8" else ()) + QUANT_GROUPS
        _check(self.group in allowed, f"QuantConfig.group for {self.scheme} must be one of {allowed}, got {self.group!r}")

    @classmethod
    def named(cls, name: str) -> "QuantConfig":
        """``int8`` (per channel), ``int4`` (group 32), or ``int4-g64`` / ``int4-g128`` / ``int8-g32``."""
        scheme, _, g = name.partition("-g")
        try:
            group = int(g) if g else (0 if scheme == "int8" else 32)
        except ValueError:
            raise ConfigError(f"quantisation {name!r} not understood; use int8, int4, int4-g32, int4-g64, "
                              "int4-g128 or int8-g32") from None
        return cls(scheme=scheme, group=group)

    @property
    def label(self) -> str:
        return self.scheme + (f"-g{self.group}" if self.group else "")


IMAGE_PLACEMENTS = ("after_bos", "before_bos", "placeholder")
# "template": the checkpoint's jinja template; "sphinx": SPHINX's ###Human/###Assistant turns;
# "qa": BLIP-2's "Question: ... Answer:" (its language models have no chat template);
# "minigpt4": MiniGPT-4 (Vicuna V0)'s ###Human: <Img><ImageHere></Img> ...###Assistant: turns
CHAT_FORMATS = ("template", "sphinx", "qa", "minigpt4")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A whole VLM. ``image_placement``: ``after_bos`` (SPHINX), ``before_bos`` (BLIP-2 and InstructBLIP put
    their query tokens first) or ``placeholder`` (an ``<image>``
    token in the prompt is replaced, as LLaVA and BLIP-3 do). ``tower=None``: a text-only model (a
    causal LM or GGUF file written as an edgevlm checkpoint by ``edgevlm convert``)."""

    name: str
    tower: TowerConfig | None
    decoder: DecoderConfig
    image_placement: str = "after_bos"
    image_token: str = "<image>"
    chat_format: str = "template"  # one of CHAT_FORMATS
    # Real decoder weights and tokenizer, when they live outside the checkpoint (formats: "gguf"
    # for either; "transformers" for a LlamaForCausalLM folder; "tokenizer-json" for a tokenizer folder).
    decoder_weights: WeightsRef | None = None
    tokenizer: WeightsRef | None = None
    # Trained tensors layered over the component weights above (format "safetensors"; keys
    # tower.* and decoder.*, LoRA factors included), e.g. the demo's trained projector and adapters.
    weights: WeightsRef | None = None
    lora: LoRAConfig | None = None
    grounding_head: GroundingHeadConfig | None = None

    def __post_init__(self) -> None:
        _check(self.image_placement in IMAGE_PLACEMENTS,
               f"image_placement must be one of {IMAGE_PLACEMENTS}, got {self.image_placement!r}")
        _check(self.chat_format in CHAT_FORMATS, f"chat_format {self.chat_format!r} not supported; supported: "
               f"{CHAT_FORMATS}")
        _check(self.tower is None or isinstance(self.tower, TowerConfig),
               f"ModelConfig.tower must be a TowerConfig or None, got {type(self.tower).__name__}")
        _check(self.tower is None or self.tower.out_width == self.decoder.hidden,
               f"tower out_width {self.tower and self.tower.out_width} != decoder hidden {self.decoder.hidden}")
        head = self.grounding_head
        if head is not None:
            _check(self.tower is not None, "a grounding head needs a vision tower")
            _check(head.visual_width == self.tower.out_width,
                   f"grounding head visual_width {head.visual_width} != tower out_width {self.tower.out_width}")
            _check(head.first_cell + head.cells <= self.tower.visual_tokens_per_image,
                   f"grounding head cells {head.first_cell}..{head.first_cell + head.cells} do not fit the "
                   f"{self.tower.visual_tokens_per_image} visual tokens per image")

    @property
    def visual_tokens_per_image(self) -> int:
        return self.tower.visual_tokens_per_image if self.tower is not None else 0

    # JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------
# Generic (de)serialisation
# --------------------------------------------------------------------------------------------

def to_dict(obj: Any) -> Any:
    """Dataclass -> JSON-able dict. Polymorphic classes carry their ``kind`` tag."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        kind = getattr(type(obj), "kind", None)
        if kind:
            out["kind"] = kind
        for f in dataclasses.fields(obj):
            out[f.name] = to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


_POLY_BASES: dict[type, dict[str, type]] = {EncoderConfig: ENCODER_KINDS, ConnectorConfig: CONNECTOR_KINDS}


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Rebuild a dataclass from :func:`to_dict` output, converting lists back to tuples."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    if cls in _POLY_BASES:
        kind = data.get("kind")
        table = _POLY_BASES[cls]
        if kind not in table:
            raise ConfigError(f"{where}: unknown kind {kind!r}; known kinds: {sorted(table)}")
        cls = table[kind]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - known - {"kind"}
    if extra:
        raise ConfigError(f"{where}: unknown fields {sorted(extra)} for {cls.__name__}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items() if k in known}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{where}: {e}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


__all__ = [
    "RGB", "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "HALF_MEAN", "HALF_STD", "LITE_MEAN", "LITE_STD", "CLIP_MEAN_RGB8",
    "WeightsRef", "EncoderConfig", "ViTConfig", "ConvNeXtConfig", "EfficientNetConfig", "round_filters",
    "QFormerTextConfig", "QFormerConfig", "ConnectorConfig", "LinearConnectorConfig", "MLPConnectorConfig", "QFormerConnectorConfig",
    "ResamplerConnectorConfig", "SphinxFusionConfig", "ViewConfig", "AnyresPackConfig", "StripRegroupConfig", "TowerConfig", "DecoderConfig", "GroundingHeadConfig", "ModelConfig",
    "DECODER_NORMS", "DECODER_ACTS", "DECODER_POSITIONS", "ROPE_SCALINGS", "IMAGE_PLACEMENTS", "CHAT_FORMATS",
    "LoRAConfig", "LORA_TARGETS", "QuantConfig", "QUANT_SCHEMES", "QUANT_GROUPS",
    "ENCODER_KINDS", "CONNECTOR_KINDS", "to_dict", "from_dict",
]
