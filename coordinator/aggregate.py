"""Aggregation: pure functions over dicts of numpy arrays (name -> tensor). No I/O, no MQTT.

Conventions: an *update* is the delta a device's training made to the global adapter it started
from (``local - global``), per tensor name ``layers.<i>.<module>.lora_A|lora_B``. Strategies return
the new global adapter tensors; "keep the previous model" is returned explicitly as ``None``.

Why more than FedAvg: averaging A and B separately is not the average of the products B·A. The
LoRA-aware choices are ``frozen_a`` (devices train only B, so averaging is exact) and ``svd``
(average the products exactly, then re-factorize to rank r by truncated SVD).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np

from edge_runtime.protocol.adapter import is_lora_a, partner_b
from edge_runtime.protocol.tensors import flatten

Tensors = dict[str, np.ndarray]


# ---------------------------------------------------------------------------- basic folds


def weighted_mean(updates: list[tuple[float, Tensors]]) -> Tensors:
    """Weighted mean of updates; weights are e.g. numbers of examples (must sum to > 0)."""
    total = float(sum(w for w, _ in updates))
    if not updates or total <= 0:
        raise ValueError("weighted_mean needs at least one update with positive weight")
    out = {k: np.zeros_like(v, dtype=np.float64) for k, v in updates[0][1].items()}
    for w, t in updates:
        for k in out:
            out[k] += w * t[k]
    return {k: (v / total).astype(np.float32) for k, v in out.items()}


@dataclasses.dataclass
class RunningSum:
    """Streaming weighted sum: memory is one update's size whatever the number folded in.

    The sums live in one flat float64 vector (``sums`` holds reshaped views of it), so folding an
    update is one multiply-add over a flat view of it (no copy for decoded fp32 payloads) rather than
    a numpy call per tensor.
    Associative: partial sums from several workers combine with ``merge`` (MQTT shared subscriptions)."""

    sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    weight: float = 0.0
    count: int = 0

    def add(self, weight: float, tensors: Tensors, flat: np.ndarray | None = None) -> None:
        """Fold one update in. ``flat``, if given, is ``tensors`` as one vector in their order (e.g.
        from validation); else it is built here (a view where possible)."""
        if weight <= 0:
            raise ValueError("weights must be positive")
        keys = list(self.sums) or list(tensors)
        if set(tensors) != set(keys):
            raise ValueError(f"update tensors differ from the running sum's ({len(tensors)} vs {len(keys)})")
        if flat is None or list(tensors) != keys:  # ``flat`` follows the update's order: usable if it is ours
            flat = flatten([tensors[k] for k in keys])
        if not self.sums:
            acc = flat.astype(np.float64) * weight
            off = 0
            for k in keys:
                shape = np.shape(tensors[k])
                n = int(np.prod(shape, dtype=np.int64))
                self.sums[k] = acc[off : off + n].reshape(shape)
                off += n
            self._flat = acc
        else:
            flat_acc = getattr(self, "_flat", None)
            if flat_acc is None:  # built by merge / by hand: per-tensor path
                off = 0
                for k in keys:
                    n = self.sums[k].size
                    self.sums[k] += weight * flat[off : off + n].reshape(self.sums[k].shape)
                    off += n
            else:
                scratch = getattr(self, "_scratch", None)
                if scratch is None or scratch.shape != flat_acc.shape:
                    scratch = self._scratch = np.empty_like(flat_acc)
                np.multiply(flat, np.float64(weight), out=scratch)  # float64 product into a reused buffer
                flat_acc += scratch
        self.weight += weight
        self.count += 1

    def merge(self, other: "RunningSum") -> "RunningSum":
        """Combine two partial sums (returns a new one)."""
        out = RunningSum({k: v.copy() for k, v in self.sums.items()}, self.weight, self.count)
        for k, v in other.sums.items():
            out.sums[k] = out.sums[k] + v if k in out.sums else v.copy()
        out.weight += other.weight
        out.count += other.count
        return out

    def mean(self) -> Tensors:
        """The weighted mean so far."""
        if self.weight <= 0:
            raise ValueError("no updates folded in")
        return {k: (v / self.weight).astype(np.float32) for k, v in self.sums.items()}


def running_sum_state(rs: RunningSum) -> tuple[np.ndarray, dict]:
    """A running sum as one flat float64 vector plus a JSON-able description (names, shapes, weight,
    count): what an accumulator checkpoint stores. The vector is a view where possible (no copy)."""
    flat = getattr(rs, "_flat", None)
    if flat is None:
        flat = np.concatenate([np.asarray(v, np.float64).ravel() for v in rs.sums.values()]) if rs.sums else np.zeros(0)
    names = [[k, list(v.shape)] for k, v in rs.sums.items()]
    return flat, {"names": names, "weight": rs.weight, "count": rs.count}


def running_sum_from_state(flat: np.ndarray, meta: dict) -> RunningSum:
    """Inverse of ``running_sum_state`` (ValueError if the vector and the description disagree)."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in meta["names"]]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"checkpoint holds {flat.size} values, its description {sum(sizes)}")
    acc = np.array(flat, np.float64)  # writable, owned
    rs = RunningSum(weight=float(meta["weight"]), count=int(meta["count"]))
    off = 0
    for (k, shape), n in zip(meta["names"], sizes):
        rs.sums[k] = acc[off : off + n].reshape(shape)
        off += n
    if rs.sums:
        rs._flat = acc
    return rs


def global_norm(t: Tensors) -> float:
    """L2 norm over all tensors (one flat pass)."""
    if not t:
        return 0.0
    f = flatten(list(t.values()))
    with np.errstate(over="ignore"):  # huge values: inf, which any norm bound rejects
        return math.sqrt(float(np.dot(f, f)))


def clip_update(t: Tensors, max_norm: float) -> Tensors:
    """Scale an update down to L2 norm ``max_norm`` (no-op if already within)."""
    n = global_norm(t)
    if n <= max_norm or n == 0:
        return t
    f = max_norm / n
    return {k: (v * f).astype(np.float32) for k, v in t.items()}


def trimmed_mean(updates: list[Tensors], trim: int) -> Tensors:
    """Coordinate-wise mean after dropping the ``trim`` largest and smallest values per coordinate."""
    if len(updates) <= 2 * trim:
        raise ValueError(f"trimmed mean with trim={trim} needs more than {2 * trim} updates, got {len(updates)}")
    out = {}
    for k in updates[0]:
        stack = np.sort(np.stack([u[k] for u in updates]), axis=0)
        out[k] = stack[trim : len(updates) - trim].mean(axis=0).astype(np.float32)
    return out


def coordinate_median(updates: list[Tensors]) -> Tensors:
    """Coordinate-wise median."""
    if not updates:
        raise ValueError("median of no updates")
    return {k: np.median(np.stack([u[k] for u in updates]), axis=0).astype(np.float32) for k in updates[0]}


# ---------------------------------------------------------------------------- LoRA-aware


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(A name, B name) pairs present in a tensor dict."""
    names = set(names)
    return sorted((n, partner_b(n)) for n in names if is_lora_a(n) and partner_b(n) in names)


def pad_or_truncate_rank(t: Tensors, rank: int) -> Tensors:
    """Bring an adapter (or update) of any rank to ``rank``: zero-pad A rows / B columns, or truncate them.

    Truncation keeps the first ``rank`` components; combine with ``svd_refactor`` for the best rank-r fit."""
    out = {}
    for a, b in lora_pairs(t):
        A, B = t[a], t[b]
        r = A.shape[0]
        if r >= rank:
            out[a], out[b] = A[:rank].copy(), B[:, :rank].copy()
        else:
            out[a] = np.concatenate([A, np.zeros((rank - r, A.shape[1]), A.dtype)], 0)
            out[b] = np.concatenate([B, np.zeros((B.shape[0], rank - r), B.dtype)], 1)
    return out


def svd_refactor(delta_w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-r factorization B @ A of a matrix (truncated SVD, singular values split evenly)."""
    m = delta_w.astype(np.float64)
    try:
        U, S, Vt = np.linalg.svd(m, full_matrices=False)
    except np.linalg.LinAlgError:
        # LAPACK's divide-and-conquer SVD fails to converge on some finite matrices (seen on a real
        # 576 x 576 mean product); the eigendecomposition of the smaller Gram matrix gives the same
        # leading factors
        if not np.all(np.isfinite(m)):
            raise
        U, S, Vt = _svd_by_gram(m)
    r = min(rank, S.size)
    root = np.sqrt(S[:r])
    B = np.zeros((delta_w.shape[0], rank))
    A = np.zeros((rank, delta_w.shape[1]))
    B[:, :r] = U[:, :r] * root
    A[:r] = root[:, None] * Vt[:r]
    return A.astype(np.float32), B.astype(np.float32)


def _svd_by_gram(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``m`` through the eigendecomposition of ``m m^T`` or ``m^T m`` (whichever is
    smaller), singular values in descending order."""
    wide = m.shape[0] <= m.shape[1]
    g = m @ m.T if wide else m.T @ m
    vals, vecs = np.linalg.eigh(g)
    order = np.argsort(vals)[::-1]
    S = np.sqrt(np.clip(vals[order], 0.0, None))
    vecs = vecs[:, order]
    safe = np.where(S > S.max(initial=0.0) * 1e-12, S, np.inf)
    if wide:
        return vecs, S, (vecs.T @ m) / safe[:, None]
    return (m @ vecs) / safe[None, :], S, vecs.T


@dataclasses.dataclass
class ProductSum:
    """Streaming weighted sum of the products B·A per module (for exact LoRA aggregation)."""

    sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    weight: float = 0.0
    count: int = 0

    def add(self, weight: float, adapter: Tensors) -> None:
        """Fold one device's full adapter (global + its delta) in."""
        for a, b in lora_pairs(adapter):
            prod = adapter[b].astype(np.float64) @ adapter[a].astype(np.float64)
            self.sums[a] = self.sums[a] + weight * prod if a in self.sums else weight * prod
        self.weight += weight
        self.count += 1

    def refactor(self, rank: int, start: Tensors | None = None, lr: float = 1.0) -> Tensors:
        """Rank-r factors of the weighted mean product of each module; with ``start`` (the adapter the
        devices trained from) and ``lr``: of ``P + lr * (mean - P)``, P = start's product (a server
        learning rate applied to the change of the product, linear in it unlike scaling A and B)."""
        out = {}
        for a, s in self.sums.items():
            target = s / self.weight
            if start is not None and lr != 1.0:
                b = partner_b(a)
                p = start[b].astype(np.float64) @ start[a].astype(np.float64)
                target = p + lr * (target - p)
            A, B = svd_refactor(target, rank)
            out[a], out[partner_b(a)] = A, B
        return out


# ---------------------------------------------------------------------------- server optimizers


@dataclasses.dataclass
class ServerOptState:
    """Server-side optimizer state (FedAvgM momentum, FedAdam/FedYogi moments)."""

    m: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    v: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    t: int = 0


def opt_state_tensors(state: ServerOptState) -> tuple[Tensors, dict[str, str]]:
    """A server-optimizer state as named float64 arrays (``m.<name>``, ``v.<name>``) and string
    metadata (the step count): what the coordinator stores next to each version it publishes."""
    t = {f"m.{k}": np.asarray(v, np.float64) for k, v in state.m.items()}
    t.update({f"v.{k}": np.asarray(v, np.float64) for k, v in state.v.items()})
    return t, {"t": str(state.t)}


def opt_state_from_tensors(t: Tensors, meta: dict[str, str]) -> ServerOptState:
    """Inverse of ``opt_state_tensors``."""
    return ServerOptState(
        m={k[2:]: np.array(v, np.float64) for k, v in t.items() if k.startswith("m.")},
        v={k[2:]: np.array(v, np.float64) for k, v in t.items() if k.startswith("v.")},
        t=int(meta.get("t", "0")),
    )


SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


def apply_server_update(
    global_t: Tensors,
    avg_delta: Tensors,
    opt: str,
    state: ServerOptState,
    *,
    lr: float = 1.0,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> Tensors:
    """New global = global + step(avg_delta) for opt in {fedavg, fedavgm, fedadam, fedyogi} (updates ``state``)."""
    state.t += 1
    out = {}
    for k, g in global_t.items():
        d = avg_delta[k].astype(np.float64)
        if opt == "fedavg":
            step = lr * d
        elif opt == "fedavgm":
            state.m[k] = beta1 * state.m.get(k, np.zeros_like(d)) + d
            step = lr * state.m[k]
        elif opt in ("fedadam", "fedyogi"):
            m = beta1 * state.m.get(k, np.zeros_like(d)) + (1 - beta1) * d
            v0 = state.v.get(k, np.full_like(d, tau * tau))
            if opt == "fedadam":
                v = beta2 * v0 + (1 - beta2) * d * d
            else:
                v = v0 - (1 - beta2) * d * d * np.sign(v0 - d * d)
            state.m[k], state.v[k] = m, v
            step = lr * m / (np.sqrt(v) + tau)
        else:
            raise ValueError(f"unknown server optimizer {opt!r}")
        out[k] = (g.astype(np.float64) + step).astype(np.float32)
    return out


# ---------------------------------------------------------------------------- differential privacy


def dp_noise(sum_t: Tensors, clip: float, noise_multiplier: float, rng: np.random.Generator) -> Tensors:
    """Add Gaussian noise N(0, (noise_multiplier * clip)^2) to a sum of clipped updates."""
    sd = noise_multiplier * clip
    return {k: (v + rng.normal(0.0, sd, v.shape)).astype(np.float32) for k, v in sum_t.items()}


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """(epsilon, delta) after ``rounds`` Gaussian-mechanism releases with client-level sensitivity 1 (RDP accountant).

    Uses the RDP of the Gaussian mechanism, alpha / (2 sigma^2) per round, composed over rounds and
    converted with eps = rdp + log(1/delta) / (alpha - 1). ``sample_rate`` < 1 applies the
    small-q amplification bound 2 q^2 alpha / sigma^2 (valid for sigma >= 1, small alpha), else no
    amplification is claimed. Conservative: a tighter accountant can only report a smaller epsilon."""
    if noise_multiplier <= 0:
        return math.inf
    if not 0 < delta < 1 or rounds < 0:
        raise ValueError("delta must be in (0, 1) and rounds >= 0")
    if rounds == 0:
        return 0.0
    best = math.inf
    for alpha in [1 + x / 10 for x in range(1, 100)] + list(range(12, 257)):
        per = alpha / (2 * noise_multiplier**2)
        if sample_rate < 1 and noise_multiplier >= 1 and alpha <= noise_multiplier**2 * math.log(1 / sample_rate):
            per = min(per, 2 * sample_rate**2 * alpha / noise_multiplier**2)
        best = min(best, rounds * per + math.log(1 / delta) / (alpha - 1))
    return best
