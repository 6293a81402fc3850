"""Chaos: random SIGKILLs of the coordinator and the agents and broker restarts while devices train
and send updates (real processes, a real Mosquitto). Afterwards every update a device produced is
receipted, every acknowledged update is counted exactly once, and every agent serves."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import examples, free_port, tiny_bundle, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def http(url, body=None, timeout=30):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class Fleet:
    def __init__(self, tmp: Path, bundle: Path, broker, devices: int):
        self.tmp, self.bundle, self.broker = tmp, bundle, broker
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports = {f"dev-{i}": free_port() for i in range(devices)}
        (tmp / "agent.toml").write_text("steps_per_round = 2\nmin_new_examples = 1\ngeneral_replay_fraction = 0.0\n"
                                        "resend_after_s = 5.0\nmax_train_seconds = 60\n")
        (tmp / "coordinator.toml").write_text("buffer_size = 2\nmax_staleness = 100\n")
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(self, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        if name == "coordinator":
            cmd = [sys.executable, "-m", "coordinator.cli", "--state-dir", str(self.tmp / "coordinator"), "serve", "--bundle",
                   str(self.bundle), "--broker", self.broker.url, "--fleet", "chaos", "--mode", "async",
                   "--config", str(self.tmp / "coordinator.toml")]
        else:
            cmd = [sys.executable, "-m", "edge_runtime.cli", "run", "--bundle", str(self.bundle), "--broker", self.broker.url,
                   "--fleet", "chaos", "--device-id", name, "--data-dir", str(self.tmp / name), "--port", str(self.ports[name]),
                   "--no-auto-train", "--config", str(self.tmp / "agent.toml")]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def healthy(self, name: str) -> bool:
        try:
            return http(self.url(name) + "/healthz", timeout=2) is not None
        except (OSError, ValueError):
            return False

    def kill(self, name: str) -> None:
        p = self.procs.get(name)
        if p and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(30)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def coordinator_json(tmp: Path, what: str):
    r = subprocess.run([sys.executable, "-m", "coordinator.cli", "--state-dir", str(tmp / "coordinator"), what, "--json"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_random_kills_and_broker_restarts_lose_and_double_count_nothing(tmp_path, tmp_path_factory, tiny_llama_dir, broker):
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    fleet = Fleet(tmp_path, bundle, broker, devices=3)
    agents = list(fleet.ports)
    rng = random.Random(11)
    chaos = {"coordinator": 0, "agent": 0, "broker": 0}
    try:
        fleet.start("coordinator")
        for a in agents:
            fleet.start(a)
        wait_for(lambda: all(fleet.healthy(a) for a in agents), 120, what="agents serving")
        n = 0
        t_end = time.time() + 60
        while time.time() < t_end:
            a = rng.choice(agents)
            try:   # a device gets data and is asked to train (the daemon may be down: then it is not)
                http(fleet.url(a) + "/v1/examples", {"examples": examples(4, offset=1000 + 4 * n)})
                http(fleet.url(a) + "/v1/train", {})
                n += 1
            except (OSError, urllib.error.HTTPError):
                pass
            roll = rng.random()
            if roll < 0.15:
                fleet.kill("coordinator")
                chaos["coordinator"] += 1
                time.sleep(rng.uniform(0.2, 2.0))
                fleet.start("coordinator")
            elif roll < 0.30:
                victim = rng.choice(agents)
                fleet.kill(victim)
                chaos["agent"] += 1
                fleet.start(victim)
            elif roll < 0.38:
                broker.restart()
                chaos["broker"] += 1
            time.sleep(rng.uniform(0.5, 2.0))
        assert min(chaos.values()) >= 1 and n >= 10, (chaos, n)
        # settle: everything running; every update a device made gets its receipt
        wait_for(lambda: all(fleet.healthy(a) for a in agents), 120, what="agents serving after the chaos")

        def settled():
            outs = [http(fleet.url(a) + "/v1/status")["outbox"] for a in agents]
            return all(o["queued"] == 0 and o["awaiting_receipt"] == 0 for o in outs)
        wait_for(settled, 180, interval=1.0, what="every update delivered and receipted")
        devices = {d["device_id"]: d for d in coordinator_json(tmp_path, "devices")}
        counts = coordinator_json(tmp_path, "status")["updates"]
        total = 0
        for a in agents:
            receipts = http(fleet.url(a) + "/v1/status")["outbox"]["receipts"]
            counted = receipts.get("accepted", 0) + receipts.get("duplicate", 0)   # "duplicate": counted before
            # exactly once: what the coordinator counted for this device is what the device was told was counted
            assert devices.get(a, {}).get("accepted", 0) == counted, (a, devices.get(a), receipts, chaos)
            total += counted
            # and it serves a valid adapter
            assert http(fleet.url(a) + "/v1/completions", {"prompt": "after the storm", "max_tokens": 2})["usage"]["completion_tokens"] >= 1
        assert counts["accepted"] == total and total >= 3, (counts, total, chaos)
        print(f"chaos: {chaos}; {n} intake + train requests; {total} updates counted, {counts['rejected']} refused "
              f"({counts['reasons']})")
    finally:
        fleet.stop_all()
