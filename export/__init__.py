"""ONNX / TensorRT export of the vision tower and projector.

* :func:`export_tower` / :func:`export_model` write an export folder (graph, manifest, engine);
* :func:`open_export` checks one and returns a runner the :class:`~edgevlm.runtime.tower.VisionTower`
  uses in place of the eager model (``edgevlm.load(..., vision_backend="onnxruntime")`` does this);
* :class:`ExportContract` is the data both the ONNX exporter and the TensorRT profiles read.
"""

from .api import BACKENDS, cache_dir, cached_export, export_model, export_tower, open_export
from .contract import ExportContract, Profile, TensorSpec
from .manifest import Manifest, read_manifest, tower_digest

__all__ = ["export_tower", "export_model", "open_export", "cached_export", "cache_dir", "BACKENDS",
           "ExportContract", "Profile", "TensorSpec", "Manifest", "read_manifest", "tower_digest"]
