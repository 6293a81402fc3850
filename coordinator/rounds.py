"""Round engine decisions (pure): who trains, whether an update counts, when a round closes.

Sync rounds: select devices (with over-selection), accept one update per device started from the
round's base version, close at the target count or at the deadline with at least the quorum; below
quorum at the deadline, the round is extended and the previous model kept (explicit decision).
Async (FedBuff): accept updates up to ``max_staleness`` versions old, weight them down by staleness,
publish a new version every ``buffer_size`` updates.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random

from edge_runtime.errors import RejectReason


class CloseDecision(str, enum.Enum):
    WAIT = "wait"
    CLOSE = "close"
    EXTEND = "extend"  # deadline passed below quorum: keep the previous model, wait longer


@dataclasses.dataclass
class RoundPlan:
    """One synchronous round."""

    round: int
    base_version: int
    opened_at: float
    deadline: float
    selected: list[str] | None  # None: every device may take part
    target: int  # close as soon as this many updates are in
    quorum: int  # minimum to close at the deadline
    accepted: dict[str, str] = dataclasses.field(default_factory=dict)  # device -> update id


def select_devices(online: list[str], per_round: int, over_selection: float, rng: random.Random) -> list[str] | None:
    """Pick ceil(per_round * (1 + over_selection)) of the online devices; None means everyone (per_round <= 0)."""
    if per_round <= 0:
        return None
    k = min(len(online), math.ceil(per_round * (1 + over_selection)))
    return sorted(rng.sample(sorted(online), k))


def plan_round(
    round_id: int,
    base_version: int,
    now: float,
    *,
    online: list[str],
    per_round: int,
    over_selection: float,
    min_updates: int,
    timeout_s: float,
    rng: random.Random,
) -> RoundPlan:
    """Open a round."""
    selected = select_devices(online, per_round, over_selection, rng)
    target = per_round if per_round > 0 else max(min_updates, len(online))
    return RoundPlan(round_id, base_version, now, now + timeout_s, selected, max(target, min_updates), min_updates)


def check_sync_update(plan: RoundPlan, device_id: str, base_version: int, round_id: int | None) -> RejectReason | None:
    """Whether an update may count in this round (None = yes)."""
    if base_version != plan.base_version or (round_id is not None and round_id != plan.round):
        return RejectReason.STALE
    if plan.selected is not None and device_id not in plan.selected:
        return RejectReason.STALE
    if device_id in plan.accepted:  # another update of this device already counts in the round (not this one:
        return RejectReason.TOO_FREQUENT  # "duplicate" tells a device its update counted)
    return None


def close_decision(plan: RoundPlan, now: float) -> CloseDecision:
    """Close at the target, or at the deadline with a quorum; extend below quorum."""
    n = len(plan.accepted)
    if n >= plan.target:
        return CloseDecision.CLOSE
    if now >= plan.deadline:
        return CloseDecision.CLOSE if n >= plan.quorum else CloseDecision.EXTEND
    return CloseDecision.WAIT


def staleness_weight(num_examples: float, staleness: int, exponent: float = 0.5) -> float:
    """FedBuff-style weight: examples / (1 + staleness)^exponent."""
    return num_examples / (1 + max(0, staleness)) ** exponent


def check_async_update(current_version: int, base_version: int, max_staleness: int) -> RejectReason | None:
    """Whether an async update is fresh enough (None = yes)."""
    if base_version > current_version or current_version - base_version > max_staleness:
        return RejectReason.STALE
    return None


def update_fits(
    *,
    mode: str,
    plan: RoundPlan | None,
    current_version: int,
    max_staleness: int,
    device_id: str,
    base_version: int,
    round_id: int | None,
    device_has_open_update: bool,
) -> tuple[RejectReason, str] | None:
    """Why an update does not fit the open round (``mode`` "sync") or version (async), with the detail a
    device is told; None when it fits."""
    if mode == "sync":
        if plan is None:
            return RejectReason.STALE, "no round is open"
        why = check_sync_update(plan, device_id, base_version, round_id)
    else:
        why = check_async_update(current_version, base_version, max_staleness)
        if why is None and device_has_open_update:
            return RejectReason.TOO_FREQUENT, (
                "this device already has an update in the open aggregation "
                f"(async: one per device per version; current v{current_version})"
            )
    if why is None:
        return None
    return why, (
        f"update from base v{base_version} round {round_id} does not fit "
        f"(current v{current_version}, round {plan.round if plan else None})"
    )
