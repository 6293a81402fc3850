"""Aggregation strategies and round decisions: hand-checkable cases and properties."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from coordinator import aggregate as agg
from coordinator.rounds import (CloseDecision, RoundPlan, check_async_update, check_sync_update, close_decision, plan_round,
                                staleness_weight)
from coordinator.strategies import make_strategy
from edge_runtime.errors import RejectReason

pytestmark = pytest.mark.device


def t(a, b):
    return {"layers.0.q.lora_A": np.array(a, np.float32), "layers.0.q.lora_B": np.array(b, np.float32)}


def test_fedavg_weighted_by_examples_hand_computed():
    # Prepare: two updates, weights 1 and 3
    u1, u2 = t([[1.0, 0.0]], [[2.0], [0.0]]), t([[5.0, 4.0]], [[6.0], [8.0]])
    # Execute
    out = agg.weighted_mean([(1, u1), (3, u2)])
    # Assert: (1*1 + 3*5)/4 = 4, (0 + 12)/4 = 3 ...
    np.testing.assert_allclose(out["layers.0.q.lora_A"], [[4.0, 3.0]])
    np.testing.assert_allclose(out["layers.0.q.lora_B"], [[5.0], [6.0]])


def test_running_sum_equals_batch_mean_and_merges():
    rng = np.random.default_rng(0)
    ups = [(float(rng.integers(1, 10)), t(rng.normal(size=(1, 2)), rng.normal(size=(2, 1)))) for _ in range(7)]
    a, b = agg.RunningSum(), agg.RunningSum()
    for i, (w, u) in enumerate(ups):
        (a if i % 2 else b).add(w, u)
    merged = a.merge(b).mean()
    ref = agg.weighted_mean(ups)
    for k in ref:
        np.testing.assert_allclose(merged[k], ref[k], rtol=1e-6)



def test_running_sum_state_round_trips_exactly_and_keeps_folding():
    rng = np.random.default_rng(1)
    ups = [(float(rng.integers(1, 10)), t(rng.normal(size=(1, 2)), rng.normal(size=(2, 1)))) for _ in range(5)]
    a = agg.RunningSum()
    for w, u in ups[:3]:
        a.add(w, u)
    flat, meta = agg.running_sum_state(a)
    assert flat.dtype == np.float64 and flat.size == 4 and meta["count"] == 3
    b = agg.running_sum_from_state(flat.copy(), json.loads(json.dumps(meta)))  # the description survives JSON
    for w, u in ups[3:]:
        a.add(w, u)
        b.add(w, u)
    assert b.count == 5 and b.weight == a.weight
    for k, v in a.mean().items():
        np.testing.assert_array_equal(b.mean()[k], v)   # bit-identical: same float64 sums
    with pytest.raises(ValueError):
        agg.running_sum_from_state(flat[:3], meta)


def test_running_sum_uses_a_given_flat_vector_only_in_its_own_order():
    u = t([[1.0, 2.0]], [[3.0], [4.0]])
    rev = dict(reversed(list(u.items())))
    wrong = np.array([9.0, 9.0, 9.0, 9.0], np.float32)
    a = agg.RunningSum()
    a.add(1.0, u)
    a.add(1.0, rev, flat=wrong)                  # order differs from the sum's: the vector is not trusted
    np.testing.assert_allclose(a.mean()["layers.0.q.lora_A"], [[1.0, 2.0]])
    a.add(2.0, u, flat=np.array([1, 2, 3, 4], np.float32))
    np.testing.assert_allclose(a.sums["layers.0.q.lora_B"], [[12.0], [16.0]])

@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_fedavg_permutation_invariant_and_constant_preserving(seed, n):
    rng = np.random.default_rng(seed)
    ups = [(float(rng.integers(1, 20)), t(rng.normal(size=(2, 3)), rng.normal(size=(3, 2)))) for _ in range(n)]
    a = agg.weighted_mean(ups)
    perm = list(ups)
    random.Random(seed).shuffle(perm)
    b = agg.weighted_mean(perm)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    same = agg.weighted_mean([(w, ups[0][1]) for w, _ in ups])  # identical updates -> that update
    for k in same:
        np.testing.assert_allclose(same[k], ups[0][1][k], rtol=1e-5, atol=1e-6)


def test_median_trimmed_mean_and_clip_hand_computed():
    ups = [t([[1.0, 10.0]], [[0.0], [0.0]]), t([[2.0, -10.0]], [[0.0], [0.0]]), t([[100.0, 0.0]], [[0.0], [0.0]])]
    med = agg.coordinate_median(ups)
    np.testing.assert_allclose(med["layers.0.q.lora_A"], [[2.0, 0.0]])
    tm = agg.trimmed_mean(ups, 1)
    np.testing.assert_allclose(tm["layers.0.q.lora_A"], [[2.0, 0.0]])
    c = agg.clip_update(t([[3.0, 4.0]], [[0.0], [0.0]]), 1.0)
    np.testing.assert_allclose(c["layers.0.q.lora_A"], [[0.6, 0.8]], rtol=1e-6)
    with pytest.raises(ValueError):
        agg.trimmed_mean(ups[:2], 1)


def test_svd_refactor_is_exact_when_rank_allows():
    rng = np.random.default_rng(1)
    B, A = rng.normal(size=(5, 2)), rng.normal(size=(2, 4))
    A2, B2 = agg.svd_refactor(B @ A, 2)
    np.testing.assert_allclose(B2 @ A2, B @ A, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (6, 6)])
def test_svd_fallback_through_the_gram_matrix_matches(shape, monkeypatch):
    """When LAPACK's SVD does not converge the Gram-matrix route gives the same best rank-r fit."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=(shape[0], 3)) @ rng.normal(size=(3, shape[1])) + 1e-3 * rng.normal(size=shape)
    A1, B1 = agg.svd_refactor(m, 2)

    def fails(*a, **k):
        raise np.linalg.LinAlgError("SVD did not converge")
    monkeypatch.setattr(np.linalg, "svd", fails)
    A2, B2 = agg.svd_refactor(m, 2)
    np.testing.assert_allclose(B2 @ A2, B1 @ A1, atol=1e-8)
    with pytest.raises(np.linalg.LinAlgError):
        agg.svd_refactor(np.full(shape, np.nan), 2)


def test_svd_strategy_averages_products_not_factors():
    # Two devices whose factors average to zero product but whose products do not.
    g = t(np.zeros((1, 2)), np.zeros((2, 1)))
    d1 = t([[1.0, 0.0]], [[1.0], [0.0]])
    d2 = t([[-1.0, 0.0]], [[-1.0], [0.0]])
    fedavg = make_strategy("fedavg")
    acc = fedavg.begin(g)
    fedavg.fold(acc, 1, d1, g)
    fedavg.fold(acc, 1, d2, g)
    f = fedavg.finish(acc, g)
    assert np.allclose(f["layers.0.q.lora_B"] @ f["layers.0.q.lora_A"], 0)  # the naive average loses B·A
    svd = make_strategy("svd", rank=1)
    acc = svd.begin(g)
    svd.fold(acc, 1, d1, g)
    svd.fold(acc, 1, d2, g)
    s = svd.finish(acc, g)
    np.testing.assert_allclose(s["layers.0.q.lora_B"] @ s["layers.0.q.lora_A"], [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)


def test_pad_or_truncate_rank():
    x = t(np.ones((2, 3)), np.ones((4, 2)))
    up = agg.pad_or_truncate_rank(x, 4)
    assert up["layers.0.q.lora_A"].shape == (4, 3) and up["layers.0.q.lora_B"].shape == (4, 4)
    np.testing.assert_allclose(up["layers.0.q.lora_B"] @ up["layers.0.q.lora_A"], x["layers.0.q.lora_B"] @ x["layers.0.q.lora_A"])
    down = agg.pad_or_truncate_rank(x, 1)
    assert down["layers.0.q.lora_A"].shape == (1, 3)


def test_frozen_a_keeps_a_and_averages_b():
    g = t([[1.0, 1.0]], [[0.0], [0.0]])
    s = make_strategy("frozen_a")
    acc = s.begin(g)
    s.fold(acc, 1, t([[9.0, 9.0]], [[2.0], [0.0]]), g)
    s.fold(acc, 3, t([[9.0, 9.0]], [[6.0], [4.0]]), g)
    out = s.finish(acc, g)
    np.testing.assert_allclose(out["layers.0.q.lora_A"], [[1.0, 1.0]])
    np.testing.assert_allclose(out["layers.0.q.lora_B"], [[5.0], [3.0]])


def test_server_optimizers_first_step():
    g = {"w": np.zeros(2, np.float32)}
    d = {"w": np.array([1.0, -2.0], np.float32)}
    st_ = agg.ServerOptState()
    np.testing.assert_allclose(agg.apply_server_update(g, d, "fedavgm", st_, lr=1.0, beta1=0.9)["w"], [1.0, -2.0])
    np.testing.assert_allclose(agg.apply_server_update(g, d, "fedavgm", st_, lr=1.0, beta1=0.9)["w"], [1.9, -3.8], rtol=1e-6)
    st_ = agg.ServerOptState()
    out = agg.apply_server_update(g, d, "fedadam", st_, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # m = 0.1 d, v = 0.99 tau^2 + 0.01 d^2 -> step = 0.1 m / (sqrt(v) + tau)
    v = 0.99 * 1e-6 + 0.01 * np.array([1.0, 4.0])
    np.testing.assert_allclose(out["w"], 0.1 * 0.1 * np.array([1.0, -2.0]) / (np.sqrt(v) + 1e-3), rtol=1e-5)
    # Yogi, two steps of the same delta: v1 = tau^2 + 0.01 d^2 (v0 < d^2: grows like Adam's first step); then
    # v2 = v1 + 0.01 d^2 (Yogi adds while v < d^2) where Adam would take 0.99 v1 + 0.01 d^2
    st_ = agg.ServerOptState()
    w1 = agg.apply_server_update(g, d, "fedyogi", st_, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    m1, v1 = 0.1 * d["w"], 1e-6 + 0.01 * d["w"] ** 2
    np.testing.assert_allclose(w1["w"], 0.1 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-5)
    w2 = agg.apply_server_update(w1, d, "fedyogi", st_, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    m2, v2 = 0.9 * m1 + 0.1 * d["w"], v1 + 0.01 * d["w"] ** 2
    np.testing.assert_allclose(w2["w"], w1["w"] + 0.1 * m2 / (np.sqrt(v2) + 1e-3), rtol=1e-5)


def test_dp_noise_scale_and_epsilon_monotone():
    s = {"w": np.zeros(20000, np.float32)}
    noisy = agg.dp_noise(s, clip=2.0, noise_multiplier=1.5, rng=np.random.default_rng(0))
    assert abs(float(noisy["w"].std()) - 3.0) < 0.1
    e1 = agg.gaussian_epsilon(1.0, 10, 1e-5)
    e2 = agg.gaussian_epsilon(1.0, 100, 1e-5)
    e3 = agg.gaussian_epsilon(2.0, 100, 1e-5)
    assert 0 < e1 < e2 and e3 < e2
    assert agg.gaussian_epsilon(0.0, 1, 1e-5) == float("inf")
    # one round, sigma=1: the RDP bound min_a a/2 + ln(1e5)/(a-1) is about 5.3
    assert 4.5 < agg.gaussian_epsilon(1.0, 1, 1e-5) < 6.0


def test_round_engine_decisions():
    rng = random.Random(0)
    plan = plan_round(1, 3, 100.0, online=["a", "b", "c", "d"], per_round=2, over_selection=0.5, min_updates=1,
                      timeout_s=10, rng=rng)
    assert len(plan.selected) == 3 and plan.target == 2
    dev = plan.selected[0]
    assert check_sync_update(plan, dev, 3, 1) is None
    assert check_sync_update(plan, dev, 2, 1) == RejectReason.STALE
    outsider = next(d for d in "abcd" if d not in plan.selected)
    assert check_sync_update(plan, outsider, 3, 1) == RejectReason.STALE
    plan.accepted[dev] = "u1"
    assert check_sync_update(plan, dev, 3, 1) == RejectReason.TOO_FREQUENT   # not DUPLICATE: that receipt means "counted"
    assert close_decision(plan, 101.0) == CloseDecision.WAIT
    assert close_decision(plan, 111.0) == CloseDecision.CLOSE          # quorum 1 reached at deadline
    empty = RoundPlan(2, 3, 0, 10, None, 3, 2)
    assert close_decision(empty, 11) == CloseDecision.EXTEND          # below quorum: keep previous model
    empty.accepted.update(a="1", b="2", c="3")
    assert close_decision(empty, 5) == CloseDecision.CLOSE             # target reached early


def test_async_staleness():
    assert check_async_update(5, 5, 2) is None and check_async_update(5, 3, 2) is None
    assert check_async_update(5, 2, 2) == RejectReason.STALE and check_async_update(5, 6, 2) == RejectReason.STALE
    assert staleness_weight(8, 0) == 8 and staleness_weight(8, 3, 0.5) == pytest.approx(4.0)


def test_validate_update_norm_flat_view_and_reasons():
    import math
    import uuid

    from coordinator.validate import Limits, validate_update
    from edge_runtime.errors import ProtocolError
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.messages import UpdateHeader, encode_update
    rng = np.random.default_rng(2)
    shapes = {"layers.0.q.lora_A": (2, 3), "layers.0.q.lora_B": (3, 2)}
    delta = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    h = UpdateHeader(device_id="d1", update_id=uuid.uuid4().hex, base_version=0, num_examples=3, base_fingerprint="f" * 64,
                     codec=CodecSpec("fp32", "none"))
    msg = encode_update(h, delta)
    expect = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
    v = validate_update("d1", msg, Limits("f" * 64, shapes, 1 << 20, 100.0))
    assert math.isclose(v.norm, expect, rel_tol=1e-6) and not v.flat.flags.owndata   # a view of the message
    np.testing.assert_array_equal(v.flat, np.concatenate([delta[k].ravel() for k in sorted(shapes)]))
    rev = dict(reversed(list(shapes.items())))                                          # schema in another order
    v2 = validate_update("d1", msg, Limits("f" * 64, rev, 1 << 20, 100.0))
    assert list(v2.tensors) == list(rev) and v2.flat is None and math.isclose(v2.norm, expect, rel_tol=1e-6)
    for limits, device, reason in ((Limits("f" * 64, shapes, 1 << 20, expect / 2), "d1", RejectReason.NORM_BOUND),
                                   (Limits("f" * 64, shapes, 1 << 20, 100.0), "d2", RejectReason.BAD_FIELD),
                                   (Limits("0" * 64, shapes, 1 << 20, 100.0), "d1", RejectReason.FINGERPRINT_MISMATCH)):
        with pytest.raises(ProtocolError) as e:
            validate_update(device, msg, limits)
        assert e.value.reason == reason and e.value.header.update_id == h.update_id


def test_server_lr_defaults_per_strategy_and_an_explicit_one_wins():
    from coordinator.config import CoordinatorConfig
    from edge_runtime.errors import ConfigError
    # the coordinator's config leaves server_lr unset, so each strategy keeps its own default
    assert CoordinatorConfig().server_lr is None
    assert make_strategy("fedadam", server_lr=CoordinatorConfig().server_lr).server_lr == 0.01
    assert make_strategy("fedavg", server_lr=None).server_lr == 1.0
    assert make_strategy("fedadam", server_lr=0.5).server_lr == 0.5
    with pytest.raises(ConfigError, match="server_lr"):
        CoordinatorConfig(server_lr=0.0)


def test_frozen_a_applies_server_lr():
    g = {"m.lora_A": np.ones((2, 3), np.float32), "m.lora_B": np.zeros((3, 2), np.float32)}
    delta = {"m.lora_A": np.full((2, 3), 5.0, np.float32), "m.lora_B": np.ones((3, 2), np.float32)}
    s = make_strategy("frozen_a", server_lr=0.5)
    acc = s.begin(g)
    s.fold(acc, 1.0, delta, g)
    new = s.finish(acc, g)
    np.testing.assert_array_equal(new["m.lora_A"], g["m.lora_A"])          # A stays frozen
    np.testing.assert_allclose(new["m.lora_B"], 0.5)                         # half of the mean B delta


def test_svd_server_lr_scales_the_change_of_the_product():
    # global product P = [[1, 0], [0, 0]]; the two devices' mean product M = [[2, 0], [0, 1]];
    # with server_lr 2 the new product is P + 2 (M - P) = [[3, 0], [0, 2]] (rank 2 keeps it exactly)
    from coordinator.config import CoordinatorConfig
    g = t([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]])
    full1 = t([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])     # product [[2, 0], [0, 1]]
    full2 = t([[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])     # product [[2, 0], [0, 0]]
    full3 = t([[2.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]])     # product [[2, 0], [0, 2]]
    s = make_strategy("svd", rank=2, server_lr=2.0)
    acc = s.begin(g)
    for full in (full1, full2, full3):
        s.fold(acc, 1.0, {k: full[k] - g[k] for k in g}, g)
    new = s.finish(acc, g)
    np.testing.assert_allclose(new["layers.0.q.lora_B"] @ new["layers.0.q.lora_A"], [[3.0, 0.0], [0.0, 2.0]], atol=1e-5)
    one = make_strategy("svd", rank=2)
    acc = one.begin(g)
    for full in (full1, full2, full3):
        one.fold(acc, 1.0, {k: full[k] - g[k] for k in g}, g)
    np.testing.assert_allclose(one.finish(acc, g)["layers.0.q.lora_B"] @ one.finish(acc, g)["layers.0.q.lora_A"],
                               [[2.0, 0.0], [0.0, 1.0]], atol=1e-5)
    assert CoordinatorConfig(strategy="svd", server_lr=2.0).server_lr == 2.0
