"""Which of a round's frames to answer, and in what order: earliest deadline first, skipping a frame that
cannot meet its camera's budget rather than answering it late (pure logic, no threads: tested alone).

A round encodes its frames in one tower call, then answers them one by one. With ``tower_s`` the
expected tower time per frame and ``answer_s[camera]`` each camera's expected answer time, the frame at
place i of the deadline order finishes at

    now + tower_s * (frames kept) + sum of answer times of the frames before it and its own

A frame predicted to finish past its deadline is skipped, and so is one whose share of the tower call
would push an earlier-deadline frame past its own; the skip says which, and by how much.
"""

from __future__ import annotations

from collections.abc import Sequence

from .camera import Frame


def plan_round(frames: Sequence[Frame], now: float, tower_s: float, answer_s: dict[str, float],
               skip_late: bool = True) -> tuple[list[Frame], list[tuple[Frame, str]]]:
    """-> (frames to answer, in order; (frame, why) for each skipped). Unknown estimates count as 0."""
    order = sorted(frames, key=lambda f: (f.deadline, f.t, f.camera))
    if not skip_late:
        return order, []
    kept: list[Frame] = []
    skipped: list[tuple[Frame, str]] = []
    for f in order:
        trial = kept + [f]
        tower = tower_s * len(trial)
        clock, worst = now + tower, None
        for g in trial:
            clock += answer_s.get(g.camera, 0.0)
            over = clock - g.deadline
            if over > 0 and (worst is None or over > worst[1]):
                worst = (g, over)
        if worst is None:
            kept = trial
        elif worst[0] is f:
            skipped.append((f, f"expected to answer {worst[1] * 1e3:.0f} ms after its deadline "
                               f"(tower {tower * 1e3:.0f} ms for {len(trial)} frames, then the answers before it)"))
        else:
            skipped.append((f, f"its share of the tower call would make camera {worst[0].camera!r} "
                               f"{worst[1] * 1e3:.0f} ms late"))
    return kept, skipped


__all__ = ["plan_round"]
