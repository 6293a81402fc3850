"""The whole loop: tiny bundle exported, served and trained by an agent, update aggregated by the
coordinator over a real Mosquitto, new global adapter adopted by the agent."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import examples, tiny_bundle, wait_for

pytestmark = pytest.mark.slow


def test_one_federated_round_end_to_end(tmp_path, tmp_path_factory, tiny_llama_dir, broker):
    # Prepare: one bundle, a coordinator and two agents on the real broker
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir)
    coord = Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / "coord"), broker=broker.url,
                                          fleet="t1", min_updates=2, round_timeout_s=60, max_rounds=1,
                                          devices_per_round=2))
    agents = []
    for i in range(2):
        a = Agent(AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / f"a{i}"), broker=broker.url, fleet="t1",
                              device_id=f"dev-{i}", auto_train=False, steps_per_round=3, min_new_examples=1,
                              learning_rate=1e-2, update_codec="fp32", update_compression="none"))
        a.api.add_examples(examples(24, offset=i * 3))
        agents.append(a)
    # Execute
    for a in agents:
        a.start()
    wait_for(lambda: all(a.sync.connected for a in agents), 15, what="agents connected")
    coord.start()
    # agents that serve or train are online for the coordinator (the selector of a 2-device round needs them)
    wait_for(lambda: sorted(coord.state.online_devices()) == ["dev-0", "dev-1"], 30, what="both agents online")
    wait_for(lambda: coord.done.is_set() or coord.version >= 1, 120, what="coordinator to publish v1")
    wait_for(lambda: all(a.global_version == 1 for a in agents), 30, what="agents to receive v1")
    # Assert: v1 equals FedAvg of the accepted updates applied to v0
    from edge_runtime.protocol.adapter import adapter_from_bytes, load_adapter
    rows = [(r["device_id"], r["num_examples"], r["status"]) for r in coord.state.update_records()]
    assert sum(1 for r in rows if r[2] == "accepted") == 2
    v0, _ = adapter_from_bytes(coord.state.blobs.get(coord.state.version_sha(0)))
    claims = {dev: n for dev, n, status in rows if status == "accepted"}
    # each agent's round result (served or refused by its gate, it is kept in its adapter history)
    local = {a.cfg.device_id: load_adapter(next(e["path"] for e in a.store.adapters() if e["id"].startswith("local-")))[0]
             for a in agents}
    # FedAvg of the deltas, each bounded against the round's updates (weight <= median claim, norm <= 1.5x median)
    from coordinator.influence import InfluencePolicy, bound_update
    delta = {d: {k: local[d][k] - v0[k] for k in v0} for d in local}
    norm = {d: float(np.sqrt(sum(float(np.sum(np.square(v.astype(np.float64)))) for v in delta[d].values()))) for d in local}
    ref = [(claims[d], norm[d]) for d in local]
    bound = {d: bound_update(claims[d], norm[d], ref, InfluencePolicy()) for d in local}
    scale = {d: min(1.0, bound[d].clip_to / norm[d]) if bound[d].clip_to else 1.0 for d in local}
    total = sum(b.examples for b in bound.values())
    expect = {k: v0[k] + sum(bound[d].examples * scale[d] * delta[d][k] for d in local) / total for k in v0}
    for k in v0:
        np.testing.assert_allclose(agents[0].lineage.global_tensors[k], expect[k], atol=1e-6)
    assert agents[0].lineage.global_tensors.keys() == v0.keys()
    # and the update actually moved the adapter
    assert max(float(np.abs(agents[0].lineage.global_tensors[k] - v0[k]).max()) for k in v0) > 0
    for a in agents:
        assert a.store.outbox_stats()["queued"] == 0
        assert a.sync.rejected == []                     # the coordinator's own v0 pointer is not "refused"
        a.stop()
    coord.stop()
