"""The agent's work queue: what MQTT's network thread, request threads and the inbox hand to the
agent's own worker thread, which alone does model work (evaluating a global, training). Producers only
put and wake; nothing here computes.

- a received global: the newest one of a lineage wins (an older one still queued is dropped);
- a round announcement: kept until it is due (edge_runtime/policy.py:round_action);
- training asked for by hand: a flag (``train_now``) or a future per waiting request (``train_and_wait``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Callable

from edge_runtime.policy import RoundAction, TrainDecision
from edge_runtime.protocol.messages import GlobalPointer, RoundAnnouncement

log = logging.getLogger("edgefm.agent")

# a round whose session did not run for one of these reasons is tried again at the next wake-up (another
# session was running, the disk was full, requests were being served, an announcement came outside the
# training window)
RETRY = ("already_training", TrainDecision.PAUSED.value, TrainDecision.BUSY.value, TrainDecision.OUTSIDE_WINDOW.value)


class WorkQueue:
    """Pending work for one worker thread; every method is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self._global: tuple[GlobalPointer, bytes] | None = None
        self._round: RoundAnnouncement | None = None
        self._train_requested = False
        self._waiters: list[concurrent.futures.Future] = []

    def put_global(self, pointer: GlobalPointer, blob: bytes) -> None:
        """A verified global adapter arrived (the newest of its lineage replaces one still queued)."""
        with self._lock:
            pending = self._global
            if pending is None or pointer.epoch != pending[0].epoch or pointer.version > pending[0].version:
                self._global = (pointer, blob)
        self.wake.set()

    def put_round(self, msg: RoundAnnouncement) -> None:
        """A round announcement arrived (it replaces one not yet answered)."""
        with self._lock:
            self._round = msg
        self.wake.set()

    def request_training(self) -> None:
        """A session as soon as possible, nobody waiting for its result."""
        with self._lock:
            self._train_requested = True
        self.wake.set()

    def wait_for_training(self) -> concurrent.futures.Future:
        """A session as soon as possible; the future gets its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._waiters.append(fut)
        self.wake.set()
        return fut

    def take_global(self) -> tuple[GlobalPointer, bytes] | None:
        with self._lock:
            pending, self._global = self._global, None
        return pending

    def peek_round(self) -> RoundAnnouncement | None:
        with self._lock:
            return self._round

    def drop_round(self, msg: RoundAnnouncement) -> None:
        """Forget ``msg`` (answered or not for this device) unless a newer one replaced it meanwhile."""
        with self._lock:
            if self._round is msg:
                self._round = None

    def retry_round(self, msg: RoundAnnouncement) -> None:
        """Keep ``msg`` pending for the next wake-up (unless a newer announcement came meanwhile)."""
        with self._lock:
            self._round = self._round or msg

    def take_training_requests(self) -> tuple[bool, list[concurrent.futures.Future]]:
        """Whether a session was asked for, and the futures waiting on it."""
        with self._lock:
            requested, self._train_requested = self._train_requested, False
            waiters, self._waiters = self._waiters, []
        return requested, waiters


class Worker:
    """The loop of the agent's worker thread over a WorkQueue: a queued global first (``consider_global``),
    then a session (``train(forced, round_msg)``) when a round is due (``round_due``), one was asked for,
    or ``auto_train``; ``housekeeping()`` runs at most every ``housekeeping_s``."""

    def __init__(
        self,
        queue: WorkQueue,
        *,
        consider_global: Callable[[GlobalPointer, bytes], None],
        train: Callable[[bool, RoundAnnouncement | None], dict] | None,
        round_due: Callable[[RoundAnnouncement], RoundAction],
        auto_train: bool,
        housekeeping: Callable[[], None],
        on_event: Callable[..., None],
        housekeeping_s: float = 3600,
    ):
        self.queue, self.consider_global, self.train, self.round_due = queue, consider_global, train, round_due
        self.auto_train, self.housekeeping, self.on_event, self.housekeeping_s = (
            auto_train,
            housekeeping,
            on_event,
            housekeeping_s,
        )

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: wait for work (at most a second), do it; answers waiting requests at the end."""
        last = 0.0
        while not stop.is_set():
            self.queue.wake.wait(1.0)
            self.queue.wake.clear()
            if stop.is_set():
                break
            try:
                self.once()
                if time.time() - last > self.housekeeping_s:
                    last = time.time()
                    self.housekeeping()
            except Exception:  # the daemon keeps serving whatever a training or evaluation bug does
                log.exception("agent worker error")
        for fut in self.queue.take_training_requests()[1]:
            fut.set_result({"status": "stopping"})

    def take_due_round(self) -> RoundAnnouncement | None:
        """The pending round announcement a session should answer now, if any (it stays pending while it waits)."""
        msg = self.queue.peek_round()
        if msg is None:
            return None
        action = self.round_due(msg)
        if action == RoundAction.WAIT:
            return None
        self.queue.drop_round(msg)
        return msg if action == RoundAction.RUN else None

    def once(self) -> None:
        """Whatever is pending now."""
        pending = self.queue.take_global()
        if pending:
            self.consider_global(*pending)
        if self.train is None:
            return
        round_msg = self.take_due_round()
        requested, waiters = self.queue.take_training_requests()
        if round_msg is None and not (requested or waiters or self.auto_train):
            return
        try:
            result = self.train(requested or bool(waiters), round_msg)
        except Exception as exc:
            for fut in waiters:
                fut.set_exception(exc)
            raise
        for fut in waiters:
            fut.set_result(result)
        if round_msg is not None and result.get("status") in RETRY:
            self.queue.retry_round(round_msg)
        elif round_msg is not None and result.get("status") != "trained":
            self.on_event("round_skipped", round=round_msg.round, status=result.get("status"), error=result.get("error"))
