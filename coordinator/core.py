"""The coordinator's logic over its durable state, without threads or a network: updates in (one
ingest batch at a time: coordinator/ingest.py), rounds (schedule.py), new versions (aggregation.py,
versions.py) and what is told to the fleet (publisher.py, through whatever ``Link`` is attached).
coordinator/service.py runs it: the MQTT link, the ingest worker and the round loop. Admin commands
with no coordinator serving use this core directly (coordinator/cli.py).

Durability: an ingest batch validates and folds each update, appends accepted payloads to the update
log, then makes the batch durable with one log sync and one SQLite commit (group commit); only then
are its messages acknowledged. After a restart, accepted updates not yet folded into a published
version are replayed into the accumulator (each exactly once: ``updates.update_id`` is the primary key).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.aggregation import OpenAggregate
from coordinator.config import CoordinatorConfig
from coordinator.ingest import Intake, Message, Outcome
from coordinator.publisher import Publisher
from coordinator.rounds import RoundPlan
from coordinator.schedule import Rounds
from coordinator.state import State
from coordinator.versions import Versions
from edge_runtime.errors import BundleError, ProtocolError, RejectReason
from edge_runtime.protocol.manifest import Manifest
from edge_runtime.protocol.messages import DeviceStatus, UpdateHeader, parse_json_message
from edge_runtime.protocol.topics import Topics

if TYPE_CHECKING:
    from edge_runtime.transport import Link

log = logging.getLogger("edgefm.coordinator")


class CoordinatorCore:
    """One coordinator over one fleet: its state and the decisions on it."""

    def __init__(self, cfg: CoordinatorConfig):
        self.cfg = cfg
        self.state = State(Path(cfg.state_dir))
        self.topics = Topics(cfg.fleet)
        bundle = Path(cfg.bundle)
        if not (bundle / "manifest.json").is_file() or not (bundle / "adapter.safetensors").is_file():
            raise BundleError(f"{bundle}: the coordinator needs the bundle's manifest.json and adapter.safetensors")
        self.manifest = Manifest.load(bundle)
        self.fingerprint = self.manifest.base_fingerprint
        # sorted: the order tensors lie in a payload, so the accumulator folds a payload as one flat view
        self.schema = {k: tuple(v) for k, v in sorted(self.manifest.adapter.shapes.items())}
        self.rank = int(self.manifest.adapter.rank)
        from edge_runtime.protocol import signing

        self.signer = signing.load_private_key(cfg.signing_key) if cfg.signing_key else None
        self.limits = cfg.limits(self.fingerprint, self.schema)
        self.strategy = cfg.make_strategy(self.rank)
        self.influence = cfg.influence_policy()
        self.lock = threading.RLock()
        self.done = threading.Event()
        self.link: Link | None = None
        self.epoch = self.state.epoch()
        self.publisher = Publisher(
            self.topics,
            self.state,
            fingerprint=self.fingerprint,
            epoch=self.epoch,
            signer=self.signer,
            chunk_size=cfg.chunk_size,
            keep_versions=cfg.keep_versions,
        )
        self.versions = Versions(self.state, self.publisher, bundle, self.fingerprint, cfg.strategy)
        self.open = OpenAggregate(
            self.strategy,
            self.influence,
            self.state,
            self.versions.tensors,
            clip_norm=cfg.clip_norm,
            sync=cfg.mode == "sync",
            staleness_exponent=cfg.staleness_exponent,
            max_update_bytes=cfg.max_update_bytes,
        )
        self.intake = Intake(self.state, self.open, self.limits, self.lock, rebuild=self._replay)
        self.rounds = Rounds(cfg, self.state, self.publisher, train_a=self.strategy.train_a)
        self._restore()

    @property
    def version(self) -> int:
        """The current global version."""
        return self.versions.current

    def _restore(self) -> None:
        """Resume after a restart: the open round and every accepted-but-unpublished update."""
        self.open.load_opt_state(self.version)
        self.replayed = self._replay()
        if self.replayed:
            log.info("restart: replayed %d accepted updates into the open aggregate", self.replayed)

    def _replay(self) -> int:
        """Rebuild the open aggregation from durable state (coordinator/aggregation.py); returns how many
        updates it holds again."""
        self.intake.forget_pending()
        restored = self.open.replay(self.version, self.versions.tensors)
        self.rounds.recount(restored)
        return len(restored)

    def _after_batch(self) -> None:
        with self.lock:
            if self.cfg.mode == "async" and self.open.count() >= self.cfg.buffer_size:
                self._aggregate(round_id=None)

    def on_connect(self) -> None:
        """The link (re)connected: the retained global and the open round again."""
        self.versions.publish()
        self.rounds.reannounce()

    def attach(self, link: Link) -> None:
        """Send to the fleet through ``link`` from now on (an admin command's short-lived link too)."""
        self.link = self.publisher.link = link

    def ingest(self, items: list[Message]) -> list[tuple[str, Outcome]]:
        """One ingest batch: route each (topic, payload, retained, ack) message, commit them together,
        then call every ack and send the receipts; returns (device id, result) per update. Raises (and
        acks nothing) when the batch could not be made durable."""
        acks, receipts = [], []
        with self.intake.batch():
            for topic, payload, retained, ack in items:
                acks.append(ack)
                try:
                    res = self.on_message(topic, payload, retained)
                    if res is not None:
                        receipts.append(res)
                except (sqlite3.Error, OSError):
                    raise  # storage failed: the whole batch stays unacknowledged
                except Exception:  # a bug in one message must not stop ingestion; it is recorded or refused
                    log.exception("ingest failed for %s", topic)
        self._after_batch()
        for ack in acks:
            ack()
        self.publisher.receipts(receipts, self.version)
        return receipts

    def handle_updates(self, updates: list[tuple[str, bytes]]) -> list[Outcome]:
        """Several (device id, payload) updates as one ingest batch (one commit); their results."""
        return [res for _, res in self.ingest([(self.topics.update(d), p, False, lambda: None) for d, p in updates])]

    def aggregate_now(self) -> int | None:
        """Aggregate what the open aggregation holds and publish it as a new version (None: nothing to)."""
        return self._aggregate(round_id=None)

    def on_message(self, topic: str, payload: bytes, retained: bool) -> tuple[str, Outcome] | None:
        """Route one MQTT message (inside an ingest batch); for an update, (device id, result)."""
        parsed = self.topics.parse_device_topic(topic)
        if not parsed:
            return None
        device_id, kind = parsed
        if kind == "status":
            try:
                self.state.seen_device(device_id, DeviceStatus.from_json(parse_json_message(payload)))
            except ProtocolError as exc:
                log.warning("bad status from %s: %s", device_id, exc)
        elif kind == "update":
            return device_id, self._update(device_id, payload)  # joins the worker's batch
        return None

    # ------------------------------------------------------------------ updates
    def handle_update(self, device_id: str, payload: bytes) -> Outcome:
        """Validate one update and fold it in durably, or record why not. Never raises on bad input."""
        res = self._update(device_id, payload)  # its own batch: durable when this returns
        self._after_batch()
        self.publisher.receipts([(device_id, res)], self.version)
        return res

    def _update(self, device_id: str, payload: bytes) -> Outcome:
        res = self.intake.update(device_id, payload, self.version, self._fits)
        if res.accepted:
            self.rounds.counted(device_id, res.update_id)
        return res

    def _fits(self, device_id: str, header: UpdateHeader) -> tuple[RejectReason, str] | None:
        return self.rounds.fits(
            device_id,
            header.base_version,
            header.round,
            version=self.version,
            device_has_open_update=device_id in self.open.devices,
        )

    # ------------------------------------------------------------------ rounds
    @property
    def plan(self) -> RoundPlan | None:
        """The open synchronous round (coordinator/schedule.py), None when none is."""
        return self.rounds.plan

    def tick(self, now: float | None = None) -> None:
        """Periodic work: open/close/extend rounds (sync mode)."""
        with self.lock:
            if self.cfg.mode != "sync" or self.done.is_set():
                return
            if self.plan is None and self.rounds.finished():
                self.done.set()
                return
            closing = self.rounds.due(
                now or time.time(), self.version, connected=self.link is None or self.link.connected.is_set()
            )
            if closing is not None:
                self._aggregate(round_id=closing)

    def _aggregate(self, round_id: int | None) -> int | None:
        """Fold what is in into a new global version and publish it; returns the version (None: kept previous)."""
        res = self.open.finish(versions=self.version + 1)
        if res.tensors is None:
            return None
        # the version and the server optimizer state that produced it, in one transaction
        version = self.versions.add(res.tensors, round_id=round_id, result=res, save_extra=self.open.save_opt_state)
        self.state.delete_updates(self.state.release_payloads(res.folded_ids))
        self.state.drop_checkpoint()  # every update it covered is folded into this version
        self.open.begin(res.tensors)
        if round_id is not None:
            self.rounds.closed(round_id, version, {**res.metrics, "participants": res.participants})
        self.versions.publish(version)
        self.publisher.summary(round_id, version, res.participants, res.metrics)
        log.info("published global v%d from %d updates (%d examples)", version, len(res.folded_ids), res.metrics["num_examples"])
        if self.cfg.mode == "async":
            self.rounds.announce(version)
            if self.cfg.max_rounds and version >= self.cfg.max_rounds:
                self.done.set()
        return version

    def publish_adapter(self, tensors, note: str) -> int:
        """Publish given tensors as a new version (manual publish / rollback): lineage stays monotonic."""
        with self.lock:
            version = self.versions.add(tensors, note=note)
            self._replay()  # accepted, unpublished updates stay pending: folded into the next version
            self.versions.publish(version)
            return version

    def rollback_to(self, to: int) -> int:
        """Republish version ``to``'s adapter as the next version; versions after it are marked rolled back."""
        with self.lock:
            v = self.publish_adapter(self.versions.load(to), f"rollback to v{to}")
            self.state.mark_rolled_back(to, v)
            return v
