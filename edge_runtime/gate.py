"""The local eval gate: whether a candidate adapter (a local training result or a received global) may
serve on this device. A pure decision over per-example losses (plain numbers in, a decision out).

A candidate is compared on the device's held-out slice with the adapter now serving *and* with the
base model (the bundle's adapter), by a paired test that accounts for the slice's size, and on a small
general-text anchor set against the base model (forgetting). Rules, first match wins:

- ``worse_than_base``: held-out loss significantly worse than the base model's;
- ``worse_than_current``: held-out loss significantly worse than the serving adapter's;
- ``worse_than_base_on_both``: mean held-out *and* mean anchor loss above the base model's;
- ``forgetting``: anchor perplexity more than ``max_forgetting`` above the base model's;
- otherwise ``adopted`` (``no_heldout_data`` when there is nothing to judge the domain by).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import numpy as np


class GateReason(str, enum.Enum):
    """Why the gate decided as it did (recorded with every decision)."""

    ADOPTED = "adopted"
    NO_HELDOUT_DATA = "no_heldout_data"
    WORSE_THAN_BASE = "worse_than_base"
    WORSE_THAN_CURRENT = "worse_than_current"
    WORSE_THAN_BASE_ON_BOTH = "worse_than_base_on_both"
    FORGETTING = "forgetting"


def anchor_texts(path: str | None = None) -> list[str]:
    """The general-text anchor passages: ``path``, else the set shipped with the agent (one per line, # comments)."""
    if path:
        from pathlib import Path

        text = Path(path).read_text()
    else:
        from importlib import resources

        text = resources.files("edge_runtime").joinpath("data/anchor.txt").read_text()
    return [t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#")]


@dataclasses.dataclass(frozen=True)
class GatePolicy:
    """Gate settings (agent config: gate_z, max_forgetting)."""

    z: float = 1.645  # one-sided 95%: "significantly worse" means mean difference > z standard errors
    max_forgetting: float = 0.05  # anchor perplexity may rise at most this much over the base model's


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The outcome and the numbers it rests on."""

    adopted: bool
    reason: GateReason
    numbers: dict


def paired_difference(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean of (candidate - reference) over paired examples and its standard error (0 for fewer than 2)."""
    d = np.asarray(candidate, np.float64) - np.asarray(reference, np.float64)
    if d.size == 0:
        return 0.0, 0.0
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    return float(d.mean()), se


def significantly_worse(candidate: np.ndarray, reference: np.ndarray, z: float) -> bool:
    """Paired one-sided test: the candidate's losses exceed the reference's by more than z standard errors."""
    mean, se = paired_difference(candidate, reference)
    return mean > z * se and mean > 0


def decide_gate(
    policy: GatePolicy,
    *,
    candidate: np.ndarray,
    current: np.ndarray,
    base: np.ndarray,
    anchor_candidate: np.ndarray,
    anchor_base: np.ndarray,
) -> GateDecision:
    """Adopt or refuse a candidate from per-example losses (held-out: candidate/current/base, paired by
    example; anchor: candidate/base, paired by text). Empty arrays mean "no such data"."""
    cand, cur, bas = (float(np.mean(a)) if len(a) else math.nan for a in (candidate, current, base))
    a_cand, a_base = (float(np.mean(a)) if len(a) else math.nan for a in (anchor_candidate, anchor_base))
    numbers: dict[str, Any] = {
        "heldout_examples": int(len(candidate)),
        "heldout_candidate": cand,
        "heldout_current": cur,
        "heldout_base": bas,
        "anchor_candidate": a_cand,
        "anchor_base": a_base,
    }
    numbers = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in numbers.items()}  # JSON: null, not NaN
    if len(anchor_candidate):
        numbers["anchor_ppl_change"] = anchor_change = math.exp(a_cand - a_base) - 1
    if len(candidate):
        numbers["heldout_vs_base"] = paired_difference(candidate, base)
        numbers["heldout_vs_current"] = paired_difference(candidate, current)
        if significantly_worse(candidate, base, policy.z):
            return GateDecision(False, GateReason.WORSE_THAN_BASE, numbers)
        if significantly_worse(candidate, current, policy.z):
            return GateDecision(False, GateReason.WORSE_THAN_CURRENT, numbers)
        if len(anchor_candidate) and cand > bas and a_cand > a_base:
            return GateDecision(False, GateReason.WORSE_THAN_BASE_ON_BOTH, numbers)
    if len(anchor_candidate) and anchor_change > policy.max_forgetting:
        return GateDecision(False, GateReason.FORGETTING, numbers)
    return GateDecision(True, GateReason.ADOPTED if len(candidate) else GateReason.NO_HELDOUT_DATA, numbers)
