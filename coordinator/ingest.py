"""Ingest: device updates in, each ``Accepted`` or ``Rejected(reason)``, made durable in batches.

- ``IngestQueue``: paho's thread only queues (bounded: back-pressure onto the broker); one worker
  thread takes what is queued in batches and hands each batch to the coordinator.
- ``Intake``: one update through the pipeline, inside a batch: checks that need no coordinator state
  (coordinator/validate.py), an id seen before (its first answer again), whether it fits the open round
  or version (the coordinator's ``fits``), then recorded, held and folded (coordinator/aggregation.py).
  A batch is one SQLite transaction; its accepted payloads go to the update log before the commit
  (group commit); if it does not commit, the aggregate is rebuilt from durable state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, ClassVar, Iterator, Union

from coordinator.aggregation import Held, OpenAggregate
from coordinator.state import State
from coordinator.validate import Limits, validate_update
from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol.messages import ReceiptStatus, UpdateHeader

log = logging.getLogger("edgefm.coordinator")


@dataclasses.dataclass(frozen=True)
class Accepted:
    """The update counts: recorded and folded (or held to be judged) in the open aggregate."""

    update_id: str
    accepted: ClassVar[bool] = True
    receipt: ClassVar[ReceiptStatus] = ReceiptStatus.ACCEPTED


@dataclasses.dataclass(frozen=True)
class Rejected:
    """The update does not count, and why (``DUPLICATE``: it already counted)."""

    update_id: str
    reason: RejectReason
    detail: str
    accepted: ClassVar[bool] = False

    @property
    def receipt(self) -> ReceiptStatus:
        return ReceiptStatus.DUPLICATE if self.reason == RejectReason.DUPLICATE else ReceiptStatus.REJECTED


Outcome = Union[Accepted, Rejected]
Message = tuple[str, bytes, bool, Callable[[], None]]  # topic, payload, retained, ack (PUBACK once durable)


class IngestQueue:
    """Messages from the link, taken by one worker in batches of at most ``cap()``."""

    def __init__(self, maxsize: int, cap: Callable[[], int], process: Callable[[list[Message]], object]):
        self._queue: queue.Queue[Message] = queue.Queue(maxsize=maxsize)
        self.cap, self.process = cap, process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def put(self, message: Message, timeout: float | None = None) -> None:
        """Queue one message (blocks while the queue is full)."""
        self._queue.put(message, timeout=timeout)

    def __len__(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="edgefm-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _take_batch(self, first: Message) -> list[Message]:
        items = [first]
        cap = self.cap()
        while len(items) < cap:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            items = self._take_batch(first)
            try:
                self.process(items)
            except Exception:  # not committed: no PUBACK, the broker delivers these again after a reconnect
                log.exception("%d messages not acknowledged", len(items))


class Intake:
    """The per-update pipeline over one coordinator's state and open aggregate. ``rebuild()``: restore
    the in-memory aggregate from durable state after a batch that did not commit."""

    def __init__(
        self, state: State, open_agg: OpenAggregate, limits: Limits, lock: threading.RLock, rebuild: Callable[[], object]
    ):
        self.state, self.open, self.limits, self.lock, self.rebuild = state, open_agg, limits, lock, rebuild
        self._depth = 0
        self._payloads: list[tuple[str, bytes]] = []  # accepted in the open batch, stored before it commits

    def forget_pending(self) -> None:
        """Drop payloads of a batch that will not commit (the aggregate is being rebuilt)."""
        self._payloads = []

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the lock and one state transaction; nested uses join the enclosing batch. If it does not
        commit, the in-memory aggregate is rebuilt (it may hold folds of updates that are now not recorded)."""
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            self._payloads = []
            try:
                with self.state.transaction():
                    yield
                    checkpointed = self._persist()
            except BaseException:
                log.exception("ingest batch did not commit; rebuilding the aggregate from durable state")
                self.rebuild()
                raise
            finally:
                self._depth = 0
            if checkpointed:
                self.state.prune_after_checkpoint()

    def _persist(self) -> bool:
        """Before the batch commits: its accepted payloads into the update log; and once the log holds
        more than a checkpoint of the accumulator would take, that checkpoint too (two generations are
        kept, coordinator/state.py), after which the log before it can go. Whether it checkpointed."""
        pending, self._payloads = self._payloads, []
        if not pending:
            return False
        for update_id, payload in pending:
            self.state.set_update_blob(update_id, self.state.log.append(payload))
        return self.open.checkpoint_if_due()

    def update(
        self, device_id: str, payload: bytes, version: int, fits: Callable[[str, UpdateHeader], tuple[RejectReason, str] | None]
    ) -> Outcome:
        """Check one update and fold it in (durable when the batch commits), or record why not;
        ``version``: the current global; ``fits``: why it does not fit the open round or version, (reason,
        detail), or None when it does. Never raises on bad input."""
        with self.batch():
            try:
                upd = validate_update(device_id, payload, self.limits)
            except ProtocolError as exc:
                header = getattr(exc, "header", None)
                seen = self.seen(header.update_id) if header is not None else None
                return seen or self.reject(device_id, header, exc.reason, exc.detail, len(payload))
            header = upd.header
            seen = self.seen(header.update_id)
            if seen is not None:
                return seen
            misfit = fits(device_id, header)
            if misfit is not None:
                return self.reject(device_id, header, misfit[0], misfit[1], len(payload))
            if not self.state.record_update(
                update_id=header.update_id,
                device_id=device_id,
                round_id=header.round,
                base_version=header.base_version,
                num_examples=header.num_examples,
                status="accepted",
                reason=None,
                detail=None,
                blob=None,
                nbytes=len(payload),
                weight=None,
                norm=upd.norm,
            ):
                return Rejected(header.update_id, RejectReason.DUPLICATE, "already counted")
            self._payloads.append((header.update_id, payload))  # stored by _persist before the commit
            self.state.count_device(device_id, accepted=True)
            # bounded against the fleet's recent updates, then folded (held while there are too few to judge)
            self.open.hold(
                Held(
                    header.update_id,
                    device_id,
                    header.num_examples,
                    upd.norm,
                    version - header.base_version,
                    upd.tensors,
                    upd.flat,
                )
            )
            self.open.release()
            return Accepted(header.update_id)

    def seen(self, update_id: str) -> Rejected | None:
        """The answer to an update id already recorded (a resend: its first receipt may have been lost):
        "duplicate" when it counted, else the rejection it got then, again (found by tests/test_chaos.py:
        a resent *rejected* update was answered "duplicate, already counted" and the device counted it)."""
        outcome = self.state.update_outcome(update_id)
        if outcome is None:
            return None
        status, reason, detail = outcome
        if status == "rejected":
            return Rejected(update_id, RejectReason(reason), detail or "")
        return Rejected(update_id, RejectReason.DUPLICATE, "already counted")

    def reject(self, device_id: str, header: UpdateHeader | None, reason: RejectReason, detail: str, nbytes: int) -> Rejected:
        """Record a refused update (an unparsable one under a made-up id) and count it against the device."""
        uid = header.update_id if header is not None else f"unparsed-{time.time_ns()}"
        self.state.record_update(
            update_id=uid,
            device_id=device_id,
            round_id=getattr(header, "round", None),
            base_version=getattr(header, "base_version", -1),
            num_examples=getattr(header, "num_examples", 0),
            status="rejected",
            reason=reason.value,
            detail=detail[:500],
            blob=None,
            nbytes=nbytes,
            weight=0.0,
        )
        self.state.count_device(device_id, accepted=False)
        log.info("rejected update %s from %s: %s (%s)", uid, device_id, reason.value, detail)
        return Rejected(uid, reason, detail)
