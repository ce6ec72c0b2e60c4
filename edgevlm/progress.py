"""Progress bars for long work (loading, export, engine builds): one bar over named stages."""

from __future__ import annotations

import contextlib


class Stages:
    """``with stages("name"): ...`` shows the stage's name on the bar, then advances it. Disabled, it
    draws nothing; either way the stages run."""

    def __init__(self, names: list[str], desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc=desc, unit="step", disable=not enabled, leave=False)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.bar.set_postfix_str(name)
        yield
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


__all__ = ["Stages"]
