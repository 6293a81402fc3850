"""The learning path through a real agent (tiny model) and a real Mosquitto: one session per round, the
network thread stays responsive while the agent evaluates, the gate protects the user, train-now."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from helpers import examples, free_port, tiny_bundle, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def bundle(tmp_path_factory, tiny_llama_dir):
    return tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")


def make_agent(bundle, data_dir, **kw):
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.server import serve_in_thread
    cfg = AgentConfig(**{"bundle": str(bundle), "data_dir": str(data_dir), "port": free_port(), "auto_train": False,
                         "min_new_examples": 1, "steps_per_round": 2, **kw})
    agent = Agent(cfg)
    srv, _ = serve_in_thread(agent.api, "127.0.0.1", cfg.port)
    agent.start()
    return agent, srv, f"http://127.0.0.1:{cfg.port}"


def call(url, body=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def sessions(url) -> int:
    """Training sessions the agent ran (its event log, through the API)."""
    return sum(1 for e in call(url + "/v1/status")["events"] if e["event"] == "trained")


class Publisher:
    """Plays the coordinator's side of the topics on the real broker."""

    def __init__(self, broker, fleet):
        from edge_runtime.protocol.topics import Topics
        from edge_runtime.transport import MqttLink
        self.topics = Topics(fleet)
        self.link = MqttLink(broker.url, f"test-pub-{fleet}").start()
        assert self.link.wait_connected(10)

    def round(self, round_id, base_version):
        from edge_runtime.protocol.messages import dump_json_message
        msg = {"kind": "round", "mode": "sync", "round": round_id, "base_version": base_version, "selected": None}
        self.link.publish(self.topics.round, dump_json_message(msg), retain=True)

    def global_adapter(self, version, tensors, meta):
        from edge_runtime.protocol.adapter import AdapterMeta, adapter_to_bytes
        from edge_runtime.protocol.messages import make_pointer
        blob = adapter_to_bytes(tensors, AdapterMeta(**{**meta.to_json(), "version": version}))
        ptr, chunks = make_pointer(version, version - 1, meta.base_fingerprint, blob, chunk_size=1 << 16)
        for i, c in enumerate(chunks):
            self.link.publish(self.topics.global_chunk(version, i), c, retain=True)
        self.link.publish(self.topics.global_pointer, ptr.to_bytes(), retain=True)

    def close(self):
        self.link.close()


def test_a_redelivered_round_announcement_starts_no_second_session(bundle, tmp_path, broker):
    # Prepare: an agent with data on the broker, a retained round announcement
    agent, srv, url = make_agent(bundle, tmp_path / "a", broker=broker.url, fleet="r", device_id="dev-1")
    pub = Publisher(broker, "r")
    try:
        call(url + "/v1/examples", {"examples": examples(24)})
        wait_for(lambda: agent.sync.connected, 30, what="agent connected")
        # Execute: the announcement, then the same one again (what a reconnect delivers)
        pub.round(1, 0)
        wait_for(lambda: sessions(url) == 1, 60, what="the round's session")
        pub.round(1, 0)
        time.sleep(3)
        # Assert
        assert sessions(url) == 1
    finally:
        srv.shutdown()
        agent.stop()
    # after a restart the broker hands the retained announcement over again: still no second session
    agent, srv, url = make_agent(bundle, tmp_path / "a", broker=broker.url, fleet="r", device_id="dev-1")
    try:
        wait_for(lambda: agent.sync.connected and agent.api.status()["round"], 30, what="retained round re-delivered")
        time.sleep(3)
        assert sessions(url) == 0
        assert agent.store.outbox_stats()["awaiting_receipt"] + agent.store.outbox_stats()["queued"] == 1
        pub.round(2, 0)                                      # a new round does start one
        wait_for(lambda: sessions(url) == 1, 60, what="round 2's session")
    finally:
        pub.close()
        srv.shutdown()
        agent.stop()


def test_network_thread_keeps_its_keepalive_while_the_agent_evaluates_under_full_cpu(bundle, tmp_path, broker):
    from edge_runtime.protocol.adapter import load_adapter
    # Prepare: a big held-out slice (a slow gate), a 1 s keep-alive, and every core busy
    agent, srv, url = make_agent(bundle, tmp_path / "a", broker=broker.url, fleet="k", device_id="dev-1",
                                 mqtt_keepalive_s=1, gate_heldout_limit=100_000)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    pub = Publisher(broker, "k")
    try:
        added = agent.api.add_examples(examples(12_000))
        assert added["heldout"] > 800
        wait_for(lambda: agent.sync.connected, 30, what="agent connected")
        tensors, meta = load_adapter(bundle / "adapter.safetensors")
        t0 = time.time()
        # Execute: a global arrives; judging it means scoring the whole held-out slice three times
        pub.global_adapter(1, {k: v + 0.001 for k, v in tensors.items()}, meta)
        wait_for(lambda: any(d["candidate"] == "global-1" for d in call(url + "/v1/status")["gate_decisions"]), 240,
                 what="the global judged by the gate")
        judged_in = time.time() - t0
        # Assert: the gate's work took many keep-alive periods, and the link never dropped
        assert judged_in > 2, f"the gate took only {judged_in:.1f}s: the test would not show a blocked network thread"
        assert call(url + "/v1/status")["broker_disconnects"] == 0
        assert agent.sync.connected
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        pub.close()
        srv.shutdown()
        agent.stop()


def test_gate_refuses_a_global_worse_than_base_and_keeps_it_for_inspection(bundle, tmp_path, broker):
    from edge_runtime.protocol.adapter import load_adapter
    agent, srv, url = make_agent(bundle, tmp_path / "a", broker=broker.url, fleet="g", device_id="dev-1")
    pub = Publisher(broker, "g")
    try:
        call(url + "/v1/examples", {"examples": examples(200)})
        wait_for(lambda: agent.sync.connected, 30, what="agent connected")
        tensors, meta = load_adapter(bundle / "adapter.safetensors")
        trained = call(url + "/v1/train", {"wait": True})       # the device's own result serves
        assert trained["adopted"]
        # a poisoned global: 40 steps of gradient *ascent* on text like this device's
        from edge_runtime.protocol.adapter import stack_adapter, unstack_adapter
        from edge_runtime.trainer import OnnxTrainer
        tr = OnnxTrainer(bundle, agent.manifest, agent.engine.tokenizer)
        params = stack_adapter(tensors, tr.targets, tr.layers)
        for step in range(40):
            _, grads = tr.loss_and_grads(params, tr.make_batch(examples(4, offset=4 * step)))
            params = {k: (v + 0.05 * np.sign(grads[k])).astype(np.float32) for k, v in params.items()}
        harmful = unstack_adapter(params, tr.targets)
        pub.global_adapter(1, harmful, meta)
        wait_for(lambda: agent.global_version == 1, 60, what="global v1 received")
        wait_for(lambda: call(url + "/v1/status")["gate_decisions"][0]["candidate"] == "global-1", 30, what="the gate's decision")
        decision = call(url + "/v1/status")["gate_decisions"][0]
        assert decision["candidate"] == "global-1" and not decision["adopted"]
        assert decision["reason"] == "worse_than_base"
        assert decision["numbers"]["heldout_candidate"] > decision["numbers"]["heldout_base"]
        adapters = call(url + "/v1/adapters")
        assert adapters["active"] == trained["candidate"]          # the device keeps serving its own result
        assert {"id": "global-1", "kind": "refused"}.items() <= next(a for a in adapters["adapters"] if a["id"] == "global-1").items()
        # an operator can still serve it by hand
        assert call(url + "/v1/adapters/rollback", {"to": "global-1"})["active"] == "global-1"
    finally:
        pub.close()
        srv.shutdown()
        agent.stop()


def test_train_now_waits_for_a_full_session(bundle, tmp_path):
    agent, srv, url = make_agent(bundle, tmp_path / "a", max_train_seconds=60, steps_per_round=4)
    try:
        call(url + "/v1/examples", {"examples": examples(40)})
        t0 = time.time()
        res = call(url + "/v1/train", {"wait": True})
        took = time.time() - t0
        assert res["status"] == "trained" and res["steps"] >= 4 and res["stopped"] == "steps"
        assert took < 30                      # not stalled until max_train_seconds by its own request
        # the CLI does the same
        out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "train-now", "--url", url],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and json.loads(out.stdout)["steps"] >= 4
    finally:
        srv.shutdown()
        agent.stop()


def test_two_sessions_from_one_global_send_their_own_progress_once(bundle, tmp_path):
    """Settles the async double count: a session that continues the device's local result sends only its
    own progress, so the updates from one global add up to the device's total progress, never more."""
    from edge_runtime.protocol.adapter import load_adapter
    from edge_runtime.protocol.messages import decode_update
    agent, srv, url = make_agent(bundle, tmp_path / "a", update_codec="fp32", update_compression="none")
    try:
        call(url + "/v1/examples", {"examples": examples(40)})
        first, second = call(url + "/v1/train", {"wait": True}), call(url + "/v1/train", {"wait": True})
        assert first["adopted"] and second["adopted"]
        updates = {decode_update(bytes(p)).header.update_id: decode_update(bytes(p)) for _, _, p in agent.store.pending_updates()}
        assert {u.header.base_version for u in updates.values()} == {0}          # both started from global v0
        d1, d2 = updates[first["update_id"]].tensors, updates[second["update_id"]].tensors
        start, _ = load_adapter(bundle / "adapter.safetensors")
        final, _ = load_adapter(next(a["path"] for a in call(url + "/v1/adapters")["adapters"] if a["id"] == second["candidate"]))
        for k in start:
            np.testing.assert_allclose(d1[k] + d2[k], final[k] - start[k], atol=1e-6)
            assert np.abs(d2[k]).max() < np.abs(final[k] - start[k]).max() + 1e-6
    finally:
        srv.shutdown()
        agent.stop()


def test_general_replay_mixes_the_base_models_own_text_into_batches(bundle, tmp_path):
    agent, srv, url = make_agent(bundle, tmp_path / "a", general_replay_fraction=0.25, steps_per_round=2)
    try:
        call(url + "/v1/examples", {"examples": examples(30)})
        res = call(url + "/v1/train", {"wait": True})
        assert res["status"] == "trained"
        replay = (tmp_path / "a" / "general_replay.jsonl").read_text().splitlines()
        assert len(replay) == 64 and all(json.loads(x)["text"].strip() for x in replay)
        # 3 device rows per step of 4: enough steps for every new example; general rows are not counted as device data
        cov = call(url + "/v1/status")["training_coverage"]
        assert cov["never_used"] == 0 and res["examples_used"] == cov["examples"]
        assert res["steps"] >= -(-cov["examples"] // 3)
    finally:
        srv.shutdown()
        agent.stop()
