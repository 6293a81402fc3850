"""One training session of a device, end to end: whether to train now (edge_runtime/policy.py), where
to start (edge_runtime/lineage.py), on which examples (the store's batches plus general-text replay),
judged by the gate (edge_runtime/adapters.py), and what it changed queued as a signed update in the
outbox before anything is sent.

Runs on the agent's worker thread only (edge_runtime/agent.py); one session at a time.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from edge_runtime.adapters import AdapterHistory
from edge_runtime.engine import Engine
from edge_runtime.errors import ConfigError, TrainingError
from edge_runtime.evaluation import Evaluator
from edge_runtime.lineage import Lineage, Tensors
from edge_runtime.metrics import Metrics
from edge_runtime.optim import AdamWConfig
from edge_runtime.policy import TrainDecision, TrainPolicy, decide, session_steps
from edge_runtime.protocol.adapter import AdapterMeta
from edge_runtime.protocol.codec import CodecSpec
from edge_runtime.protocol.messages import RoundAnnouncement, RoundMode, UpdateHeader, encode_update
from edge_runtime.store import Store

if TYPE_CHECKING:
    from edge_runtime.config import AgentConfig


def make_trainer(cfg: AgentConfig, engine: Engine) -> Any:
    """The trainer the config and bundle call for: TorchTrainer (``trainer_backend = "torch"``) or
    OnnxTrainer (same interface); None for a bundle without a training graph."""
    if cfg.trainer_backend == "torch":
        from edge_runtime.torch_trainer import TorchTrainer  # lazy: torch only where this backend is chosen

        return TorchTrainer(
            engine.dir,
            engine.manifest,
            engine.tokenizer,
            model_dir=str(cfg.torch_model),
            load_4bit=cfg.torch_load_4bit,
            threads=cfg.threads_training,
            optim=AdamWConfig(lr=cfg.learning_rate),
        )
    if engine.manifest.training.graph:
        from edge_runtime.trainer import OnnxTrainer

        return OnnxTrainer(
            engine.dir, engine.manifest, engine.tokenizer, threads=cfg.threads_training, optim=AdamWConfig(lr=cfg.learning_rate)
        )
    return None


class Sessions:
    """Runs this device's training sessions. ``busy()``: requests are being served (a session yields
    to them); ``disk_ok()``: intake and checkpoints have room; ``topic``: where updates go;
    ``on_queued()``: an update was written to the outbox (sync sends it)."""

    def __init__(
        self,
        cfg: AgentConfig,
        trainer: Any,
        store: Store,
        evaluator: Evaluator,
        adapters: AdapterHistory,
        lineage: Lineage,
        metrics: Metrics,
        on_event: Callable[..., None],
        *,
        busy: Callable[[], bool],
        disk_ok: Callable[[], bool],
        topic: str,
        signer: Any,
        on_queued: Callable[[], None],
    ):
        self.cfg, self.trainer, self.store, self.evaluator = cfg, trainer, store, evaluator
        self.adapters, self.lineage, self.metrics, self.on_event = adapters, lineage, metrics, on_event
        self.busy, self.disk_ok, self.topic, self.signer, self.on_queued = busy, disk_ok, topic, signer, on_queued
        self.fingerprint = evaluator.manifest.base_fingerprint
        self.checkpoint_path = Path(cfg.data_dir) / "checkpoint.safetensors"
        self.lock = threading.Lock()
        self.running = False
        self.last_train_at = 0.0
        self.last_decision = TrainDecision.NOT_ENOUGH_DATA

    def run(
        self, forced: bool = False, round_msg: RoundAnnouncement | None = None, announced: RoundAnnouncement | None = None
    ) -> dict:
        """One session, if the policy says so (``forced``: asked for by hand); ``round_msg``: the round
        announcement it answers (one session per round and base version); ``announced``: the latest
        announcement heard, whose round and ``train_a`` apply when it is on the same base version."""
        if self.trainer is None:
            raise ConfigError("this bundle has no training graph")
        if not self.lock.acquire(blocking=False):
            return {"status": "already_training"}
        try:
            sync_round = round_msg is not None and round_msg.mode == RoundMode.SYNC
            counts = self.store.count_examples()
            window = self.cfg.train_window_hours
            policy = TrainPolicy(
                self.cfg.min_new_examples,
                cooldown_s=self.cfg.train_cooldown_s,
                window_hours=(window[0], window[1]) if window else None,
            )
            # a sync round asks this device for a session; an async announcement only says a new global
            # exists: train when there is new data (else every version would trigger a session on every
            # device, each making another version)
            decision = decide(
                policy,
                new_examples=counts["new"],
                inflight_requests=int(self.busy()),
                hour=time.localtime().tm_hour,
                paused=not self.disk_ok(),
                seconds_since_last=time.time() - self.last_train_at,
                forced=forced or sync_round,
            )
            self.last_decision = decision
            if decision != TrainDecision.TRAIN:
                return {"status": decision.value}
            if counts["train"] == 0:
                return {"status": TrainDecision.NOT_ENOUGH_DATA.value}
            self.running = True
            self._lower_thread_priority()
            # A synchronous round's session starts from the round's global (plain FedAvg); other sessions
            # continue this device's adopted local result on that global.
            start = self.lineage.global_tensors if sync_round else self.lineage.training_start()
            return self._train(start, counts["new"], round_msg, round_msg or announced)
        except TrainingError as exc:
            self.on_event("training_failed", error=str(exc))
            return {"status": "failed", "error": str(exc)}
        finally:
            self.running = False
            self.lock.release()

    def _train(
        self, start: Tensors, new_examples: int, round_msg: RoundAnnouncement | None, announced: RoundAnnouncement | None
    ) -> dict:
        from edge_runtime.trainer import load_checkpoint, save_checkpoint

        base_version = self.lineage.global_version
        ckpt = self.checkpoint_path
        resume = None
        loaded = load_checkpoint(ckpt) if ckpt.exists() else None
        if loaded and loaded[1].get("base_version") == base_version:
            resume = loaded[0]
            self.on_event("training_resumed", step=resume["step"])
        current = announced or RoundAnnouncement(base_version=base_version)
        round_id = current.round if current.base_version in (None, base_version) else None
        general = (
            self.evaluator.general_replay_texts()
            if self.cfg.general_replay_fraction > 0 and self.evaluator.manifest.task == "causal-lm"
            else []
        )
        device_rows = self.trainer.B - min(len(general), int(round(self.trainer.B * self.cfg.general_replay_fraction)))
        steps = session_steps(
            new_examples=new_examples,
            batch=device_rows,
            replay_fraction=self.cfg.replay_fraction,
            min_steps=self.cfg.steps_per_round,
            max_steps=self.cfg.max_steps_per_session,
        )
        rng = np.random.default_rng(int(time.time()))

        def next_examples(n: int) -> list[dict]:
            if self.cfg.train_step_delay_s:
                time.sleep(self.cfg.train_step_delay_s)
            batch = self.store.training_batch(device_rows, self.cfg.replay_fraction)
            # general rows carry no id: they are not device data and are never counted as used
            extra = [{"text": general[i]} for i in rng.choice(len(general), n - device_rows, replace=False)] if batch else []
            return batch + extra

        try:
            result = self.trainer.train(
                start,
                next_examples,
                max_steps=steps,
                max_seconds=self.cfg.max_train_seconds,
                should_yield=self.busy,
                resume=resume,
                checkpoint=lambda st: save_checkpoint(ckpt, st, {"base_version": base_version}),
                train_a=current.train_a,
                prox_mu=self.cfg.prox_mu,
                on_used=self.store.mark_trained,
                on_step=self._count_step,
            )
        finally:
            # the training session is the agent's biggest allocation: drop it before the gate evaluates
            # (so the two do not add up) and between sessions (an idle device holds only the server)
            self.trainer.release()
        self.last_train_at = time.time()
        if result.steps == 0:
            return {"status": "no_steps", "stopped": result.stopped}
        n_local = int(self.store.get("local_counter", 0)) + 1
        self.store.put("local_counter", n_local)
        adapter_id = f"local-{base_version}.{n_local}"
        train_loss = float(np.mean(result.losses[-4:]))
        meta = self.adapters.engine.adapter.meta
        cand_meta = AdapterMeta(
            **{**meta.to_json(), "version": base_version, "parent_version": base_version, "metrics": {"train_loss": train_loss}}
        )
        gate, metrics = self.adapters.offer("local", adapter_id, result.tensors, cand_meta, {"train_loss": train_loss})
        if gate.adopted:
            self.lineage.record_local(base_version, result.tensors, str(self.adapters.path_of(adapter_id)))
        # The update (what this session changed) goes to the outbox before anything is sent.
        update_id = self.queue_update(result.tensors, start, len(result.examples_used), base_version, round_id, metrics)
        if round_msg is not None:
            self.lineage.session_done(round_msg.session_key)
        ckpt.unlink(missing_ok=True)
        self.on_event(
            "trained",
            steps=result.steps,
            loss_first=result.losses[0],
            loss_last=result.losses[-1],
            heldout_before=metrics["heldout_loss_before"],
            heldout_after=metrics["heldout_loss"],
            adopted=gate.adopted,
            gate=gate.reason.value,
            update_id=update_id,
            round=round_id,
        )
        return {
            "status": "trained",
            "steps": result.steps,
            "stopped": result.stopped,
            "losses": result.losses,
            "examples_used": len(result.examples_used),
            "adopted": gate.adopted,
            "gate": gate.reason.value,
            "gate_numbers": gate.numbers,
            "adapter": self.adapters.active_id,
            "candidate": adapter_id,
            "update_id": update_id,
            "round": round_id,
            "heldout_loss_before": metrics["heldout_loss_before"],
            "heldout_loss_after": metrics["heldout_loss"],
            "seconds": result.seconds,
        }

    def queue_update(
        self, tensors: Tensors, start: Tensors, num_examples: int, base_version: int, round_id: int | None, metrics: dict
    ) -> str:
        """Encode (and sign) what a session changed, ``tensors - start``, into the outbox; its update id."""
        # Sessions that continue a local result each send only their own progress, so the coordinator
        # never counts one session's progress twice.
        delta = {k: (tensors[k] - start[k]).astype(np.float32) for k in tensors}
        update_id = uuid.uuid4().hex
        header = UpdateHeader(
            device_id=self.cfg.device_id,
            update_id=update_id,
            base_version=base_version,
            num_examples=max(1, num_examples),
            base_fingerprint=self.fingerprint,
            round=round_id,
            metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
            codec=CodecSpec(self.cfg.update_codec, self.cfg.update_compression),
        )
        payload = encode_update(
            header, delta, sign_key=self.cfg.sign_key.encode() if self.cfg.sign_key else None, signer=self.signer
        )
        self.store.enqueue_update(update_id, self.topic, payload, base_version)
        self.metrics.inc("edgefm_updates_queued_total", help="updates written to the outbox")
        self.metrics.inc("edgefm_update_bytes_total", len(payload), help="bytes of updates queued")
        self.on_queued()
        return update_id

    def _count_step(self, step: int, loss: float) -> None:
        self.metrics.inc("edgefm_training_steps_total", help="optimizer steps run")
        self.metrics.set("edgefm_training_loss", loss, help="last training loss")

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
