"""Coordinator logic against the in-memory link (no broker): what it publishes for what it receives.
The same paths over a real Mosquitto are in test_coordinator.py and test_loop.py."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from helpers import MemoryLink, tiny_bundle, wait_for


@pytest.fixture
def bundle(tmp_path_factory, tiny_llama_dir):
    return tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")


def _update(meta, device, base_version, n, rng, round_id=None):
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.messages import UpdateHeader, encode_update
    delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in meta.shapes.items()}
    h = UpdateHeader(device_id=device, update_id=uuid.uuid4().hex, base_version=base_version, num_examples=n,
                     base_fingerprint=meta.base_fingerprint, round=round_id, codec=CodecSpec("fp32", "zstd"))
    return h.update_id, delta, encode_update(h, delta)


def _started(bundle, tmp_path, **kw):
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    c = Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / "state"), fleet="m", judge_batch=1, **kw))
    link = MemoryLink(on_message=c.enqueue, on_connect=c.on_connect)
    c.start(link)
    return c, link


def test_async_receipts_versions_and_summary_through_the_link(bundle, tmp_path):
    from edge_runtime.protocol.adapter import adapter_from_bytes, load_adapter
    v0, meta = load_adapter(bundle / "adapter.safetensors")
    c, link = _started(bundle, tmp_path, mode="async", buffer_size=2)
    try:
        t = c.topics
        assert t.all_devices("update") in link.subscribed
        assert link.messages(t.global_pointer)[-1]["version"] == 0          # on connect: the retained v0 pointer
        rng = np.random.default_rng(1)
        a_id, a_delta, a_msg = _update(meta, "a", 0, 3, rng)
        stale_id, _, stale = _update(meta, "b", 5, 3, rng)                 # from a version that does not exist
        link.deliver(t.update("a"), a_msg, "a")
        link.deliver(t.update("b"), stale, "stale")
        link.deliver(t.update("x"), b"not an update", "junk")
        wait_for(lambda: len(link.acked) == 3, 10, what="three messages acknowledged")
        wait_for(lambda: len(link.messages(t.ack("b"))) == 1, 10, what="b's receipt")
        assert [(r["update_id"], r["status"]) for r in link.messages(t.ack("a"))] == [(a_id, "accepted")]
        assert [(r["update_id"], r["status"], r["reason"]) for r in link.messages(t.ack("b"))] == [(stale_id, "rejected", "stale")]
        assert link.messages(t.ack("x")) == []                             # no readable id: no receipt
        link.deliver(t.update("a"), a_msg, "again")                         # resent: its receipt was lost
        wait_for(lambda: len(link.messages(t.ack("a"))) == 2, 10, what="a's second receipt")
        assert link.messages(t.ack("a"))[-1]["status"] == "duplicate" and c.version == 0
        c_id, c_delta, c_msg = _update(meta, "c", 0, 1, rng)
        link.deliver(t.update("c"), c_msg, "c")                             # the buffer (2) is full: v1
        wait_for(lambda: link.messages(t.summary), 10, what="v1")
        pointer = link.messages(t.global_pointer)[-1]
        assert pointer["version"] == 1 and pointer["epoch"] == c.epoch
        blob = b"".join(link.retained[t.global_chunk(1, i)] for i in range(len(pointer["chunk_sha256"])))
        v1, _ = adapter_from_bytes(blob)
        for k in v0:   # FedAvg by examples (3 and 1) of the two accepted deltas
            np.testing.assert_allclose(v1[k], v0[k] + (3 * a_delta[k] + 1 * c_delta[k]) / 4, atol=1e-6)
        summary = link.messages(t.summary)[-1]
        assert summary["version"] == 1 and summary["participants"] == ["a", "c"]
    finally:
        c.stop()


def test_sync_round_announced_to_the_selected_and_closed_at_target(bundle, tmp_path):
    from edge_runtime.protocol.adapter import load_adapter
    from edge_runtime.protocol.messages import DeviceStatus, dump_json_message
    _, meta = load_adapter(bundle / "adapter.safetensors")
    c, link = _started(bundle, tmp_path, mode="sync", devices_per_round=2, over_selection=0.0, min_updates=2,
                       round_timeout_s=600)
    try:
        t = c.topics
        for d in ("a", "b", "c"):
            link.deliver(t.status(d), dump_json_message(DeviceStatus(state="online", device_id=d).to_json()), d)
        wait_for(lambda: c.plan is not None, 10, what="a round opened")
        ann = link.messages(t.round)[-1]
        assert ann["round"] == 1 and ann["base_version"] == 0 and len(ann["selected"]) == 2
        chosen = ann["selected"]
        left_out = ({"a", "b", "c"} - set(chosen)).pop()
        rng = np.random.default_rng(2)
        _, _, msg = _update(meta, left_out, 0, 2, rng, round_id=1)
        link.deliver(t.update(left_out), msg, left_out)
        wait_for(lambda: len(link.messages(t.ack(left_out))) == 1, 10, what="receipt for the device not selected")
        assert link.messages(t.ack(left_out))[0]["reason"] == "stale"
        for d in chosen:
            link.deliver(t.update(d), _update(meta, d, 0, 2, rng, round_id=1)[2], d)
        wait_for(lambda: link.messages(t.summary), 10, what="the round closed at its target")
        assert c.version == 1 and link.messages(t.summary)[-1]["participants"] == sorted(chosen)
        assert link.messages(t.global_pointer)[-1]["version"] == 1
    finally:
        c.stop()


def test_a_reconnect_reannounces_an_open_sync_round_and_no_async_one(bundle, tmp_path):
    """A reconnect republishes the retained pointer, and the open sync round; an async announcement is
    made once per new version (one per reconnect started a session on every device: tests/test_trust.py)."""
    from coordinator.config import CoordinatorConfig
    from coordinator.core import CoordinatorCore
    for mode, rounds_after in (("async", 0), ("sync", 2)):
        c = CoordinatorCore(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / mode), fleet="m", mode=mode))
        link = MemoryLink()
        c.attach(link)
        if mode == "sync":
            c.rounds.open(c.version)                        # announced once when it opens
        c.on_connect()
        assert len(link.messages(c.topics.global_pointer)) == 1
        assert len(link.messages(c.topics.round)) == rounds_after, mode
