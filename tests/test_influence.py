"""Bounded influence: no single update, signed or not, can dominate the aggregate.

Pure bounds (coordinator/influence.py) with hand-checkable cases and properties; then the coordinator
itself, fed real update payloads: an update claiming 1e9 examples with norm 9000 (the attack from the
trust issue) counts as at most the median claim at 1.5x the median norm (the defaults), also when it
is the fleet's very first update and across a restart, and an async device gets one update per version. Also the
fleet messages each side checks before acting on them (what bench/fuzz.py found).
"""
from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.influence import InfluencePolicy, bound_update, direction_cosines, direction_keep, reference_medians
from helpers import tiny_bundle


# ---------------------------------------------------------------------------- pure bounds

@pytest.mark.device
def test_bounds_by_hand():
    ref = [(40, 1.0), (50, 2.0), (60, 3.0), (1e9, 9000.0)]   # medians: claim 55, norm 2.5
    assert reference_medians(ref) == (55.0, 2.5)
    p = InfluencePolicy()                                      # the median claim, 1.5x the median norm
    b = bound_update(1e9, 9000.0, ref, p)
    assert (b.examples, b.clip_to) == (55.0, 3.75)
    b = bound_update(1e9, 9000.0, ref, InfluencePolicy(examples_multiple=2, norm_multiple=2))
    assert (b.examples, b.clip_to) == (110.0, 5.0)
    b = bound_update(50, 2.0, ref, p)                          # an ordinary update is left alone
    assert (b.examples, b.clip_to) == (50.0, 0.0)
    assert bound_update(60, 3.0, ref, p) == bound_update(55, 3.0, ref, p)   # above the median claim: counts as the median
    assert bound_update(1e9, 9000.0, ref, InfluencePolicy(examples_multiple=0, norm_multiple=0)).examples == 100_000  # hard cap
    assert bound_update(1e9, 9000.0, ref, InfluencePolicy(max_examples=52)).examples == 52
    assert bound_update(0, 0.0, [(0, 0.0)], p) == bound_update(0, 0.0, [(0, 0.0)], p)  # degenerate: weight 1, no clip
    assert bound_update(0, 0.0, [(0, 0.0)], p).examples == 1.0
    with pytest.raises(ValueError):
        InfluencePolicy(norm_multiple=-1)


@pytest.mark.device
@settings(max_examples=200, deadline=None)
@given(honest=st.lists(st.tuples(st.integers(1, 500), st.floats(0.01, 10)), min_size=3, max_size=20),
       attack=st.tuples(st.floats(1, 1e12), st.floats(0.01, 1e6)), frac=st.floats(0, 0.49))
def test_a_minority_cannot_escape_the_honest_range(honest, attack, frac):
    """Whatever fewer than half of the reference send, a bounded update counts at most the largest
    honest claim and is clipped to at most 1.5x the largest honest norm."""
    n_bad = int(len(honest) * frac / (1 - frac))
    ref = honest + [attack] * n_bad
    if 2 * n_bad >= len(ref):
        return
    b = bound_update(*attack, ref, InfluencePolicy())
    assert b.examples <= max(c for c, _ in honest) + 1e-9
    assert min(attack[1], b.clip_to or attack[1]) <= 1.5 * max(n for _, n in honest) * (1 + 1e-9)


# ---------------------------------------------------------------------------- the coordinator

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama_dir):
    return tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")


def adapter_schema(bundle):
    from edge_runtime.protocol.adapter import load_adapter
    return load_adapter(bundle / "adapter.safetensors")


def payload(meta, device, n, delta, base_version=0, round_id=None):
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.messages import UpdateHeader, encode_update
    h = UpdateHeader(device_id=device, update_id=uuid.uuid4().hex, base_version=base_version, num_examples=n,
                     base_fingerprint=meta.base_fingerprint, round=round_id, codec=CodecSpec("fp32", "zstd"))
    return encode_update(h, delta)


def coordinator(bundle, state_dir, **kw):
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    return Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(state_dir), fleet="infl", mode="async", **kw))


def published_delta(c, v0):
    from edge_runtime.protocol.adapter import adapter_from_bytes
    t, _ = adapter_from_bytes(c.state.blobs.get(c.state.version_sha(c.version)))
    return {k: t[k] - v0[k] for k in v0}


def flat(t):
    return np.concatenate([np.asarray(t[k], np.float64).ravel() for k in sorted(t)])


def fleet_updates(meta, seed=0):
    """Four honest devices (a shared direction + noise, norm ~1, 40-70 examples) and one attacker
    pushing the opposite way with norm 9000 and 1e9 claimed examples."""
    rng = np.random.default_rng(seed)
    u = {k: rng.standard_normal(s) for k, s in meta.shapes.items()}
    un = np.linalg.norm(flat(u))
    u = {k: v / un for k, v in u.items()}
    size = flat(u).size
    honest = []
    for i, n in enumerate((40, 50, 60, 70)):
        d = {k: (u[k] + 0.3 * rng.standard_normal(v.shape) / np.sqrt(size)).astype(np.float32) for k, v in u.items()}
        honest.append((f"h{i}", n, d))
    attacker = ("mallory", 10**9, {k: (-9000.0 * v).astype(np.float32) for k, v in u.items()})
    return honest, attacker, u


def expected_bounded_mean(updates, claim_mult=1.0, norm_mult=1.5):
    """FedAvg of updates bounded against the medians of all of them (as when they are judged together)."""
    claims = [n for _, n, _ in updates]
    norms = [np.linalg.norm(flat(d)) for _, _, d in updates]
    mc, mn = np.median(claims), np.median(norms)
    acc, wsum = 0.0, 0.0
    for (_, n, d), norm in zip(updates, norms):
        w = min(n, claim_mult * mc)
        x = flat(d) * (min(1.0, norm_mult * mn / norm))
        acc = acc + w * x
        wsum += w
    return acc / wsum


@pytest.mark.parametrize("attacker_first", [False, True])
def test_one_inflated_update_cannot_dominate(bundle, tmp_path, attacker_first):
    v0, meta = adapter_schema(bundle)
    honest, attacker, u = fleet_updates(meta)
    order = [attacker] + honest if attacker_first else honest + [attacker]
    # the bounds alone (the direction check, on by default, is tested below)
    c = coordinator(bundle, tmp_path / "state", buffer_size=5, direction_share=0)   # all five judged together
    for dev, n, d in order:
        assert c.handle_update(dev, payload(meta, dev, n, d)).accepted
    assert c.version == 1
    got = flat(published_delta(c, v0))
    np.testing.assert_allclose(got, expected_bounded_mean(order), rtol=1e-4, atol=1e-6)
    honest_mean = expected_bounded_mean(honest, 1e9, 1e9)
    # the attacker counts as one device of median weight at 1.5x the median norm: it slows the fleet
    # down but cannot turn it around (unbounded, it sets the global to -9000 x the direction)
    assert float(got @ flat(u)) > 0.3 * float(honest_mean @ flat(u))
    assert np.linalg.norm(got) < 2 * np.linalg.norm(honest_mean)
    rows = {r["device_id"]: r for r in c.state.devices()}
    assert rows["mallory"]["accepted"] == 1


@pytest.mark.parametrize("attacker_first", [False, True])
def test_an_update_pointing_away_from_the_fleet_counts_nothing(bundle, tmp_path, attacker_first):
    """With the defaults the sign-flipped attacker is excluded by the direction check: the global is
    the bounded mean of the four honest updates (their bounds still judged with the attacker's claim
    and norm in the reference), recorded as excluded with its numbers."""
    v0, meta = adapter_schema(bundle)
    honest, attacker, u = fleet_updates(meta)
    order = [attacker] + honest if attacker_first else honest + [attacker]
    c = coordinator(bundle, tmp_path / "state", buffer_size=5)
    for dev, n, d in order:
        assert c.handle_update(dev, payload(meta, dev, n, d)).accepted
    assert c.version == 1
    got = flat(published_delta(c, v0))
    claims = [n for _, n, _ in order]
    norms = [np.linalg.norm(flat(d)) for _, _, d in order]
    mc, mn = np.median(claims), np.median(norms)
    acc = wsum = 0.0
    for (_, n, d), norm in zip(honest, norms[1:] if attacker_first else norms[:4]):
        w = min(n, mc)
        acc, wsum = acc + w * flat(d) * min(1.0, 1.5 * mn / norm), wsum + w
    np.testing.assert_allclose(got, acc / wsum, rtol=1e-4, atol=1e-6)
    assert float(got @ flat(u)) > 0.9 * np.linalg.norm(got) * np.linalg.norm(flat(u))
    row = c.state.update_records("mallory")[0]
    assert (row["status"], row["reason"]) == ("excluded", "direction") and "cosine -" in row["detail"]
    assert c.state.update_counts()["excluded"] == 1 and c.state.update_counts()["accepted"] == 4


@pytest.mark.device
def test_direction_check_by_hand():
    # three honest updates along +x with some spread, one along -x, one orthogonal (noise-like)
    vecs = [np.array([1.0, 0.2, 0.0]), np.array([1.0, -0.2, 0.0]), np.array([1.0, 0.0, 0.1]),
            np.array([-5.0, 0.0, 0.0]), np.array([0.0, 0.0, 3.0])]
    cos = direction_cosines(vecs)
    # against the median of the others (unit vectors): the honest ones ~0.98, the flipped -1, the orthogonal 0
    assert all(c > 0.95 for c in cos[:3]) and cos[3] < -0.99 and abs(cos[4]) < 1e-6
    assert direction_keep(cos, 0.25) == [True, True, True, False, False]
    assert direction_keep(cos, 0.0) == [True] * 5                       # off
    assert direction_keep(cos[:2], 0.25) == [True, True]                # too few to judge
    assert direction_keep([-0.5, -0.1, 0.0], 0.25) == [True] * 3        # no common direction: nothing to judge by
    assert direction_keep([0.02, 0.03, -0.01, 0.01], 0.25) == [True] * 4  # unrelated updates: not judged at random
    assert direction_cosines([np.zeros(3), np.ones(3), np.ones(3)])[0] == 0.0


@pytest.mark.device
@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), n_honest=st.integers(4, 12), spread=st.floats(0.0, 1.0), scale=st.floats(0.01, 1e4))
def test_a_flipped_minority_is_excluded_and_honest_updates_kept(seed, n_honest, spread, scale):
    """Honest updates share a direction (plus spread up to their own size); a minority under a third
    sends the negated shared direction at any scale: every attacker is excluded, no honest one is."""
    rng = np.random.default_rng(seed)
    d = 64
    shared = rng.standard_normal(d)
    shared /= np.linalg.norm(shared)
    honest = [(shared + spread * rng.standard_normal(d) / np.sqrt(d)) * rng.uniform(0.5, 2) for _ in range(n_honest)]
    bad = [-scale * shared for _ in range((n_honest - 1) // 3)]
    keep = direction_keep(direction_cosines(honest + bad), 0.25)
    assert keep == [True] * n_honest + [False] * len(bad)


def test_without_bounds_the_same_update_dominates(bundle, tmp_path):
    """The checks above can fail: with the bounds and the direction check off, the attacker's update is the global."""
    v0, meta = adapter_schema(bundle)
    honest, attacker, u = fleet_updates(meta)
    c = coordinator(bundle, tmp_path / "state", buffer_size=5, examples_multiple=0, norm_multiple=0, direction_share=0)
    for dev, n, d in honest + [attacker]:
        c.handle_update(dev, payload(meta, dev, n, d))
    got = flat(published_delta(c, v0))
    assert float(got @ flat(u)) < -1000


def test_held_updates_survive_a_restart(bundle, tmp_path):
    """Updates wait (judge_batch) until they can be judged together; a coordinator killed
    while holding them resumes with them and publishes what an uninterrupted one does."""
    v0, meta = adapter_schema(bundle)
    honest, attacker, _ = fleet_updates(meta)
    order = [attacker, honest[0], honest[1], honest[2]]
    msgs = [(dev, payload(meta, dev, n, d)) for dev, n, d in order]
    ref = coordinator(bundle, tmp_path / "ref", buffer_size=4)
    for dev, m in msgs:
        ref.handle_update(dev, m)
    c = coordinator(bundle, tmp_path / "state", buffer_size=4)
    for dev, m in msgs[:2]:
        c.handle_update(dev, m)
    from coordinator.cli import main as cli
    c2 = coordinator(bundle, tmp_path / "state", buffer_size=4)         # as after SIGKILL: same state dir
    assert c2.replayed == 2
    for dev, m in msgs[2:]:
        assert c2.handle_update(dev, m).accepted
    assert c2.version == ref.version == 1
    np.testing.assert_allclose(flat(published_delta(c2, v0)), flat(published_delta(ref, v0)), rtol=1e-6, atol=1e-7)
    assert cli(["--state-dir", str(tmp_path / "state"), "status", "--json"]) == 0


def test_async_device_gets_one_update_per_version(bundle, tmp_path):
    v0, meta = adapter_schema(bundle)
    honest, _, _ = fleet_updates(meta)
    c = coordinator(bundle, tmp_path / "state", buffer_size=3)
    dev, n, d = honest[0]
    assert c.handle_update(dev, payload(meta, dev, n, d)).accepted
    res = c.handle_update(dev, payload(meta, dev, n, d))
    assert not res.accepted and res.reason == "too_frequent"
    for dev, n, d in honest[1:3]:
        assert c.handle_update(dev, payload(meta, dev, n, d)).accepted
    assert c.version == 1                                              # a new version: the device may send again
    dev, n, d = honest[0]
    assert c.handle_update(dev, payload(meta, dev, n, d, base_version=1)).accepted


def test_robust_rule_with_a_server_optimizer(bundle, tmp_path):
    """median + fedavgm: the median of the bounded updates, then the server momentum step."""
    from edge_runtime.errors import ConfigError
    v0, meta = adapter_schema(bundle)
    honest, attacker, _ = fleet_updates(meta)
    c = coordinator(bundle, tmp_path / "state", buffer_size=5, strategy="median", server_optimizer="fedavgm", server_lr=0.5,
                    direction_share=0)  # the rule and the optimizer alone
    ups = honest + [attacker]
    for dev, n, d in ups:
        c.handle_update(dev, payload(meta, dev, n, d))
    mn = np.median([np.linalg.norm(flat(d)) for _, _, d in ups])
    clipped = [flat(d) * min(1.0, 1.5 * mn / np.linalg.norm(flat(d))) for _, _, d in ups]
    np.testing.assert_allclose(flat(published_delta(c, v0)), 0.5 * np.median(np.stack(clipped), axis=0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="server_optimizer"):
        coordinator(bundle, tmp_path / "x", strategy="svd", server_optimizer="fedadam")
    with pytest.raises(ConfigError, match="server_optimizer"):
        coordinator(bundle, tmp_path / "y", server_optimizer="sgd")


@pytest.mark.device
def test_fleet_messages_are_checked_before_use(tmp_path):
    """Found by bench/fuzz.py: a status with a huge integer or a list as its state reached SQLite (an
    OverflowError would leave the coordinator's ingest batch unacknowledged, redelivered for ever);
    a round with `selected: 5` or `base_version: "x"` reached the agent's worker; a manifest holding a
    JSON list raised AttributeError."""
    from edge_runtime.errors import BundleError, ProtocolError
    from edge_runtime.protocol.manifest import Manifest
    from edge_runtime.protocol.messages import DeviceStatus, Receipt, RoundAnnouncement, RoundMode
    for bad in ({"state": ["x"]}, {"global_version": 2**64}, {"adapter_version": -1}, {"outbox": 3}, {"profile": "p" * 257}):
        with pytest.raises(ProtocolError):
            DeviceStatus.from_json({"kind": "status", **bad})
    st = DeviceStatus.from_json({"kind": "status", "state": "serving", "global_version": 3, "outbox": {"queued": 0}})
    assert (st.state, st.global_version, st.outbox, st.profile) == ("serving", 3, {"queued": 0}, None)
    assert DeviceStatus.from_json(st.to_json()) == st
    good = {"kind": "round", "mode": "sync", "round": 2, "base_version": 1, "selected": ["a"], "deadline": 1.5e9, "epoch": "ab"}
    r = RoundAnnouncement.from_json(good)
    assert (r.mode, r.round, r.base_version, r.selected, r.deadline, r.train_a, r.epoch) == (RoundMode.SYNC, 2, 1, ("a",), 1.5e9, True, "ab")
    assert RoundAnnouncement.from_json(r.to_json()) == r                     # what the coordinator sends, agents read back
    for bad in ({"selected": 5}, {"selected": [1]}, {"base_version": "x"}, {"mode": "fast"}, {"deadline": float("inf")},
                {"train_a": "no"}, {"epoch": "NOT HEX"}, {"round": 2**60}):
        with pytest.raises(ProtocolError):
            RoundAnnouncement.from_json({**good, **bad})
    with pytest.raises(ProtocolError):
        Receipt.from_json({"update_id": "u", "status": "maybe"})
    with pytest.raises(ProtocolError):
        Receipt.from_json({"update_id": "u", "status": "accepted", "device_id": "no spaces allowed"})
    for status in ({"a": 1}, ["accepted"]):                          # unhashable values (found by bench/fuzz.py)
        with pytest.raises(ProtocolError):
            Receipt.from_json({"update_id": "u", "status": status})
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="JSON object"):
        Manifest.load(tmp_path)


def test_a_malformed_status_does_not_wedge_the_coordinator(bundle, tmp_path):
    from edge_runtime.protocol.messages import dump_json_message
    c = coordinator(bundle, tmp_path / "state")
    topic = c.topics.status("dev-1")
    c.on_message(topic, dump_json_message({"kind": "status", "state": "serving", "global_version": 2**64}), False)
    assert c.state.devices() == []                                     # refused, nothing recorded, no exception
    c.on_message(topic, dump_json_message({"kind": "status", "state": "serving", "global_version": 0}), False)
    assert [d["device_id"] for d in c.state.devices()] == ["dev-1"]
