"""Run an exported tower with ONNX Runtime, behind the same call as the eager model.

``runner(views, masks, text=None, order=None) -> [views, tokens_per_view, out_width]`` with ``views`` the
preprocessed ``{encoder: [N, 3, R, R]}`` dict the preprocessor makes (for an any-resolution tower, every
image's base view and tiles; the caller packs them per image afterwards, as with the eager model) and
``masks`` / ``order`` its ``token_masks`` / ``token_order`` (graph inputs where the contract says so), so
:class:`~edgevlm.runtime.tower.VisionTower` swaps backends without changing anything else. ``text`` is
an InstructBLIP tower's instruction as the eager model takes it, ``(ids [N, L], mask [N, L] or None)``,
fed as ``qformer_input_ids`` / ``qformer_attention_mask``; without one such a graph gets an empty
instruction (L = 0), which computes the Q-Former's query path as the eager model does without ``text``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgevlm.errors import BackendUnavailableError, ExportError, ShapeError

from .contract import INSTRUCTION_IDS, INSTRUCTION_MASK, ExportContract

CPU_PROVIDERS = ("CPUExecutionProvider",)


def ort_session(path: str | Path, *, threads: int | None = None, providers: tuple[str, ...] | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("the onnxruntime vision backend needs onnxruntime: "
                                      "pip install 'edgevlm[onnx]' (or onnxruntime-gpu)") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
    # ORT's worker threads spin for a while after each run, and in a Pipeline the decoder's prefill runs
    # right after the tower on the same cores: spinning cost the demo's prefill 22 ms (120 -> 97 ms when
    # off, tower +4 ms, 2 cores; edgevlm bench). Sleeping threads lose little here and hand the CPU back.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wanted = list(providers or CPU_PROVIDERS)
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BackendUnavailableError(f"execution providers {missing} are not in this onnxruntime "
                                      f"({ort.__version__}: {available}); for CUDA / TensorRT install "
                                      "onnxruntime-gpu (pip install 'edgevlm[gpu]')")
    try:
        session = ort.InferenceSession(str(path), so, providers=wanted)
    except Exception as e:  # ORT raises its own pybind types for unreadable / invalid graphs
        raise ExportError(f"{path}: ONNX Runtime could not load the graph: {e}") from e
    # ORT quietly falls back to the next provider when one fails to initialise (a missing CUDA library,
    # say); a GPU request that ends up on the CPU is an error, not a slow surprise.
    if session.get_providers()[0] != wanted[0]:
        raise BackendUnavailableError(f"ONNX Runtime could not start {wanted[0]} (session runs on "
                                      f"{session.get_providers()}); check the CUDA / TensorRT libraries")
    return session


class OrtTowerRunner:
    """``(views, masks=None, text=None, order=None) -> torch.Tensor`` backed by an ONNX Runtime session."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, contract: ExportContract, *, threads: int | None = None,
                 providers: tuple[str, ...] | None = None):
        self.contract = contract
        self.session = ort_session(path, threads=threads, providers=providers)
        got = [i.name for i in self.session.get_inputs()]
        if got != contract.input_names:
            raise ExportError(f"{path}: graph inputs {got} do not match the manifest's {contract.input_names}")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, views: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                 text=None, order: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        feed, n = {}, None
        for name, spec in zip(self.contract.encoder_names, self.contract.pixel_inputs):
            if name not in views:
                raise ShapeError(f"no views for encoder {name!r}; got views for {sorted(views)}")
            x = views[name]
            n = x.shape[0] if n is None else n
            want = spec.concrete(n)
            if tuple(x.shape) != want:
                raise ShapeError(f"views for encoder {name!r}: expected {list(want)}, got {list(x.shape)}")
            feed[spec.name] = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        # anyres padding masks: fed where the connector reads them (with a regrouping's order), else checked only
        for name, t in self.contract.token_inputs(masks, order, n).items():
            feed[name] = np.ascontiguousarray(t.numpy())
        instruction = self.contract.instruction_inputs(text, n)  # InstructBLIP: (ids, mask) int64 [n, L]
        if instruction is not None:
            feed[INSTRUCTION_IDS], feed[INSTRUCTION_MASK] = (np.ascontiguousarray(t.numpy()) for t in instruction)
        out = self.session.run(self.contract.output_names, feed)[0]
        return torch.from_numpy(out)


__all__ = ["OrtTowerRunner", "ort_session"]
