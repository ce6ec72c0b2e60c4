"""What a model would do on a device this machine does not have (``edgevlm plan``): per stage, the work
counted on the model itself, set against the device's published limits, with the memory plan.

The work is counted, not guessed, on a weightless copy of the model (meta device):

- tower and prefill FLOPs: torch's FLOP counter over one image's views, and :func:`prefill_flops` for
  the prompt (the same counts ``edgevlm bench`` reports beside its timings);
- bytes a decode step reads: every projection at the decoder's precision, as each weight format
  stores it (:func:`weight_bytes`), plus the KV cache at the decode position;
- activations: the peak of live intermediate tensors while the fp16 tower and prefill run eagerly,
  tracked op by op (:class:`_LiveBytes`).

Each stage's **bound** is the roofline at the device's peak: ``max(FLOPs / tensor peak, bytes /
bandwidth)``. The **expected** figure divides each term by a utilisation (``Utilisation``): by default
the fractions that mature runtimes reach on Orin (docs/jetson.md says where they come from). edgevlm
itself has not run on a Jetson, so these are plans, not measurements.

The memory plan adds what the device must hold at once: weights as stored, the KV cache for the
whole context, the activation peak, the TensorRT builder's workspace, and what the OS and the CUDA
runtime take (assumed figures, printed as such). Jetson's CPU and GPU share one memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgevlm.config import ModelConfig, QuantConfig
from edgevlm.errors import ConfigError

from .devices import DeviceSpec
from .latency import prefill_flops
from .limits import count_flops

GIB = 1 << 30
DECODER_PRECISIONS = ("fp16", "int8", "int4", "int4-g64", "int4-g128", "int8-g32")
TOWER_PRECISIONS = ("fp16", "int8")


def weight_bytes(numel: int, in_features: int, precision: str) -> float:
    """Bytes a ``[out, in_features]`` weight of ``numel`` values takes in ``precision``, as this runtime
    stores it: fp16; int8 with an fp32 scale per output row (or per group); int4 with an fp16 scale and
    zero point per group of inputs."""
    if precision == "fp16":
        return 2.0 * numel
    q = QuantConfig.named(precision)
    if q.group and in_features % q.group:
        raise ConfigError(f"a projection with {in_features} inputs cannot be quantised to {precision}: "
                          f"{in_features} inputs is not a multiple of group {q.group}")
    per_group = q.group or in_features
    if q.scheme == "int8":
        return numel * (1 + 4 / per_group)
    return numel * (0.5 + 4 / per_group)


class _LiveBytes(TorchDispatchMode):
    """The peak of bytes held by tensors that ops create while it is active: each output's storage is
    counted once and released when its last tensor is freed (weakref finalisers), so views and
    in-place ops cost nothing and the peak is the eager working set beyond the weights and inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.now)
        return out


@dataclass(frozen=True)
class Work:
    """One request (one image and its prompt) counted on a model's config; independent of the device."""

    model: str
    visual_tokens: int
    prompt_tokens: int  # visual + text
    tower_flops: int
    tower_params: int  # encoders + connector + grounding head
    prefill_flops: int
    decoder_linears: tuple[tuple[int, int], ...]  # (numel, in_features) of every projection and the LM head
    embedding_numel: int  # the token table (stored apart from the LM head unless tied and in fp16)
    position_numel: int  # a learned position table (OPT), 0 for RoPE: stored whole, one row read a step
    tied: bool
    other_decoder_params: int  # norms and biases, read whole every step
    hidden: int
    kv_values_per_position: int  # K and V of every layer
    head_dim: int
    tower_activation_bytes: int  # fp16 peak working set of the tower on one image
    prefill_activation_bytes: int  # fp16 peak working set of the prefill


def _tower_inputs(cfg: ModelConfig) -> tuple[dict, dict]:
    """One image's views on the meta device (and the tile order of an any-resolution tower: an image
    twice the encoder's size each way, so the largest grid of a 2x2-tile model)."""
    from edgevlm.runtime.connectors.strip_regroup import regroup_inputs

    tower = cfg.tower
    v = tower.views_per_image
    views = {e.name: torch.empty(v, 3, e.image_size, e.image_size, device="meta", dtype=torch.float16)
             for e in tower.encoders}
    if tower.regroup is None:
        return views, {}
    side = 2 * tower.encoders[0].image_size
    order, masks = regroup_inputs(tower, [v], [(side, side)])
    return views, {"masks": {k: m.to("meta") for k, m in masks.items()},
                   "order": {k: o.to("meta") for k, o in order.items()}}


def count_work(cfg: ModelConfig, name: str, text_tokens: int = 32) -> Work:
    """Count one request's work on ``cfg`` (no weights are read or allocated)."""
    from edgevlm.runtime.decoder import Decoder

    if text_tokens < 1:
        raise ConfigError(f"text_tokens must be at least 1, got {text_tokens}")
    d = cfg.decoder
    with torch.device("meta"):
        dec = Decoder(d).half().requires_grad_(False)
    linears = tuple((m.weight.numel(), m.in_features) for n, m in dec.named_modules()
                    if isinstance(m, torch.nn.Linear))
    positions = dec.embed_positions.weight if dec.embed_positions is not None else None
    counted = {id(m.weight) for m in dec.modules() if isinstance(m, torch.nn.Linear)} | {id(dec.embed_tokens.weight)}
    counted |= {id(positions)} if positions is not None else set()
    other = sum(p.numel() for p in dec.parameters() if id(p) not in counted)

    tower_flops = tower_params = visual = tower_act = 0
    if cfg.tower is not None:
        from edgevlm.runtime.tower import VisionTowerModel

        with torch.device("meta"):
            tower = VisionTowerModel(cfg.tower).half().requires_grad_(False)
        views, extra = _tower_inputs(cfg)
        tower_flops = count_flops(lambda: tower(views, **extra))
        with torch.no_grad(), _LiveBytes() as live:
            out = tower(views, **extra)
            del out
        tower_act = live.peak
        tower_params = sum(p.numel() for p in tower.parameters())
        visual = cfg.visual_tokens_per_image
        if cfg.grounding_head is not None:
            from edgevlm.runtime.grounding_head import GroundingHead

            with torch.device("meta"):
                tower_params += sum(p.numel() for p in GroundingHead(cfg.grounding_head).parameters())
    tokens = visual + text_tokens
    x = torch.empty(1, tokens, d.hidden, device="meta", dtype=torch.float16)
    with torch.no_grad(), _LiveBytes() as live:
        out = dec(inputs_embeds=x, last_only=True)
        del out
    return Work(model=name, visual_tokens=visual, prompt_tokens=tokens, tower_flops=tower_flops,
                tower_params=tower_params, prefill_flops=prefill_flops(d, tokens), decoder_linears=linears,
                embedding_numel=dec.embed_tokens.weight.numel(),
                position_numel=positions.numel() if positions is not None else 0, tied=d.tie_embeddings,
                other_decoder_params=other,
                hidden=d.hidden, kv_values_per_position=2 * d.layers * d.kv_heads * d.head_dim, head_dim=d.head_dim,
                tower_activation_bytes=tower_act, prefill_activation_bytes=live.peak)


@dataclass(frozen=True)
class Utilisation:
    """Fractions of the peaks a well-built runtime reaches, for the "expected" figures."""

    bandwidth: float = 0.75  # decode: measured runtimes reach 0.76-0.85 of the bound on AGX Orin
    compute: float = 0.4  # tower and prefill: tensor-core utilisation of transformer inference

    def __post_init__(self) -> None:
        for name in ("bandwidth", "compute"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"utilisation {name} must be in (0, 1], got {value!r}")


@dataclass(frozen=True)
class Overheads:
    """Memory that is not the model's, in GiB: assumed, not measured, and printed as such."""

    system_gib: float = 1.0  # headless JetPack: the OS, its services and the firmware carve-outs
    runtime_gib: float = 1.0  # CUDA context (lazy loading), cuBLAS/cuDNN and TensorRT libraries


@dataclass(frozen=True)
class Plan:
    """One model on one device at one precision: the memory plan (GiB) and the stage times (ms)."""

    model: str
    device: str
    decoder: str
    tower: str
    kv_cache: str
    context: int
    visual_tokens: int
    prompt_tokens: int
    weights_gib: float
    kv_gib: float
    activations_gib: float
    workspace_gib: float
    overhead_gib: float
    total_gib: float
    memory_gib: float
    fits: bool
    tower_gflop: float
    prefill_gflop: float
    decode_mb_per_token: float
    tower_bound_ms: float
    prefill_bound_ms: float
    ttft_bound_ms: float
    ttft_expected_ms: float
    decode_bound_ms: float
    decode_expected_ms: float

    @property
    def decode_tok_s(self) -> float:
        return 1e3 / self.decode_expected_ms


def plan(work: Work, device: DeviceSpec, decoder: str = "fp16", tower: str = "fp16", *, kv_cache: str = "fp16",
         context: int = 2048, new_tokens: int = 32, utilisation: Utilisation = Utilisation(),
         overheads: Overheads = Overheads()) -> Plan:
    """``work`` on ``device`` with the decoder's projections in ``decoder`` precision (activations fp16)
    and the tower's weights and matmuls in ``tower`` precision. Decode is timed at the position half way
    through ``new_tokens`` answer tokens, as ``edgevlm bench`` times it."""
    if decoder not in DECODER_PRECISIONS:
        raise ConfigError(f"decoder precision must be one of {DECODER_PRECISIONS}, got {decoder!r}")
    if tower not in TOWER_PRECISIONS:
        raise ConfigError(f"tower precision must be one of {TOWER_PRECISIONS}, got {tower!r}")
    if kv_cache not in ("fp16", "int8"):
        raise ConfigError(f"kv_cache must be 'fp16' or 'int8', got {kv_cache!r}")
    if context < work.prompt_tokens + new_tokens:
        raise ConfigError(f"context {context} cannot hold the {work.prompt_tokens}-token prompt and "
                          f"{new_tokens} new tokens")

    projections = sum(weight_bytes(n, k, decoder) for n, k in work.decoder_linears)
    embedding = 0 if (work.tied and decoder == "fp16") else 2 * work.embedding_numel
    tower_bytes = work.tower_params * (2 if tower == "fp16" else 1)
    weights = projections + embedding + 2 * (work.other_decoder_params + work.position_numel) + tower_bytes
    kv_per_value = 2 if kv_cache == "fp16" else 1 + 4 / work.head_dim  # int8 + an fp32 scale per vector
    kv = work.kv_values_per_position * kv_per_value * context
    activations = max(work.tower_activation_bytes, work.prefill_activation_bytes)
    workspace = device.workspace_mb * (1 << 20)
    overhead = (overheads.system_gib + overheads.runtime_gib) * GIB
    total = weights + kv + activations + workspace + overhead

    bandwidth = device.bandwidth_gbs * 1e9
    tower_peak = (device.fp16_tflops if tower == "fp16" else device.int8_tops) * 1e12
    fp16_peak = device.fp16_tflops * 1e12

    def roofline(flops: float, nbytes: float, peak: float, u: Utilisation | None = None) -> float:
        """ms of a stage at ``peak`` FLOP/s and the bandwidth (divided by ``u``'s fractions if given)."""
        c, b = (u.compute, u.bandwidth) if u else (1.0, 1.0)
        return max(flops / peak / c, nbytes / bandwidth / b) * 1e3

    tower_bound = roofline(work.tower_flops, tower_bytes, tower_peak) if work.tower_flops else 0.0
    tower_exp = roofline(work.tower_flops, tower_bytes, tower_peak, utilisation) if work.tower_flops else 0.0
    decoder_read = projections + 2 * work.other_decoder_params  # a prefill reads every projection once
    prefill_bound = roofline(work.prefill_flops, decoder_read, fp16_peak)
    prefill_exp = roofline(work.prefill_flops, decoder_read, fp16_peak, utilisation)
    rows = 2 if work.position_numel else 1  # the token's embedding row (and its learned position's)
    step = decoder_read + 2 * work.hidden * rows \
        + work.kv_values_per_position * kv_per_value * (work.prompt_tokens + new_tokens / 2)
    decode_bound = step / bandwidth * 1e3
    return Plan(model=work.model, device=device.name, decoder=decoder, tower=tower, kv_cache=kv_cache,
                context=context, visual_tokens=work.visual_tokens, prompt_tokens=work.prompt_tokens,
                weights_gib=weights / GIB, kv_gib=kv / GIB, activations_gib=activations / GIB,
                workspace_gib=workspace / GIB, overhead_gib=overhead / GIB, total_gib=total / GIB,
                memory_gib=device.memory_gb, fits=total <= device.memory_gb * GIB,
                tower_gflop=work.tower_flops / 1e9, prefill_gflop=work.prefill_flops / 1e9,
                decode_mb_per_token=step / 1e6, tower_bound_ms=tower_bound, prefill_bound_ms=prefill_bound,
                ttft_bound_ms=tower_bound + prefill_bound, ttft_expected_ms=tower_exp + prefill_exp,
                decode_bound_ms=decode_bound, decode_expected_ms=decode_bound / utilisation.bandwidth)


def markdown(plans: list[Plan], device: DeviceSpec) -> str:
    """One device's plans as a Markdown table (GiB; ms; expected figure, then the bound in brackets)."""
    lines = [f"**{device.title}**: {device.memory_gb:g} GiB shared, {device.bandwidth_gbs:g} GB/s, "
             f"GPU {device.fp16_tflops:.1f} dense FP16 TFLOPS / {device.int8_tops:.1f} INT8 TOPS "
             f"(TensorRT workspace {device.workspace_mb} MiB)",
             "",
             "| model | decoder | weights | KV | activations | total of " f"{device.memory_gb:g} GiB"
             " | TTFT ms [bound] | decode ms/token [bound] | tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        total = f"{p.total_gib:.2f}" + ("" if p.fits else " **does not fit**")
        lines.append(f"| {p.model} | {p.decoder} | {p.weights_gib:.2f} | {p.kv_gib:.2f} | {p.activations_gib:.2f} "
                     f"| {total} | {p.ttft_expected_ms:.1f} [{p.ttft_bound_ms:.1f}] "
                     f"| {p.decode_expected_ms:.2f} [{p.decode_bound_ms:.2f}] | {p.decode_tok_s:.0f} |")
    return "\n".join(lines)


__all__ = ["DECODER_PRECISIONS", "TOWER_PRECISIONS", "Work", "count_work", "weight_bytes", "Utilisation",
           "Overheads", "Plan", "plan", "markdown"]
