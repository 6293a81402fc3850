"""Bounded influence (pure): how much one update may count, whoever signed it.

A device states how many examples its update saw and the update has an L2 norm; neither can be
trusted, since a compromised device signs whatever it likes. Each accepted update is bounded against
a *reference*: the claims and norms of the fleet's recent accepted updates (the candidate included).

- weight: the claim, capped at ``max_examples`` and at ``examples_multiple`` x the median claim;
- norm: clipped to ``norm_multiple`` x the median norm.

Medians move only when at least half of the reference moves, so a minority of devices (however
large what they send) can neither inflate the yardstick nor escape it. Below ``min_reference``
entries nothing can be judged: the coordinator holds updates until it has that many (or until it
must aggregate), then bounds them together.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class InfluencePolicy:
    """The bounds; 0 turns a relative bound off."""

    max_examples: int = 100_000
    examples_multiple: float = 1.0
    norm_multiple: float = 1.5
    window: int = 64
    min_reference: int = 3

    def __post_init__(self):
        if self.max_examples < 1 or self.window < 1 or self.min_reference < 1:
            raise ValueError("max_examples, window and min_reference must be >= 1")
        if self.examples_multiple < 0 or self.norm_multiple < 0:
            raise ValueError("examples_multiple and norm_multiple must be >= 0 (0: off)")


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
