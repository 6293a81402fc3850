"""How the agent judges adapters: per-example losses on the held-out slice and on general text, the
gate's decision (edge_runtime/gate.py: pure) recorded with its numbers, and the general text the base
model wrote itself, which training replays to keep everyday language (forgetting control)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from edge_runtime.engine import ActiveAdapter, Engine
from edge_runtime.gate import GateDecision, GatePolicy, anchor_texts, decide_gate
from edge_runtime.metrics import Metrics
from edge_runtime.sampling import nll
from edge_runtime.store import Store

if TYPE_CHECKING:
    from edge_runtime.config import AgentConfig

GENERAL_OPENINGS = (
    "The",
    "Yesterday",
    "In the morning",
    "She said",
    "Our town",
    "When we",
    "Most people",
    "After the",
    "My friend",
    "The weather",
    "Last year",
    "At home",
    "The story",
    "Every day",
    "On the way",
    "He",
)


class Evaluator:
    """Scores adapters of one bundle on one device's data; ``base`` is the bundle's own adapter (what
    the gate calls "the base model")."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        base: ActiveAdapter,
        cfg: AgentConfig,
        data_dir: Path,
        metrics: Metrics,
        on_event: Callable[..., None],
    ):
        self.engine, self.store, self.base, self.cfg, self.data_dir = engine, store, base, cfg, data_dir
        self.metrics, self.on_event = metrics, on_event
        self.manifest = engine.manifest
        self._anchor: list[dict] | None = None
        self._cache: dict[tuple, np.ndarray] = {}

    def example_losses(self, adapter: ActiveAdapter, examples: list[dict]) -> np.ndarray:
        """Loss per example (mean NLL per token for LMs, cross-entropy for classifiers)."""
        if not examples:
            return np.zeros(0)
        if self.manifest.task == "causal-lm":
            S = int(self.manifest.training.seq)
            out = []
            for ex in examples:
                s, c = self.engine.score(self.engine.encode(ex["text"])[:S], adapter)
                if c:  # a one-token text has nothing to predict (the same for every adapter, so pairs stay aligned)
                    out.append(s / c)
            return np.array(out)
        feeds, _ = self.engine.encoder_inputs([e["text"] for e in examples])
        logits = self.engine.session.run(None, {**feeds, **adapter.feeds})[0]
        return nll(logits, np.array([e["label"] or 0 for e in examples]))

    def anchor_examples(self) -> list[dict]:
        """The general-text anchor set (LM bundles only): shipped passages or ``anchor_file``."""
        if self.manifest.task != "causal-lm" or self.cfg.anchor_file == "":
            return []
        if self._anchor is None:
            self._anchor = [{"text": t} for t in anchor_texts(self.cfg.anchor_file)]
        return self._anchor

    def general_replay_texts(self, per_opening: int = 4, tokens: int = 64) -> list[str]:
        """General text sampled once from the base model itself (kept in the data dir): replaying it while
        training on device data keeps the adapter close to the base model's everyday language. It is
        not the gate's anchor set, so the gate's forgetting check stays independent."""
        path = self.data_dir / "general_replay.jsonl"
        if path.exists():
            return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        texts = []
        for i, opening in enumerate(GENERAL_OPENINGS):
            for j in range(per_opening):
                ids = self.engine.encode(opening)
                new = list(
                    self.engine.generate(
                        ids, max_new_tokens=tokens, temperature=1.0, top_p=1.0, seed=1000 * i + j, adapter=self.base
                    )
                )
                texts.append(self.engine.decode(ids + new))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(path)
        self.on_event("general_replay_ready", passages=len(texts))
        return texts

    def _cached_losses(self, key: tuple, adapter: ActiveAdapter, examples: list[dict]) -> np.ndarray:
        """Losses of an adapter that does not change under ``key`` (the base, the serving one by id)."""
        full = key + (tuple(e.get("id", i) for i, e in enumerate(examples)),)
        if full not in self._cache:
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[full] = self.example_losses(adapter, examples)
        return self._cache[full]

    def judge(
        self, kind: str, candidate_id: str, candidate: ActiveAdapter, *, serving_id: str, serving: ActiveAdapter
    ) -> GateDecision:
        """Judge a candidate against the serving adapter and the base model on the held-out slice and
        the anchor set; the decision is recorded in the store with its numbers."""
        held = self.store.heldout(self.cfg.gate_heldout_limit)
        anchor = self.anchor_examples()
        decision = decide_gate(
            GatePolicy(z=self.cfg.gate_z, max_forgetting=self.cfg.max_forgetting),
            candidate=self.example_losses(candidate, held),
            current=self._cached_losses(("serving", serving_id), serving, held),
            base=self._cached_losses(("base",), self.base, held),
            anchor_candidate=self.example_losses(candidate, anchor),
            anchor_base=self._cached_losses(("base-anchor",), self.base, anchor),
        )
        self.store.record_decision(kind, candidate_id, decision.adopted, decision.reason.value, decision.numbers)
        self.metrics.inc(
            "edgefm_gate_decisions_total",
            labels={"kind": kind, "reason": decision.reason.value},
            help="gate decisions by candidate kind and reason",
        )
        return decision
