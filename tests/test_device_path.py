"""The device path without torch: a committed tiny bundle served, trained and synced by the agent.

Runs in scripts/test.sh's torch-free venv (base install only) as well as in the full one."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.device
BUNDLE = Path(__file__).parent / "data" / "tiny-bundle"


def test_device_path_never_imports_torch(tmp_path):
    # A fresh interpreter: serving, training and the coordinator must not pull torch in (even where it is installed).
    import subprocess
    code = f"""
import sys
from edge_runtime.agent import Agent
from edge_runtime.config import AgentConfig
import coordinator.service
a = Agent(AgentConfig(bundle={str(BUNDLE)!r}, data_dir={str(tmp_path / 'a')!r}, auto_train=False, min_new_examples=1, steps_per_round=2))
a.api.add_examples([{{"text": "pump %d restarted" % i}} for i in range(12)])
assert a.train_once(forced=True)["status"] == "trained"
assert list(a.engine.generate(a.engine.encode("pump"), max_new_tokens=2, stop_ids=set()))
assert "torch" not in sys.modules, "torch was imported on the device path"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_engine_generates_and_trainer_learns_without_torch(tmp_path):
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    a = Agent(AgentConfig(bundle=str(BUNDLE), data_dir=str(tmp_path / "a"), auto_train=False, min_new_examples=1,
                          steps_per_round=5, learning_rate=1e-2))
    eng = a.engine
    out = list(eng.generate(eng.encode("the quick brown"), max_new_tokens=4, stop_ids=set()))
    assert len(out) == 4
    a.api.add_examples([{"text": f"valve {i} closed at noon and reopened at two"} for i in range(20)])
    r = a.train_once(forced=True)
    assert r["status"] == "trained" and r["losses"][-1] < r["losses"][0]
    assert a.store.outbox_stats()["queued"] == 1
    a.stop()


def test_device_and_coordinator_round_over_real_broker_without_torch(tmp_path, broker):
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from helpers import wait_for
    c = Coordinator(CoordinatorConfig(bundle=str(BUNDLE), state_dir=str(tmp_path / "c"), broker=broker.url, fleet="d",
                                      mode="async", buffer_size=1))
    a = Agent(AgentConfig(bundle=str(BUNDLE), data_dir=str(tmp_path / "a"), broker=broker.url, fleet="d", device_id="pi",
                          auto_train=False, min_new_examples=1, steps_per_round=2))
    try:
        a.api.add_examples([{"text": f"door sensor {i} reported open"} for i in range(12)])
        c.start()
        a.start()
        wait_for(lambda: a.sync.connected, 15, what="agent connected")
        a.train_once(forced=True)
        wait_for(lambda: a.global_version == 1, 30, what="v1 adopted")
    finally:
        a.stop()
        c.stop()


def test_corrupted_bundle_is_refused(tmp_path):
    from edge_runtime.engine import Engine
    from edge_runtime.errors import BundleError
    b = tmp_path / "b"
    shutil.copytree(BUNDLE, b)
    data = bytearray((b / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (b / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="adapter.safetensors"):
        Engine(b)
    with pytest.raises(BundleError, match="manifest"):
        Engine(tmp_path)
