"""edgevlm.runtime: model definitions, checkpoint readers, preprocessing, and the vision tower API."""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy so that `import edgevlm.runtime.readers` does not build the whole tower machinery.
    if name in ("load_vision_tower", "VisionTower", "VisionTowerModel"):
        from . import tower

        return getattr(tower, name)
    raise AttributeError(name)


__all__ = ["load_vision_tower", "VisionTower", "VisionTowerModel"]
