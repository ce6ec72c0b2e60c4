"""``edgevlm convert`` on the source kinds added after it (MiniGPT-4 eval configs, xGen-MM / BLIP-3
folders): convert reads every source through the generic ``read_parts``, so these convert with no code
of their own and load back as the same model, bit for bit (:func:`test_convert.assert_same_model`).

Kept apart from test_convert.py because it imports those kinds' fixtures from their own test files.
"""

from __future__ import annotations

from test_convert import IMAGE, _converted, assert_same_model
from test_minigpt4 import minigpt4  # noqa: F401  (module fixtures, reused as they are)
from test_xgenmm import xgenmm  # noqa: F401


def test_minigpt4_eval_config(minigpt4, tmp_path):  # noqa: F811
    out = _converted(minigpt4["folder"], tmp_path)
    a, b = assert_same_model(minigpt4["folder"], out, IMAGE)
    assert b.chat.image_token == a.chat.image_token and b.chat.image_placement == a.chat.image_placement


def test_xgenmm_folder(xgenmm, tmp_path):  # noqa: F811
    _, folder, _ = xgenmm
    out = _converted(folder, tmp_path)
    a, b = assert_same_model(folder, out, IMAGE)
    assert b.tower.config == a.tower.config and b.tower.config.views.kind == a.tower.config.views.kind
