"""The coordinator's rounds: which synchronous round is open (its plan: base version, selected devices,
target, quorum, deadline, the updates it counts), when it opens, closes or is extended, and what an
update must match to count (the decisions are pure, coordinator/rounds.py; this part holds the open
plan, records it in the ledger and announces it). Asynchronous mode has no plan: each new version is
announced so devices know a fresh global exists."""

from __future__ import annotations

import logging
import random
import time

from coordinator.config import CoordinatorConfig
from coordinator.publisher import Publisher
from coordinator.rounds import CloseDecision, RoundPlan, close_decision, plan_round, update_fits
from coordinator.state import State
from edge_runtime.errors import RejectReason

log = logging.getLogger("edgefm.coordinator")


class Rounds:
    """The open round of one coordinator (``plan``; None: none open, or async mode)."""

    def __init__(self, cfg: CoordinatorConfig, state: State, publisher: Publisher, *, train_a: bool):
        self.cfg, self.state, self.publisher, self.train_a = cfg, state, publisher, train_a
        self.sync = cfg.mode == "sync"
        self.rng = random.Random(cfg.seed)
        r = state.open_round()
        self.plan: RoundPlan | None = RoundPlan(*r) if r is not None and self.sync else None

    def announce(self, version: int) -> None:
        """Announce (retained) the open sync round, or in async mode that ``version`` is the newest global."""
        if self.sync and self.plan is None:
            return
        base = self.plan.base_version if self.plan else version
        self.publisher.round(mode=self.cfg.mode, base_version=base, train_a=self.train_a, plan=self.plan)

    def reannounce(self) -> None:
        """After a reconnect: the open sync round again (an async announcement is made per new version only;
        one on every reconnect would start a session on every device)."""
        if self.plan is not None:
            self.announce(self.plan.base_version)

    def open(self, version: int) -> RoundPlan:
        """Open the next synchronous round on ``version`` and announce it."""
        cfg = self.cfg
        plan = plan_round(
            self.state.last_round() + 1,
            version,
            time.time(),
            online=self.state.online_devices(),
            per_round=cfg.devices_per_round,
            over_selection=cfg.over_selection,
            min_updates=cfg.min_updates,
            timeout_s=cfg.round_timeout_s,
            rng=self.rng,
        )
        self.state.record_round(
            plan.round, "sync", plan.base_version, plan.opened_at, plan.deadline, plan.selected, plan.target, plan.quorum
        )
        self.plan = plan
        self.announce(version)
        log.info(
            "round %d open: base v%d, target %d, quorum %d, deadline in %.0fs",
            plan.round,
            plan.base_version,
            plan.target,
            plan.quorum,
            plan.deadline - plan.opened_at,
        )
        return plan

    def due(self, now: float, version: int, *, connected: bool) -> int | None:
        """Periodic work (sync mode): open a round when none is open and the fleet can hear it, extend
        one below quorum at its deadline; the round to close now, if any."""
        if self.plan is None:
            if connected and not self.finished():
                self.open(version)
            return None
        d = close_decision(self.plan, now)
        if d == CloseDecision.EXTEND:
            self.plan.deadline = now + self.cfg.round_timeout_s
            self.state.extend_round(self.plan.round, self.plan.deadline)
            log.info(
                "round %d below quorum (%d/%d) at deadline: previous model kept, extended",
                self.plan.round,
                len(self.plan.accepted),
                self.plan.quorum,
            )
        return self.plan.round if d == CloseDecision.CLOSE else None

    def finished(self) -> bool:
        """``max_rounds`` rounds closed with a new version."""
        return bool(self.cfg.max_rounds) and self.state.closed_rounds() >= self.cfg.max_rounds

    def fits(
        self, device_id: str, base_version: int, round_id: int | None, *, version: int, device_has_open_update: bool
    ) -> tuple[RejectReason, str] | None:
        """Why an update does not fit the open round or version; None when it does."""
        return update_fits(
            mode=self.cfg.mode,
            plan=self.plan,
            current_version=version,
            max_staleness=self.cfg.max_staleness,
            device_id=device_id,
            base_version=base_version,
            round_id=round_id,
            device_has_open_update=device_has_open_update,
        )

    def counted(self, device_id: str, update_id: str) -> None:
        """An update of the open round was accepted."""
        if self.plan is not None:
            self.plan.accepted[device_id] = update_id

    def recount(self, accepted: list[tuple[str, str]]) -> None:
        """After a replay: the open round counts exactly these (update id, device id)."""
        if self.plan is not None:
            self.plan.accepted = {device_id: update_id for update_id, device_id in accepted}

    def closed(self, round_id: int, version: int, metrics: dict) -> None:
        """The round made ``version``."""
        self.state.close_round(round_id, version, metrics)
        self.plan = None
