"""When to train: a pure decision over plain numbers (tested with tables)."""
from __future__ import annotations

import dataclasses
import enum


class TrainDecision(str, enum.Enum):
    """Outcome of the training policy, recorded in status."""

    TRAIN = "train"
    NOT_ENOUGH_DATA = "not_enough_data"
    BUSY = "busy"                  # serving load: yield to requests
    OUTSIDE_WINDOW = "outside_window"
    PAUSED = "paused"              # disk full or paused by the operator
    COOLDOWN = "cooldown"


@dataclasses.dataclass(frozen=True)
class TrainPolicy:
    """Knobs from the device profile / agent config."""

    min_new_examples: int = 16
    max_inflight_requests: int = 0          # an automatic session starts only when at most this many requests run
    window_hours: tuple[int, int] | None = None   # e.g. (0, 6): train only between 00:00 and 06:00 local time
    cooldown_s: float = 10.0


def decide(policy: TrainPolicy, *, new_examples: int, inflight_requests: int, hour: int, paused: bool,
           seconds_since_last: float, forced: bool = False) -> TrainDecision:
    """Whether to start a training session now."""
    if paused:
        return TrainDecision.PAUSED
    if forced:
        return TrainDecision.TRAIN
    if new_examples < policy.min_new_examples:
        return TrainDecision.NOT_ENOUGH_DATA
    if policy.window_hours is not None:
        start, end = policy.window_hours
        inside = start <= hour < end if start <= end else (hour >= start or hour < end)
        if not inside:
            return TrainDecision.OUTSIDE_WINDOW
    if seconds_since_last < policy.cooldown_s:
        return TrainDecision.COOLDOWN
    if inflight_requests > policy.max_inflight_requests:
        return TrainDecision.BUSY
    return TrainDecision.TRAIN


def session_steps(*, new_examples: int, batch: int, replay_fraction: float, min_steps: int, max_steps: int) -> int:
    """Optimizer steps for one session: enough for every new example to be used once (each batch
    carries ``batch * (1 - replay_fraction)`` new ones), at least ``min_steps``, at most ``max_steps``."""
    per_step = max(1, batch - int(round(batch * replay_fraction)))
    needed = -(-new_examples // per_step)
    return max(1, min(max_steps, max(min_steps, needed)))

