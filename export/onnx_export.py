"""Vision tower + projector -> one ONNX graph, named by the contract.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used: it needs no
package beyond torch (the torch.export-based one needs onnxscript), exports this tower in about a
second, and scopes node names by module path (``/tower/dinov2/blocks.3/attn/qkv/MatMul``), which
stay stable while the model code does. torch deprecates it since 2.9; the parity tests are what
would catch a behaviour change, and moving to ``dynamo=True`` is a follow-up.
The tower's Python-side checks that read sizes are written so that tracing records one dynamic
``views`` axis and constant spatial sizes (see ``runtime/connectors/sphinx.py``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from edgevlm.errors import BackendUnavailableError, ExportError
from edgevlm.runtime.tower import VisionTowerModel

from .contract import (INPUT_PREFIX, INSTRUCTION_IDS, INSTRUCTION_MASK, MASK_PREFIX, ORDER_PREFIX,
                       ExportContract)

DEFAULT_OPSET = 18


class TowerGraph(nn.Module):
    """Positional-input face of :class:`VisionTowerModel` for tracing, inputs in the contract's order: one
    tensor per encoder, then (anyres towers whose connector reads them) the token masks and a regrouping's
    order, then (InstructBLIP) the instruction's ids and mask.

    The graph is the per-view part only (encoders + connector): any-resolution towers' base views and
    tiles go through it like any other views, and packing each image's views into its sequence
    (``VisionTowerModel.per_image``: unpad + ``image_newline``, which depend on the image's original size)
    runs in torch on the graph's output, for every backend alike."""

    def __init__(self, tower: VisionTowerModel, contract: ExportContract):
        super().__init__()
        self.tower = tower
        self.names = contract.input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        by_name = dict(zip(self.names, inputs, strict=True))

        def group(prefix: str) -> dict[str, torch.Tensor] | None:
            got = {k[len(prefix):]: v for k, v in by_name.items() if k.startswith(prefix)}
            return got or None

        text = None
        if INSTRUCTION_IDS in by_name:  # int64 [N, L] each; the Q-Former reads mask != 0
            text = (by_name[INSTRUCTION_IDS], by_name[INSTRUCTION_MASK])
        return self.tower(group(INPUT_PREFIX), group(MASK_PREFIX), text=text, order=group(ORDER_PREFIX))


def export_onnx(model: VisionTowerModel, contract: ExportContract, path: str | Path, *,
                opset: int = DEFAULT_OPSET) -> Path:
    """Trace ``model`` (fp32, CPU) into ``path``; example inputs have two images so that no size
    in the graph can be mistaken for a batch of one. An instruction tower's example instruction has rows of
    different lengths (padding under the mask); its length is traced as the dynamic ``instruction_tokens``
    axis, and validation runs the graph at two other lengths."""
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("exporting needs the onnx package: pip install 'edgevlm[onnx]'") from None
    path = Path(path)
    model = model.float().eval()
    shapes = contract.example_shapes(images=2)
    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(shapes[t.name], generator=gen) for t in contract.pixel_inputs)
    n = shapes[contract.pixel_inputs[0].name][0]
    for t in contract.mask_inputs:  # some padding masked in every view: any mask traces the same graph
        example += (torch.rand(shapes[t.name], generator=gen) > 0.25,)
    for t in contract.order_inputs:  # a shuffle of the batch's tokens: any permutation traces the same gather
        example += (torch.randperm(n * shapes[t.name][1], generator=gen).view(shapes[t.name]),)
    if contract.instruction is not None:
        from .calibration import synthetic_instruction

        length = min(contract.instruction.max_tokens, 7)  # any length traces the same graph; a short one is quick
        ids, mask = synthetic_instruction(contract.instruction, n, length, seed=0)  # rows padded to 7, 4 and 1
        example += (ids, mask.long())
    graph = TowerGraph(model, contract).eval()
    with warnings.catch_warnings():
        # The tower turns spatial sizes into constants on purpose (fixed by the contract); the tracer
        # warns about every such int().
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The exporter's own deprecation notices (itself, its logging helper) say nothing actionable here.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(graph, example, str(path), input_names=contract.input_names,
                              output_names=contract.output_names, dynamic_axes=contract.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        except Exception as e:  # exporter errors are many types; name the model and keep the cause
            raise ExportError(f"ONNX export of the vision tower failed: {type(e).__name__}: {e}") from e
    onnx.checker.check_model(str(path))
    return path


__all__ = ["export_onnx", "TowerGraph", "DEFAULT_OPSET"]
