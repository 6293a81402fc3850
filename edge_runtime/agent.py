"""The edge agent: serves the bundle locally, trains its LoRA adapter on local data, syncs over MQTT.

Threads: HTTP server (one thread per request), the agent's worker (the only one doing model work:
received globals, training sessions), inbox watcher, MQTT network + flush loop. Serving never waits
on training, the broker or the coordinator.

Parts: adapters.py (what serves, candidates judged by the gate), evaluation.py (losses, the gate's
numbers), lineage.py (the global this device trains from), session.py (one training session),
worker.py (work handed to the worker), sync.py (MQTT), store.py (examples, outbox, history).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edge_runtime.adapters import AdapterHistory
from edge_runtime.config import AgentConfig
from edge_runtime.engine import Engine
from edge_runtime.errors import ConfigError, TrainingError
from edge_runtime.evaluation import Evaluator
from edge_runtime.lineage import Lineage
from edge_runtime.metrics import Metrics
from edge_runtime.policy import RoundAction, round_action
from edge_runtime.protocol.adapter import load_adapter
from edge_runtime.protocol.messages import GlobalPointer, RoundAnnouncement
from edge_runtime.protocol.topics import Topics
from edge_runtime.session import Sessions, make_trainer
from edge_runtime.store import Store, StoreFull
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
        self.inflight = 0
        self._inflight_lock = threading.Lock()
        self.work = WorkQueue()
        self._stop = threading.Event()
        self._started = False
        self.paused_reason: str | None = None
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
            busy=lambda: self.inflight > 0,
            disk_ok=self.disk_ok,
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
        return AgentState.PAUSED if self.paused_reason else AgentState.SERVING

    @property
    def active_id(self) -> str:
        """The id of the adapter serving now."""
        return self.adapters.active_id

    @property
    def global_version(self) -> int:
        """The version of the newest global this device trains from."""
        return self.lineage.global_version

    # ------------------------------------------------------------------ adapters
    def load_external(
        self,
        *,
        adapter: bytes | None = None,
        peft_config: dict | None = None,
        peft_weights: bytes | None = None,
        name: str | None = None,
    ) -> dict:
        """An adapter from outside (edgefm safetensors bytes, or a PEFT LoRA's config and tensors):
        verified against this bundle, judged by the gate like any candidate, then served or kept as refused."""
        return self.adapters.load_external(
            version=self.global_version, adapter=adapter, peft_config=peft_config, peft_weights=peft_weights, name=name
        )

    def rollback(self, to: str | None = None) -> dict:
        """Serve an earlier adapter: ``to`` an id from `adapters`, else the one before the current."""
        return self.adapters.rollback(to)

    def _consider_global(self, pointer: GlobalPointer, blob: bytes) -> None:
        """A received global: served if the gate agrees, and the base of further training whatever it says
        (edge_runtime/lineage.py) unless it failed its checks or is no longer news."""
        if not self.lineage.wants(pointer):
            return
        offered = self.adapters.offer_global(pointer.version, blob)
        if offered is not None:
            self.lineage.adopt_global(pointer, *offered)
            self.metrics.set("edgefm_global_version", pointer.version, help="latest global adapter version received")

    # ------------------------------------------------------------------ training
    def disk_ok(self) -> bool:
        """Enough free disk for data intake and checkpoints (else pause both; inference continues)."""
        free_mb = shutil.disk_usage(self.data_dir).free / 2**20
        self.metrics.set("edgefm_disk_free_mb", free_mb, help="free disk space in the data dir")
        if free_mb < self.cfg.min_free_disk_mb:
            self.paused_reason = (
                f"disk nearly full: {free_mb:.0f} MB free < {self.cfg.min_free_disk_mb:.0f} MB; training and data intake paused"
            )
            return False
        if self.paused_reason and self.paused_reason.startswith("disk"):
            self.paused_reason = None
        return True

    def train_once(self, forced: bool = False, round_msg: RoundAnnouncement | None = None) -> dict:
        """One training session on the calling thread (edge_runtime/session.py); ``round_msg``: the round
        announcement it answers."""
        return self.sessions.run(forced=forced, round_msg=round_msg, announced=self.round)

    def train_now(self) -> None:
        """Ask the worker to run a session as soon as possible."""
        self.work.request_training()

    def train_and_wait(self, timeout: float | None = None) -> dict:
        """Run a session on the worker (after any queued global) and return what it did."""
        if self.sessions.trainer is None:
            raise ConfigError("this bundle has no training graph")
        fut = self.work.wait_for_training()
        try:
            return fut.result(timeout if timeout is not None else self.cfg.max_train_seconds * 2 + 300)
        except TimeoutError:
            raise TrainingError("the training session did not finish in time; see `edgefm-agent status`") from None

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

    def status(self) -> dict:
        """Full status for the API and CLI."""
        return {
            "device_id": self.cfg.device_id,
            "fleet": self.cfg.fleet,
            "state": self.state.value,
            "paused_reason": self.paused_reason,
            "task": self.manifest.task,
            "active_adapter": self.active_id,
            "adapter_version": self.engine.adapter.version,
            "global_version": self.global_version,
            "fleet_epoch": self.lineage.fleet_epoch,
            "examples": self.store.count_examples(),
            "outbox": self.store.outbox_stats(),
            "broker_connected": bool(self.sync and self.sync.connected),
            "last_train_decision": self.sessions.last_decision.value,
            "round": self.round.to_json() if self.round else None,
            "rejected": (self.sync.rejected[-10:] if self.sync else []),
            "events": self.events[-20:],
            "training_coverage": self.store.training_coverage(),
            "gate_decisions": self.store.decisions(20),
            "broker_disconnects": self.sync.disconnects if self.sync else 0,
            "base_fingerprint": self.manifest.base_fingerprint,
            "quant": self.manifest.quant.scheme,
        }

    def metrics_text(self) -> str:
        """Prometheus exposition of the agent's metrics, current as of now."""
        self.metrics.set("edgefm_inflight_requests", self.inflight, help="requests being served")
        self.metrics.set("edgefm_outbox_queued", self.store.outbox_stats()["queued"], help="updates waiting to be sent")
        counts = self.store.count_examples()
        self.metrics.set("edgefm_examples", counts["train"] + counts["heldout"], help="stored examples")
        return self.metrics.render()

    def heldout_examples(self) -> list[dict]:
        """The examples this device holds back from training for its gate."""
        return self.store.heldout_split()

    def adapter_history(self) -> list[dict]:
        """Served adapters and refused candidates, newest first."""
        return self.store.adapters()

    # ------------------------------------------------------------------ lifecycle
    def request_started(self) -> None:
        with self._inflight_lock:
            self.inflight += 1

    def request_finished(self) -> None:
        with self._inflight_lock:
            self.inflight -= 1

    @contextlib.contextmanager
    def not_in_flight(self):
        """A request that waits on background work does not count as serving load (training yields to that)."""
        self.request_finished()
        try:
            yield
        finally:
            self.request_started()

    def add_examples(self, items: list[dict], source: str = "api") -> dict:
        """Validate and store training examples (refused while the disk is nearly full)."""
        if not self.disk_ok():
            raise StoreFull(self.paused_reason)
        res = self.store.add_examples(items, source)
        self.metrics.inc("edgefm_examples_added_total", res["added"], help="training examples stored")
        return res

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
                    args=(Path(str(self.cfg.inbox)), self.add_examples, self._event, self._stop),
                )
            )
        for t in self._threads:
            t.start()
        if self.sync:
            self.sync.start()
        self._event("started", bundle=str(self.engine.dir), adapter=self.active_id, global_version=self.global_version)

    def stop(self) -> None:
        """Stop background work and say goodbye on MQTT."""
        self._stop.set()
        self.work.wake.set()
        if self.sync:
            self.sync.close()
