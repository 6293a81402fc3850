"""The edge agent: serves the bundle locally, trains its LoRA adapter on local data, syncs over MQTT.

Threads: HTTP server (one thread per request), trainer loop, inbox watcher, MQTT network + flush loop.
Serving never waits on training, the broker or the coordinator.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.config import AgentConfig
from edge_runtime.adapters import AdapterHistory
from edge_runtime.engine import ActiveAdapter, Engine
from edge_runtime.evaluation import Evaluator
from edge_runtime.errors import BundleError, ConfigError, EdgefmError, ProtocolError, TrainingError
from edge_runtime.gate import GateDecision
from edge_runtime.metrics import Metrics
from edge_runtime.optim import AdamWConfig
from edge_runtime.policy import TrainDecision, TrainPolicy, decide, session_steps
from edge_runtime.protocol.adapter import AdapterMeta, adapter_from_bytes, load_adapter, save_adapter
from edge_runtime.protocol.codec import CodecSpec
from edge_runtime.protocol.messages import GlobalPointer, RoundAnnouncement, RoundMode, UpdateHeader, encode_update
from edge_runtime.protocol.topics import Topics
from edge_runtime.store import Store

log = logging.getLogger("edgefm.agent")

class AgentState(str, enum.Enum):
    """What the agent is doing."""

    STARTING = "starting"
    SERVING = "serving"
    TRAINING = "training"
    PAUSED = "paused"
    STOPPING = "stopping"


class Agent:
    """One device."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.state = AgentState.STARTING
        self.data_dir = Path(cfg.data_dir)
        (self.data_dir / "adapters").mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics()
        self.engine = Engine(cfg.bundle, threads=cfg.threads_inference, verify=cfg.verify_bundle)
        if cfg.profile:
            from devices.profiles import load_profile
            self.profile_fit = load_profile(cfg.profile).check_bundle_fits(self.engine.dir)
        self.manifest = self.engine.manifest
        self.store = Store(self.data_dir / "agent.sqlite", max_examples=cfg.max_examples, min_heldout=cfg.min_heldout_examples,
                           max_evictions_per_hour=cfg.max_evictions_per_hour, max_source_share=cfg.max_source_share)
        self.topics = Topics(cfg.fleet)
        self.inflight = 0
        self._inflight_lock = threading.Lock()
        self._train_lock = threading.Lock()
        # Work handed to the agent's own worker thread (never done on MQTT's network thread or a request thread):
        self._work_lock = threading.Lock()
        self._wake = threading.Event()
        self._train_requested = False
        self._train_waiters: list[concurrent.futures.Future] = []
        self._pending_global: tuple[GlobalPointer, bytes] | None = None
        self._pending_round: RoundAnnouncement | None = None
        self._stop = threading.Event()
        self.last_train_at = 0.0
        self.last_decision = TrainDecision.NOT_ENOUGH_DATA
        self.paused_reason: str | None = None
        self.round: RoundAnnouncement | None = None
        self.events: list[dict] = []
        self.trainer: Any = None   # OnnxTrainer or TorchTrainer (same train/evaluate interface), None for no training graph
        if cfg.trainer_backend == "torch":
            from edge_runtime.torch_trainer import TorchTrainer  # lazy: torch only where this backend is chosen
            self.trainer = TorchTrainer(self.engine.dir, self.manifest, self.engine.tokenizer, model_dir=str(cfg.torch_model),
                                        load_4bit=cfg.torch_load_4bit, threads=cfg.threads_training,
                                        optim=AdamWConfig(lr=cfg.learning_rate))
        elif self.manifest.training.get("graph"):
            from edge_runtime.trainer import OnnxTrainer
            self.trainer = OnnxTrainer(self.engine.dir, self.manifest, self.engine.tokenizer, threads=cfg.threads_training,
                                       optim=AdamWConfig(lr=cfg.learning_rate))
        self.adapters = AdapterHistory(self.engine, self.store, self.data_dir / "adapters", keep=cfg.keep_adapters,
                                       keep_refused=cfg.keep_refused, metrics=self.metrics, on_event=self._event,
                                       in_use=self._files_in_use)
        self._restore_adapters()
        self.evaluator = Evaluator(self.engine, self.store, self.base_adapter, cfg, self.data_dir, self.metrics, self._event)
        self.sync = None
        from edge_runtime.protocol import signing
        self._signer = signing.load_private_key(cfg.signing_key) if cfg.signing_key else None
        if cfg.broker:
            from edge_runtime.sync import FederatedSync
            self.sync = FederatedSync(cfg.broker, cfg.fleet, cfg.device_id, self.store, self.data_dir / "chunks",
                                      base_fingerprint=self.manifest.base_fingerprint,
                                      wants_global=self.wants_global, on_global=self.receive_global,
                                      on_round=self._on_round, status=self.status_summary, metrics=self.metrics,
                                      resend_after_s=cfg.resend_after_s, keepalive_s=cfg.mqtt_keepalive_s,
                                      coordinator_key=cfg.coordinator_key)
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ adapters
    def _event(self, kind: str, **info) -> None:
        e = {"ts": time.time(), "event": kind, **info}
        self.events.append(e)
        del self.events[:-200]
        log.info("%s %s", kind, json.dumps(info, default=str))

    def _restore_adapters(self) -> None:
        """After a restart (or crash): serve the last active adapter that still validates, else the bundle's."""
        bundle_tensors, bundle_meta = load_adapter(self.engine.dir / "adapter.safetensors")
        self.base_adapter = self.engine.make_active(bundle_tensors, bundle_meta)  # what the gate calls "the base model"
        self._latest_local = None
        latest = self.store.get("latest_local")
        if latest:
            try:
                self._latest_local = (int(latest["base_version"]),
                                      load_adapter(latest["path"], expect_fingerprint=self.manifest.base_fingerprint)[0])
            except (OSError, EdgefmError, KeyError, TypeError) as exc:
                self._event("local_adapter_unreadable", error=str(exc))
        self.global_version = int(self.store.get("global_version", 0))
        self.fleet_epoch = self.store.get("fleet_epoch")   # the coordinator lineage the global comes from
        self.global_tensors = bundle_tensors
        gpath = self.store.get("global_path")
        if gpath:
            try:
                want = self.store.get("global_sha256")
                if want and hashlib.sha256(Path(gpath).read_bytes()).hexdigest() != want:
                    # refetched from the broker: version 0 makes the retained pointer new again
                    raise BundleError(f"{gpath} differs from the sha256 recorded when it was saved")
                self.global_tensors, _ = load_adapter(gpath, expect_fingerprint=self.manifest.base_fingerprint)
            except (OSError, EdgefmError) as exc:
                self._event("global_adapter_unreadable", path=gpath, error=str(exc))
                self.global_version, self.global_tensors = 0, bundle_tensors
        self.adapters.restore()

    @property
    def active_id(self) -> str:
        """The id of the adapter serving now."""
        return self.adapters.active_id

    def _files_in_use(self) -> set:
        """Adapter files the agent still needs whatever the history keeps: its latest local result and
        the newest global it received."""
        return {(self.store.get("latest_local") or {}).get("path"), self.store.get("global_path")}

    def load_external(self, *, adapter: bytes | None = None, peft_config: dict | None = None,
                      peft_weights: bytes | None = None, name: str | None = None) -> dict:
        """An adapter from outside (edgefm safetensors bytes, or a PEFT LoRA's config and tensors):
        verified against this bundle (fingerprint, shapes, finite values), judged by the gate like any
        candidate, then served or kept as refused. Returns the id, the decision and its numbers."""
        import hashlib

        from edge_runtime.protocol.peft import adapter_from_peft
        from edge_runtime.protocol.tensors import decode_tensors
        try:
            if adapter is not None:
                tensors, meta = adapter_from_bytes(adapter, expect_fingerprint=self.manifest.base_fingerprint,
                                                   expect_shapes=self.manifest.adapter["shapes"])
                raw = adapter
            else:
                weights, _ = decode_tensors(peft_weights or b"")
                tensors, meta = adapter_from_peft(peft_config or {}, weights, self.manifest)
                raw = peft_weights or b""
        except ProtocolError as exc:
            raise ConfigError(f"adapter refused: {exc.reason.value}: {exc.detail}") from None
        meta.version = self.global_version
        adapter_id = f"loaded-{name or hashlib.sha256(raw).hexdigest()[:12]}"
        candidate = self.engine.make_active(tensors, meta)   # shapes, alpha, finite values
        gate = self.gate("loaded", adapter_id, candidate)
        metrics = {"heldout_loss": gate.numbers.get("heldout_candidate"), "heldout_loss_before": gate.numbers.get("heldout_current"),
                   "gate": gate.reason.value}
        if gate.adopted:
            self.adapters.activate(adapter_id, tensors, meta, "loaded", metrics, "loaded by hand")
        else:
            self.adapters.keep_as_refused(adapter_id, tensors, meta, metrics, gate.reason.value)
        self._event("adapter_loaded", id=adapter_id, adopted=gate.adopted, reason=gate.reason.value)
        return {"id": adapter_id, "adopted": gate.adopted, "reason": gate.reason.value, "numbers": gate.numbers,
                "active": self.active_id}

    def rollback(self, to: str | None = None) -> dict:
        """Serve an earlier adapter: ``to`` an id from `adapters`, else the one before the current."""
        return self.adapters.rollback(to)

    # ------------------------------------------------------------------ evaluation
    def gate(self, kind: str, candidate_id: str, candidate: ActiveAdapter) -> GateDecision:
        """Judge a candidate against the serving adapter and the base model (edge_runtime/evaluation.py);
        the decision is recorded."""
        return self.evaluator.judge(kind, candidate_id, candidate, serving_id=self.active_id, serving=self.engine.adapter)

    # ------------------------------------------------------------------ training
    def disk_ok(self) -> bool:
        """Enough free disk for data intake and checkpoints (else pause both; inference continues)."""
        free_mb = shutil.disk_usage(self.data_dir).free / 2**20
        self.metrics.set("edgefm_disk_free_mb", free_mb, help="free disk space in the data dir")
        if free_mb < self.cfg.min_free_disk_mb:
            self.paused_reason = f"disk nearly full: {free_mb:.0f} MB free < {self.cfg.min_free_disk_mb:.0f} MB; training and data intake paused"
            return False
        if self.paused_reason and self.paused_reason.startswith("disk"):
            self.paused_reason = None
        return True

    def train_once(self, forced: bool = False, round_msg: RoundAnnouncement | None = None) -> dict:
        """One training session from the current global (or this device's adopted local result on it);
        ``round_msg``: the round announcement it answers (one session per round and base version)."""
        if self.trainer is None:
            raise ConfigError("this bundle has no training graph")
        if not self._train_lock.acquire(blocking=False):
            return {"status": "already_training"}
        ckpt_path = self.data_dir / "checkpoint.safetensors"
        try:
            counts = self.store.count_examples()
            window = self.cfg.train_window_hours
            policy = TrainPolicy(self.cfg.min_new_examples, cooldown_s=self.cfg.train_cooldown_s,
                                 window_hours=(window[0], window[1]) if window else None)
            decision = decide(policy, new_examples=counts["new"], inflight_requests=self.inflight, hour=time.localtime().tm_hour,
                              paused=not self.disk_ok(), seconds_since_last=time.time() - self.last_train_at,
                              # a sync round asks this device for a session; an async announcement only says
                              # a new global exists: train when there is new data (else every version would
                              # trigger a session on every device, each making another version)
                              forced=forced or (round_msg is not None and round_msg.mode == RoundMode.SYNC))
            self.last_decision = decision
            if decision != TrainDecision.TRAIN:
                return {"status": decision.value}
            if counts["train"] == 0:
                return {"status": TrainDecision.NOT_ENOUGH_DATA.value}
            self.state = AgentState.TRAINING
            self._lower_thread_priority()
            base_version = self.global_version
            # A synchronous round's session starts from the round's global (plain FedAvg); other sessions
            # continue this device's adopted local result on that global.
            sync_round = round_msg is not None and round_msg.mode == RoundMode.SYNC
            start = self.global_tensors if sync_round else self._training_start()
            resume = None
            from edge_runtime.trainer import load_checkpoint, save_checkpoint
            loaded = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
            if loaded and loaded[1].get("base_version") == base_version:
                resume = loaded[0]
                self._event("training_resumed", step=resume["step"])
            current_round = round_msg or self.round or RoundAnnouncement(base_version=base_version)
            round_id = current_round.round if current_round.base_version in (None, base_version) else None
            general = self.evaluator.general_replay_texts() if self.cfg.general_replay_fraction > 0 and self.manifest.task == "causal-lm" else []
            device_rows = self.trainer.B - min(len(general), int(round(self.trainer.B * self.cfg.general_replay_fraction)))
            steps = session_steps(new_examples=counts["new"], batch=device_rows, replay_fraction=self.cfg.replay_fraction,
                                  min_steps=self.cfg.steps_per_round, max_steps=self.cfg.max_steps_per_session)

            rng = np.random.default_rng(int(time.time()))

            def next_examples(n):
                if self.cfg.train_step_delay_s:
                    time.sleep(self.cfg.train_step_delay_s)
                k = n - device_rows
                batch = self.store.training_batch(device_rows, self.cfg.replay_fraction)
                # general rows carry no id: they are not device data and are never counted as used
                return batch + [{"text": general[i]} for i in rng.choice(len(general), k, replace=False)] if batch else batch

            result = self.trainer.train(
                start, next_examples, max_steps=steps,
                max_seconds=self.cfg.max_train_seconds, should_yield=lambda: self.inflight > 0, resume=resume,
                checkpoint=lambda st: save_checkpoint(ckpt_path, st, {"base_version": base_version}),
                train_a=current_round.train_a, prox_mu=self.cfg.prox_mu,
                on_used=self.store.mark_trained,
                on_step=self._count_step)
            self.last_train_at = time.time()
            if result.steps == 0:
                return {"status": "no_steps", "stopped": result.stopped}
            n_local = int(self.store.get("local_counter", 0)) + 1
            self.store.put("local_counter", n_local)
            adapter_id = f"local-{base_version}.{n_local}"
            train_loss = float(np.mean(result.losses[-4:]))
            meta = self.engine.adapter.meta
            cand_meta = AdapterMeta(**{**meta.to_json(), "version": base_version, "parent_version": base_version,
                                       "metrics": {"train_loss": train_loss}})
            gate = self.gate("local", adapter_id, self.engine.make_active(result.tensors, cand_meta))
            metrics = {"train_loss": train_loss, "heldout_loss": gate.numbers.get("heldout_candidate"),
                       "heldout_loss_before": gate.numbers.get("heldout_current"), "gate": gate.reason.value}
            if gate.adopted:
                self.adapters.activate(adapter_id, result.tensors, cand_meta, "local", metrics)
                path = str(self.data_dir / "adapters" / f"{adapter_id}.safetensors")
                self._latest_local = (base_version, result.tensors)
                self.store.put("latest_local", {"base_version": base_version, "path": path})
            else:
                self.adapters.keep_as_refused(adapter_id, result.tensors, cand_meta, metrics, gate.reason.value)
            # The update (what this session changed) goes to the outbox before anything is sent.
            update_id = self._queue_update(result.tensors, start, result.examples_used, base_version, round_id, metrics)
            if round_msg is not None:
                self._session_done(round_msg)
            ckpt_path.unlink(missing_ok=True)
            self._event("trained", steps=result.steps, loss_first=result.losses[0], loss_last=result.losses[-1],
                        heldout_before=metrics["heldout_loss_before"], heldout_after=metrics["heldout_loss"],
                        adopted=gate.adopted, gate=gate.reason.value, update_id=update_id, round=round_id)
            return {"status": "trained", "steps": result.steps, "stopped": result.stopped, "losses": result.losses,
                    "examples_used": len(result.examples_used), "adopted": gate.adopted, "gate": gate.reason.value,
                    "gate_numbers": gate.numbers, "adapter": self.active_id, "candidate": adapter_id,
                    "update_id": update_id, "round": round_id,
                    "heldout_loss_before": metrics["heldout_loss_before"], "heldout_loss_after": metrics["heldout_loss"],
                    "seconds": result.seconds}
        except TrainingError as exc:
            self._event("training_failed", error=str(exc))
            return {"status": "failed", "error": str(exc)}
        finally:
            self.state = AgentState.PAUSED if self.paused_reason else AgentState.SERVING
            self._train_lock.release()

    def _session_done(self, round_msg: RoundAnnouncement) -> None:
        """Remember (durably) that the session for this round announcement ran."""
        done = self.store.get("round_sessions", [])
        self.store.put("round_sessions", (done + [round_msg.session_key])[-50:])

    def _lower_thread_priority(self) -> None:
        """Nice this thread (Linux: per thread); onnxruntime with one intra-op thread computes on it."""
        if self.cfg.train_nice and threading.current_thread() is not threading.main_thread():
            try:
                tid = threading.get_native_id()
                current = os.getpriority(os.PRIO_PROCESS, tid)
                if current < self.cfg.train_nice:
                    os.setpriority(os.PRIO_PROCESS, tid, self.cfg.train_nice)
            except (OSError, AttributeError):
                pass  # not Linux / not permitted: training still works, just without the priority hint

    def _training_start(self) -> dict[str, np.ndarray]:
        """Continue this device's adopted local result while it sits on the current global, else start from the global."""
        latest = self._latest_local
        if latest and latest[0] == self.global_version:
            return latest[1]
        return self.global_tensors

    def _queue_update(self, tensors: dict, start: dict, examples_used: list, base_version: int, round_id, metrics: dict) -> str:
        # The delta is what this session changed: sessions that continue a local result each send only their own
        # progress, so the coordinator never counts one session's progress twice.
        delta = {k: (tensors[k] - start[k]).astype(np.float32) for k in tensors}
        update_id = uuid.uuid4().hex
        header = UpdateHeader(device_id=self.cfg.device_id, update_id=update_id, base_version=base_version,
                              num_examples=max(1, len(examples_used)), base_fingerprint=self.manifest.base_fingerprint,
                              round=round_id, metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
                              codec=CodecSpec(self.cfg.update_codec, self.cfg.update_compression))
        payload = encode_update(header, delta, sign_key=self.cfg.sign_key.encode() if self.cfg.sign_key else None,
                                signer=self._signer)
        self.store.enqueue_update(update_id, self.topics.update(self.cfg.device_id), payload, base_version)
        self.metrics.inc("edgefm_updates_queued_total", help="updates written to the outbox")
        self.metrics.inc("edgefm_update_bytes_total", len(payload), help="bytes of updates queued")
        if self.sync:
            self.sync.flush()
        return update_id

    # ------------------------------------------------------------------ federated
    # The two entry points below run on MQTT's network thread: they only hand work to the agent's worker,
    # so keep-alives and receipts flow while a global is evaluated or a session trains.
    def _on_round(self, msg: RoundAnnouncement) -> None:
        with self._work_lock:
            self.round = msg
            self._pending_round = msg
        self._wake.set()

    def wants_global(self, pointer: GlobalPointer) -> bool:
        """Whether a verified pointer is news: a higher version of this device's lineage, or any version
        of another lineage (the coordinator's signed fleet reset: a new state, a restore from backup,
        recovery from a bad pointer published before signatures)."""
        if pointer.epoch and pointer.epoch != self.fleet_epoch:
            if pointer.version == 0 and self.global_version == 0 and self.fleet_epoch is None:
                self.fleet_epoch = pointer.epoch   # a new device meets its fleet: v0 is the bundle's adapter it has
                self.store.put("fleet_epoch", pointer.epoch)
                return False
            return True
        return pointer.version > self.global_version

    def receive_global(self, pointer: GlobalPointer, blob: bytes) -> None:
        """A verified global adapter arrived: queue it for the worker (the newest one wins)."""
        with self._work_lock:
            pending = self._pending_global
            if pending is None or pointer.epoch != pending[0].epoch or pointer.version > pending[0].version:
                self._pending_global = (pointer, blob)
        self._wake.set()

    def _take_due_round(self) -> RoundAnnouncement | None:
        """The round announcement a session should answer now, if any (worker thread)."""
        with self._work_lock:
            msg = self._pending_round
        if msg is None:
            return None
        if msg.epoch and msg.epoch != self.fleet_epoch:
            return None  # a round of another lineage: its global comes first (the announcement stays pending)
        base = msg.base_version or 0
        drop = (msg.selected is not None and self.cfg.device_id not in msg.selected) or \
            msg.session_key in self.store.get("round_sessions", []) or base < self.global_version
        if not drop and (base > self.global_version or self.store.count_examples()["train"] == 0):
            return None  # wait for the round's global (or for data); the announcement stays pending
        with self._work_lock:
            if self._pending_round is msg:
                self._pending_round = None
        return None if drop else msg

    def _consider_global(self, pointer: GlobalPointer, blob: bytes) -> None:
        """Check a received global, make it the base of further training, and serve it if the gate agrees."""
        try:
            tensors, meta = adapter_from_bytes(blob, expect_fingerprint=self.manifest.base_fingerprint,
                                               expect_shapes=self.manifest.adapter["shapes"])
        except ProtocolError as exc:
            self._event("global_refused", version=pointer.version, reason=exc.reason.value, detail=exc.detail)
            self.metrics.inc("edgefm_global_refused_total", labels={"reason": exc.reason.value}, help="global adapters refused")
            return
        if not self.wants_global(pointer):
            return
        if pointer.epoch and pointer.epoch != self.fleet_epoch:
            # fleet reset: versions restart in the new lineage; what this device built on the old one is
            # no base for it (sessions and local results are keyed by version)
            self._event("fleet_epoch_changed", old=self.fleet_epoch, new=pointer.epoch, version=pointer.version,
                        old_version=self.global_version)
            self._latest_local = None
            self.store.put("latest_local", None)
            self.store.put("round_sessions", [])
            self.fleet_epoch = pointer.epoch
            self.store.put("fleet_epoch", pointer.epoch)
        meta.version = pointer.version
        adapter_id = f"global-{pointer.version}"
        path = self.data_dir / "adapters" / f"{adapter_id}.safetensors"
        save_adapter(path, tensors, meta)
        # It serves only if the gate finds it no worse for this device ...
        gate = self.gate("global", adapter_id, self.engine.make_active(tensors, meta))
        metrics = {"heldout_loss": gate.numbers.get("heldout_candidate"), "heldout_loss_before": gate.numbers.get("heldout_current"),
                   "gate": gate.reason.value}
        if gate.adopted:
            self.adapters.activate(adapter_id, tensors, meta, "global", metrics)
            self._event("global_adopted", version=pointer.version, **metrics)
        else:
            self.adapters.keep_as_refused(adapter_id, tensors, meta, metrics, gate.reason.value)
            self._event("global_not_served", version=pointer.version, reason=gate.reason.value, **metrics)
        # ... but it is always the base of further training (that is what the fleet agreed on; the device's
        # status tells the coordinator which global it trains from).
        self.global_version, self.global_tensors = pointer.version, tensors
        self.store.put("global_path", str(path))
        self.store.put("global_sha256", hashlib.sha256(path.read_bytes()).hexdigest())
        self.store.put("global_version", pointer.version)
        self.metrics.set("edgefm_global_version", pointer.version, help="latest global adapter version received")

    # ------------------------------------------------------------------ status
    def status_summary(self) -> dict:
        """Small status for MQTT status messages."""
        return {"adapter": self.active_id, "adapter_version": self.engine.adapter.version, "global_version": self.global_version,
                "profile": self.cfg.profile, "activity": self.state.value, "outbox": self.store.outbox_stats()}

    def status(self) -> dict:
        """Full status for the API and CLI."""
        return {"device_id": self.cfg.device_id, "fleet": self.cfg.fleet, "state": self.state.value,
                "paused_reason": self.paused_reason, "task": self.manifest.task,
                "active_adapter": self.active_id, "adapter_version": self.engine.adapter.version,
                "global_version": self.global_version, "fleet_epoch": self.fleet_epoch, "examples": self.store.count_examples(),
                "outbox": self.store.outbox_stats(), "broker_connected": bool(self.sync and self.sync.connected),
                "last_train_decision": self.last_decision.value,
                "round": self.round.to_json() if self.round else None,
                "rejected": (self.sync.rejected[-10:] if self.sync else []), "events": self.events[-20:],
                "training_coverage": self.store.training_coverage(), "gate_decisions": self.store.decisions(20),
                "broker_disconnects": self.sync.disconnects if self.sync else 0,
                "base_fingerprint": self.manifest.base_fingerprint, "quant": self.manifest.quant["scheme"]}

    # ------------------------------------------------------------------ lifecycle
    def request_started(self) -> None:
        with self._inflight_lock:
            self.inflight += 1

    def request_finished(self) -> None:
        with self._inflight_lock:
            self.inflight -= 1

    def add_examples(self, items: list[dict], source: str = "api") -> dict:
        """Validate and store training examples (refused while the disk is nearly full)."""
        if not self.disk_ok():
            from edge_runtime.store import StoreFull
            raise StoreFull(self.paused_reason)
        res = self.store.add_examples(items, source)
        self.metrics.inc("edgefm_examples_added_total", res["added"], help="training examples stored")
        return res

    def _worker_loop(self) -> None:
        """The agent's own worker: received globals, round sessions, requested and automatic training."""
        last_retention = 0.0
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._work_once()
                if time.time() - last_retention > 3600:
                    last_retention = time.time()
                    removed = self.store.apply_retention(self.cfg.retention_days * 86400)
                    if removed:
                        self._event("retention", removed=removed)
            except Exception:  # the daemon keeps serving whatever a training or evaluation bug does
                log.exception("agent worker error")
        with self._work_lock:
            waiters, self._train_waiters = self._train_waiters, []
        for fut in waiters:
            fut.set_result({"status": "stopping"})

    def _work_once(self) -> None:
        with self._work_lock:
            pending, self._pending_global = self._pending_global, None
        if pending:
            self._consider_global(*pending)
        if self.trainer is None:
            return
        round_msg = self._take_due_round()
        with self._work_lock:
            requested, self._train_requested = self._train_requested, False
            waiters, self._train_waiters = self._train_waiters, []
        if round_msg is not None or requested or waiters or self.cfg.auto_train:
            try:
                result = self.train_once(forced=requested or bool(waiters), round_msg=round_msg)
            except Exception as exc:
                for fut in waiters:
                    fut.set_exception(exc)
                raise
            for fut in waiters:
                fut.set_result(result)
            if round_msg is not None and result.get("status") in ("already_training", TrainDecision.PAUSED.value,
                                                                  TrainDecision.BUSY.value, TrainDecision.OUTSIDE_WINDOW.value):
                # try again at the next wake-up (another session was running, the disk was full, requests were
                # being served, or an async announcement came outside the training window)
                with self._work_lock:
                    self._pending_round = self._pending_round or round_msg
            elif round_msg is not None and result.get("status") != "trained":
                self._event("round_skipped", round=round_msg.round, status=result.get("status"), error=result.get("error"))

    def _count_step(self, step: int, loss: float) -> None:
        self.metrics.inc("edgefm_training_steps_total", help="optimizer steps run")
        self.metrics.set("edgefm_training_loss", loss, help="last training loss")

    def _inbox_loop(self) -> None:
        inbox = Path(str(self.cfg.inbox))
        inbox.mkdir(parents=True, exist_ok=True)
        from edge_runtime.store import StoreFull
        waiting: set[str] = set()
        while not self._stop.wait(1.0):
            for f in sorted(inbox.glob("*.jsonl")):
                try:
                    items = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                    self.add_examples(items, source="inbox")
                    f.rename(f.with_suffix(".jsonl.done"))
                    waiting.discard(f.name)
                except StoreFull as exc:  # not the file's fault: it stays and is tried again
                    if f.name not in waiting:
                        waiting.add(f.name)
                        self._event("inbox_file_waiting", file=f.name, error=str(exc))
                    break
                except (ValueError, EdgefmError) as exc:
                    self._event("inbox_file_refused", file=f.name, error=str(exc))
                    f.rename(f.with_suffix(".jsonl.bad"))

    def start(self) -> None:
        """Start background work (trainer, inbox, sync). The HTTP server is started by the caller."""
        self.state = AgentState.SERVING
        self._threads.append(threading.Thread(target=self._worker_loop, name="edgefm-worker", daemon=True))
        if self.cfg.inbox:
            self._threads.append(threading.Thread(target=self._inbox_loop, name="edgefm-inbox", daemon=True))
        for t in self._threads:
            t.start()
        if self.sync:
            self.sync.start()
        self._event("started", bundle=str(self.engine.dir), adapter=self.active_id, global_version=self.global_version)

    def train_now(self) -> None:
        """Ask the worker to run a session as soon as possible."""
        with self._work_lock:
            self._train_requested = True
        self._wake.set()

    def train_and_wait(self, timeout: float | None = None) -> dict:
        """Run a session on the worker (after any queued global) and return what it did."""
        if self.trainer is None:
            raise ConfigError("this bundle has no training graph")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._work_lock:
            self._train_waiters.append(fut)
        self._wake.set()
        try:
            return fut.result(timeout if timeout is not None else self.cfg.max_train_seconds * 2 + 300)
        except concurrent.futures.TimeoutError:
            raise TrainingError("the training session did not finish in time; see `edgefm-agent status`") from None

    @contextlib.contextmanager
    def not_in_flight(self):
        """A request that waits on background work does not count as serving load (training yields to that)."""
        self.request_finished()
        try:
            yield
        finally:
            self.request_started()

    def stop(self) -> None:
        """Stop background work and say goodbye on MQTT."""
        self.state = AgentState.STOPPING
        self._stop.set()
        self._wake.set()
        if self.sync:
            self.sync.close()
