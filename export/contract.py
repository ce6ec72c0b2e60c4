"""The export contract: what an exported vision tower takes and returns, as data.

One contract drives the ONNX exporter (input/output names, dynamic axes), the TensorRT builder
(optimisation profiles) and the runners that feed the graph, and it is written into every
manifest. The graph is the whole :class:`~edgevlm.runtime.tower.VisionTowerModel`::

    inputs   pixels.<encoder>   float32 [views, 3, R_e, R_e]   one per encoder, normalised views
    output   visual_embeds      float32 [views, tokens_per_view, out_width]

``views`` is the only dynamic axis. With a fixed view recipe every image contributes
``views_per_image`` views (global view plus crops) in image-major order, so a batch of ``k`` images is
``k * views_per_image`` views, and the profile bounds it between one image and ``max_images`` images.

Any-resolution (``anyres``, LLaVA-NeXT) towers export the same per-view graph: an image's base view and
its tiles are just views, and how many it has (``view_counts``: ``1 + rows*cols`` for each grid the
recipe may choose) depends on its aspect ratio. The profile then runs from the smallest image
(``min(view_counts)`` views) to ``max_images`` of the largest. Packing an image's views into its
sequence (:class:`~edgevlm.runtime.connectors.anyres.AnyresPacker`: stitching, unpadding,
``image_newline``) depends on each image's original size, so it stays in torch after the graph.
Such a tower exports only when its connector does not read the views' padding masks
(``ConnectorConfig.reads_token_masks``, false for LLaVA's token-wise MLP): ``token_masks = "unused"``
then tells runners to accept the preprocessor's masks and drop them. A resampler (xGen-MM) reads them
and would need them as graph inputs, which is not done yet; it is refused. So are towers whose
Q-Former reads an instruction (InstructBLIP): the graph has no text input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgevlm.config import QFormerConnectorConfig, TowerConfig
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.options import VISION_PRECISIONS

INPUT_PREFIX = "pixels."
OUTPUT_NAME = "visual_embeds"
VIEWS_AXIS = "views"
TOKEN_MASKS = ("none", "unused")  # what runners do with anyres padding masks: none come / accepted and dropped
PRECISIONS = VISION_PRECISIONS  # one list for load(vision_precision=...) and export
TARGETS = ("onnx", "tensorrt")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` holds ints and the dynamic axis' name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def concrete(self, views: int) -> tuple[int, ...]:
        return tuple(views if d == VIEWS_AXIS else int(d) for d in self.shape)


@dataclass(frozen=True)
class Profile:
    """Bounds of the ``views`` axis: TensorRT builds for [min, max] and tunes kernels at ``opt``."""

    min_views: int
    opt_views: int
    max_views: int

    def __post_init__(self):
        if not 1 <= self.min_views <= self.opt_views <= self.max_views:
            raise ConfigError(f"profile needs 1 <= min <= opt <= max views, got "
                              f"{self.min_views}/{self.opt_views}/{self.max_views}")


@dataclass(frozen=True)
class ExportContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    views_per_image: int  # the most views one image has (the only count for fixed recipes)
    profile: Profile
    tower: dict[str, Any] = field(default_factory=dict)  # TowerConfig.to_dict(): preprocessing travels along
    view_counts: tuple[int, ...] = ()  # every count of views one image may have, ascending; () = (views_per_image,)
    token_masks: str = "none"  # "unused": anyres padding masks come with the views and are dropped (see above)

    def __post_init__(self):
        if not self.view_counts:
            object.__setattr__(self, "view_counts", (self.views_per_image,))
        if self.token_masks not in TOKEN_MASKS:
            raise ConfigError(f"token_masks must be one of {TOKEN_MASKS}, got {self.token_masks!r}")

    @classmethod
    def for_tower(cls, config: TowerConfig, *, max_images: int = 4, opt_images: int = 1) -> "ExportContract":
        c = config.connector
        if isinstance(c, QFormerConnectorConfig) and c.qformer.text is not None:
            raise ConfigError("this tower's Q-Former reads the prompt (InstructBLIP: QFormerConfig.text), and an "
                              "exported graph has no instruction input (qformer_ids / qformer_mask) yet; run "
                              "it with vision_backend='torch'")
        masks = "none"
        if not config.views.fixed_views:
            if c.reads_token_masks():
                raise ConfigError(f"views kind {config.views.kind!r} with a {c.kind!r} connector cannot be exported "
                                  "yet: the connector attends under the views' padding masks, which the graph "
                                  "would need as inputs; anyres towers with a token-wise connector (LLaVA-NeXT's "
                                  "MLP) and fixed-view towers (pad_square, stretch, crops) export")
            masks = "unused"
        if max_images < 1 or not 1 <= opt_images <= max_images:
            raise ConfigError(f"need 1 <= opt_images <= max_images, got opt_images={opt_images}, max_images={max_images}")
        v = config.views_per_image
        counts = (v,) if config.views.fixed_views else \
            tuple(sorted({1 + r * cols for r, cols in config.views.anyres_grids}))
        inputs = tuple(TensorSpec(INPUT_PREFIX + e.name, (VIEWS_AXIS, 3, e.image_size, e.image_size))
                       for e in config.encoders)
        outputs = (TensorSpec(OUTPUT_NAME, (VIEWS_AXIS, config.tokens_per_view, config.out_width)),)
        return cls(inputs=inputs, outputs=outputs, views_per_image=v,
                   profile=Profile(counts[0], v * opt_images, v * max_images), tower=config.to_dict(),
                   view_counts=counts, token_masks=masks)

    # ---- views onto the contract ---------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def encoder_names(self) -> list[str]:
        return [n[len(INPUT_PREFIX):] for n in self.input_names]

    @property
    def max_images(self) -> int:
        return self.profile.max_views // self.views_per_image

    def tower_config(self) -> TowerConfig:
        return TowerConfig.from_dict(self.tower)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For ``torch.onnx.export``: every tensor's dynamic axes by name."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}

    def trt_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """For a TensorRT optimisation profile: input name -> (min, opt, max) shapes."""
        p = self.profile
        return {t.name: (t.concrete(p.min_views), t.concrete(p.opt_views), t.concrete(p.max_views))
                for t in self.inputs}

    def drop_masks(self, masks: dict[str, Any] | None, n_views: int) -> None:
        """Runners' check of the token masks that came with ``n_views`` views: none for a graph without
        mask inputs, except anyres padding masks the connector does not read (``token_masks="unused"``),
        which must still line up with the views, and are then not fed."""
        if masks is None:
            return
        if self.token_masks != "unused":
            raise ConfigError("token masks (any-resolution views) are not part of this exported tower")
        for name, m in masks.items():
            if name not in self.encoder_names:
                raise ShapeError(f"token mask for encoder {name!r}, but the graph has {self.encoder_names}")
            if m.dim() != 2 or m.shape[0] != n_views:
                raise ShapeError(f"token mask for encoder {name!r}: expected [{n_views}, tokens], got {list(m.shape)}")

    def example_shapes(self, images: int = 1) -> dict[str, tuple[int, ...]]:
        return {t.name: t.concrete(images * self.views_per_image) for t in self.inputs}

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def spec(t: TensorSpec) -> dict:
            return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
        p = self.profile
        return {"inputs": [spec(t) for t in self.inputs], "outputs": [spec(t) for t in self.outputs],
                "dynamic_axes": {k: {str(i): d for i, d in v.items()} for k, v in self.dynamic_axes().items()},
                "views_per_image": self.views_per_image, "view_counts": list(self.view_counts),
                "token_masks": self.token_masks,
                "profile": {"min_views": p.min_views, "opt_views": p.opt_views, "max_views": p.max_views},
                "tower": self.tower}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportContract":
        def spec(x: dict) -> TensorSpec:
            return TensorSpec(x["name"], tuple(x["shape"]), x.get("dtype", "float32"))
        return cls(inputs=tuple(spec(x) for x in d["inputs"]), outputs=tuple(spec(x) for x in d["outputs"]),
                   views_per_image=int(d["views_per_image"]), profile=Profile(**d["profile"]), tower=d["tower"],
                   view_counts=tuple(int(n) for n in d.get("view_counts", ())),
                   token_masks=d.get("token_masks", "none"))


def check_precision(precision: str, target: str = "onnx") -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if target not in TARGETS:
        raise ConfigError(f"export target must be one of {', '.join(TARGETS)}, got {target!r}")
    return precision


__all__ = ["ExportContract", "TensorSpec", "Profile", "INPUT_PREFIX", "OUTPUT_NAME", "VIEWS_AXIS", "TOKEN_MASKS",
           "PRECISIONS", "TARGETS", "check_precision"]
