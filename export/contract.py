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
A connector that does not read the views' padding masks (``ConnectorConfig.reads_token_masks``, false
for LLaVA's token-wise MLP) gets ``token_masks = "unused"``: runners accept the preprocessor's masks,
check them and drop them. One that reads them (a resampler) gets ``token_masks = "input"``: the masks
are graph inputs, and a tower that regroups its tiles before the connector (xGen-MM's strips,
``TowerConfig.regroup``) also takes the regrouping's gather index, both from the preprocessor (or
:func:`~edgevlm.runtime.connectors.strip_regroup.regroup_inputs`), since both depend on each image's size::

    inputs   token_mask.<encoder>    bool  [views, encoder tokens]   True = real token (False: canvas padding)
             token_order.<encoder>   int64 [views, encoder tokens]   regrouping towers only: which of the
                                                                     batch's views*tokens lands at each place

A tower whose Q-Former reads the instruction (InstructBLIP, ``QFormerConfig.text`` set) takes it as two
more inputs, named as ``InstructBlipProcessor`` names them, one row per view (each view reads its image's
instruction, right-padded to the longest)::

    inputs   qformer_input_ids       int64 [views, instruction_tokens]   Q-Former (BERT) token ids
             qformer_attention_mask  int64 [views, instruction_tokens]   1 = real token, 0 = padding

``instruction_tokens`` is a second dynamic axis, bounded by :class:`InstructionProfile` (TensorRT: 1 to
the Q-Former's ``max_positions``, tuned at 32). Towers without an instruction keep exactly the graph
above: no such inputs, and no ``instruction`` entry in the contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgevlm.config import QFormerConnectorConfig, TowerConfig
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.options import VISION_PRECISIONS

INPUT_PREFIX = "pixels."
OUTPUT_NAME = "visual_embeds"
VIEWS_AXIS = "views"
# InstructBLIP: the instruction's inputs, named as InstructBlipProcessor names them, and their length axis
INSTRUCTION_IDS = "qformer_input_ids"
INSTRUCTION_MASK = "qformer_attention_mask"
INSTRUCTION_AXIS = "instruction_tokens"
OPT_INSTRUCTION_TOKENS = 32  # TensorRT tunes at this length (a short question), clipped to max_positions
# what runners do with anyres padding masks: none come / accepted, checked and dropped / fed to the graph
TOKEN_MASKS = ("none", "unused", "input")
MASK_PREFIX = "token_mask."
ORDER_PREFIX = "token_order."
PRECISIONS = VISION_PRECISIONS  # one list for load(vision_precision=...) and export
TARGETS = ("onnx", "tensorrt")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` holds ints and the dynamic axis' name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def concrete(self, views: int, tokens: int | None = None) -> tuple[int, ...]:
        """The shape for ``views`` views (and, for the instruction's inputs, ``tokens`` tokens)."""
        if tokens is None and INSTRUCTION_AXIS in self.shape:
            raise ConfigError(f"input {self.name!r} has an {INSTRUCTION_AXIS!r} axis: its shape needs a token count")
        return tuple(views if d == VIEWS_AXIS else tokens if d == INSTRUCTION_AXIS else int(d) for d in self.shape)


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
class InstructionProfile:
    """Bounds of the ``instruction_tokens`` axis (InstructBLIP): TensorRT builds for [min, max] tokens and
    tunes at ``opt``; ``max_tokens`` is the Q-Former's ``max_positions`` (its position table), which also
    bounds ONNX Runtime. ``vocab_size`` bounds the ids (the graph's Gather would fail on others)."""

    min_tokens: int
    opt_tokens: int
    max_tokens: int
    vocab_size: int
    pad_id: int = 0

    def __post_init__(self):
        if not 1 <= self.min_tokens <= self.opt_tokens <= self.max_tokens:
            raise ConfigError(f"instruction profile needs 1 <= min <= opt <= max tokens, got "
                              f"{self.min_tokens}/{self.opt_tokens}/{self.max_tokens}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"instruction pad_id {self.pad_id} is outside the vocabulary [0, {self.vocab_size})")

    @classmethod
    def for_text(cls, text) -> "InstructionProfile":
        """From a :class:`~edgevlm.config.QFormerTextConfig`."""
        return cls(1, min(OPT_INSTRUCTION_TOKENS, text.max_positions), text.max_positions, text.vocab_size,
                   text.pad_id)


@dataclass(frozen=True)
class ExportContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    views_per_image: int  # the most views one image has (the only count for fixed recipes)
    profile: Profile
    tower: dict[str, Any] = field(default_factory=dict)  # TowerConfig.to_dict(): preprocessing travels along
    view_counts: tuple[int, ...] = ()  # every count of views one image may have, ascending; () = (views_per_image,)
    token_masks: str = "none"  # "unused": anyres padding masks come with the views and are dropped (see above)
    instruction: InstructionProfile | None = None  # InstructBLIP: the graph takes qformer_input_ids / _attention_mask

    def __post_init__(self):
        if not self.view_counts:
            object.__setattr__(self, "view_counts", (self.views_per_image,))
        if self.token_masks not in TOKEN_MASKS:
            raise ConfigError(f"token_masks must be one of {TOKEN_MASKS}, got {self.token_masks!r}")
        has_inputs = [n for n in (INSTRUCTION_IDS, INSTRUCTION_MASK) if n in self.input_names]
        if (self.instruction is None and has_inputs) or (self.instruction is not None and len(has_inputs) != 2):
            raise ConfigError(f"contract: the instruction inputs ({INSTRUCTION_IDS}, {INSTRUCTION_MASK}) and the "
                              f"instruction profile come together; got inputs {has_inputs} and profile "
                              f"{self.instruction}")

    @classmethod
    def for_tower(cls, config: TowerConfig, *, max_images: int = 4, opt_images: int = 1) -> "ExportContract":
        c = config.connector
        masks = "none"
        if not config.views.fixed_views:
            masks = "input" if c.reads_token_masks() or config.regroup is not None else "unused"
        if max_images < 1 or not 1 <= opt_images <= max_images:
            raise ConfigError(f"need 1 <= opt_images <= max_images, got opt_images={opt_images}, max_images={max_images}")
        v = config.views_per_image
        counts = (v,) if config.views.fixed_views else \
            tuple(sorted({1 + r * cols for r, cols in config.views.anyres_grids}))
        inputs = tuple(TensorSpec(INPUT_PREFIX + e.name, (VIEWS_AXIS, 3, e.image_size, e.image_size))
                       for e in config.encoders)
        if masks == "input":  # the preprocessor's masks (and regrouping's order) are per image: graph inputs
            # (a regrouping tower has one encoder, TowerConfig checks it)
            inputs += tuple(TensorSpec(MASK_PREFIX + e.name, (VIEWS_AXIS, e.tokens), "bool") for e in config.encoders)
            if config.regroup is not None:
                inputs += tuple(TensorSpec(ORDER_PREFIX + e.name, (VIEWS_AXIS, e.tokens), "int64")
                                for e in config.encoders)
        instruction = None
        if isinstance(c, QFormerConnectorConfig) and c.qformer.text is not None:  # InstructBLIP
            instruction = InstructionProfile.for_text(c.qformer.text)
            inputs += (TensorSpec(INSTRUCTION_IDS, (VIEWS_AXIS, INSTRUCTION_AXIS), "int64"),
                       TensorSpec(INSTRUCTION_MASK, (VIEWS_AXIS, INSTRUCTION_AXIS), "int64"))
        outputs = (TensorSpec(OUTPUT_NAME, (VIEWS_AXIS, config.tokens_per_view, config.out_width)),)
        return cls(inputs=inputs, outputs=outputs, views_per_image=v,
                   profile=Profile(counts[0], v * opt_images, v * max_images), tower=config.to_dict(),
                   view_counts=counts, token_masks=masks, instruction=instruction)

    # ---- views onto the contract ---------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def pixel_inputs(self) -> tuple[TensorSpec, ...]:
        """The views' inputs, one per encoder, in the graph's order (the instruction's follow them)."""
        return tuple(t for t in self.inputs if t.name.startswith(INPUT_PREFIX))

    @property
    def encoder_names(self) -> list[str]:
        return [t.name[len(INPUT_PREFIX):] for t in self.pixel_inputs]

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
        """For a TensorRT optimisation profile: input name -> (min, opt, max) shapes. The instruction's
        inputs take the views' bounds on their first axis and :class:`InstructionProfile`'s on their second."""
        p, t = self.profile, self.instruction
        lo, opt, hi = (t.min_tokens, t.opt_tokens, t.max_tokens) if t is not None else (None, None, None)
        return {s.name: (s.concrete(p.min_views, lo), s.concrete(p.opt_views, opt), s.concrete(p.max_views, hi))
                for s in self.inputs}

    def instruction_inputs(self, text, n_views: int, *, min_tokens: int = 0):
        """Runners' check of the instruction that came with ``n_views`` views -> ``(ids int64 [n_views, L],
        mask int64 [n_views, L])`` on the CPU, or None for a tower without one.

        ``text`` is what :meth:`~edgevlm.runtime.tower.VisionTowerModel.forward` takes: ``(ids, mask or None)``.
        ``None`` for an instruction tower feeds an empty instruction (L = 0), which is the Q-Former's query
        path (the eager model without ``text``) where the runtime allows zero-length inputs (ONNX Runtime);
        ``min_tokens`` is the least L the runner's engine was built for (TensorRT: the profile's minimum)."""
        t = self.instruction
        if t is None:
            if text is not None:
                raise ConfigError("this exported tower's connector takes no instruction (only an InstructBLIP "
                                  "Q-Former reads one)")
            return None
        import torch

        if text is None:
            ids, mask = torch.zeros(n_views, 0, dtype=torch.long), None
        else:
            if not isinstance(text, (tuple, list)) or len(text) != 2:
                raise ShapeError("instruction must be a pair (ids [n_views, L], mask [n_views, L] or None)")
            ids, mask = text
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != n_views \
                or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ShapeError(f"{INSTRUCTION_IDS}: expected integer ids [{n_views}, L] (one row per view), got {got}")
        length = ids.shape[1]
        if not min_tokens <= length <= t.max_tokens:
            raise ShapeError(f"{INSTRUCTION_IDS}: {length} tokens are outside the exported tower's "
                             f"[{min_tokens}, {t.max_tokens}] (max_positions of the Q-Former"
                             + (", the least its engine was built for)" if min_tokens else ")"))
        if length and (int(ids.min()) < 0 or int(ids.max()) >= t.vocab_size):
            raise ShapeError(f"{INSTRUCTION_IDS} must lie in [0, {t.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if mask is None:
            mask = torch.ones(n_views, length, dtype=torch.long)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n_views, length) \
                or mask.dtype.is_floating_point or mask.dtype.is_complex:
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ShapeError(f"{INSTRUCTION_MASK}: expected a bool or 0/1 integer mask [{n_views}, {length}] like "
                             f"the ids, got {got}")
        return ids.to("cpu", torch.long), (mask.to("cpu") != 0).to(torch.long)

    @property
    def mask_inputs(self) -> tuple[TensorSpec, ...]:
        """``token_mask.<encoder>`` inputs (``token_masks == "input"``), in the graph's order."""
        return tuple(t for t in self.inputs if t.name.startswith(MASK_PREFIX))

    @property
    def order_inputs(self) -> tuple[TensorSpec, ...]:
        """``token_order.<encoder>`` inputs (a tower that regroups its tiles), in the graph's order."""
        return tuple(t for t in self.inputs if t.name.startswith(ORDER_PREFIX))

    def token_inputs(self, masks: dict[str, Any] | None, order: dict[str, Any] | None,
                     n_views: int) -> dict[str, Any]:
        """Runners' check of the token masks (and regrouping order) that came with ``n_views`` views -> the
        graph feeds they make, ``{input name: CPU tensor}`` (bool masks, int64 order), empty when the graph
        takes none. Graphs without mask inputs take no masks, except anyres padding masks the connector does
        not read (``token_masks="unused"``), which must still line up with the views, and are then not fed."""
        import torch

        if order is not None and not self.order_inputs:
            raise ConfigError("a token order (regrouped any-resolution tiles) is not part of this exported tower")
        if masks is None:
            if self.mask_inputs:
                raise ShapeError(f"this exported tower reads the views' token masks "
                                 f"({', '.join(t.name for t in self.mask_inputs)}): "
                                 "pass the preprocessor's token_masks")
            return {}
        if self.token_masks == "none":
            raise ConfigError("token masks (any-resolution views) are not part of this exported tower")
        for name, m in masks.items():
            if name not in self.encoder_names:
                raise ShapeError(f"token mask for encoder {name!r}, but the graph has {self.encoder_names}")
            if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != n_views:
                got = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ShapeError(f"token mask for encoder {name!r}: expected [{n_views}, tokens], got {got}")
        feeds = {}
        for spec in self.mask_inputs:
            enc = spec.name[len(MASK_PREFIX):]
            m = masks.get(enc)
            if m is None or tuple(m.shape) != spec.concrete(n_views):
                got = "none" if m is None else list(m.shape)
                raise ShapeError(f"{spec.name}: expected a mask {list(spec.concrete(n_views))}, got {got}")
            feeds[spec.name] = m.to("cpu", torch.bool)
        for spec in self.order_inputs:
            enc = spec.name[len(ORDER_PREFIX):]
            o = None if order is None else order.get(enc)
            want = spec.concrete(n_views)
            if o is None or tuple(o.shape) != want or o.dtype.is_floating_point or o.dtype == torch.bool:
                got = "none" if o is None else f"{o.dtype} {list(o.shape)}"
                raise ShapeError(f"{spec.name}: expected integer indices {list(want)} (regroup_inputs), got {got}")
            if o.numel() and (int(o.min()) < 0 or int(o.max()) >= o.numel()):  # the graph's Gather would fail
                raise ShapeError(f"{spec.name}: indices must lie in [0, {o.numel()}) (the batch's tokens), got "
                                 f"[{int(o.min())}, {int(o.max())}]")
            feeds[spec.name] = o.to("cpu", torch.long)
        return feeds

    def example_shapes(self, images: int = 1, tokens: int | None = None) -> dict[str, tuple[int, ...]]:
        """Input shapes for ``images`` images (of the most views), instructions of ``tokens`` tokens
        (default: the profile's ``opt``)."""
        if tokens is None and self.instruction is not None:
            tokens = self.instruction.opt_tokens
        return {t.name: t.concrete(images * self.views_per_image, tokens) for t in self.inputs}

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
                **({"instruction": asdict(self.instruction)} if self.instruction is not None else {}),
                "tower": self.tower}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportContract":
        def spec(x: dict) -> TensorSpec:
            return TensorSpec(x["name"], tuple(x["shape"]), x.get("dtype", "float32"))
        return cls(inputs=tuple(spec(x) for x in d["inputs"]), outputs=tuple(spec(x) for x in d["outputs"]),
                   views_per_image=int(d["views_per_image"]), profile=Profile(**d["profile"]), tower=d["tower"],
                   view_counts=tuple(int(n) for n in d.get("view_counts", ())),
                   token_masks=d.get("token_masks", "none"),
                   instruction=InstructionProfile(**d["instruction"]) if d.get("instruction") else None)


def check_precision(precision: str, target: str = "onnx") -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if target not in TARGETS:
        raise ConfigError(f"export target must be one of {', '.join(TARGETS)}, got {target!r}")
    return precision


__all__ = ["ExportContract", "TensorSpec", "Profile", "InstructionProfile", "INPUT_PREFIX", "OUTPUT_NAME", "VIEWS_AXIS",
           "TOKEN_MASKS", "MASK_PREFIX", "ORDER_PREFIX", "INSTRUCTION_IDS", "INSTRUCTION_MASK", "INSTRUCTION_AXIS", "PRECISIONS", "TARGETS",
           "check_precision"]
