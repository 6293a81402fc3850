"""Coordinator over a real Mosquitto with simulated devices: sync/async aggregation equals the strategy
function on accepted updates; bad updates are recorded with reasons; drop-outs and SIGKILL survived."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from helpers import tiny_bundle, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def bundle(tmp_path_factory, tiny_llama_dir):
    return tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")


def schema(bundle):
    from edge_runtime.protocol.adapter import load_adapter
    t, m = load_adapter(bundle / "adapter.safetensors")
    return t, m


def make_update(meta, device, base_version, n, rng, round_id=None, scale=0.01, fingerprint=None, shapes=None):
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.messages import UpdateHeader, encode_update
    shapes = shapes or meta.shapes
    delta = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}
    h = UpdateHeader(device_id=device, update_id=uuid.uuid4().hex, base_version=base_version, num_examples=n,
                     base_fingerprint=fingerprint or meta.base_fingerprint, round=round_id, codec=CodecSpec("fp32", "zstd"))
    return h.update_id, delta, encode_update(h, delta)


def nan_update(meta, device, base_version, round_id):
    """Well-formed envelope with a NaN inside (encode_update refuses NaN, so build it by hand)."""
    from edge_runtime.protocol.tensors import encode_tensors
    t = {k: np.zeros(s, np.float32) for k, s in meta.shapes.items()}
    next(iter(t.values())).flat[0] = np.nan
    payload = encode_tensors(t)
    h = {"protocol": 1, "kind": "update", "device_id": device, "update_id": uuid.uuid4().hex, "base_version": base_version,
         "num_examples": 5, "base_fingerprint": meta.base_fingerprint, "round": round_id, "metrics": {},
         "codec": {"dtype": "fp32", "compression": "none"}, "created_at": time.time(),
         "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_size": len(payload), "signature": None}
    hb = json.dumps(h).encode()
    return b"EFMU" + struct.pack("<I", len(hb)) + hb + payload


class Devices:
    """Simulated devices: one MQTT client publishing status and updates like an agent would."""

    def __init__(self, url, fleet, ids):
        from edge_runtime.protocol.messages import dump_json_message
        from edge_runtime.protocol.topics import Topics
        from edge_runtime.transport import MqttLink
        self.topics = Topics(fleet)
        self.rounds = []
        self.link = MqttLink(url, f"sim-{uuid.uuid4().hex[:6]}", on_message=self._msg)
        self.link.subscribe(self.topics.round, 1)
        self.link.start()
        assert self.link.wait_connected(10)
        for d in ids:
            self.link.publish(self.topics.status(d), dump_json_message({"kind": "status", "device_id": d, "state": "online"}), retain=True)

    def _msg(self, topic, payload, retained):
        if payload:
            self.rounds.append(json.loads(payload))

    def send(self, device, msg):
        assert self.link.publish(self.topics.update(device), msg, qos=1) is not None


def coordinator(bundle, tmp_path, url, **kw):
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    c = Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / "state"), broker=url, fleet="c", **kw))
    c.start()
    return c


def test_sync_round_equals_fedavg_of_accepted_updates(bundle, tmp_path, broker):
    from edge_runtime.protocol.adapter import adapter_from_bytes
    v0, meta = schema(bundle)
    devs = Devices(broker.url, "c", ["d1", "d2", "d3", "d4"])
    c = coordinator(bundle, tmp_path, broker.url, min_updates=3, round_timeout_s=6, max_rounds=1)
    try:
        wait_for(lambda: c.plan is not None, 20, what="round 1 open")
        rng = np.random.default_rng(0)
        good = []
        for dev, n in (("d1", 10), ("d2", 30)):
            uid, delta, msg = make_update(meta, dev, 0, n, rng, round_id=1)
            good.append((n, delta))
            devs.send(dev, msg)
        devs.send("d3", nan_update(meta, "d3", 0, 1))                                   # NaN
        devs.send("d3", make_update(meta, "d3", 0, 5, rng, 1, fingerprint="0" * 64)[2])  # other base model
        devs.send("d3", make_update(meta, "d3", 0, 5, rng, 1, shapes={k: [s[0] + 1, *s[1:]] for k, s in meta.shapes.items()})[2])
        devs.send("d4", make_update(meta, "d4", 0, 5, rng, 1, scale=1e6)[2])            # norm bound (default 1e4)
        devs.send("d3", make_update(meta, "d3", 7, 5, rng, 1)[2])                        # stale base version
        devs.send("d3", b"\x00garbage")                                                 # not an envelope
        devs.send("d1", make_update(meta, "d2", 0, 5, rng, 1)[2])                        # header/topic device mismatch
        uid, delta, msg = make_update(meta, "d3", 0, 60, rng, round_id=1)
        good.append((60, delta))
        devs.send("d3", msg)
        devs.send("d3", msg)                                                            # duplicate delivery
        wait_for(lambda: c.version == 1, 30, what="v1 published")
        time.sleep(0.5)
        reasons = c.state.update_counts()["reasons"]
        for r in ("non_finite", "fingerprint_mismatch", "bad_shape", "norm_bound", "stale", "bad_magic", "bad_field"):
            assert reasons.get(r, 0) >= 1, (r, reasons)
        assert c.state.update_counts()["accepted"] == 3
        v1, m1 = adapter_from_bytes(c.state.blobs.get(c.state.version_sha(1)))
        # FedAvg by examples, each update counting at most the median claim (bounded influence: 60 -> 30)
        med = float(np.median([n for n, _ in good]))
        total = sum(min(n, med) for n, _ in good)
        for k in v0:
            expect = v0[k] + sum(min(n, med) * d[k] for n, d in good) / total
            np.testing.assert_allclose(v1[k], expect, rtol=1e-5, atol=1e-6)
        assert m1.version == 1 and m1.parent_version == 0
        devices = {d["device_id"]: d for d in c.state.devices()}
        assert devices["d3"]["rejected"] >= 4 and devices["d1"]["accepted"] == 1
    finally:
        c.stop()
        devs.link.close()


def test_async_fedbuff_staleness_weighted(bundle, tmp_path, broker):
    from coordinator.rounds import staleness_weight
    from edge_runtime.protocol.adapter import adapter_from_bytes
    v0, meta = schema(bundle)
    devs = Devices(broker.url, "c", ["a", "b", "e"])
    c = coordinator(bundle, tmp_path, broker.url, mode="async", buffer_size=2, max_staleness=1)
    try:
        wait_for(lambda: c.link.connected.is_set(), 20)
        time.sleep(0.5)
        rng = np.random.default_rng(1)
        _, d1, m1 = make_update(meta, "a", 0, 10, rng)
        _, d2, m2 = make_update(meta, "b", 0, 20, rng)
        devs.send("a", m1)
        devs.send("b", m2)
        wait_for(lambda: c.version == 1, 40, what="v1")
        _, d3, m3 = make_update(meta, "e", 0, 10, rng)   # one version stale: weight 10 / sqrt(2)
        _, d4, m4 = make_update(meta, "a", 1, 10, rng)
        devs.send("e", m3)
        devs.send("a", m4)
        wait_for(lambda: c.version == 2, 40, what="v2")
        devs.send("b", make_update(meta, "b", 0, 10, rng)[2])  # two versions stale: rejected
        wait_for(lambda: c.state.update_counts()["reasons"].get("stale") == 1, 20, what="stale rejection")
        v1, _ = adapter_from_bytes(c.state.blobs.get(c.state.version_sha(1)))
        v2, _ = adapter_from_bytes(c.state.blobs.get(c.state.version_sha(2)))
        w3, w4 = staleness_weight(10, 1), staleness_weight(10, 0)
        # v1 is due with two updates judged together: each counts at most their median claim (20 -> 15)
        for k in v0:
            np.testing.assert_allclose(v1[k], v0[k] + (10 * d1[k] + 15 * d2[k]) / 25, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(v2[k], v1[k] + (w3 * d3[k] + w4 * d4[k]) / (w3 + w4), rtol=1e-5, atol=1e-6)
    finally:
        c.stop()
        devs.link.close()


def test_dropouts_close_at_deadline_with_quorum_and_below_quorum_extends(bundle, tmp_path, broker):
    v0, meta = schema(bundle)
    devs = Devices(broker.url, "c", ["x", "y", "z"])
    time.sleep(0.3)
    c = coordinator(bundle, tmp_path, broker.url, min_updates=2, round_timeout_s=2.0, max_rounds=2)
    try:
        wait_for(lambda: c.plan is not None, 10)
        rng = np.random.default_rng(2)
        devs.send("x", make_update(meta, "x", 0, 5, rng, 1)[2])
        time.sleep(2.5)                                    # deadline passes with 1 < quorum 2: extended, v0 kept
        assert c.version == 0 and c.state.rounds()[0]["status"] == "extended"
        devs.send("y", make_update(meta, "y", 0, 5, rng, 1)[2])   # z dropped out: round closes at the deadline
        wait_for(lambda: c.version == 1, 20, what="round closed with quorum")
        r = c.state.rounds()[-1]
        assert r["status"] == "closed" and len(r["summary"]["participants"]) == 2
    finally:
        c.stop()
        devs.link.close()


def test_sigkill_mid_round_resumes_without_double_counting(bundle, tmp_path, broker):
    from coordinator.state import State
    from edge_runtime.protocol.adapter import adapter_from_bytes
    v0, meta = schema(bundle)
    devs = Devices(broker.url, "c", ["p", "q", "r"])
    state_dir = tmp_path / "state"
    cmd = [sys.executable, "-m", "coordinator.cli", "--state-dir", str(state_dir), "serve", "--bundle", str(bundle),
           "--broker", broker.url, "--fleet", "c", "--min-updates", "3", "--round-timeout", "120", "--rounds", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(r.get("round") == 1 for r in devs.rounds), 30, what="round 1 announced")
        rng = np.random.default_rng(3)
        sent = {d: make_update(meta, d, 0, n, rng, 1) for d, n in (("p", 4), ("q", 8), ("r", 12))}
        devs.send("p", sent["p"][2])
        devs.send("q", sent["q"][2])
        wait_for(lambda: (state_dir / "coordinator.sqlite").exists() and
                 State(state_dir).update_counts()["accepted"] == 2, 20, what="two updates recorded")
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        devs.send("p", sent["p"][2])        # redelivered while down: must not count twice
        devs.send("r", sent["r"][2])        # sent while down: queued by the broker for the persistent session
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: State(state_dir).current_version() == 1, 40, what="v1 after restart")
        st = State(state_dir)
        assert st.update_counts()["accepted"] == 3
        v1, _ = adapter_from_bytes(st.blobs.get(st.version_sha(1)))
        # p and q were held (too few to judge) when the process died; after the restart r makes three:
        # each counts at most the median claim (8), so r's 12 counts 8
        for k in v0:
            expect = v0[k] + sum(n * sent[d][1][k] for d, n in (("p", 4), ("q", 8), ("r", 8))) / 20
            np.testing.assert_allclose(v1[k], expect, rtol=1e-5, atol=1e-6)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
        devs.link.close()


def test_acl_broker_stops_device_impersonation(bundle, tmp_path, broker_acl):
    from edge_runtime.protocol.topics import Topics
    from edge_runtime.transport import MqttLink
    v0, meta = schema(bundle)
    host = f"127.0.0.1:{broker_acl.port}"
    c = coordinator(bundle, tmp_path, f"mqtt://coordinator:cpass@{host}", mode="async", buffer_size=1)
    dev1 = MqttLink(f"mqtt://dev-1:p1@{host}", "dev-1").start()
    try:
        assert dev1.wait_connected(20) and c.link.wait_connected(20)
        time.sleep(0.5)
        rng = np.random.default_rng(4)
        t = Topics("c")
        dev1.publish(t.update("dev-2"), make_update(meta, "dev-2", 0, 5, rng)[2])   # denied by the ACL
        dev1.publish(t.update("dev-1"), make_update(meta, "dev-1", 0, 5, rng)[2])   # allowed
        wait_for(lambda: c.version == 1, 30, what="own update counted")
        time.sleep(0.5)
        assert [d["device_id"] for d in c.state.devices()] == ["dev-1"]
        wrong = MqttLink(f"mqtt://dev-1:wrong@{host}", "dev-x").start()
        time.sleep(1.5)
        assert not wrong.connected.is_set() and wrong.last_error
        wrong.close()
    finally:
        dev1.close()
        c.stop()


def test_tls_broker_end_to_end(bundle, tmp_path, broker_tls):
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from helpers import examples
    url = f"mqtts://localhost:{broker_tls.port}?ca={broker_tls.certs['ca.crt']}"
    c = coordinator(bundle, tmp_path, url, mode="async", buffer_size=1)
    a = Agent(AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / "a"), broker=url, fleet="c", device_id="tls-dev",
                          auto_train=False, min_new_examples=1, steps_per_round=2))
    try:
        a.api.add_examples(examples(12))
        a.start()
        wait_for(lambda: a.sync.connected and c.link.connected.is_set(), 30, what="TLS connections")
        a.train_once(forced=True)
        wait_for(lambda: a.global_version == 1, 40, what="global over TLS")
    finally:
        a.stop()
        c.stop()


def test_admin_cli_adapters_rollback_export(bundle, tmp_path, broker):
    from edge_runtime.protocol.adapter import load_adapter
    v0, meta = schema(bundle)
    devs = Devices(broker.url, "c", ["a"])
    c = coordinator(bundle, tmp_path, broker.url, mode="async", buffer_size=1)
    try:
        wait_for(lambda: c.link.connected.is_set(), 20, what="coordinator connected")
        time.sleep(0.5)  # its subscription must exist before the first update (no session to queue into yet)
        rng = np.random.default_rng(9)
        devs.send("a", make_update(meta, "a", 0, 5, rng)[2])
        wait_for(lambda: c.version == 1, 30, what="v1")
    finally:
        c.stop()
        devs.link.close()
    state = str(tmp_path / "state")
    run = lambda *a: subprocess.run([sys.executable, "-m", "coordinator.cli", "--state-dir", state, *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run("adapters", "--json")
    assert r.returncode == 0 and [v["version"] for v in json.loads(r.stdout)] == [1, 0]
    assert "version" in run("adapters").stdout and "a" in run("devices").stdout
    r = run("rollback", "--to", "0", "--broker", broker.url, "--bundle", str(bundle), "--fleet", "c")
    assert r.returncode == 0 and "v2" in r.stdout, r.stderr
    # with no coordinator serving, the command itself published v2 to the fleet (retained pointer)
    from edge_runtime.protocol.messages import parse_json_message
    from edge_runtime.protocol.topics import Topics
    from edge_runtime.transport import MqttLink
    pointers: list[dict] = []
    probe = MqttLink(broker.url, f"probe-{uuid.uuid4().hex[:6]}", on_message=lambda t, p, r: pointers.append(parse_json_message(p)))
    probe.subscribe(Topics("c").global_pointer, 1)
    probe.start()
    try:
        wait_for(lambda: any(m.get("version") == 2 for m in pointers), 10, what="v2's pointer retained on the broker")
    finally:
        probe.close()
    out = tmp_path / "v2.safetensors"
    assert run("export", "--version", "2", "-o", str(out)).returncode == 0
    t2, m2 = load_adapter(out)
    for k in v0:
        np.testing.assert_array_equal(t2[k], v0[k])       # rollback republished v0's content as v2
    assert m2.version == 2 and m2.parent_version == 1
    peft_dir = tmp_path / "peft"
    assert run("export", "--format", "peft", "--bundle", str(bundle), "-o", str(peft_dir)).returncode == 0
    assert (peft_dir / "adapter_config.json").is_file()
    bad = run("rollback", "--to", "9", "--broker", broker.url, "--bundle", str(bundle), "--fleet", "c")
    assert bad.returncode == 1 and "no version 9" in bad.stderr


def test_update_log_refs_sync_rotate_and_damage(tmp_path):
    from coordinator.state import UpdateLog
    lg = UpdateLog(tmp_path / "u")
    r1, r2 = lg.append(b"one"), lg.append(b"second payload")
    assert lg.read(r1) == b"one" and lg.read(r2) == b"second payload"   # readable before the sync too
    lg.sync()
    lg.rotate()
    r3 = lg.append(b"three")
    assert r3.split(":")[0] != r1.split(":")[0]                          # a new segment after rotate
    lg.delete_segments([r1])
    with pytest.raises(OSError):
        lg.read(r2)                                                      # its segment is gone
    assert lg.read(r3) == b"three"
    for bad in ("seg-x.log:0:5", "../seg-1.log:0:1", f"{r3.split(':')[0]}:0:999"):
        with pytest.raises(OSError):
            lg.read(bad)


def _offline_coordinator(bundle, tmp_path, **kw):
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    return Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / "state"), fleet="c", **kw))


def test_worker_group_commits_then_acks_and_a_failed_commit_acks_nothing(bundle, tmp_path):
    from coordinator.state import State
    v0, meta = schema(bundle)
    c = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100, ingest_batch=8, judge_batch=1)  # folded at once
    rng = np.random.default_rng(5)
    ups = [make_update(meta, f"d{i}", 0, 1 + i, rng) for i in range(10)]
    acked, commits = [], []
    real_sync = c.state.log.sync

    def counting_sync():
        commits.append(len(acked))
        real_sync()
    c.state.log.sync = counting_sync
    items = [(c.topics.update(f"d{i}"), msg, False, lambda u=uid: acked.append(u)) for i, (uid, _, msg) in enumerate(ups)]
    for it in items[:8]:                     # the inbox holds ingest_batch (8) messages
        c.enqueue(*it, timeout=1)
    assert c.queued() == 8
    c.start_ingest()
    for it in items[8:]:
        c.enqueue(*it, timeout=20)
    wait_for(lambda: len(acked) == 10, 20, what="all ten acknowledged")
    # 8 queued + 2 more: one group commit for the 8, then one or two (a commit that writes a checkpoint
    # syncs the log twice: the batch's payloads, then the rotation)
    assert commits[:commits.index(8)] in ([0], [0, 0]) and len(commits) <= 5
    assert State(c.state.dir).update_counts()["accepted"] == 10   # durable (seen by a fresh connection) before the ack
    assert c.open.count() == 10
    # the log sync fails: nothing is acknowledged, nothing recorded, the aggregate is rebuilt from disk
    def failing_sync():
        raise OSError(28, "No space left on device")
    c.state.log.sync = failing_sync
    uid, delta, msg = make_update(meta, "d10", 0, 3, rng)
    c.enqueue(c.topics.update("d10"), msg, False, lambda: acked.append(uid))
    wait_for(lambda: c.queued() == 0, 10, what="message taken")
    time.sleep(0.5)
    assert uid not in acked and c.state.update_outcome(uid) is None
    assert c.open.count() == 10
    c.state.log.sync = real_sync
    c.stop()
    # delivered again (as the broker would after a reconnect): counted once
    assert c.handle_update("d10", msg).accepted and c.open.count() == 11



def test_batches_checkpoint_the_sum_and_a_restart_resumes_from_it(bundle, tmp_path, capsys):
    """Once the log holds more than the accumulator would take, a checkpoint of the running sum is written
    too (the log entries it adds stay as their second copy until the next one); a lone update goes to the
    log only. A fresh process (as after
    SIGKILL) resumes with checkpoint + log and publishes the FedAvg of every accepted update (weighted by
    the claims: the median-claim cap is off here, tests/test_influence.py covers it)."""
    from edge_runtime.protocol.adapter import adapter_from_bytes
    v0, meta = schema(bundle)
    rng = np.random.default_rng(11)
    ups = [make_update(meta, f"d{i}", 0, 1 + i, rng) for i in range(6)]
    c = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100, examples_multiple=0, judge_batch=1)
    c.handle_update("d0", ups[0][2])                                    # alone: smaller than a checkpoint -> log
    assert all(r.accepted for r in c.handle_updates([(f"d{i}", ups[i][2]) for i in (1, 2, 3)]))   # one ingest batch
    st = c.state
    ck = st.get("acc_checkpoint")
    assert ck["count"] == 4 and ck["nbytes"] == 8 * sum(int(np.prod(s)) for s in meta.shapes.values())
    blobs = {r["update_id"]: r["blob"] for r in st.update_records()}
    assert {blobs[ups[i][0]] for i in range(4)} == {"ckpt"}            # d0's log entry is covered too
    logrefs = [r["logref"] for r in st.update_records()]
    assert all(r and r.startswith("seg-") for r in logrefs)             # ... and kept as the second copy
    assert len(list((st.dir / "acc").glob("ckpt-*.f64"))) == 1
    c.handle_update("d4", ups[4][2])
    assert {r["update_id"]: r["blob"] for r in st.update_records()}[ups[4][0]].startswith("seg-")
    from coordinator.cli import main as cli
    assert cli(["--state-dir", str(st.dir), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == {"updates": 5, "in_checkpoint": 4, "in_log": 1}

    c2 = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100, examples_multiple=0, judge_batch=1)   # restart on the same state
    assert c2.replayed == 5 and c2.open.count() == 5
    assert c2.handle_update("d5", ups[5][2]).accepted
    assert c2.aggregate_now() == 1
    v1, _ = adapter_from_bytes(c2.state.blobs.get(c2.state.version_sha(1)))
    w = [1 + i for i in range(6)]
    for k in v0:
        expect = v0[k] + sum(wi * u[1][k] for wi, u in zip(w, ups)) / sum(w)
        np.testing.assert_allclose(v1[k], expect, rtol=1e-5, atol=1e-7)
    assert c2.state.get("acc_checkpoint") is None and not list((st.dir / "acc").glob("ckpt-*.f64"))


def _three_in_a_checkpoint(bundle, tmp_path, seed, n):
    """An offline coordinator whose first ingest batch (three updates) was made durable as a
    checkpoint; returns it and ``n`` prepared updates (the first three already in)."""
    _, meta = schema(bundle)
    rng = np.random.default_rng(seed)
    ups = [make_update(meta, f"d{i}", 0, 2, rng) for i in range(n)]
    c = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100, judge_batch=1)
    c.handle_updates([(f"d{i}", ups[i][2]) for i in (0, 1, 2)])
    return c, ups


def _published_mean(c, ups, v0):
    """Version 1 after publishing, and the plain mean of ``ups`` (all claim 2 examples) it should be."""
    from edge_runtime.protocol.adapter import adapter_from_bytes
    assert c.aggregate_now() == 1
    v1, _ = adapter_from_bytes(c.state.blobs.get(c.state.version_sha(1)))
    return v1, {k: v0[k] + sum(u[1][k] for u in ups) / len(ups) for k in v0}


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[8] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("generations", [1, 2])
def test_a_damaged_checkpoint_loses_no_acknowledged_update(bundle, tmp_path, generations):
    """A flipped byte in the newest checkpoint: it is rebuilt from the previous one (with one generation:
    the empty sum) plus the log copies of the updates it added; every acknowledged update still counts
    and version 1 is their exact mean. Damage to both copies is reported and what they held dropped."""
    v0, _ = schema(bundle)
    c, ups = _three_in_a_checkpoint(bundle, tmp_path, 12, 7)
    if generations == 2:
        c.handle_updates([(f"d{i}", ups[i][2]) for i in (3, 4, 5)])
        assert c.state.get("acc_checkpoint")["count"] == 6 and c.state.get("acc_checkpoint_prev")["count"] == 3
    n = 3 * generations
    c.handle_update(f"d{n}", ups[n][2])                                  # in the log, after the checkpoint
    files = sorted((c.state.dir / "acc").glob("ckpt-*.f64"))
    assert len(files) == generations
    _flip_a_byte(c.state.dir / "acc" / c.state.get("acc_checkpoint")["file"])
    c2 = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100, judge_batch=1)
    assert c2.replayed == n + 1 and c2.open.count() == n + 1
    assert c2.state.update_counts()["reasons"] == {}
    got, expect = _published_mean(c2, ups[:n + 1], v0)
    for k in v0:
        np.testing.assert_allclose(got[k], expect[k], rtol=1e-5, atol=1e-7)


def test_a_damaged_log_copy_loses_no_acknowledged_update(bundle, tmp_path):
    """An update only the log holds (after the newest checkpoint): its bytes in the segment damaged, it
    is rebuilt from its batch's parity; it still counts."""
    v0, _ = schema(bundle)
    c, ups = _three_in_a_checkpoint(bundle, tmp_path, 12, 4)
    c.handle_update("d3", ups[3][2])
    ref = c.state.update_records("d3")[0]["blob"]
    _flip_a_byte(c.state.dir / "updates" / ref.split(":")[0])
    c2 = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100, judge_batch=1)
    assert c2.replayed == 4 and c2.state.update_counts()["reasons"] == {}
    got, expect = _published_mean(c2, ups, v0)
    for k in v0:
        np.testing.assert_allclose(got[k], expect[k], rtol=1e-5, atol=1e-7)


def test_payload_and_its_parity_damaged_is_reported(bundle, tmp_path):
    c, ups = _three_in_a_checkpoint(bundle, tmp_path, 12, 4)
    c.handle_update("d3", ups[3][2])
    _flip_a_byte(c.state.dir / "acc" / c.state.get("acc_checkpoint")["file"])
    for seg in {r["logref"].split(":")[0] for r in c.state.update_records() if r["logref"] is not None}:
        _flip_a_byte(c.state.dir / "updates" / seg)
        _flip_a_byte(c.state.dir / "updates" / seg.replace(".log", ".par"))
    c2 = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100, judge_batch=1)
    counts = c2.state.update_counts()
    assert counts["accepted"] + counts["rejected"] == 4 and counts["reasons"].get("corrupt_store", 0) >= 3


def test_update_sent_before_any_coordinator_is_resent_until_receipted(bundle, tmp_path, broker):
    """The broker acknowledges an update nobody had subscribed to and drops it; the device keeps it
    until the coordinator's receipt and sends it again, and it is counted once."""
    from coordinator.state import State
    from edge_runtime.store import Store
    from edge_runtime.sync import FederatedSync
    v0, meta = schema(bundle)
    store = Store(tmp_path / "agent.sqlite")
    fleet = f"fresh-{uuid.uuid4().hex[:6]}"            # no coordinator session for this fleet exists on the broker
    sync = FederatedSync(broker.url, fleet, "dev-9", store, tmp_path / "chunks", base_fingerprint=meta.base_fingerprint,
                         wants_global=lambda p: p.version > 0, on_global=lambda p, b: None, resend_after_s=1.0)
    sync.start()
    c = None
    try:
        uid, _, msg = make_update(meta, "dev-9", 0, 5, np.random.default_rng(9))
        store.enqueue_update(uid, sync.topics.update("dev-9"), msg, 0)
        wait_for(lambda: store.outbox_stats()["awaiting_receipt"] == 1, 20, what="broker PUBACK")
        assert store.outbox_stats()["queued"] == 0          # delivered to the broker, which had no subscriber
        from coordinator.config import CoordinatorConfig
        from coordinator.service import Coordinator
        c = Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / "state"), broker=broker.url, fleet=fleet,
                                          mode="async", buffer_size=100))
        c.start()
        wait_for(lambda: store.outbox_stats()["awaiting_receipt"] == 0, 30, what="receipt after a resend")
        assert store.outbox_stats()["receipts"].get("accepted") == 1
        time.sleep(1.5)                                      # any later resend is answered as a duplicate
        assert State(tmp_path / "state").update_counts()["accepted"] == 1
        assert len(c.state.pending_accepted()) == 1          # in the open aggregation once
    finally:
        sync.close()
        if c:
            c.stop()


def test_server_optimizer_state_survives_a_restart(bundle, tmp_path):
    """FedAdam's moments are stored with each version: a coordinator restarted between rounds
    publishes exactly what one that kept running does."""
    from edge_runtime.protocol.adapter import adapter_from_bytes
    v0, meta = schema(bundle)
    rng = np.random.default_rng(13)
    rounds = [[make_update(meta, f"d{i}", r, 2 + i, rng) for i in range(2)] for r in range(3)]

    def run(state_dir, restart_each_round):
        kw = dict(mode="async", buffer_size=2, strategy="fedadam", max_staleness=10)
        c = _offline_coordinator(bundle, state_dir, **kw)
        for ups in rounds:
            for i, (_, _, msg) in enumerate(ups):
                assert c.handle_update(f"d{i}", msg).accepted
            if restart_each_round:
                c = _offline_coordinator(bundle, state_dir, **kw)
        assert c.version == 3
        return adapter_from_bytes(c.state.blobs.get(c.state.version_sha(3)))[0], c
    straight, _ = run(tmp_path / "a", False)
    restarted, c = run(tmp_path / "b", True)
    for k in straight:
        np.testing.assert_array_equal(restarted[k], straight[k])
    blobs = [p for p in (c.state.dir / "blobs").rglob("*") if p.is_file()]
    assert c.strategy.opt_state.t == 3 and len(blobs) == 4 + 1      # v0..v3 + the newest optimizer state only


def test_checkpoint_whose_commit_fails_changes_nothing_and_is_cleaned_up(bundle, tmp_path):
    c, ups = _three_in_a_checkpoint(bundle, tmp_path, 14, 6)
    first = c.state.get("acc_checkpoint")
    assert first["count"] == 3
    real_sync = c.state.log.sync

    def failing_sync():
        raise OSError(28, "No space left on device")
    c.state.log.sync = failing_sync
    with pytest.raises(OSError):
        c.handle_updates([(f"d{i}", ups[i][2]) for i in (3, 4, 5)])   # a second checkpoint is written, its commit fails
    c.state.log.sync = real_sync
    assert c.state.get("acc_checkpoint") == first        # still the committed one
    assert c.open.count() == 3 and not any(c.state.update_outcome(ups[i][0]) is not None for i in (3, 4, 5))
    files = sorted(p.name for p in (c.state.dir / "acc").glob("ckpt-*.f64"))
    assert len(files) == 2                                # the orphan of the failed commit is still there
    c2 = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100, judge_batch=1)
    assert c2.replayed == 3
    assert len(list((c2.state.dir / "acc").glob("ckpt-*.f64"))) == 2    # opening the state (admin commands) deletes nothing
    c2.state.prune_after_checkpoint()                                    # what `start` does before serving
    assert [p.name for p in (c2.state.dir / "acc").glob("ckpt-*.f64")] == [first["file"]]


def test_rollback_and_publish_while_serve_runs(bundle, tmp_path, broker):
    """Admin commands are executed by the serving coordinator (they used to write the state around it
    and wedge it in an IntegrityError loop); a second serve on the same state dir is refused."""
    from coordinator.state import State
    from edge_runtime.protocol.adapter import save_adapter
    v0, meta = schema(bundle)
    devs = Devices(broker.url, "c", ["a"])
    state = tmp_path / "state"
    serve = [sys.executable, "-m", "coordinator.cli", "--state-dir", str(state), "serve", "--bundle", str(bundle),
             "--broker", broker.url, "--fleet", "c", "--mode", "async"]
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen(serve + ["--config", str(_buffer_one(tmp_path))], stdout=log, stderr=subprocess.STDOUT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "coordinator.cli", "--state-dir", str(state), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    try:
        wait_for(lambda: devs.rounds, 30, what="the serving coordinator's announcement")
        rng = np.random.default_rng(5)
        devs.send("a", make_update(meta, "a", 0, 5, rng)[2])
        wait_for(lambda: State(state).current_version() == 1, 30, what="v1")
        r = run("rollback", "--to", "0", "--broker", broker.url, "--bundle", str(bundle), "--fleet", "c")
        assert r.returncode == 0 and "v2" in r.stdout and "handing it the command" in r.stdout, (r.stdout, r.stderr)
        save_adapter(tmp_path / "mine.safetensors", {k: v + 0.01 for k, v in v0.items()}, meta)
        r = run("publish", str(tmp_path / "mine.safetensors"), "--broker", broker.url, "--bundle", str(bundle), "--fleet", "c")
        assert r.returncode == 0 and "v3" in r.stdout, (r.stdout, r.stderr)
        bad = run("rollback", "--to", "9", "--broker", broker.url, "--bundle", str(bundle), "--fleet", "c")
        assert bad.returncode == 1 and "no version 9" in bad.stderr
        # serve still works: an update on v3 is folded into v4
        devs.send("a", make_update(meta, "a", 3, 5, rng)[2])
        wait_for(lambda: State(state).current_version() == 4, 30, what="v4 from an update after the admin commands")
        second = subprocess.run(serve, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "one coordinator per state dir" in second.stderr
        assert p.poll() is None
        st = State(state)
        t2, _ = load_adapter_bytes(st, 2)
        for k in v0:
            np.testing.assert_array_equal(t2[k], v0[k])
    finally:
        p.terminate()
        p.wait(30)
        log.close()
        devs.link.close()
    assert "IntegrityError" not in (tmp_path / "serve.log").read_text()


def _buffer_one(tmp_path):
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text("buffer_size = 1\n")
    return cfg


def load_adapter_bytes(st, version):
    from edge_runtime.protocol.adapter import adapter_from_bytes
    return adapter_from_bytes(st.blobs.get(st.version_sha(version)))


def test_a_resent_rejected_update_is_rejected_again_not_called_counted(bundle, tmp_path):
    """Found by tests/test_chaos.py: a device whose "rejected" receipt was lost resends the update; the
    answer was "duplicate, already counted", so the device counted an update the coordinator never did."""
    _, meta = schema(bundle)
    rng = np.random.default_rng(4)
    c = _offline_coordinator(bundle, tmp_path, mode="async", buffer_size=100)
    first = make_update(meta, "d0", 0, 3, rng)
    second = make_update(meta, "d0", 0, 3, rng)         # the same device again in the same version: refused
    assert c.handle_update("d0", first[2]).accepted
    r = c.handle_update("d0", second[2])
    assert not r.accepted and r.reason == "too_frequent"
    again = c.handle_update("d0", second[2])            # resent (its receipt was lost)
    assert not again.accepted and again.reason == "too_frequent"
    resent = c.handle_update("d0", first[2])            # the counted one resent: "duplicate" (it counted)
    assert resent.reason == "duplicate"
    assert {d["device_id"]: d["accepted"] for d in c.state.devices()}["d0"] == 1


def test_update_log_rebuilds_one_damaged_payload_of_a_batch_from_its_parity(tmp_path):
    """Three payloads of different lengths made durable together, then a second batch of one. Any one
    damaged payload reads back exactly (rebuilt from the XOR parity of its batch); two damaged in the
    same batch cannot be, and say so."""
    from coordinator.state import UpdateLog

    def check(data):
        if data != payloads[refs.index(current)]:
            raise ValueError("checksum mismatch")

    log = UpdateLog(tmp_path / "updates")
    payloads = [b"first payload", b"the second, longer payload", b"third", b"alone in its batch"]
    refs = [log.append(p) for p in payloads[:3]]
    log.sync()
    refs.append(log.append(payloads[3]))
    log.sync()
    seg = tmp_path / "updates" / refs[0].split(":")[0]
    clean = seg.read_bytes()
    for i, ref in enumerate(refs):
        off, n = map(int, ref.split(":")[1:])
        broken = bytearray(clean)
        broken[off + n // 2] ^= 0x55
        seg.write_bytes(bytes(broken))
        current = ref
        assert log.read(ref, check=check) == payloads[i]
    seg.write_bytes(clean[:int(refs[3].split(":")[1]) + 3])      # the last payload cut short
    current = refs[3]
    assert log.read(refs[3], check=check) == payloads[3]
    broken = bytearray(clean)
    for ref in refs[:2]:
        off, n = map(int, ref.split(":")[1:])
        broken[off] ^= 0x55
    seg.write_bytes(bytes(broken))
    current = refs[0]
    with pytest.raises(OSError, match="not rebuildable"):
        log.read(refs[0], check=check)
    seg.unlink()                                                 # a crash between delete's two unlinks ...
    assert log.segments() == {seg.name}                          # ... leaves the parity, still listed for pruning
    log.delete(seg.name)
    assert list((tmp_path / "updates").iterdir()) == []
