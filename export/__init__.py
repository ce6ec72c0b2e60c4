"""ONNX / TensorRT export of the vision tower and projector (see the export issue)."""
