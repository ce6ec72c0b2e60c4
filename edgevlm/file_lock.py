"""An exclusive lock between processes (and threads) on a lock file, one per cache entry.

Filling a cache entry (an exported tower, a converted checkpoint) takes seconds to minutes. Two
processes that start it together, such as several robot processes or server workers launched at
once, must not both write it and race on the final rename: the first takes the lock and fills the
entry, the others wait for it and then find the entry made.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock: Path, what: str, *, announce: bool = True) -> Iterator[None]:
    """Holds the file ``lock`` (created with its folder; left in place, it is empty) for the ``with``
    block. ``what`` names the entry it guards; ``announce``: say on stderr when another process holds
    it, so a wait of minutes is not silent.

    POSIX ``flock`` (released by the kernel if the holder dies); ``msvcrt.locking`` on Windows."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as f:
        if not _try_lock(f):
            if announce:
                print(f"edgevlm: waiting for another process filling {what}", file=sys.stderr, flush=True)
            _lock(f)
        try:
            yield
        finally:
            _unlock(f)


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(f) -> bool:
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock(f) -> None:
        while not _try_lock(f):
            time.sleep(0.2)

    def _unlock(f) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(f) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _lock(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)

    def _unlock(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


__all__ = ["exclusive"]
