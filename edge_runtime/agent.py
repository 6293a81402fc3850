"""The edge agent: serves the bundle locally, trains its LoRA adapter on local data, syncs over MQTT.

Threads: HTTP server (one thread per request), the agent's worker (the only one doing model work:
received globals, training sessions), inbox watcher, MQTT network + flush loop. Serving never waits
on training, the broker or the coordinator.

Parts: adapters.py (what serves, candidates judged by the gate), evaluation.py (losses, the gate's
numbers), lineage.py (the global this device trains from), session.py (one training session),
worker.py (work handed to the worker), sync.py (MQTT), store.py (examples, outbox, history).
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from edge_runtime.adapters import AdapterHistory
from edge_runtime.config import AgentConfig
from edge_runtime.engine import Engine
from edge_runtime.evaluation import Evaluator
from edge_runtime.lineage import Lineage
from edge_runtime.metrics import Metrics
from edge_runtime.policy import RoundAction, round_action
from edge_runtime.protocol.adapter import load_adapter
from edge_runtime.protocol.messages import GlobalPointer, RoundAnnouncement
from edge_runtime.protocol.topics import Topics
from edge_runtime.session import Sessions, make_trainer
from edge_runtime.local_api import LocalApi
from edge_runtime.store import DiskGuard, Store
from edge_runtime.worker import WorkQueue, Worker

log = logging.getLogger("edgefm.agent")


class AgentState(str, enum.Enum):
    """What the agent is doing."""

    STARTING = "starting"
    SERVING = "serving"
    TRAINING = "training"
    PAUSED = "paused"
    STOPPING = "stopping"


class Agent:
    """One device: wires the parts together and owns the threads."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir)
        (self.data_dir / "adapters").mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics()
        self.engine = Engine(cfg.bundle, threads=cfg.threads_inference, verify=cfg.verify_bundle)
        if cfg.profile:
            from devices.profiles import load_profile

            self.profile_fit = load_profile(cfg.profile).check_bundle_fits(self.engine.dir)
        self.manifest = self.engine.manifest
        self.store = Store(
            self.data_dir / "agent.sqlite",
            max_examples=cfg.max_examples,
            min_heldout=cfg.min_heldout_examples,
            max_evictions_per_hour=cfg.max_evictions_per_hour,
            max_source_share=cfg.max_source_share,
        )
        self.topics = Topics(cfg.fleet)
        self.disk = DiskGuard(self.data_dir, cfg.min_free_disk_mb, self.metrics)
        self.work = WorkQueue()
        self._stop = threading.Event()
        self._started = False
        self.round: RoundAnnouncement | None = None
        self.events: list[dict] = []
        bundle_tensors, bundle_meta = load_adapter(self.engine.dir / "adapter.safetensors")
        base = self.engine.make_active(bundle_tensors, bundle_meta)  # what the gate calls "the base model"
        self.evaluator = Evaluator(self.engine, self.store, base, cfg, self.data_dir, self.metrics, self._event)
        self.lineage = Lineage(self.store, self.manifest.base_fingerprint, bundle_tensors, self._event)
        self.adapters = AdapterHistory(
            self.engine,
            self.store,
            self.data_dir / "adapters",
            self.evaluator,
            keep=cfg.keep_adapters,
            keep_refused=cfg.keep_refused,
            metrics=self.metrics,
            on_event=self._event,
            in_use=self.lineage.files_in_use,
        )
        self.adapters.restore()
        from edge_runtime.protocol import signing

        self.sync: Any = None
        if cfg.broker:
            from edge_runtime.sync import FederatedSync

            self.sync = FederatedSync(
                cfg.broker,
                cfg.fleet,
                cfg.device_id,
                self.store,
                self.data_dir / "chunks",
                base_fingerprint=self.manifest.base_fingerprint,
                wants_global=self.lineage.wants,
                on_global=self.work.put_global,
                on_round=self._on_round,
                status=self.status_summary,
                metrics=self.metrics,
                resend_after_s=cfg.resend_after_s,
                keepalive_s=cfg.mqtt_keepalive_s,
                coordinator_key=cfg.coordinator_key,
            )
        self.sessions = Sessions(
            cfg,
            make_trainer(cfg, self.engine),
            self.store,
            self.evaluator,
            self.adapters,
            self.lineage,
            self.metrics,
            self._event,
            busy=lambda: self.api.inflight > 0,
            disk_ok=self.disk.ok,
            topic=self.topics.update(cfg.device_id),
            signer=signing.load_private_key(cfg.signing_key) if cfg.signing_key else None,
            on_queued=lambda: self.sync.flush() if self.sync else None,
        )
        self.worker = Worker(
            self.work,
            consider_global=self._consider_global,
            round_due=self._round_due,
            train=(lambda forced, msg: self.train_once(forced, msg)) if self.sessions.trainer else None,
            auto_train=cfg.auto_train,
            housekeeping=self._housekeeping,
            on_event=self._event,
        )
        self.api = LocalApi(self)  # what local apps may ask (edge_runtime/server.py serves it over HTTP)
        self._threads: list[threading.Thread] = []

    def _event(self, kind: str, **info) -> None:
        e = {"ts": time.time(), "event": kind, **info}
        self.events.append(e)
        del self.events[:-200]
        log.info("%s %s", kind, json.dumps(info, default=str))

    @property
    def state(self) -> AgentState:
        """What the agent is doing now."""
        if self._stop.is_set():
            return AgentState.STOPPING
        if not self._started:
            return AgentState.STARTING
        if self.sessions.running:
            return AgentState.TRAINING
        return AgentState.PAUSED if self.disk.reason else AgentState.SERVING

    @property
    def active_id(self) -> str:
        """The id of the adapter serving now."""
        return self.adapters.active_id

    @property
    def global_version(self) -> int:
        """The version of the newest global this device trains from."""
        return self.lineage.global_version

    # ------------------------------------------------------------------ background work
    def _consider_global(self, pointer: GlobalPointer, blob: bytes) -> None:
        """A received global: served if the gate agrees, and the base of further training whatever it says
        (edge_runtime/lineage.py) unless it failed its checks or is no longer news."""
        if not self.lineage.wants(pointer):
            return
        offered = self.adapters.offer_global(pointer.version, blob)
        if offered is not None:
            self.lineage.adopt_global(pointer, *offered)
            self.metrics.set("edgefm_global_version", pointer.version, help="latest global adapter version received")

    def train_once(self, forced: bool = False, round_msg: RoundAnnouncement | None = None) -> dict:
        """One training session on the calling thread (edge_runtime/session.py); ``round_msg``: the round
        announcement it answers."""
        return self.sessions.run(forced=forced, round_msg=round_msg, announced=self.round)

    # MQTT's network thread calls this: it only hands the announcement to the worker
    def _on_round(self, msg: RoundAnnouncement) -> None:
        self.round = msg
        self.work.put_round(msg)

    def _round_due(self, msg: RoundAnnouncement) -> RoundAction:
        return round_action(
            round_epoch=msg.epoch,
            round_base=msg.base_version,
            selected=msg.selected,
            session_key=msg.session_key,
            device_id=self.cfg.device_id,
            fleet_epoch=self.lineage.fleet_epoch,
            global_version=self.lineage.global_version,
            sessions_done=self.lineage.sessions_done(),
            has_training_data=self.store.count_examples()["train"] > 0,
        )

    def _housekeeping(self) -> None:
        removed = self.store.apply_retention(self.cfg.retention_days * 86400)
        if removed:
            self._event("retention", removed=removed)

    # ------------------------------------------------------------------ status
    def status_summary(self) -> dict:
        """Small status for MQTT status messages."""
        return {
            "adapter": self.active_id,
            "adapter_version": self.engine.adapter.version,
            "global_version": self.global_version,
            "profile": self.cfg.profile,
            "activity": self.state.value,
            "outbox": self.store.outbox_stats(),
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start background work (worker, inbox, sync). The HTTP server is started by the caller."""
        self._started = True
        self._threads.append(threading.Thread(target=self.worker.run, name="edgefm-worker", daemon=True, args=(self._stop,)))
        if self.cfg.inbox:
            from edge_runtime.inbox import watch_inbox

            self._threads.append(
                threading.Thread(
                    target=watch_inbox,
                    name="edgefm-inbox",
                    daemon=True,
                    args=(Path(str(self.cfg.inbox)), self.api.add_examples, self._event, self._stop),
                )
            )
        for t in self._threads:
            t.start()
        if self.sync:
            self.sync.start()
        self._event(
            "started",
            bundle=str(self.engine.dir),
            adapter=self.active_id,
            global_version=self.global_version,
            native_kernels=self.engine.native,  # edge_runtime/native.py: compiled kernels in use
        )

    def stop(self) -> None:
        """Stop background work and say goodbye on MQTT."""
        self._stop.set()
        self.work.wake.set()
        if self.sync:
            self.sync.close()
