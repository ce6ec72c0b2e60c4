"""Camera streams: many cameras on one Pipeline, newest frame first, one batched tower call per round,
deadline-aware answers, and temporal token reuse between a camera's frames (docs/streams.md)."""

from edgevlm.runtime.temporal import ReuseReport, TemporalReuse

from .camera import Camera, CameraStats, Skip, StreamResult
from .scheduler import plan_round
from .streams import Streams

__all__ = ["Streams", "Camera", "CameraStats", "StreamResult", "Skip", "TemporalReuse", "ReuseReport", "plan_round"]
