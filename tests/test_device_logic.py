"""Agent-side pure logic: optimizer, policy, sampling, stop sequences, store, metrics (torch-free)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.optim import AdamWConfig, adamw_step, clip_by_global_norm, learning_rate
from edge_runtime.policy import TrainDecision, TrainPolicy, decide
from edge_runtime.sampling import find_stop, holdback, sample_next
from edge_runtime.store import Store

pytestmark = pytest.mark.device


def test_adamw_first_step_matches_hand_computation():
    cfg = AdamWConfig(lr=0.1, weight_decay=0.1)
    p, g = {"w": np.array([1.0, -1.0], np.float32)}, {"w": np.array([0.5, -2.0], np.float32)}
    z = {"w": np.zeros(2, np.float32)}
    new, m, v, lr = adamw_step(p, g, z, dict(z), 1, cfg)
    # bias-corrected m/v at step 1 equal g and g^2, so the step is lr * sign(g) (plus decoupled decay)
    np.testing.assert_allclose(new["w"], p["w"] * (1 - 0.1 * 0.1) - 0.1 * np.sign(g["w"]), rtol=1e-5)


def test_adamw_matches_torch_when_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    tw = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.AdamW([tw], lr=1e-2, weight_decay=0.01)
    p, m, v = {"w": w0.copy()}, {"w": np.zeros_like(w0)}, {"w": np.zeros_like(w0)}
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.01)
    for step in range(1, 6):
        g = rng.normal(size=(3, 4)).astype(np.float32)
        tw.grad = torch.tensor(g)
        opt.step()
        p, m, v, _ = adamw_step(p, {"w": g}, m, v, step, cfg)
    np.testing.assert_allclose(p["w"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clip_and_schedule():
    g, n = clip_by_global_norm({"a": np.array([3.0]), "b": np.array([4.0])}, 1.0)
    assert n == pytest.approx(5.0) and float(g["a"][0]) == pytest.approx(0.6)
    cfg = AdamWConfig(lr=1.0, warmup_steps=4, schedule="cosine", total_steps=14)
    assert learning_rate(cfg, 0) == 0.25 and learning_rate(cfg, 3) == 1.0
    assert learning_rate(cfg, 14) == pytest.approx(0.1)


@pytest.mark.parametrize("kw, expected", [
    (dict(new_examples=3, inflight_requests=0, hour=3, paused=False, seconds_since_last=99), TrainDecision.NOT_ENOUGH_DATA),
    (dict(new_examples=30, inflight_requests=2, hour=3, paused=False, seconds_since_last=99), TrainDecision.BUSY),
    (dict(new_examples=30, inflight_requests=0, hour=12, paused=False, seconds_since_last=99), TrainDecision.OUTSIDE_WINDOW),
    (dict(new_examples=30, inflight_requests=0, hour=3, paused=True, seconds_since_last=99), TrainDecision.PAUSED),
    (dict(new_examples=30, inflight_requests=0, hour=3, paused=False, seconds_since_last=1), TrainDecision.COOLDOWN),
    (dict(new_examples=30, inflight_requests=0, hour=3, paused=False, seconds_since_last=99), TrainDecision.TRAIN),
    (dict(new_examples=0, inflight_requests=0, hour=12, paused=False, seconds_since_last=0, forced=True), TrainDecision.TRAIN),
])
def test_training_policy_table(kw, expected):
    assert decide(TrainPolicy(min_new_examples=16, window_hours=(22, 6), cooldown_s=10), **kw) == expected


def test_sampling_and_stops():
    logits = np.array([0.0, 5.0, 1.0])
    assert sample_next(logits) == 1
    rng = np.random.default_rng(0)
    assert all(sample_next(logits, temperature=1.0, top_k=1, rng=rng) == 1 for _ in range(20))
    assert {sample_next(logits, temperature=5.0, top_p=1.0, rng=rng) for _ in range(200)} == {0, 1, 2}
    assert find_stop("hello END there", ["END", "x"]) == 6 and find_stop("abc", ["z"]) == -1
    assert holdback("text EN", ["END"]) == 2 and holdback("text", ["END"]) == 0


def test_store_examples_split_dedupe_quota_and_outbox(tmp_path):
    from edge_runtime.store import StoreFull
    s = Store(tmp_path / "a.sqlite", max_examples=50, heldout_fraction=0.2, max_evictions_per_hour=10)
    with pytest.raises(StoreFull, match="Nothing was stored"):     # over the quota with nothing trained on yet
        s.add_examples([{"text": f"example {i}"} for i in range(60)])
    assert s.count_examples()["train"] + s.count_examples()["heldout"] == 0
    r = s.add_examples([{"text": f"example {i}"} for i in range(50)])
    s.mark_trained([e["id"] for e in s.training_batch(100, replay_fraction=0.0)])
    r = s.add_examples([{"text": f"example {i}"} for i in range(50, 60)])
    assert r["added"] == 10 and r["evicted"] == 10                   # ten trained-on examples made room
    assert s.add_examples([{"text": "example 59"}])["duplicates"] == 1
    with pytest.raises(StoreFull, match="at most 10 per hour"):       # the hour's eviction budget is spent
        s.add_examples([{"text": "one more"}])
    c = s.count_examples()
    assert c["train"] + c["heldout"] == 50 and 0 < c["heldout"] < 25
    with pytest.raises(Exception):
        s.add_examples([{"text": ""}])
    s.enqueue_update("u1", "t", b"payload", 0)
    s.enqueue_update("u1", "t", b"payload", 0)
    assert s.outbox_stats()["queued"] == 1
    s.ack_update("u1")
    assert s.outbox_stats() == {"queued": 0, "queued_bytes": 0, "awaiting_receipt": 1, "acknowledged": 1, "receipts": {}}
    assert s.pending_updates() == []                       # delivered: not resent on reconnect ...
    assert [r[0] for r in s.pending_updates(resend_after_s=0.0)] == ["u1"]   # ... but after the receipt timeout
    assert s.receipt("u1", "accepted", None) and not s.receipt("nope", "accepted", None)
    assert s.outbox_stats() == {"queued": 0, "queued_bytes": 0, "awaiting_receipt": 0, "acknowledged": 1,
                                "receipts": {"accepted": 1}}
    # retention drops only trained-on training examples past the age limit
    unused = s.training_coverage()["never_used"]                        # the new training examples
    s.mark_trained([e["id"] for e in s.training_batch(2, replay_fraction=0.0)])
    cov = s.training_coverage()
    assert cov["never_used"] == unused - 2 > 0
    assert s.apply_retention(max_age_s=-1) == cov["examples"] - cov["never_used"] and s.apply_retention(max_age_s=-1) == 0
    assert s.training_coverage()["examples"] == s.training_coverage()["never_used"] == unused - 2   # unused ones stay
    c = s.count_examples()
    # state survives reopening (what a restart sees)
    s2 = Store(tmp_path / "a.sqlite", max_examples=50)
    assert s2.count_examples() == c


def test_metrics_render():
    from edge_runtime.metrics import Metrics
    m = Metrics()
    m.inc("edgefm_x_total", 2, {"a": "b"}, help="x")
    m.observe("edgefm_lat_seconds", 0.03)
    text = m.render()
    assert 'edgefm_x_total{a="b"} 2.0' in text and 'edgefm_lat_seconds_bucket{le="0.05"} 1' in text
    assert "edgefm_lat_seconds_count 1" in text


def test_lowrank_slot_places_base_prefix_then_each_target():
    from edge_runtime.lowrank import Slot, pack_slot
    # q (2 outputs) + k (1) + v (1) share an input of 3; LoRA rank 1 on q and v; a base prefix of width 1
    slot = Slot(layer=0, L="l", R="r", in_features=3, out_features=4, prefix=1, targets=(("q_proj", 0, 2), ("v_proj", 3, 1)))
    t = {"layers.0.q_proj.lora_A": np.array([[1.0, 2.0, 3.0]], np.float32), "layers.0.q_proj.lora_B": np.array([[1.0], [-1.0]], np.float32),
         "layers.0.v_proj.lora_A": np.array([[0.0, 1.0, 0.0]], np.float32), "layers.0.v_proj.lora_B": np.array([[4.0]], np.float32)}
    L, R = pack_slot(slot, t, rank=1, scale=0.5, base_L=np.ones((3, 1), np.float32), base_R=np.full((1, 4), 0.25, np.float32))
    np.testing.assert_array_equal(L, [[1, 1, 0], [1, 2, 1], [1, 3, 0]])
    np.testing.assert_array_equal(R, [[0.25, 0.25, 0.25, 0.25], [0.5, -0.5, 0, 0], [0, 0, 0, 2.0]])
    x = np.array([[1.0, 1.0, 2.0]], np.float32)
    # (x @ L) @ R = base (sum(x) * 0.25 everywhere) + q delta (scale * B_q A_q x) in cols 0-1 + v delta in col 3
    np.testing.assert_allclose(x @ L @ R, [[4 * 0.25 + 0.5 * 9, 4 * 0.25 - 0.5 * 9, 4 * 0.25, 4 * 0.25 + 0.5 * 4]])
    from edge_runtime.errors import BundleError
    with pytest.raises(BundleError, match="base part"):
        pack_slot(slot, t, rank=1, scale=0.5)          # a prefix but no base tensors: refused, not zero-filled


def test_lowrank_layout_reads_its_base_part_from_the_bundle(tmp_path):
    from types import SimpleNamespace
    from safetensors.numpy import save_file
    from edge_runtime.errors import BundleError
    from edge_runtime.lowrank import BASE_FILE, LowRankLayout
    slot = {"layer": 0, "L": "lowrank.0.q.L", "R": "lowrank.0.q.R", "in": 2, "out": 3, "prefix": 1, "targets": [["q_proj", 0, 3]]}
    from edge_runtime.protocol.manifest import AdapterSpec, IoSpec
    manifest = SimpleNamespace(io=IoSpec(lora_layout="lowrank", lowrank=[slot]), adapter=AdapterSpec(1, 2.0, ["q_proj"], {}))
    with pytest.raises(BundleError, match="missing"):
        LowRankLayout.from_bundle(tmp_path, manifest)             # a prefix but no base file: a clear error
    save_file({"lowrank.0.q.L": np.ones((2, 1), np.float32), "lowrank.0.q.R": np.full((1, 3), 0.5, np.float32)}, str(tmp_path / BASE_FILE))
    feeds = LowRankLayout.from_bundle(tmp_path, manifest).feeds(
        {"layers.0.q_proj.lora_A": np.array([[1.0, -1.0]], np.float32), "layers.0.q_proj.lora_B": np.array([[1.0], [2.0], [3.0]], np.float32)})
    np.testing.assert_array_equal(feeds["lowrank.0.q.L"], [[1, 1], [1, -1]])
    np.testing.assert_array_equal(feeds["lowrank.0.q.R"], [[0.5, 0.5, 0.5], [2.0, 4.0, 6.0]])     # alpha/rank = 2
    assert LowRankLayout.from_bundle(tmp_path, SimpleNamespace(io=IoSpec(), adapter=manifest.adapter)) is None  # stacked inputs
    (tmp_path / BASE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(BundleError, match="unreadable"):
        LowRankLayout.from_bundle(tmp_path, manifest)


def test_per_source_quotas_protect_each_sources_examples(tmp_path):
    """max_examples 10, max_source_share 0.5: quota 5 per source. A full store makes room only from
    trained-on examples, from the adding source while it is over its quota, else from sources over theirs."""
    from edge_runtime.store import StoreFull
    s = Store(tmp_path / "q.sqlite", max_examples=10, heldout_fraction=0.0, max_evictions_per_hour=100, max_source_share=0.5)

    def texts():
        return sorted(e["text"] for e in s.training_batch(100, replay_fraction=0.0))

    def train_all():
        s.mark_trained([e["id"] for e in s.training_batch(100, replay_fraction=0.0)])

    assert s.add_examples([{"text": f"a{i}"} for i in range(8)], source="A")["evicted"] == 0   # not full: no quota bites
    train_all()
    assert s.add_examples([{"text": f"b{i}"} for i in range(2)], source="B")["evicted"] == 0   # 10 of 10
    r = s.add_examples([{"text": f"b{i}"} for i in range(2, 5)], source="B")
    assert r == {"added": 3, "duplicates": 0, "evicted": 3, "train": 3, "heldout": 0, "source": "B"}
    assert texts() == ["a3", "a4", "a5", "a6", "a7"] + [f"b{i}" for i in range(5)]   # A's oldest, down to its quota
    with pytest.raises(StoreFull, match="'B' holds more than its quota"):     # B at 6 > 5: only its own, none trained
        s.add_examples([{"text": "b5"}], source="B")
    with pytest.raises(StoreFull, match="under their quota"):                 # C: A and B hold 5 each, protected
        s.add_examples([{"text": "c0"}], source="C")
    train_all()
    assert s.add_examples([{"text": "b5"}], source="B")["evicted"] == 1                    # B's own oldest
    assert texts() == ["a3", "a4", "a5", "a6", "a7"] + [f"b{i}" for i in range(1, 6)]
    assert s.add_examples([{"text": "a8"}], source="A")["evicted"] == 1                    # A's own oldest
    assert texts() == ["a4", "a5", "a6", "a7", "a8"] + [f"b{i}" for i in range(1, 6)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ABC"), st.integers(1, 6), st.booleans()), min_size=1, max_size=25))
def test_quota_property_no_source_loses_examples_under_its_quota(tmp_path_factory, plan):
    """Whatever the order of adds (and training sessions in between), an example is evicted only if it
    was trained on, and only when its own source was adding or held more than its quota."""
    from edge_runtime.store import StoreFull
    s = Store(tmp_path_factory.mktemp("p") / "q.sqlite", max_examples=12, heldout_fraction=0.0, max_evictions_per_hour=1000,
              max_source_share=0.4)   # quota 4
    trained: set[str] = set()
    n = 0
    for source, k, train in plan:
        before = {e["text"] for e in s.training_batch(1000, replay_fraction=0.0)}
        held = {src: sum(t[0] == src for t in before) for src in "ABC"}
        try:
            s.add_examples([{"text": f"{source}{n + i}"} for i in range(k)], source=source)
        except StoreFull:
            assert {e["text"] for e in s.training_batch(1000, replay_fraction=0.0)} == before   # refused whole
        n += k
        after = {e["text"] for e in s.training_batch(1000, replay_fraction=0.0)}
        assert len(after) <= 12
        for t in before - after:
            assert t in trained, f"{t} evicted before it was trained on"
            assert t[0] == source or held[t[0]] > 4, f"{t} evicted for {source} while {t[0]} held {held[t[0]]} <= its quota"
        if train:
            trained |= after
            s.mark_trained([e["id"] for e in s.training_batch(1000, replay_fraction=0.0)])


def test_token_source_names_the_source_a_bearer_token_authenticates():
    from edge_runtime.server import token_source
    named = {"camera": "c" * 20, "app": "a" * 20}
    assert token_source(None, None, {}) == "api"                                   # no token configured: local callers
    assert token_source("Bearer " + "t" * 20, "t" * 20, named) == "api"
    assert token_source("Bearer " + "a" * 20, "t" * 20, named) == "api:app"
    assert token_source("Bearer " + "c" * 20, None, named) == "api:camera"
    assert token_source("Bearer " + "x" * 20, "t" * 20, named) is None
    assert token_source(None, "t" * 20, {}) is None and token_source("Basic " + "t" * 20, "t" * 20, {}) is None
    assert token_source("Bearer ", None, named) is None                            # an empty token matches nothing


def test_log_softmax_and_nll_by_hand():
    """The one place scores and losses come from logits (edge_runtime/sampling.py)."""
    from edge_runtime.sampling import log_softmax, nll
    np.testing.assert_allclose(np.exp(log_softmax(np.array([0.0, np.log(3.0)]))), [0.25, 0.75])
    masked = log_softmax(np.array([-np.inf, 5.0, 5.0]))              # a token masked by a grammar stays impossible
    assert masked[0] == -np.inf and np.allclose(masked[1:], np.log(0.5))
    logits = np.array([[[0.0, np.log(3.0)], [1000.0, 1000.0]]])       # batch x positions x vocab; huge but equal
    np.testing.assert_allclose(nll(logits, np.array([[1, 0]])), [[np.log(4 / 3), np.log(2.0)]])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-60, 60, width=32), min_size=2, max_size=40), st.data())
def test_nll_is_minus_the_log_softmax_of_the_target(row, data):
    # nll keeps one float32 working copy (memory: vocabulary-sized rows) and sums in float64
    from edge_runtime.sampling import log_softmax, nll
    z = np.array([row, row[::-1]], np.float32)
    z[1, 0] = -np.inf                                                  # a masked token
    t = np.array([data.draw(st.integers(0, len(row) - 1)), data.draw(st.integers(1, len(row) - 1))])
    want = -log_softmax(z)[np.arange(2), t]
    np.testing.assert_allclose(nll(z, t), want, rtol=1e-6, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=40))
def test_log_softmax_is_a_distribution(row):
    from edge_runtime.sampling import log_softmax
    lp = log_softmax(np.array(row))
    assert abs(np.exp(lp).sum() - 1.0) < 1e-9 and np.all(lp <= 1e-12)


def test_microbatch_losses_combine_as_the_whole_batch():
    """Mean losses of microbatches weighted by what each averaged over (scored tokens or rows)."""
    from edge_runtime.trainer import combine_microbatches, microbatch_weight
    g = lambda v: {"a": np.array([v], np.float32)}  # noqa: E731
    # 3 tokens with mean loss 2 and 1 token with mean loss 6: the whole batch's mean is (6 + 6) / 4 = 3
    loss, grads = combine_microbatches([(2.0, g(1.0), 3.0), (6.0, g(5.0), 1.0)])
    assert loss == 3.0 and grads["a"][0] == 2.0
    # a microbatch with nothing scored adds nothing; all of them with nothing: zeros, as the graph gives
    assert combine_microbatches([(2.0, g(1.0), 3.0), (0.0, g(0.0), 0.0)])[0] == 2.0
    assert combine_microbatches([(0.0, g(0.0), 0.0)])[0] == 0.0
    mask = np.array([[1, 1, 1, 0], [0, 0, 1, 1]], np.float32)   # the first position is never a target
    assert microbatch_weight({"loss_mask": mask}, "causal-lm") == 4.0
    assert microbatch_weight({"labels": np.zeros(3, np.int64)}, "classification") == 3.0
