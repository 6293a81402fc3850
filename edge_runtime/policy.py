"""When to train: a pure decision over plain numbers (tested with tables)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence


class TrainDecision(str, enum.Enum):
    """Outcome of the training policy, recorded in status."""

    TRAIN = "train"
    NOT_ENOUGH_DATA = "not_enough_data"
    BUSY = "busy"  # serving load: yield to requests
    OUTSIDE_WINDOW = "outside_window"
    PAUSED = "paused"  # disk full or paused by the operator
    COOLDOWN = "cooldown"


@dataclasses.dataclass(frozen=True)
class TrainPolicy:
    """Knobs from the device profile / agent config."""

    min_new_examples: int = 16
    max_inflight_requests: int = 0  # an automatic session starts only when at most this many requests run
    window_hours: tuple[int, int] | None = None  # e.g. (0, 6): train only between 00:00 and 06:00 local time
    cooldown_s: float = 10.0


def decide(
    policy: TrainPolicy,
    *,
    new_examples: int,
    inflight_requests: int,
    hour: int,
    paused: bool,
    seconds_since_last: float,
    forced: bool = False,
) -> TrainDecision:
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


class RoundAction(str, enum.Enum):
    """What a device does with a pending round announcement."""

    RUN = "run"  # answer it with a session now
    WAIT = "wait"  # keep it pending: its global (or data to train on) has not arrived yet
    DROP = "drop"  # not for this device, already answered, or overtaken by a newer global


def round_action(
    *,
    round_epoch: str | None,
    round_base: int | None,
    selected: Sequence[str] | None,
    session_key: str,
    device_id: str,
    fleet_epoch: str | None,
    global_version: int,
    sessions_done: list[str],
    has_training_data: bool,
) -> RoundAction:
    """Whether a round announcement is due on this device (a pure decision over what the device knows)."""
    if round_epoch and round_epoch != fleet_epoch:
        return RoundAction.WAIT  # a round of another lineage: its global comes first
    base = round_base or 0
    if (selected is not None and device_id not in selected) or session_key in sessions_done or base < global_version:
        return RoundAction.DROP
    if base > global_version or not has_training_data:
        return RoundAction.WAIT
    return RoundAction.RUN
