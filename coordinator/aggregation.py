"""The open aggregation: the accepted updates of the current version, held until their batch is
judged (coordinator/influence.py) and then folded into the strategy's accumulator; its durable
form (accumulator checkpoints + the update log, coordinator/state.py) and its rebuild from it.

One instance per coordinator; the service calls it under its lock and inside a state transaction.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import statistics

import numpy as np

from coordinator import aggregate as agg
from coordinator.influence import MIN_DIRECTION_BATCH, InfluencePolicy, bound_update, direction_cosines, direction_keep
from coordinator.rounds import staleness_weight
from coordinator.state import CHECKPOINTED, State
from coordinator.strategies import Strategy
from edge_runtime.errors import ProtocolError
from edge_runtime.protocol.messages import decode_update
from edge_runtime.protocol.tensors import decode_tensors, encode_tensors, flatten

log = logging.getLogger("edgefm.coordinator")


@dataclasses.dataclass(frozen=True)
class AggregateResult:
    """What closing the open aggregation made: the new global (None: keep the previous one), its
    metrics, the updates folded into it and the devices they came from."""

    tensors: dict[str, np.ndarray] | None
    metrics: dict
    folded_ids: list[str]
    participants: list[str]


@dataclasses.dataclass
class Held:
    """An accepted update waiting for its batch to be judged and bounded (see coordinator/influence.py)."""

    update_id: str
    device_id: str
    claimed: int
    norm: float
    staleness: int
    tensors: dict
    flat: np.ndarray | None


class OpenAggregate:
    """Accepted updates not yet in a published version: ``held`` ones (not yet judged) and folded
    ones (``folded_ids``, in ``acc``); ``devices`` that have one; the ``reference`` of recent
    bounded updates the influence bounds are taken from."""

    def __init__(
        self,
        strategy: Strategy,
        influence: InfluencePolicy,
        state: State,
        global_tensors: dict,
        *,
        clip_norm: float,
        sync: bool,
        staleness_exponent: float,
        max_update_bytes: int,
    ):
        self.strategy, self.influence, self.state = strategy, influence, state
        self.clip_norm, self.sync, self.staleness_exponent, self.max_update_bytes = (
            clip_norm,
            sync,
            staleness_exponent,
            max_update_bytes,
        )
        self.rng = np.random.default_rng()  # OS entropy: which coordinates the direction check samples is not guessable
        self.reference: collections.deque = collections.deque(maxlen=influence.window)
        self.begin(global_tensors)

    def begin(self, global_tensors: dict) -> None:
        """Empty, on top of ``global_tensors`` (a new version)."""
        self.global_tensors = global_tensors
        self.acc = self.strategy.begin(global_tensors)
        self.folded_ids: list[str] = []
        self.held: list[Held] = []
        self.devices: set[str] = set()

    def count(self) -> int:
        """Updates in the open aggregation, folded or held."""
        return self.strategy.count(self.acc) + len(self.held)

    def fold(self, weight: float, tensors, flat=None, norm: float | None = None, clip: float = 0.0) -> None:
        """Fold one update into the accumulator, clipped first to ``clip`` (its bound) and to
        ``clip_norm`` if configured (``flat``: the tensors as one vector in their order, when at hand;
        ``norm``: theirs, if known)."""
        limit = min([c for c in (clip, self.clip_norm) if c and c > 0], default=0.0)
        if limit:
            n = agg.global_norm(tensors) if norm is None else norm
            if n > limit:
                self.strategy.fold(self.acc, weight, agg.clip_update(tensors, limit), self.global_tensors)
                return
        self.strategy.fold(self.acc, weight, tensors, self.global_tensors, flat=flat)

    def hold(self, h: Held) -> None:
        """An accepted update joins the open aggregation (judged with its batch by ``release``)."""
        self.held.append(h)
        self.devices.add(h.device_id)

    def release(self, force: bool = False) -> None:
        """Judge and fold the held updates once ``judge_batch`` of them are held, or now (``force``: an
        aggregation is due). Each is bounded against the reference (recent bounded updates plus the held
        ones); then the batch is judged by direction and an update pointing away from it is excluded
        (recorded in the state)."""
        if not self.held or (len(self.held) < self.influence.judge_batch and not force):
            return
        pool = list(self.reference) + [(h.claimed, h.norm) for h in self.held]
        names = sorted(self.global_tensors)  # one coordinate order for every update, whatever its payload's
        if self.influence.direction_share and len(self.held) >= MIN_DIRECTION_BATCH:
            # each update as one vector in that order: its payload's own flat view when the order matches (no copy)
            cosines = direction_cosines(
                [
                    h.flat if h.flat is not None and list(h.tensors) == names else flatten([h.tensors[k] for k in names])
                    for h in self.held
                ],
                self.rng,
            )
        else:
            cosines = [float("nan")] * len(self.held)
        keep = direction_keep(cosines, self.influence.direction_share)
        for h, cos, kept in zip(self.held, cosines, keep):
            if not kept:
                why = (
                    f"points away from the other updates of its batch: cosine {cos:.3f} with their median direction, "
                    f"below {self.influence.direction_share:g} x the batch's median cosine {statistics.median(cosines):.3f}"
                )
                self.state.exclude_update(h.update_id, why)
                log.warning("update %s from %s excluded: %s", h.update_id, h.device_id, why)
                continue
            b = bound_update(h.claimed, h.norm, pool, self.influence)
            weight = b.examples if self.sync else staleness_weight(b.examples, h.staleness, self.staleness_exponent)
            self.state.set_update_bound(h.update_id, weight, b.clip_to)
            if b.clip_to or b.examples < h.claimed:
                log.info(
                    "update %s from %s bounded: counts %.0f of %d claimed examples%s",
                    h.update_id,
                    h.device_id,
                    b.examples,
                    h.claimed,
                    f", norm {h.norm:.3g} clipped to {b.clip_to:.3g}" if b.clip_to else "",
                )
            self.fold(weight, h.tensors, h.flat, h.norm, clip=b.clip_to)
            self.folded_ids.append(h.update_id)
            self.reference.append((h.claimed, h.norm))
        self.held = []

    def checkpoint_if_due(self) -> bool:
        """Inside a batch's transaction, after its payloads went to the log: once the log holds more
        than a checkpoint of the accumulator would take, write that checkpoint (two generations are
        kept: one damaged copy loses nothing), after which the log before it can go. A checkpoint
        covers folded updates only: while any is held, the log alone keeps them."""
        ck_bytes = self.strategy.checkpoint_nbytes(self.acc)
        if not self.held and ck_bytes is not None and ck_bytes <= self.state.uncovered_log_bytes():
            flat, meta = self.strategy.checkpoint(self.acc)
            self.state.save_checkpoint(flat, meta)
            return True
        return False

    def replay(self, version: int, global_tensors: dict) -> list[tuple[str, str]]:
        """Rebuild from durable state on top of ``global_tensors`` (``version``'s; after a restart, a
        failed commit or a hand publish): the checkpoint (if one was taken since the last publish) plus
        every accepted update stored in the log after it. Returns (update id, device id) of every update
        restored."""
        self.begin(global_tensors)
        self.reference = collections.deque(self.state.influence_reference(self.influence.window), maxlen=self.influence.window)
        rows = self.state.pending_accepted()
        covered = [r for r in rows if r[2] == CHECKPOINTED]
        if covered:
            ck = None
            try:
                ck = self.state.load_checkpoint()
                if ck is not None:
                    acc = self.strategy.restore(ck[0], ck[1], self.global_tensors)
                    if self.strategy.count(acc) != len(covered):
                        raise OSError(f"checkpoint holds {self.strategy.count(acc)} updates, state says {len(covered)}")
                    self.acc = acc
            except (OSError, ValueError, KeyError) as exc:
                log.error("accumulator checkpoint unusable after restart (%s); rebuilding it from the previous one", exc)
                ck = self._rebuild_checkpoint(len(covered))
            if ck is None:
                log.error("%d accepted updates were held only by the accumulator checkpoint; dropping them", len(covered))
                self.state.drop_unreadable()
                covered = []
        restored = []
        for update_id, device_id, *_ in covered:
            self.folded_ids.append(update_id)
            restored.append((update_id, device_id))
        for update_id, device_id, blob, weight, clip, claimed, norm, base_version in rows:
            if blob == CHECKPOINTED:
                continue
            try:
                upd = decode_update(self.state.read_update(blob), max_bytes=self.max_update_bytes)
            except (OSError, ProtocolError) as exc:
                log.error("stored update %s unreadable after restart (%s); dropping it", update_id, exc)
                self.state.drop_unreadable(update_id)
                continue
            if weight is None:  # held when the coordinator stopped: judged with the next ones
                norm = agg.global_norm(upd.tensors) if norm is None else norm
                self.held.append(Held(update_id, device_id, claimed, norm, version - base_version, upd.tensors, upd.tensors.flat))
            else:
                self.fold(weight, upd.tensors, upd.tensors.flat, clip=clip or 0.0)
                self.folded_ids.append(update_id)
            restored.append((update_id, device_id))
        self.devices = {d for _, d in restored}
        return restored

    def _rebuild_checkpoint(self, covered: int):
        """The newest checkpoint is damaged: the previous one (if any) plus the payloads of the updates
        the newest added (kept in the log until the next checkpoint). Returns something true when it
        worked (``acc`` is then rebuilt), None when a second copy is damaged too."""
        rec = self.state.get("acc_checkpoint")
        if not rec:
            return None
        added = self.state.added_by_checkpoint(rec["file"])
        try:
            prev = self.state.load_checkpoint(previous=True)
            acc = (
                self.strategy.restore(prev[0], prev[1], self.global_tensors) if prev else self.strategy.begin(self.global_tensors)
            )
            if self.strategy.count(acc) + len(added) != covered:
                raise OSError(
                    f"previous checkpoint holds {self.strategy.count(acc)} updates and {len(added)} were added, "
                    f"state says {covered}"
                )
            self.acc = acc
            for update_id, ref, weight, clip in added:
                upd = decode_update(self.state.read_update(ref), max_bytes=self.max_update_bytes)
                self.fold(weight, upd.tensors, upd.tensors.flat, clip=clip or 0.0)
        except (OSError, ValueError, KeyError, ProtocolError) as exc:
            log.error("the previous checkpoint and the payload copies cannot rebuild it either (%s)", exc)
            self.acc = self.strategy.begin(self.global_tensors)
            return None
        log.warning("accumulator rebuilt from the previous checkpoint and %d stored payloads: nothing lost", len(added))
        return True

    def finish(self, versions: int) -> AggregateResult:
        """Fold what is still held and ask the strategy for the new global; ``versions``: how many
        aggregated versions exist with this one (for the strategy's metrics, e.g. DP epsilon). A result
        with non-finite values is never published: the previous model is kept, explicitly."""
        self.release(force=True)
        ids = list(self.folded_ids)
        rows = self.state.folded_summary(ids)
        participants = sorted({r[2] for r in rows})
        new = self.strategy.finish(self.acc, self.global_tensors)
        if new is None:
            return AggregateResult(None, {}, ids, participants)
        bad = [k for k, v in new.items() if not np.all(np.isfinite(v))]
        if bad:
            log.error("aggregate has non-finite values in %s; keeping the previous version", bad[:3])
            return AggregateResult(None, {}, ids, participants)
        metrics = {
            "num_updates": len(ids),
            "num_examples": sum(r[0] for r in rows),
            "bytes": sum(r[1] for r in rows),
            "update_norm": agg.global_norm({k: new[k] - self.global_tensors[k] for k in new}),
            **self.strategy.version_metrics(versions),
        }
        return AggregateResult(new, metrics, ids, participants)

    def save_opt_state(self, version: int) -> str | None:
        """Store the server optimizer's state (momentum, moments) as of ``version``, so a restart
        continues it instead of starting from zero (FedAvgM, FedAdam, FedYogi); returns the blob it
        supersedes (delete it once this commits)."""
        opt = self.strategy.opt_state
        if not (opt.m or opt.v):
            return None
        tensors, meta = agg.opt_state_tensors(opt)
        old = (self.state.get("server_opt") or {}).get("sha256")
        sha = self.state.blobs.put(encode_tensors(tensors, meta))
        self.state.put("server_opt", {"version": version, "sha256": sha})
        return old if old != sha else None

    def load_opt_state(self, version: int) -> None:
        """The server optimizer's state stored with ``version`` (else it starts afresh, logged)."""
        rec = self.state.get("server_opt")
        if not rec:
            return
        if rec.get("version") != version:
            log.warning(
                "server optimizer state is from v%s, the current version is v%d (published by hand?): starting it afresh",
                rec.get("version"),
                version,
            )
            return
        try:
            tensors, meta = decode_tensors(self.state.blobs.get(rec["sha256"]))
            self.strategy.opt_state = agg.opt_state_from_tensors(tensors, meta)
        except (OSError, ProtocolError, ValueError) as exc:
            log.error("server optimizer state unreadable (%s): starting it afresh", exc)
