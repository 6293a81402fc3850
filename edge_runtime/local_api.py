"""What local apps may ask of the agent: the facade the HTTP layer (edge_runtime/server.py, checked
against its ``AgentApi`` protocol) and the CLI use. It counts the requests being served (training
yields to them), stores examples, reports status and metrics, and hands adapter and training requests
to the agent's parts; it never reaches into the store's tables or the worker's queue itself."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Iterator

from edge_runtime.errors import ConfigError, TrainingError
from edge_runtime.store import StoreFull

if TYPE_CHECKING:
    from edge_runtime.agent import Agent, AgentState


class LocalApi:
    """The local API of one agent."""

    def __init__(self, agent: Agent):
        self._agent = agent
        self.cfg, self.engine, self.manifest, self.metrics = agent.cfg, agent.engine, agent.manifest, agent.metrics
        self.inflight = 0
        self._lock = threading.Lock()

    @property
    def state(self) -> AgentState:
        return self._agent.state

    @property
    def active_id(self) -> str:
        return self._agent.adapters.active_id

    @property
    def paused_reason(self) -> str | None:
        return self._agent.disk.reason

    # -- requests in flight: training yields while any is served
    def request_started(self) -> None:
        with self._lock:
            self.inflight += 1

    def request_finished(self) -> None:
        with self._lock:
            self.inflight -= 1

    @contextlib.contextmanager
    def not_in_flight(self) -> Iterator[None]:
        """A request that waits on background work does not count as serving load (training yields to that)."""
        self.request_finished()
        try:
            yield
        finally:
            self.request_started()

    # -- data
    def add_examples(self, items: list[dict], source: str = "api") -> dict:
        """Validate and store training examples (refused while the disk is nearly full)."""
        a = self._agent
        if not a.disk.ok():
            raise StoreFull(a.disk.reason)
        res = a.store.add_examples(items, source)
        self.metrics.inc("edgefm_examples_added_total", res["added"], help="training examples stored")
        return res

    def heldout_examples(self) -> list[dict]:
        """The examples this device holds back from training for its gate."""
        return self._agent.store.heldout_split()

    # -- adapters
    def adapter_history(self) -> list[dict]:
        """Served adapters and refused candidates, newest first."""
        return self._agent.store.adapters()

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
        a = self._agent
        return a.adapters.load_external(
            version=a.lineage.global_version, adapter=adapter, peft_config=peft_config, peft_weights=peft_weights, name=name
        )

    def rollback(self, to: str | None = None) -> dict:
        """Serve an earlier adapter: ``to`` an id from `adapters`, else the one before the current."""
        return self._agent.adapters.rollback(to)

    # -- training
    def train_now(self) -> None:
        """Ask the worker to run a session as soon as possible."""
        self._agent.work.request_training()

    def train_and_wait(self, timeout: float | None = None) -> dict:
        """Run a session on the worker (after any queued global) and return what it did."""
        a = self._agent
        if a.sessions.trainer is None:
            raise ConfigError("this bundle has no training graph")
        fut = a.work.wait_for_training()
        try:
            return fut.result(timeout if timeout is not None else self.cfg.max_train_seconds * 2 + 300)
        except TimeoutError:
            raise TrainingError("the training session did not finish in time; see `edgefm-agent status`") from None

    # -- reports
    def status(self) -> dict:
        """Full status for the API and CLI."""
        a, store, sync = self._agent, self._agent.store, self._agent.sync
        return {
            "device_id": self.cfg.device_id,
            "fleet": self.cfg.fleet,
            "state": a.state.value,
            "paused_reason": a.disk.reason,
            "task": self.manifest.task,
            "active_adapter": self.active_id,
            "adapter_version": self.engine.adapter.version,
            "global_version": a.lineage.global_version,
            "fleet_epoch": a.lineage.fleet_epoch,
            "examples": store.count_examples(),
            "outbox": store.outbox_stats(),
            "broker_connected": bool(sync and sync.connected),
            "last_train_decision": a.sessions.last_decision.value,
            "round": a.round.to_json() if a.round else None,
            "rejected": (sync.rejected[-10:] if sync else []),
            "events": a.events[-20:],
            "training_coverage": store.training_coverage(),
            "gate_decisions": store.decisions(20),
            "broker_disconnects": sync.disconnects if sync else 0,
            "base_fingerprint": self.manifest.base_fingerprint,
            "quant": self.manifest.quant.scheme,
        }

    def metrics_text(self) -> str:
        """Prometheus exposition of the agent's metrics, current as of now."""
        store = self._agent.store
        self.metrics.set("edgefm_inflight_requests", self.inflight, help="requests being served")
        self.metrics.set("edgefm_outbox_queued", store.outbox_stats()["queued"], help="updates waiting to be sent")
        counts = store.count_examples()
        self.metrics.set("edgefm_examples", counts["train"] + counts["heldout"], help="stored examples")
        return self.metrics.render()
