"""Bounded influence (pure): how much one update may count, whoever signed it.

A device states how many examples its update saw and the update has an L2 norm; neither can be
trusted, since a compromised device signs whatever it likes. Each accepted update is bounded against
a *reference*: the claims and norms of the fleet's recent accepted updates (the candidate included).

- weight: the claim, capped at ``max_examples`` and at ``examples_multiple`` x the median claim;
- norm: clipped to ``norm_multiple`` x the median norm.

Medians move only when at least half of the reference moves, so a minority of devices (however
large what they send) can neither inflate the yardstick nor escape it.

Bounds alone do not stop a device that pushes the other way at an ordinary size: one sign-flipped
update of five at 1.5x the median norm takes most of a round's progress away. So updates are also
judged by *direction*, together, in batches (``judge_batch`` updates, or what the aggregation has when
it is due): each update's cosine with the coordinate-wise median of the other updates of its batch
(unit vectors: a reference a minority cannot move far) must be above ``direction_share`` x the
batch's median cosine; an update below it is excluded (counts nothing). Honest updates of different
domains point the same way enough (cosine 0.41-0.44 for four real devices of four different domains,
bench/poisoning.py's honest updates); a sign-flipped one has about -0.97, random noise 0.001.
Batches of fewer than three cannot be judged by direction. What this does not stop: an attacker who
knows the honest updates and stays just above the threshold (see docs/security.md).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class InfluencePolicy:
    """The bounds; 0 turns a relative bound off."""

    max_examples: int = 100_000
    examples_multiple: float = 1.0
    norm_multiple: float = 1.5
    window: int = 64
    judge_batch: int = 16
    direction_share: float = 0.25

    def __post_init__(self):
        if self.max_examples < 1 or self.window < 1 or self.judge_batch < 1:
            raise ValueError("max_examples, window and judge_batch must be >= 1")
        if self.examples_multiple < 0 or self.norm_multiple < 0:
            raise ValueError("examples_multiple and norm_multiple must be >= 0 (0: off)")
        if not 0 <= self.direction_share < 1:
            raise ValueError("direction_share must be in [0, 1) (0: no direction check)")


@dataclasses.dataclass(frozen=True)
class Bound:
    """What one update counts for: its weight in examples and the norm it is clipped to (0: not clipped)."""

    examples: float
    clip_to: float


def reference_medians(reference: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(median claim, median norm) of (claimed examples, norm) pairs."""
    if not reference:
        raise ValueError("an empty reference has no median")
    return statistics.median(c for c, _ in reference), statistics.median(n for _, n in reference)


def bound_update(claimed: float, norm: float, reference: Sequence[tuple[float, float]], policy: InfluencePolicy) -> Bound:
    """The bound for one update; ``reference`` holds the recent accepted updates' (claim, norm),
    this one's included."""
    med_claim, med_norm = reference_medians(reference)
    examples = min(float(claimed), float(policy.max_examples))
    if policy.examples_multiple:
        examples = min(examples, max(1.0, policy.examples_multiple * med_claim))
    clip_to = 0.0
    if policy.norm_multiple and med_norm > 0 and norm > policy.norm_multiple * med_norm:
        clip_to = policy.norm_multiple * med_norm
    return Bound(max(examples, 1.0), clip_to)


MIN_DIRECTION_BATCH = 3


DIRECTION_SAMPLE = 16_384


def direction_cosines(
    vectors: Sequence[np.ndarray], rng: np.random.Generator | None = None, sample: int = DIRECTION_SAMPLE
) -> list[float]:
    """Cosine of each vector with the coordinate-wise median of the *others* as unit vectors (zero
    vectors: cosine 0). Leaving the vector itself out matters: in a batch of five, random noise pulls
    the median of all five towards itself (cosine 0.22 measured) but is orthogonal to the others' (0.001).

    Vectors longer than ``sample`` are compared on ``sample`` coordinates drawn by ``rng`` (the
    coordinator's own generator: a device cannot know which): cosines of long vectors are estimated to
    about 1/sqrt(sample) (0.008: honest updates measure 0.4, noise 0.001), and the medians cost 28x less for a
    SmolLM2 adapter (460,800 coordinates)."""
    if len(vectors) < 2:
        return [0.0] * len(vectors)  # no others to compare with
    vecs = [np.asarray(v, np.float32).ravel() for v in vectors]
    d = vecs[0].size if vecs else 0
    if d > sample:
        idx = np.sort((rng or np.random.default_rng()).integers(0, d, sample))  # with replacement: far cheaper, same estimate
        vecs = [v[idx] for v in vecs]
    units = []
    for v in vecs:
        n = float(np.linalg.norm(v))
        units.append(v / n if n > 0 and np.isfinite(n) else np.zeros_like(v))
    stack = np.stack(units)  # (n, k)
    n = stack.shape[0]
    order = np.argsort(stack, axis=0, kind="stable")
    srt = np.take_along_axis(stack, order, axis=0)  # each column sorted
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[:, None].repeat(stack.shape[1], 1), axis=0)

    def others_at(j: int, r: np.ndarray) -> np.ndarray:
        """Per column, the j-th smallest of the others: a column's own entry sits at rank r."""
        return np.where(j < r, srt[j], srt[min(j + 1, n - 1)])

    out = []
    for i, u in enumerate(units):  # the median of the other n - 1, from one sort of all n
        m = n - 1
        ref = others_at(m // 2, rank[i]) if m % 2 else 0.5 * (others_at(m // 2 - 1, rank[i]) + others_at(m // 2, rank[i]))
        rn = float(np.linalg.norm(ref))
        out.append(float(u @ ref) / rn if rn > 0 else 0.0)
    return out


MIN_COMMON_DIRECTION = 0.05


def direction_keep(cosines: Sequence[float], share: float) -> list[bool]:
    """Which updates of one batch count: a cosine above ``share`` x the batch's median cosine (and
    above 0). Everything counts when the batch is too small, the check is off, or the batch has no
    common direction to judge against (median cosine below ``MIN_COMMON_DIRECTION``: updates that are
    mostly unrelated to each other, where the check would exclude honest ones at random; the weight and
    norm bounds still apply)."""
    if share <= 0 or len(cosines) < MIN_DIRECTION_BATCH:
        return [True] * len(cosines)
    med = statistics.median(cosines)
    if med < MIN_COMMON_DIRECTION:
        return [True] * len(cosines)
    return [c > share * med for c in cosines]
