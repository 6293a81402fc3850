"""The coordinator process: the core (coordinator/core.py) run on an MQTT link with its threads.

Parts: core.py (the logic over the state), ingest.py (queue, per-update pipeline -> Accepted | Rejected,
group commit), aggregation.py (the open aggregate, its checkpoints and replay, the new global),
strategies.py, schedule.py (the open round; its decisions are pure functions in rounds.py), versions.py,
publisher.py (what goes to the fleet over a ``Link``), state.py (the ledger: all SQL, versions, blobs,
update log), admin.py (publish/rollback requests from the CLI).

Threads: paho's network thread only queues messages (``enqueue``; bounded: back-pressure onto the
broker); the ingest worker takes what is queued in batches (``ingest``) and sends the PUBACKs only once
a batch is durable (manual acknowledgement), so every acknowledged update survives a SIGKILL and an
update whose batch did not commit is delivered again; the round loop opens and closes rounds and
serves admin requests.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.config import CoordinatorConfig
from coordinator.core import CoordinatorCore
from coordinator.ingest import IngestQueue
from edge_runtime.errors import ConfigError

if TYPE_CHECKING:
    from edge_runtime.transport import Link

log = logging.getLogger("edgefm.coordinator")


class Coordinator(CoordinatorCore):
    """One coordinator serving one fleet."""

    def __init__(self, cfg: CoordinatorConfig):
        super().__init__(cfg)
        self._stop = threading.Event()
        # bounded: back-pressure onto the broker; with the batch being worked on, at most 2 x ingest_batch
        # payloads are in memory whatever the number of updates in a round
        self.inbox = IngestQueue(cfg.ingest_batch, cap=self._batch_cap, process=self.ingest)

    # ------------------------------------------------------------------ MQTT
    def start(self, link: Link | None = None) -> None:
        """Connect and start the round loop and the ingest worker. ``link``: one made by the caller
        (delivering to ``enqueue``, calling ``on_connect``), else an MqttLink to ``cfg.broker``
        (persistent session, PUBACK only once an update is durable)."""
        # files a crash left behind (a checkpoint whose commit never happened); only here, in the
        # serving process: admin commands open the same state while a coordinator may be writing it
        self.state.prune_after_checkpoint()
        if self.cfg.keep_large_buffers:
            from edge_runtime.memory import keep_large_buffers

            keep_large_buffers()
        if link is None:
            if self.cfg.broker is None:
                raise ConfigError(
                    "the coordinator needs a broker URL to serve (the CLI starts an embedded one when none is given)"
                )
            from edge_runtime.transport import MqttLink

            link = MqttLink(
                self.cfg.broker,
                f"edgefm-coordinator-{self.cfg.fleet}",
                on_message=self.enqueue,
                on_connect=self.on_connect,
                clean_start=False,
                manual_ack=True,
            )
        self.attach(link)
        link.subscribe(self.topics.all_devices("status"), 1)
        link.subscribe(self.topics.all_devices("update"), 1)
        link.start()
        self._thread = threading.Thread(target=self._loop, name="edgefm-rounds", daemon=True)
        self._thread.start()
        self.start_ingest()

    def start_ingest(self) -> None:
        """Start the ingest worker: it takes what ``enqueue`` queued, in batches (``ingest``)."""
        self.inbox.start()

    def queued(self) -> int:
        """Messages waiting for the ingest worker (at most ``ingest_batch``: the queue is bounded)."""
        return len(self.inbox)

    def enqueue(self, topic: str, payload: bytes, retained: bool, ack, timeout: float | None = None) -> None:
        """The link's message callback: paho's thread only queues (blocking while the bounded queue is
        full: back-pressure onto the broker); the worker persists, then acks (PUBACK only for what is
        durable)."""
        self.inbox.put((topic, payload, retained, ack), timeout=timeout)

    def _batch_cap(self) -> int:
        """Messages per ingest batch: in async mode never more updates than fill the buffer (the version
        is published between batches)."""
        if self.cfg.mode == "async":
            return max(1, min(self.cfg.ingest_batch, self.cfg.buffer_size - self.open.count()))
        return self.cfg.ingest_batch

    def stop(self) -> None:
        """Stop the loop and disconnect."""
        self._stop.set()
        if self.link:
            self.link.close()
        self.inbox.stop()

    def _loop(self) -> None:
        from coordinator import admin

        if self.cfg.mode == "async":
            time.sleep(0.5)
            self.rounds.announce(self.version)
        while not self._stop.wait(0.2):
            try:
                admin.serve_requests(Path(self.cfg.state_dir), lambda request: admin.execute(self, request))
                self.tick()
            except Exception:  # the coordinator keeps running; the error is in the log
                log.exception("round loop error")
