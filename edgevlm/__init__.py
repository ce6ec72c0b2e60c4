"""edgevlm: an edge-optimised runtime for multimodal LLMs of the SPHINX / BLIP-2 / BLIP-3 / LLaVA family.

The facade is small: configs and presets, the typed errors, and (from :mod:`edgevlm.runtime`) the
loaders. Heavy modules are imported lazily so that ``import edgevlm`` stays fast.
"""

from __future__ import annotations

from .config import (
    ConvNeXtConfig, DecoderConfig, EfficientNetConfig, EncoderConfig, LinearConnectorConfig, MLPConnectorConfig,
    ModelConfig, QFormerConfig, QFormerConnectorConfig, ResamplerConnectorConfig, SphinxFusionConfig, TowerConfig,
    ViewConfig, ViTConfig, WeightsRef,
)
from .errors import (
    BackendUnavailableError, BoxFormatError, ChatTemplateError, CheckpointError, ConfigError, EdgeVLMError, ImageDecodeError,
    ImageError, ImageSizeError, PromptError, ServingError, ShapeError, TokenizerError, UnknownPresetError,
    WeightsNotFoundError,
)
from .presets import get_preset, preset_names

__version__ = "0.1.0"


def _warn_if_checkout_on_sys_path() -> None:
    """Python started from a source checkout (``python -c``, a notebook, ``python -m ...``) has the
    checkout root on sys.path, where kernels/, export/, runtime/ and train/ stand in for installed
    packages of those names; transformers imports Hugging Face's ``kernels`` and fails far from here."""
    import os
    import sys
    import warnings
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "kernels" / "__init__.py").is_file():
        return  # an installed wheel, not a checkout
    if any(Path(p or os.getcwd()).resolve() == root for p in sys.path):
        warnings.warn(f"the edgevlm checkout {root} is on sys.path, so its folders kernels/, export/, runtime/ "
                      f"and train/ shadow installed packages of those names (transformers imports `kernels`). "
                      f"Start Python with -P or PYTHONSAFEPATH=1, or from another folder.",
                      RuntimeWarning, stacklevel=3)


_warn_if_checkout_on_sys_path()


def load_vision_tower(source, **kwargs):
    """See :func:`edgevlm.runtime.load_vision_tower`."""
    from edgevlm.runtime import load_vision_tower as _load

    return _load(source, **kwargs)


__all__ = [
    "__version__", "load_vision_tower", "get_preset", "preset_names",
    "ModelConfig", "TowerConfig", "DecoderConfig", "ViewConfig", "EncoderConfig", "ViTConfig", "ConvNeXtConfig",
    "EfficientNetConfig", "QFormerConfig", "LinearConnectorConfig", "MLPConnectorConfig", "QFormerConnectorConfig",
    "ResamplerConnectorConfig", "SphinxFusionConfig", "WeightsRef",
    "EdgeVLMError", "ConfigError", "UnknownPresetError", "ImageError", "ImageDecodeError", "ImageSizeError",
    "CheckpointError", "WeightsNotFoundError", "ShapeError", "BackendUnavailableError", "ChatTemplateError",
    "PromptError", "TokenizerError", "BoxFormatError", "ServingError",
]


def load(source, options=None, **overrides):
    """Load a :class:`~edgevlm.runtime.pipeline.Pipeline`: a preset name, an edgevlm checkpoint folder,
    a transformers folder (LlamaForCausalLM, LlavaForConditionalGeneration) or a ``.gguf`` file.
    ``options`` is a :class:`~edgevlm.options.LoadOptions`; keywords name its fields (``device``,
    ``dtype``, ``quant``, ...). See :func:`edgevlm.loading.load` for what each does."""
    from .loading import load as _load

    return _load(source, options, **overrides)


def __getattr__(name: str):
    if name == "LoadOptions":  # lazy like load(): options.py imports torch
        from .options import LoadOptions

        return LoadOptions
    raise AttributeError(f"module 'edgevlm' has no attribute {name!r}")


__all__ += ["load", "LoadOptions"]
