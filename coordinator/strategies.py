"""Aggregation strategies: small classes in a registry, each folding updates as they arrive.

A strategy turns validated updates into a new global adapter by calling the pure functions of
``coordinator.aggregate``; it never sends anything. Streaming strategies keep one running sum (memory
independent of the number of updates); robust rules (median, trimmed mean) need every update of
the round and say so with ``streaming = False``.
"""

from __future__ import annotations

import numpy as np

from coordinator import aggregate as agg
from edge_runtime.protocol.adapter import is_lora_a

Tensors = dict[str, np.ndarray]


class Strategy:
    """FedAvg by number of examples, optionally followed by a server optimizer."""

    name = "fedavg"
    streaming = True
    server_opt = "fedavg"
    default_server_lr = 1.0

    def __init__(
        self,
        *,
        server_lr: float | None = None,
        server_opt: str | None = None,
        rank: int = 8,
        trim: int = 1,
        dp_noise_multiplier: float = 0.0,
        dp_clip: float = 1.0,
        dp_delta: float = 1e-5,
        seed: int = 0,
    ):
        if server_opt is not None:  # e.g. a robust rule (median) followed by a server optimizer
            self.server_opt = server_opt
            if server_lr is None and server_opt in ("fedadam", "fedyogi"):
                server_lr = FedAdam.default_server_lr
        self.server_lr = self.default_server_lr if server_lr is None else server_lr
        self.rank, self.trim = rank, trim
        self.dp_noise_multiplier, self.dp_clip, self.dp_delta = dp_noise_multiplier, dp_clip, dp_delta
        self.rng = np.random.default_rng(seed)
        self.opt_state = agg.ServerOptState()

    def begin(self, global_t: Tensors):
        """A fresh accumulator for one aggregation."""
        return {"sum": agg.RunningSum(), "all": []}

    def fold(self, acc, weight: float, delta: Tensors, global_t: Tensors, flat: np.ndarray | None = None) -> None:
        """Fold one validated update in (``flat``: ``delta`` as one vector in schema order, if at hand)."""
        if self.streaming:
            acc["sum"].add(weight, delta, flat)
        else:
            acc["all"].append((weight, delta))

    def count(self, acc) -> int:
        """How many updates are folded in."""
        return acc["sum"].count if self.streaming else len(acc["all"])

    def checkpoint_nbytes(self, acc) -> int | None:
        """Size of ``checkpoint(acc)``, or None where the accumulator cannot be checkpointed (it keeps
        every update, or is too large to be worth it): then the updates themselves are stored."""
        s = acc.get("sum")
        if not self.streaming or s is None or not s.count:
            return None
        return 8 * sum(v.size for v in s.sums.values())

    def checkpoint(self, acc) -> tuple[np.ndarray, dict]:
        """The accumulator as (flat float64 vector, description): enough to ``restore`` it exactly."""
        return agg.running_sum_state(acc["sum"])

    def restore(self, flat: np.ndarray, meta: dict, global_t: Tensors):
        """An accumulator equal to the one ``checkpoint`` saw."""
        return {"sum": agg.running_sum_from_state(flat, meta), "all": []}

    def avg_delta(self, acc) -> Tensors:
        """The aggregated delta."""
        return acc["sum"].mean()

    def version_metrics(self, versions: int) -> dict:
        """What this strategy adds to the metrics of its ``versions``-th aggregated version."""
        return {}

    def finish(self, acc, global_t: Tensors) -> Tensors | None:
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
        return {"prod": agg.ProductSum()}

    def fold(self, acc, weight, delta, global_t, flat=None):
        full = {k: global_t[k] + delta[k] for k in global_t}
        acc["prod"].add(weight, agg.pad_or_truncate_rank(full, max(self.rank, 1)) if self.rank else full)

    def count(self, acc):
        return acc["prod"].count

    def checkpoint_nbytes(self, acc):
        return None  # the product sums are out x in per module: larger than the updates; store those

    def finish(self, acc, global_t):
        if self.count(acc) == 0:
            return None
        return acc["prod"].refactor(
            self.rank, agg.pad_or_truncate_rank(global_t, self.rank) if self.rank else global_t, self.server_lr
        )


class Median(Strategy):
    """Coordinate-wise median of deltas (robust to a minority of bad devices)."""

    name, streaming = "median", False

    def avg_delta(self, acc):
        return agg.coordinate_median([d for _, d in acc["all"]])


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean of deltas."""

    name, streaming = "trimmed_mean", False

    def avg_delta(self, acc):
        return agg.trimmed_mean([d for _, d in acc["all"]], self.trim)


class DpFedAvg(Strategy):
    """Client-level DP: every update clipped to dp_clip, equal weights, Gaussian noise on the sum."""

    name = "dp_fedavg"

    def fold(self, acc, weight, delta, global_t, flat=None):
        acc["sum"].add(1.0, agg.clip_update(delta, self.dp_clip))

    def version_metrics(self, versions):
        """The privacy spent so far: epsilon at ``dp_delta`` after ``versions`` noisy aggregates."""
        return {"epsilon": agg.gaussian_epsilon(self.dp_noise_multiplier, versions, self.dp_delta)}

    def avg_delta(self, acc):
        s = acc["sum"]
        noisy = agg.dp_noise({k: v for k, v in s.sums.items()}, self.dp_clip, self.dp_noise_multiplier, self.rng)
        return {k: (v / s.count).astype(np.float32) for k, v in noisy.items()}


STRATEGIES: dict[str, type[Strategy]] = {
    c.name: c for c in (Strategy, FedAvgM, FedAdam, FedYogi, FrozenA, SvdProduct, Median, TrimmedMean, DpFedAvg)
}


def make_strategy(name: str, **kw) -> Strategy:
    """Instantiate a strategy by name (ValueError lists the known ones)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kw)
