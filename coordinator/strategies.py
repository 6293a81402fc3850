"""Aggregation strategies: small classes in a registry, each folding updates as they arrive.

A strategy turns validated updates into a new global adapter by calling the pure functions of
``coordinator.aggregate``; it never sends anything. Streaming strategies keep one running sum (memory
independent of the number of updates); robust rules (median, trimmed mean) need every update of
the round and say so with ``streaming = False``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from coordinator import aggregate as agg
from edge_runtime.protocol.adapter import is_lora_a

Tensors = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """The settings strategies read (each reads its own: ``trim`` the trimmed mean, ``dp_*`` DP-FedAvg,
    ``rank`` the SVD product); ``server_lr``/``server_opt`` None: the strategy's own defaults."""

    server_lr: float | None = None
    server_opt: str | None = None
    rank: int = 8
    trim: int = 1
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    seed: int = 0


@dataclasses.dataclass
class Accumulator:
    """What one aggregation holds: a running weighted sum (streaming strategies), every (weight, delta)
    (robust rules), or the sum of the adapters' products (SVD)."""

    sum: agg.RunningSum = dataclasses.field(default_factory=agg.RunningSum)
    all: list[tuple[float, Tensors]] = dataclasses.field(default_factory=list)
    prod: agg.ProductSum | None = None


class Strategy:
    """FedAvg by number of examples, optionally followed by a server optimizer. Adding a strategy is
    adding a subclass to ``STRATEGIES``."""

    name = "fedavg"
    streaming = True
    server_opt = "fedavg"
    default_server_lr = 1.0
    train_a = True  # devices train both factors (the round announcement carries it)

    def __init__(self, cfg: StrategyConfig | None = None):
        cfg = cfg or StrategyConfig()
        server_lr = cfg.server_lr
        if cfg.server_opt is not None:  # e.g. a robust rule (median) followed by a server optimizer
            self.server_opt = cfg.server_opt
            if server_lr is None and cfg.server_opt in ("fedadam", "fedyogi"):
                server_lr = FedAdam.default_server_lr
        self.cfg = cfg
        self.server_lr = self.default_server_lr if server_lr is None else server_lr
        self.rng = np.random.default_rng(cfg.seed)
        self.opt_state = agg.ServerOptState()

    def begin(self, global_t: Tensors) -> Accumulator:
        """A fresh accumulator for one aggregation."""
        return Accumulator()

    def fold(self, acc: Accumulator, weight: float, delta: Tensors, global_t: Tensors, flat: np.ndarray | None = None) -> None:
        """Fold one validated update in (``flat``: ``delta`` as one vector in schema order, if at hand)."""
        if self.streaming:
            acc.sum.add(weight, delta, flat)
        else:
            acc.all.append((weight, delta))

    def count(self, acc: Accumulator) -> int:
        """How many updates are folded in."""
        return acc.sum.count if self.streaming else len(acc.all)

    def checkpoint_nbytes(self, acc: Accumulator) -> int | None:
        """Size of ``checkpoint(acc)``, or None where the accumulator cannot be checkpointed (it keeps
        every update, or is too large to be worth it): then the updates themselves are stored."""
        if not self.streaming or not acc.sum.count:
            return None
        return 8 * sum(v.size for v in acc.sum.sums.values())

    def checkpoint(self, acc: Accumulator) -> tuple[np.ndarray, dict]:
        """The accumulator as (flat float64 vector, description): enough to ``restore`` it exactly."""
        return agg.running_sum_state(acc.sum)

    def restore(self, flat: np.ndarray, meta: dict, global_t: Tensors) -> Accumulator:
        """An accumulator equal to the one ``checkpoint`` saw."""
        return Accumulator(sum=agg.running_sum_from_state(flat, meta))

    def avg_delta(self, acc: Accumulator) -> Tensors:
        """The aggregated delta."""
        return acc.sum.mean()

    def version_metrics(self, versions: int) -> dict:
        """What this strategy adds to the metrics of its ``versions``-th aggregated version."""
        return {}

    def finish(self, acc: Accumulator, global_t: Tensors) -> Tensors | None:
        """New global tensors, or None to keep the previous model (nothing usable was folded in)."""
        if self.count(acc) == 0:
            return None
        return agg.apply_server_update(global_t, self.avg_delta(acc), self.server_opt, self.opt_state, lr=self.server_lr)


class FedAvgM(Strategy):
    name, server_opt = "fedavgm", "fedavgm"


class FedAdam(Strategy):
    name, server_opt = "fedadam", "fedadam"
    default_server_lr = 0.01


class FedYogi(FedAdam):
    name, server_opt = "fedyogi", "fedyogi"


class FrozenA(Strategy):
    """Devices train only B (the round message says train_a=false); averaging B is then exact."""

    name = "frozen_a"
    train_a = False

    def finish(self, acc, global_t):
        if self.count(acc) == 0:
            return None
        d = self.avg_delta(acc)
        return {k: (global_t[k] if is_lora_a(k) else global_t[k] + self.server_lr * d[k]).astype(np.float32) for k in global_t}


class SvdProduct(Strategy):
    """Exact mean of the products B·A of each device's adapter, re-factorized to rank r by truncated SVD."""

    name = "svd"

    def begin(self, global_t):
        return Accumulator(prod=agg.ProductSum())

    def _prod(self, acc: Accumulator) -> agg.ProductSum:
        if acc.prod is None:
            raise ValueError("an SVD accumulator holds a product sum")
        return acc.prod

    def fold(self, acc, weight, delta, global_t, flat=None):
        full = {k: global_t[k] + delta[k] for k in global_t}
        rank = self.cfg.rank
        self._prod(acc).add(weight, agg.pad_or_truncate_rank(full, max(rank, 1)) if rank else full)

    def count(self, acc):
        return self._prod(acc).count

    def checkpoint_nbytes(self, acc):
        return None  # the product sums are out x in per module: larger than the updates; store those

    def finish(self, acc, global_t):
        if self.count(acc) == 0:
            return None
        rank = self.cfg.rank
        return self._prod(acc).refactor(rank, agg.pad_or_truncate_rank(global_t, rank) if rank else global_t, self.server_lr)


class Median(Strategy):
    """Coordinate-wise median of deltas (robust to a minority of bad devices)."""

    name, streaming = "median", False

    def avg_delta(self, acc):
        return agg.coordinate_median([d for _, d in acc.all])


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean of deltas."""

    name, streaming = "trimmed_mean", False

    def avg_delta(self, acc):
        return agg.trimmed_mean([d for _, d in acc.all], self.cfg.trim)


class DpFedAvg(Strategy):
    """Client-level DP: every update clipped to dp_clip, equal weights, Gaussian noise on the sum."""

    name = "dp_fedavg"

    def fold(self, acc, weight, delta, global_t, flat=None):
        acc.sum.add(1.0, agg.clip_update(delta, self.cfg.dp_clip))

    def version_metrics(self, versions):
        """The privacy spent so far: epsilon at ``dp_delta`` after ``versions`` noisy aggregates."""
        return {"epsilon": agg.gaussian_epsilon(self.cfg.dp_noise_multiplier, versions, self.cfg.dp_delta)}

    def avg_delta(self, acc):
        s = acc.sum
        noisy = agg.dp_noise({k: v for k, v in s.sums.items()}, self.cfg.dp_clip, self.cfg.dp_noise_multiplier, self.rng)
        return {k: (v / s.count).astype(np.float32) for k, v in noisy.items()}


STRATEGIES: dict[str, type[Strategy]] = {
    c.name: c for c in (Strategy, FedAvgM, FedAdam, FedYogi, FrozenA, SvdProduct, Median, TrimmedMean, DpFedAvg)
}


def make_strategy(name: str, cfg: StrategyConfig | None = None, **settings) -> Strategy:
    """A strategy by name with its settings (``cfg``, or keyword fields of StrategyConfig; ValueError
    lists the known names)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](cfg or StrategyConfig(**settings))
