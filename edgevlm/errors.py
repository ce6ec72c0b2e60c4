"""Typed errors raised at edgevlm's boundaries.

Every error edgevlm raises on purpose derives from :class:`EdgeVLMError`, so callers that embed the
runtime (a camera callback, say) can catch one type and keep going. Each subclass also derives from
the closest built-in exception so that generic handlers (``except ValueError``) still work.

Messages say what was expected and what was found.
"""

from __future__ import annotations


class EdgeVLMError(Exception):
    """Base class of every error edgevlm raises deliberately."""


class ConfigError(EdgeVLMError, ValueError):
    """A configuration is inconsistent or names something that does not exist."""


class UnknownPresetError(ConfigError, KeyError):
    """A preset name is not in the preset table."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class ChatTemplateError(ConfigError):
    """A chat template does not parse, tries something the sandbox forbids, or raised an error itself."""


class PromptError(EdgeVLMError, ValueError):
    """Messages are malformed, or the prompt's image placeholders do not match the images given."""


class TokenizerError(EdgeVLMError, ValueError):
    """Text or ids given to a tokenizer are unusable (lone surrogates, ids outside the vocabulary)."""


class BoxFormatError(EdgeVLMError, TypeError, ValueError):
    """A box helper got something other than text / four finite numbers / a sane decimal count.

    Derives from both TypeError (non-str text) and ValueError (bad values) so generic handlers work.
    """


class ImageError(EdgeVLMError, ValueError):
    """An image could not be decoded, or is of a size or mode the runtime refuses."""


class ImageDecodeError(ImageError):
    """The bytes are not a readable image (corrupt, truncated, or not an image at all)."""


class ImageSizeError(ImageError):
    """The image is empty, too large (decompression-bomb guard), or too thin to make a view."""


class CheckpointError(EdgeVLMError, ValueError):
    """A checkpoint is missing, corrupt, truncated, or does not match the configuration."""


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """A weights file that a preset or checkpoint names is not installed."""


class ShapeError(EdgeVLMError, ValueError):
    """A tensor has a shape other than the one a component expects."""


class BackendUnavailableError(EdgeVLMError, RuntimeError):
    """An optional backend (C++ extension, ONNX Runtime, TensorRT, Triton) is not installed."""


class ServingError(EdgeVLMError, RuntimeError):
    """A served model could not be reached, or failed a request in a way no typed error describes."""


class ExportError(EdgeVLMError, RuntimeError):
    """An export (ONNX graph, TensorRT engine, manifest) could not be made or used."""


class ExportValidationError(ExportError):
    """An exported graph's output differs from eager PyTorch by more than the tolerance."""

    def __init__(self, message: str, *, output: str = "", error: float = float("nan"), tolerance: float = 0.0):
        super().__init__(message)
        self.output, self.error, self.tolerance = output, error, tolerance


class CorruptExportError(ExportError):
    """An export folder's manifest or one of its files is unreadable or does not match its recorded hash."""


class StaleExportError(ExportError):
    """An export was made from other weights, or an engine for another GPU / TensorRT version."""


__all__ = [
    "EdgeVLMError",
    "ConfigError",
    "UnknownPresetError",
    "ChatTemplateError",
    "PromptError",
    "TokenizerError",
    "BoxFormatError",
    "ImageError",
    "ImageDecodeError",
    "ImageSizeError",
    "CheckpointError",
    "WeightsNotFoundError",
    "ShapeError",
    "BackendUnavailableError",
    "ServingError",
    "ExportError",
    "ExportValidationError",
    "CorruptExportError",
    "StaleExportError",
]
