"""The learning path's pure parts: which examples a session draws, how many steps it takes, the gate."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.gate import GatePolicy, GateReason, decide_gate, paired_difference
from edge_runtime.policy import session_steps
from edge_runtime.protocol.messages import RoundAnnouncement
from edge_runtime.store import Store

pytestmark = pytest.mark.device


def _store(tmp_path, n: int) -> Store:
    s = Store(tmp_path / "s.sqlite", heldout_fraction=0.0)
    s.add_examples([{"text": f"example number {i}"} for i in range(n)])
    return s


def _session(store: Store, steps: int, batch: int, replay: float) -> list[list[int]]:
    """What the agent does: draw a batch, train, count the use; ``steps`` times."""
    batches = []
    for _ in range(steps):
        b = store.training_batch(batch, replay)
        store.mark_trained([e["id"] for e in b])
        batches.append([e["id"] for e in b])
    return batches


def test_first_session_uses_every_new_example_once(tmp_path):
    # Prepare: 10 examples, batch 4, a quarter replay
    s = _store(tmp_path, 10)
    steps = session_steps(new_examples=10, batch=4, replay_fraction=0.25, min_steps=1, max_steps=64)
    # Execute
    batches = _session(s, steps, 4, 0.25)
    # Assert: step 1 is all new (nothing to replay yet), later steps 3 new + 1 replay; 10 new need 4 steps
    assert steps == 4
    assert s.training_coverage()["never_used"] == 0
    assert all(len(set(b)) == len(b) == 4 for b in batches)


def test_new_examples_come_first_and_then_epochs(tmp_path):
    s = _store(tmp_path, 8)
    _session(s, 2, 4, 0.0)               # one epoch: every example once
    assert s.training_coverage() == {"examples": 8, "never_used": 0, "min_uses": 1, "max_uses": 1}
    s.add_examples([{"text": "a brand new example"}, {"text": "another new one"}])
    first = s.training_batch(4, 0.25)
    new_ids = {e["id"] for e in first if e["text"] in ("a brand new example", "another new one")}
    assert len(new_ids) == 2             # both new ones in the very next batch
    s.mark_trained([e["id"] for e in first])
    _session(s, 2, 4, 0.25)
    cov = s.training_coverage()
    assert cov["max_uses"] - cov["min_uses"] <= 1   # least-used first: epochs stay level


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 8), replay=st.sampled_from([0.0, 0.25, 0.5]))
def test_every_example_is_used_within_one_scaled_session(tmp_path_factory, n, batch, replay):
    s = _store(tmp_path_factory.mktemp("s"), n)
    steps = session_steps(new_examples=n, batch=batch, replay_fraction=replay, min_steps=1, max_steps=10_000)
    _session(s, steps, batch, replay)
    assert s.training_coverage()["never_used"] == 0
    # and not many more steps than needed: one step fewer would leave some example unused
    assert steps <= math.ceil(n / max(1, batch - round(batch * replay))) + 1


@pytest.mark.parametrize("new,batch,replay,lo,hi,expect", [
    (0, 4, 0.25, 8, 64, 8),        # nothing new: the profile's minimum
    (40, 4, 0.25, 8, 64, 14),      # 3 new per step: ceil(40 / 3)
    (1000, 4, 0.25, 8, 64, 64),    # capped by the budget
    (10, 4, 0.0, 1, 64, 3),
])
def test_session_steps_table(new, batch, replay, lo, hi, expect):
    assert session_steps(new_examples=new, batch=batch, replay_fraction=replay, min_steps=lo, max_steps=hi) == expect


def test_session_key_names_lineage_round_and_base():
    def key(**kw):
        return RoundAnnouncement.from_json({"kind": "round", "mode": "sync", **kw}).session_key
    assert key(round=3, base_version=2) == "sync:None:3:2"
    assert key(epoch="ab12", round=3, base_version=2) == "sync:ab12:3:2"
    assert key(round=3, base_version=2) != key(round=3, base_version=3)
    # round 3 from base 2 of a new coordinator lineage is another session than the old lineage's
    assert key(epoch="ab12", round=3, base_version=2) != key(epoch="cd34", round=3, base_version=2)


def test_add_examples_reports_each_split(tmp_path):
    s = Store(tmp_path / "s.sqlite", heldout_fraction=0.5)
    res = s.add_examples([{"text": f"text {i}"} for i in range(40)])
    assert res["train"] + res["heldout"] == res["added"] == 40
    assert 0 < res["heldout"] < 40
    assert len(s.heldout_split()) == res["heldout"]


# ---------------------------------------------------------------------------- gate
P = GatePolicy(z=1.645, max_forgetting=0.05)
BASE = np.array([3.0, 3.2, 2.8, 3.1, 3.0, 2.9])
ANCHOR = np.array([4.0, 4.1, 3.9])


def test_paired_difference_by_hand():
    mean, se = paired_difference(np.array([2.0, 4.0]), np.array([1.0, 1.0]))
    assert mean == 2.0 and se == pytest.approx(1.0)   # d = [1, 3]: std 1.414 / sqrt 2


def test_gate_adopts_a_better_candidate():
    d = decide_gate(P, candidate=BASE - 0.2, current=BASE, base=BASE, anchor_candidate=ANCHOR, anchor_base=ANCHOR)
    assert d.adopted and d.reason == GateReason.ADOPTED
    assert d.numbers["heldout_candidate"] == pytest.approx(BASE.mean() - 0.2)


def test_gate_refuses_a_candidate_significantly_worse_than_base():
    # better than the (bad) serving adapter, but worse than the base model on every example
    d = decide_gate(P, candidate=BASE + 0.3, current=BASE + 1.0, base=BASE, anchor_candidate=ANCHOR, anchor_base=ANCHOR)
    assert not d.adopted and d.reason == GateReason.WORSE_THAN_BASE


def test_gate_refuses_worse_than_current():
    d = decide_gate(P, candidate=BASE - 0.1, current=BASE - 0.5, base=BASE, anchor_candidate=ANCHOR, anchor_base=ANCHOR)
    assert not d.adopted and d.reason == GateReason.WORSE_THAN_CURRENT


def test_gate_noise_on_a_small_slice_is_not_a_refusal():
    # mixed differences: mean slightly worse but well within the standard error
    cand = BASE + np.array([0.3, -0.3, 0.25, -0.2, 0.1, -0.1])
    d = decide_gate(P, candidate=cand, current=BASE, base=BASE - 0.0, anchor_candidate=ANCHOR - 0.01, anchor_base=ANCHOR)
    assert d.adopted


def test_gate_refuses_worse_than_base_on_both():
    cand = BASE + np.array([0.3, -0.3, 0.25, -0.2, 0.1, -0.1])   # mean +0.0083: worse, not significantly
    d = decide_gate(P, candidate=cand, current=BASE, base=BASE, anchor_candidate=ANCHOR + 0.01, anchor_base=ANCHOR)
    assert not d.adopted and d.reason == GateReason.WORSE_THAN_BASE_ON_BOTH


def test_gate_refuses_forgetting():
    d = decide_gate(P, candidate=BASE - 0.5, current=BASE, base=BASE, anchor_candidate=ANCHOR + 0.06, anchor_base=ANCHOR)
    assert not d.adopted and d.reason == GateReason.FORGETTING
    assert d.numbers["anchor_ppl_change"] == pytest.approx(math.exp(0.06) - 1)


def test_gate_without_heldout_data_still_checks_forgetting():
    empty = np.zeros(0)
    assert decide_gate(P, candidate=empty, current=empty, base=empty, anchor_candidate=ANCHOR,
                       anchor_base=ANCHOR).reason == GateReason.NO_HELDOUT_DATA
    assert decide_gate(P, candidate=empty, current=empty, base=empty, anchor_candidate=ANCHOR + 0.1,
                       anchor_base=ANCHOR).reason == GateReason.FORGETTING


def test_choose_split_table():
    from edge_runtime.store import choose_split
    low, high = "00000000" + "0" * 56, "ffffffff" + "0" * 56          # hash at the bottom / top of the range
    assert choose_split(low, heldout_fraction=0.1, n_train=0, n_heldout=0) == "heldout"
    assert choose_split(high, heldout_fraction=0.1, n_train=100, n_heldout=0) == "train"          # no minimum asked
    assert choose_split(high, heldout_fraction=0.1, n_train=3, n_heldout=0, min_heldout=4) == "train"   # train first
    assert choose_split(high, heldout_fraction=0.1, n_train=4, n_heldout=0, min_heldout=4) == "heldout"
    assert choose_split(high, heldout_fraction=0.1, n_train=7, n_heldout=1, min_heldout=4) == "train"   # 4 per held-out one
    assert choose_split(high, heldout_fraction=0.1, n_train=50, n_heldout=4, min_heldout=4) == "train"  # minimum reached


def test_a_small_store_still_holds_back_a_slice_for_the_gate(tmp_path):
    s = Store(tmp_path / "s.sqlite", heldout_fraction=0.0, min_heldout=4)
    first = s.add_examples([{"text": f"line {i}"} for i in range(12)])
    assert first["heldout"] == 2 and first["train"] == 10          # the 5th and the 10th
    second = s.add_examples([{"text": f"more {i}"} for i in range(30)])
    assert second["heldout"] == 2                                    # up to the minimum of 4, then no more
    assert s.count_examples()["heldout"] == 4


def test_a_duplicate_receipt_does_not_overwrite_accepted(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.enqueue_update("u1", "t", b"payload", 0)
    assert s.receipt("u1", "accepted", None)
    assert s.receipt("u1", "duplicate", "seen before")      # the same update delivered twice
    assert s.outbox_stats()["receipts"] == {"accepted": 1}
