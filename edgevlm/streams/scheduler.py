"""Which of a round's frames to answer, and in what order: earliest deadline first, and under overload
the frames to skip chosen so that the others meet their budgets and no camera starves (pure logic, no
threads: tested alone).

A round encodes its frames in one tower call, then answers them one by one. With ``tower_s`` the
expected tower time per frame and ``answer_s[camera]`` each camera's expected answer time, the frame at
place i of the deadline order finishes at

    now + tower_s * (frames kept) + the answer times of the frames before it and its own

While some frame would finish past its deadline, one frame is skipped: the one whose removal leaves the
fewest frames late; among those, the frame of the camera answered most recently (so that a camera
whose frames keep losing to another's gets its turn: with equal costs the cameras alternate), then the
one with the latest deadline, then the one last in deadline order. Each skip says why.

A frame of a camera in ``must`` is never skipped: the caller (:class:`~.streams.Streams`) names the
cameras whose frames were skipped 10 times in a row, so that an estimate grown too pessimistic (a slow first answer, a
busy moment) is measured again instead of starving that camera for good.
"""

from __future__ import annotations

from collections.abc import Sequence

from .camera import Frame


def _late(order: list[Frame], now: float, tower_s: float, answer_s: dict[str, float]) -> list[tuple[Frame, float]]:
    """(frame, seconds past its deadline) for the frames of ``order`` (deadline order) that would be late."""
    clock = now + tower_s * len(order)
    out = []
    for f in order:
        clock += answer_s.get(f.camera, 0.0)
        if clock > f.deadline:
            out.append((f, clock - f.deadline))
    return out


def plan_round(frames: Sequence[Frame], now: float, tower_s: float, answer_s: dict[str, float],
               skip_late: bool = True, last_answer: dict[str, float] | None = None,
               must: frozenset[str] | set[str] = frozenset()) -> tuple[list[Frame], list[tuple[Frame, str]]]:
    """-> (frames to answer, in deadline order; (frame, why) for each skipped). ``last_answer[camera]``:
    when the camera was last answered (absent: never, the highest claim); ``must``: cameras whose frames
    are answered even if late. Unknown estimates count as 0."""
    order = sorted(frames, key=lambda f: (f.deadline, f.t, f.camera))
    if not skip_late:
        return order, []
    last = last_answer or {}
    skipped: list[tuple[Frame, str]] = []
    while late := _late(order, now, tower_s, answer_s):
        late_by = dict((id(f), s) for f, s in late)

        def cost(i: int) -> tuple:
            f = order[i]
            rest = order[:i] + order[i + 1:]
            return (len(_late(rest, now, tower_s, answer_s)), -last.get(f.camera, float("-inf")), -f.deadline, -i)

        free = [i for i, f in enumerate(order) if f.camera not in must]
        if not free:  # only frames that must be answered are left: they will be, late
            break
        victim = order[min(free, key=cost)]
        order = [g for g in order if g is not victim]
        if id(victim) in late_by:
            why = (f"expected to answer {late_by[id(victim)] * 1e3:.0f} ms after its deadline (tower "
                   f"{tower_s * (len(order) + 1) * 1e3:.0f} ms for {len(order) + 1} frames, then the answers before it)")
        else:
            names = ", ".join(repr(f.camera) for f, _ in late)
            why = f"its turn went to camera {names}, which would otherwise miss its budget"
        skipped.append((victim, why))
    return order, skipped


__all__ = ["plan_round"]
