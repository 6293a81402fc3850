"""Trust (issue 12): a provisioned fleet on a real Mosquitto running the generated TLS + ACL config;
Ed25519-signed updates, globals, rounds and receipts; forged and replayed messages refused."""
from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
import pytest

from helpers import examples, free_port, tiny_bundle, wait_for

pytestmark = pytest.mark.slow
pytest.importorskip("cryptography")


@pytest.fixture
def bundle(tmp_path_factory, tiny_llama_dir):
    return tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")


def provisioned(tmp_path, devices=("dev-a", "dev-b"), fleet="plant"):
    from coordinator.provision import provision
    out = tmp_path / "fleet-keys"
    provision(out, fleet, list(devices), port=free_port(), log=lambda *_: None)
    return out


def toml(path):
    import tomllib
    return tomllib.loads(path.read_text())


class ProvisionedBroker:
    """Mosquitto started with the provisioned mosquitto.conf (plus, as root, `user root` so it can read the keys)."""

    def __init__(self, out):
        self.out = out
        self.conf = out / "broker" / "mosquitto.conf"
        self.port = int(next(x.split()[1] for x in self.conf.read_text().splitlines() if x.startswith("listener ")))
        self.proc = None

    def start(self):
        from coordinator.broker import start_mosquitto
        conf = self.out / "broker" / "test.conf"
        conf.write_text(self.conf.read_text() + ("user root\n" if os.getuid() == 0 else ""))
        self.proc = start_mosquitto(conf, self.port, self.out / "broker" / "mosquitto.log")
        return self

    def stop(self):
        from coordinator.broker import stop_process
        stop_process(self.proc)


def test_provision_writes_identities_keys_and_broker_rules(tmp_path):
    out = provisioned(tmp_path)
    for who in ("coordinator", "devices/dev-a", "devices/dev-b"):
        for f in ("client.crt", "client.key", "signing.key"):
            assert (out / who / f).is_file()
        assert oct((out / who / "client.key").stat().st_mode & 0o777) == "0o600"
        assert oct((out / who / "signing.key").stat().st_mode & 0o777) == "0o600"
    reg = json.loads((out / "fleet.json").read_text())
    assert set(reg["devices"]) == {"dev-a", "dev-b"}
    acl = (out / "broker" / "acl").read_text()
    assert "user coordinator\ntopic readwrite edgefm/v1/plant/#" in acl
    assert "pattern write edgefm/v1/plant/device/%u/update" in acl and "pattern read edgefm/v1/plant/device/%u/ack" in acl
    assert "pattern write edgefm/v1/plant/global" not in acl
    a = toml(out / "devices" / "dev-a" / "agent.toml")
    assert a["device_id"] == "dev-a" and a["broker"].startswith("mqtts://") and a["coordinator_key"].endswith("coordinator.pub")
    # adding a device later keeps the CA and the others; revoking one puts its certificate on the CRL
    from coordinator.provision import provision
    ca_before = (out / "ca" / "ca.crt").read_bytes()
    provision(out, "plant", ["dev-c"], log=lambda *_: None)
    provision(out, "plant", [], revoke=["dev-b"], log=lambda *_: None)
    from edge_runtime.errors import ConfigError
    with pytest.raises(ConfigError, match="provisioned for port"):   # the configs in the folder name its broker
        provision(out, "plant", ["dev-d"], port=1, log=lambda *_: None)
    with pytest.raises(ConfigError, match="--auth cert"):
        provision(out, "plant", ["dev-d"], auth="password", log=lambda *_: None)
    assert (out / "ca" / "ca.crt").read_bytes() == ca_before
    assert set(json.loads((out / "fleet.json").read_text())["devices"]) == {"dev-a", "dev-c"}
    from cryptography import x509
    crl = x509.load_pem_x509_crl((out / "ca" / "crl.pem").read_bytes())
    assert len(list(crl)) == 1


def connect(url, client_id, timeout=5.0):
    """(connected?, last error) for an MQTT client at url."""
    from edge_runtime.transport import MqttLink
    link = MqttLink(url, client_id).start()
    ok = link.wait_connected(timeout)
    err = link.last_error
    link.close()
    return ok, err


def test_provisioned_broker_refuses_strangers_and_confines_devices(tmp_path, bundle):
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.protocol.topics import Topics
    from edge_runtime.transport import MqttLink
    out = provisioned(tmp_path)
    broker = ProvisionedBroker(out).start()
    agents = []
    c = None
    try:
        ca = out / "ca" / "ca.crt"
        base = f"mqtts://localhost:{broker.port}"
        # strangers: no certificate, another CA's certificate, plain TCP
        assert not connect(f"{base}?ca={ca}", "anon")[0]
        other = provisioned(tmp_path / "other", devices=("dev-a",))
        assert not connect(f"{base}?ca={ca}&cert={other / 'devices/dev-a/client.crt'}&key={other / 'devices/dev-a/client.key'}",
                           "impostor")[0]
        assert not connect(f"mqtt://localhost:{broker.port}", "plain")[0]
        # the fleet: coordinator + two agents from the generated configs
        ccfg = toml(out / "coordinator" / "coordinator.toml")
        c = Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / "state"), mode="async", buffer_size=1,
                                          **ccfg))
        c.start()
        for dev in ("dev-a", "dev-b"):
            acfg = toml(out / "devices" / dev / "agent.toml")
            a = Agent(AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / dev), auto_train=False, min_new_examples=1,
                                  steps_per_round=2, **acfg))
            a.api.add_examples(examples(12))
            a.start()
            agents.append(a)
        wait_for(lambda: c.link.connected.is_set() and all(a.sync.connected for a in agents), 30, what="mTLS connections")
        time.sleep(1.0)
        agents[0].train_once(forced=True)
        # (dev-b has new data too, so the v0 announcement may start its own session: v2 can follow v1 at once)
        wait_for(lambda: c.version >= 1 and all(a.global_version == c.version for a in agents), 60,
                 what="a signed global verified and adopted by both agents")
        # dev-a's identity cannot publish as dev-b, nor a global, nor read dev-b's receipts
        t = Topics("plant")
        seen = []
        spy = MqttLink(f"{base}?ca={ca}&cert={out / 'devices/dev-a/client.crt'}&key={out / 'devices/dev-a/client.key'}",
                       "dev-a-spy", on_message=lambda topic, payload, retained: seen.append(topic))
        spy.subscribe(t.ack("dev-b"), 1)
        spy.subscribe(t.update("dev-b"), 1)
        spy.start()
        assert spy.wait_connected(10)
        time.sleep(0.5)
        from edge_runtime.protocol.codec import CodecSpec
        from edge_runtime.protocol.messages import UpdateHeader, encode_update
        from edge_runtime.protocol.signing import load_private_key
        _, meta = agents[0].engine.adapter.tensors, agents[0].engine.adapter.meta
        h = UpdateHeader(device_id="dev-b", update_id=uuid.uuid4().hex, base_version=1, num_examples=10**9,
                         base_fingerprint=meta.base_fingerprint, codec=CodecSpec("fp32", "zstd"))
        delta = {k: np.full(s, 1.0, np.float32) for k, s in meta.shapes.items()}
        spy.publish(t.update("dev-b"), encode_update(h, delta, signer=load_private_key(out / "devices/dev-a/signing.key")))
        spy.publish(t.global_pointer, b'{"kind": "global"}', retain=True)
        spy.publish(t.round, b'{"kind": "round"}', retain=True)
        # dev-b trains on its own data when v1 is announced: its genuine updates are counted
        wait_for(lambda: agents[1].status_summary()["outbox"]["receipts"].get("accepted", 0) >= 1, 60,
                 what="dev-b's own update accepted")
        time.sleep(2.0)
        rows = {d["device_id"]: d for d in c.state.devices()}
        # what the coordinator counted for dev-b is exactly what dev-b itself sent: the forgery never arrived
        assert rows["dev-b"]["accepted"] == agents[1].status_summary()["outbox"]["receipts"]["accepted"]
        assert c.state.update_counts()["rejected"] == 0 and seen == []   # nor did dev-b's receipts or updates reach dev-a
        assert all(a.global_version == c.version for a in agents)      # the junk retained pointer/round changed nothing
        spy.close()
    finally:
        for a in agents:
            a.stop()
        if c:
            c.stop()
        broker.stop()


def test_forged_globals_rounds_receipts_and_updates_refused_without_any_acl(tmp_path, bundle, broker):
    """On an open broker (no TLS, no ACL): signatures alone keep the fleet safe."""
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.messages import UpdateHeader, dump_json_message, encode_update, make_pointer
    from edge_runtime.protocol.signing import load_private_key
    from edge_runtime.protocol.topics import Topics
    from edge_runtime.transport import MqttLink
    out = provisioned(tmp_path)
    c = Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / "state"), broker=broker.url, fleet="plant",
                                      mode="async", buffer_size=1, signing_key=str(out / "coordinator/signing.key"),
                                      device_keys=str(out / "fleet.json")))
    c.start()
    a = Agent(AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / "a"), broker=broker.url, fleet="plant", device_id="dev-a",
                          # it trains when told (forced) only: answering the coordinator's next round with its
                          # unused examples raced the forged updates below for version 2
                          auto_train=False, min_new_examples=10_000, steps_per_round=2,
                          signing_key=str(out / "devices/dev-a/signing.key"), coordinator_key=str(out / "coordinator.pub")))
    t = Topics("plant")
    evil = MqttLink(broker.url, "evil").start()
    try:
        a.api.add_examples(examples(12))
        a.start()
        wait_for(lambda: a.sync.connected and c.link.connected.is_set() and evil.wait_connected(1), 30, what="connections")
        time.sleep(1.0)
        a.train_once(forced=True)
        wait_for(lambda: a.global_version == 1, 60, what="v1")
        meta = a.engine.adapter.meta
        blob = (tmp_path / "a" / "adapters" / "global-1.safetensors").read_bytes()
        # 1. a copy of a real adapter announced as v999 of a new lineage (a fleet reset), unsigned and
        #    signed with a device's key: refused
        ptr, chunks = make_pointer(999, 1, meta.base_fingerprint, blob, epoch="dead")
        for i, ch in enumerate(chunks):
            evil.publish(t.global_chunk(999, i), ch, retain=True)
        evil.publish(t.global_pointer, ptr.to_bytes(), retain=True)
        evil.publish(t.global_pointer, dump_json_message(ptr.to_json(), load_private_key(out / "devices/dev-a/signing.key")),
                     retain=True)
        # 2. a forged round and a forged receipt for an update still in the outbox
        evil.publish(t.round, dump_json_message({"kind": "round", "mode": "sync", "round": 50, "base_version": 999}), retain=True)
        wait_for(lambda: sum(r["reason"] == "bad_signature" for r in a.sync.rejected) >= 3, 20, what="forged messages refused")
        assert a.global_version == 1
        # 3. updates: re-headered (more examples), claimed for another device, and an exact replay
        def update(device, n, key):
            h = UpdateHeader(device_id=device, update_id=uuid.uuid4().hex, base_version=1, num_examples=n,
                             base_fingerprint=meta.base_fingerprint, codec=CodecSpec("fp32", "zstd"))
            return h, encode_update(h, {k: np.full(s, 0.01, np.float32) for k, s in meta.shapes.items()},
                                    signer=load_private_key(key))
        _, good = update("dev-a", 5, out / "devices/dev-a/signing.key")
        hlen = int.from_bytes(good[4:8], "little")
        header = json.loads(good[8:8 + hlen])
        header.update(num_examples=10**9, update_id=uuid.uuid4().hex)   # a captured payload under a new header
        hb = json.dumps(header, separators=(",", ":")).encode()
        reheadered = good[:4] + len(hb).to_bytes(4, "little") + hb + good[8 + hlen:]
        _, as_b = update("dev-b", 5, out / "devices/dev-a/signing.key")
        _, stranger = update("dev-z", 5, out / "devices/dev-a/signing.key")
        for topic, msg in ((t.update("dev-a"), reheadered), (t.update("dev-b"), as_b), (t.update("dev-z"), stranger)):
            evil.publish(topic, msg)
        evil.publish(t.update("dev-a"), good)
        wait_for(lambda: c.version == 2, 30, what="the genuine update counted")
        evil.publish(t.update("dev-a"), good)   # replayed
        time.sleep(2.0)
        assert c.version == 2
        counts = c.state.update_counts()
        assert counts["accepted"] == 2 and counts["reasons"] == {"bad_signature": 3}, counts
    finally:
        evil.close()
        a.stop()
        c.stop()


def test_broker_passwords_never_reach_logs_or_errors(tmp_path):
    import subprocess
    import sys
    from edge_runtime.errors import ConfigError
    from edge_runtime.transport import BrokerAddress, redact
    assert redact("mqtt://dev-1:s3cret@broker.lan:1883") == "mqtt://dev-1:***@broker.lan:1883"
    assert redact("mqtts://h:8883?ca=/x/ca.crt") == "mqtts://h:8883?ca=/x/ca.crt" and redact(None) is None
    with pytest.raises(ConfigError) as err:
        BrokerAddress.parse("mqtt://dev-1:s3cret@broker.lan:notaport")
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    # the daemon's start line and its log while the broker is unreachable
    bundle = __import__("pathlib").Path(__file__).parent / "data" / "tiny-bundle"
    p = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--bundle", str(bundle), "--port", str(free_port()),
                          "--data-dir", str(tmp_path / "d"), "--broker", f"mqtt://dev-1:s3cret@127.0.0.1:{free_port()}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any("serving" in x for x in lines):
            lines.append(p.stdout.readline())
        time.sleep(3)   # a few refused connection attempts get logged meanwhile
    finally:
        p.terminate()
        out = "".join(lines) + p.communicate(timeout=30)[0]
    assert "broker mqtt://dev-1:***@127.0.0.1" in out, out
    assert "s3cret" not in out


def test_damaged_adapter_snapshot_is_refused_and_the_last_good_one_serves(tmp_path, bundle):
    """One float of the serving adapter's file set to 1e4 (a valid file, other bytes): at restart the agent
    says so and serves the adapter it had before, not that file and not the bundle's."""
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.protocol.adapter import load_adapter, save_adapter
    t0, m0 = load_adapter(bundle / "adapter.safetensors")
    rng = np.random.default_rng(0)
    mine = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.01) for k, v in t0.items()}
    save_adapter(tmp_path / "mine.safetensors", mine, m0)
    cfg = AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / "agent"), auto_train=False)
    a = Agent(cfg)
    a.api.load_external(adapter=(bundle / "adapter.safetensors").read_bytes(), name="first")
    res = a.api.load_external(adapter=(tmp_path / "mine.safetensors").read_bytes(), name="second")
    assert res["adopted"] and a.active_id == "loaded-second"
    a.stop()
    path = next(e["path"] for e in a.store.adapters() if e["id"] == "loaded-second")
    t, m = load_adapter(path)
    k = sorted(t)[0]
    t[k].flat[0] = 1e4
    save_adapter(path, t, m)
    b = Agent(cfg)
    try:
        assert b.active_id == "loaded-first"
        kinds = [e["event"] for e in b.events]
        assert "adapter_damaged" in kinds and "adapter_fallback" in kinds
        assert all(e["id"] != "loaded-second" for e in b.store.adapters())
        np.testing.assert_array_equal(b.engine.adapter.tensors[k], t0[k])
    finally:
        b.stop()


@pytest.mark.device
def test_which_brokers_count_as_secure():
    from edge_runtime.transport import insecure_reasons
    ok = ["mqtt://127.0.0.1:1883", "mqtt://localhost:1883", "mqtt://[::1]:1883",
          "mqtts://broker.lan:8883?ca=ca.crt&cert=d.crt&key=d.key", "mqtts://dev:pw@10.0.0.5:8883?ca=ca.crt"]
    assert [u for u in ok if insecure_reasons(u)] == []
    assert [len(insecure_reasons(u)) for u in ("mqtt://broker.lan:1883", "mqtt://dev:pw@10.0.0.5:1883",
                                               "mqtts://broker.lan:8883?ca=ca.crt", "mqtts://d:p@broker.lan:8883?insecure=1",
                                               "mqtt://127.0.0.2.example.com:1883")] == [2, 1, 1, 1, 2]


def test_a_broker_beyond_loopback_needs_tls_and_credentials_or_insecure(tmp_path, bundle):
    """Every program that talks to a fleet broker refuses a plain or anonymous one beyond loopback
    (before any work), names what is missing and never the password; --insecure lets it through."""
    import subprocess
    import sys
    from coordinator.config import CoordinatorConfig
    from edge_runtime.config import AgentConfig
    from edge_runtime.errors import ConfigError
    url = "mqtt://dev-1:s3cret@broker.lan:1883"
    cmds = {"agent": [sys.executable, "-m", "edge_runtime.cli", "run", "--bundle", str(bundle), "--broker", url,
                      "--data-dir", str(tmp_path / "a")],
            "coordinator": [sys.executable, "-m", "coordinator.cli", "--state-dir", str(tmp_path / "c"), "serve", "--bundle",
                            str(bundle), "--broker", url],
            "rollback": [sys.executable, "-m", "coordinator.cli", "--state-dir", str(tmp_path / "c"), "rollback", "--to", "0",
                         "--broker", url, "--bundle", str(bundle)],
            "fleet": [sys.executable, "-m", "devices.cli", "run", "--broker", url, "--out", str(tmp_path / "f")]}
    for who, cmd in cmds.items():
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "plain TCP" in r.stderr and "--insecure" in r.stderr, (who, r.stderr[-1500:])
        assert "s3cret" not in r.stdout + r.stderr and "dev-1:***@broker.lan" in r.stderr, who
    assert not (tmp_path / "f" / "agents").exists()            # the fleet refused before building anything
    AgentConfig(bundle=str(bundle), broker=url, insecure=True)  # allowed when the user says so
    CoordinatorConfig(bundle=str(bundle), broker=url, insecure=True)
    with pytest.raises(ConfigError, match="no credentials"):
        CoordinatorConfig(bundle=str(bundle), broker="mqtts://broker.lan:8883?ca=ca.crt")
    # TLS and credentials are not enough beyond loopback: what changes state must be signed
    tls = "mqtts://dev-1:s3cret@broker.lan:8883?ca=ca.crt"
    with pytest.raises(ConfigError, match="no signing_key; no coordinator_key") as err:
        AgentConfig(bundle=str(bundle), broker=tls)
    assert "s3cret" not in str(err.value) and "provision" in str(err.value)
    with pytest.raises(ConfigError, match="no device_keys"):
        CoordinatorConfig(bundle=str(bundle), broker=tls, signing_key="coordinator/signing.key")
    AgentConfig(bundle=str(bundle), broker=tls, signing_key="signing.key", coordinator_key="coordinator.pub")
    CoordinatorConfig(bundle=str(bundle), broker=tls, signing_key="signing.key", device_keys="fleet.json")
    AgentConfig(bundle=str(bundle), broker="mqtt://127.0.0.1:1883")     # the loopback demo needs none


def test_damaged_coordinator_database_is_refused_not_reset(tmp_path, bundle):
    """A truncated or scribbled-over coordinator.sqlite stops the coordinator (and its admin
    commands) with what was found and how to recover; it never starts again at v0 over the fleet's
    history, and it changes nothing on disk."""
    import subprocess
    import sys
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    from edge_runtime.errors import StateError
    from test_influence import adapter_schema, fleet_updates, payload
    v0, meta = adapter_schema(bundle)
    state = tmp_path / "state"
    cfg = dict(bundle=str(bundle), state_dir=str(state), fleet="integ", mode="async", buffer_size=4)
    c = Coordinator(CoordinatorConfig(**cfg))
    honest, _, _ = fleet_updates(meta)
    for dev, n, d in honest:
        assert c.handle_update(dev, payload(meta, dev, n, d)).accepted
    assert c.version == 1
    c.state.db.close()                                   # the last connection: the WAL is folded into the file
    db = state / "coordinator.sqlite"
    good = db.read_bytes()
    snapshot = lambda: sorted((p.relative_to(state).as_posix(), p.stat().st_size) for p in state.rglob("*") if p.is_file())  # noqa: E731

    def refused(match):
        before = snapshot()
        with pytest.raises(StateError, match=match) as err:
            Coordinator(CoordinatorConfig(**cfg))
        assert "Nothing was changed" in str(err.value) and "backup" in str(err.value)
        r = subprocess.run([sys.executable, "-m", "coordinator.cli", "--state-dir", str(state), "status"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and "edgefm-coordinator: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert snapshot() == before
    db.write_bytes(b"")                                  # truncated
    refused("records no versions")
    db.write_bytes(good[:4096] + bytes(len(good) - 4096))  # every page after the first zeroed
    refused("damaged")
    db.write_bytes(b"not a database at all" * 300)
    refused("damaged")
    db.write_bytes(good)                                 # restored from a backup: back in business at v1
    c2 = Coordinator(CoordinatorConfig(**cfg))
    assert c2.version == 1


def test_signed_fleet_reset_recovers_devices_on_an_old_lineage(tmp_path, bundle, broker):
    """The coordinator's state is lost and a new one starts (same signing key, new state dir): its
    versions restart at 0, lower than what the devices hold. Its pointers carry its lineage (epoch),
    so devices take its globals whatever their version and their updates count again; without that
    every device would ignore v0..v(N) and every update would be refused as stale, for good."""
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    out = provisioned(tmp_path)
    keys = dict(signing_key=str(out / "coordinator/signing.key"), device_keys=str(out / "fleet.json"))

    def coordinator(state):
        c = Coordinator(CoordinatorConfig(bundle=str(bundle), state_dir=str(tmp_path / state), broker=broker.url, fleet="plant",
                                          mode="async", buffer_size=1, **keys))
        c.start()
        return c
    c = coordinator("state-1")
    a = Agent(AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / "a"), broker=broker.url, fleet="plant", device_id="dev-a",
                          auto_train=False, min_new_examples=1, steps_per_round=2,
                          signing_key=str(out / "devices/dev-a/signing.key"), coordinator_key=str(out / "coordinator.pub")))
    c2 = None
    try:
        a.api.add_examples(examples(12))
        a.start()
        wait_for(lambda: a.sync.connected and c.link.connected.is_set(), 30, what="connections")
        wait_for(lambda: a.api.status()["fleet_epoch"] == c.epoch, 20, what="the device learns its fleet's lineage from v0")
        assert a.global_version == 0 and a.active_id == "bundle"     # v0 is the bundle's adapter: nothing fetched
        for v in (1, 2):
            a.api.add_examples(examples(4, offset=100 * v))
            a.train_once(forced=True)
            wait_for(lambda: a.global_version == v, 60, what=f"v{v}")
        c.stop()
        c2 = coordinator("state-2")                                    # a fresh state: v0 again, a new lineage
        assert c2.epoch != c.epoch and c2.version == 0
        wait_for(lambda: a.api.status()["fleet_epoch"] == c2.epoch and a.global_version == 0, 60, what="the device takes the new v0")
        assert any(e["event"] == "fleet_epoch_changed" for e in a.api.status()["events"])
        a.api.add_examples(examples(4, offset=900))
        a.train_once(forced=True)
        wait_for(lambda: c2.version == 1 and a.global_version == 1, 60, what="its update counts in the new lineage")
        assert c2.state.update_counts()["accepted"] == 1
    finally:
        a.stop()
        if c2:
            c2.stop()
        c.stop()


def test_api_token_guards_every_endpoint_but_health(tmp_path, bundle):
    """With api_token set, the OpenAI client works with it as its api_key and fails without it; raw
    requests without it get 401 + WWW-Authenticate; /healthz stays open (load balancers); the CLI
    sends it from $EDGEFM_API_TOKEN. An agent bound beyond loopback refuses to start without one."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    import openai
    from edge_runtime.config import AgentConfig
    from edge_runtime.errors import ConfigError
    from helpers import served_agent
    token = "t0ken-" + uuid.uuid4().hex
    with served_agent(bundle, tmp_path / "a", api_token=token) as (agent, url):
        ok = openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
        mid = ok.models.list().data[0].id
        assert ok.completions.create(model=mid, prompt="hello", max_tokens=2).usage.prompt_tokens >= 1   # served (a tiny random model may stop at once)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong-" + token, max_retries=0).models.list()
        for path, body in (("/v1/status", None), ("/v1/examples", b'{"examples": [{"text": "junk"}]}')):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url + path, data=body), timeout=10)
            assert err.value.code == 401 and err.value.headers["WWW-Authenticate"].startswith("Bearer")
        assert agent.store.count_examples()["train"] == 0          # the refused POST stored nothing
        with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
            assert resp.status == 200
        cli = [sys.executable, "-m", "edge_runtime.cli", "status", "--url", url]
        env = {k: v for k, v in os.environ.items() if k != "EDGEFM_API_TOKEN"}
        r = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 1 and "401" in r.stderr and "Bearer" in r.stderr and token not in r.stderr
        r = subprocess.run(cli, capture_output=True, text=True, timeout=60, env={**env, "EDGEFM_API_TOKEN": token})
        assert r.returncode == 0 and json.loads(r.stdout)["device_id"]
    with pytest.raises(ConfigError, match="api_token"):
        AgentConfig(bundle=str(bundle), host="0.0.0.0")
    with pytest.raises(ConfigError, match="16 characters"):
        AgentConfig(bundle=str(bundle), api_token="short")
    AgentConfig(bundle=str(bundle), host="0.0.0.0", api_token=token)


def test_junk_examples_cannot_wash_out_the_training_store(tmp_path, bundle):
    """The trust issue's attack through the real API: 2,741 real examples the device has trained on,
    then 11 requests of 10,000 junk examples each. Before, the junk evicted every real example; now
    only trained-on examples make room, at most 10% of the store per hour, and a request that needs
    more is refused whole (503 + Retry-After, nothing stored)."""
    import urllib.error
    import urllib.request
    from helpers import served_agent
    with served_agent(bundle, tmp_path / "a", max_examples=3000) as (agent, url):
        def post(texts):
            req = urllib.request.Request(url + "/v1/examples", data=json.dumps({"examples": [{"text": t} for t in texts]}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read()), None
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read()), err.headers.get("Retry-After")
        real = [f"real sensor log {i}: pressure nominal" for i in range(2741)]
        assert post(real)[0] == 200
        agent.store.mark_trained([e["id"] for e in agent.store.training_batch(5000, replay_fraction=0.0)])  # as sessions would
        heldout_before = {e["text"] for e in agent.store.heldout_split()}
        statuses = []
        for r in range(11):
            status, body, retry = post([f"junk {r}-{i}" for i in range(10_000)])
            statuses.append(status)
            if status != 200:
                assert status == 503 and retry == "60" and "Nothing was stored" in body["error"]["message"]
        smaller = [post([f"junk small {r}-{i}" for i in range(100)])[0] for r in range(10)]  # what fits, bit by bit
        assert statuses == [503] * 11 and 503 in smaller
        heldout = agent.store.heldout_split()
        kept = {e["text"] for e in agent.store.training_batch(10_000, replay_fraction=0.0)} | {e["text"] for e in heldout}
        real_kept = sum(t in kept for t in real)
        assert real_kept >= 2741 - 300, real_kept                      # at most 10% of max_examples rotated out
        assert heldout_before <= {e["text"] for e in heldout}          # the gate's slice is never evicted


def test_named_tokens_have_quotas_so_one_app_cannot_evict_anothers_examples(tmp_path, bundle):
    """Two apps with their own tokens (api_tokens): max_examples 100, max_source_share 0.5. The camera
    app's 60 examples (trained on) and then a flood from a second app: the flood may push the camera
    down to its quota of 50 and no further, and once the app holds its own quota it is refused (503,
    nothing stored) until its own examples are trained on. Examples are tagged with the token's name."""
    import urllib.error
    import urllib.request
    from helpers import served_agent
    cam, app = "camera-" + uuid.uuid4().hex, "app-" + uuid.uuid4().hex
    with served_agent(bundle, tmp_path / "a", max_examples=100, api_tokens={"camera": cam, "app": app}) as (agent, url):
        def call(token, path, body=None):
            req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, body = call(cam, "/v1/examples", {"examples": [{"text": f"camera frame {i}"} for i in range(60)]})
        assert status == 200 and body["source"] == "api:camera" and body["added"] == 60
        agent.store.mark_trained([e["id"] for e in agent.store.training_batch(1000, replay_fraction=0.0)])  # as a session would
        flood = [call(app, "/v1/examples", {"examples": [{"text": f"app junk {r}-{i}"} for i in range(10)]})[0]
                 for r in range(12)]
        assert flood[:4] == [200] * 4 and 503 in flood                       # 40 fit, then the app's quota bites
        status, body = call(app, "/v1/examples", {"examples": [{"text": "app junk once more"}]})
        assert status == 503 and "'api:app' holds more than its quota" in body["error"]["message"]
        counts = call(cam, "/v1/status")[1]["examples"]
        assert counts["source_quota"] == 50
        assert counts["by_source"]["api:camera"] >= 50 and counts["by_source"]["api:app"] <= 50 + 10, counts
        assert counts["train"] + counts["heldout"] <= 100
        assert call("wrong-" + app, "/v1/examples", {"examples": [{"text": "x"}]})[0] == 401


def test_provision_with_passwords_instead_of_client_certificates(tmp_path):
    """`provision --auth password`: a user name and random password per identity over TLS, hashed into
    Mosquitto's password file by mosquitto_passwd; the same ACL (user name = identity); configs holding
    a password are 0600; revoking removes the user."""
    import subprocess
    import sys
    from edge_runtime.transport import MqttLink
    from edge_runtime.protocol.topics import Topics
    out = tmp_path / "fleet-keys"
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "coordinator.cli", "provision", "--fleet", "plant", "--devices", "dev-a", "dev-b",
                        "--auth", "password", "--port", str(port), "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    a = toml(out / "devices" / "dev-a" / "agent.toml")
    assert a["broker"].startswith("mqtts://dev-a:") and "cert=" not in a["broker"]
    assert oct((out / "devices" / "dev-a" / "agent.toml").stat().st_mode & 0o777) == "0o600"
    password = a["broker"].split(":")[2].split("@")[0]
    assert password not in (out / "broker" / "passwd").read_text()          # stored hashed
    assert "require_certificate" not in (out / "broker" / "mosquitto.conf").read_text()
    broker = ProvisionedBroker(out).start()
    seen = []
    try:
        ca = out / "ca" / "ca.crt"
        assert connect(a["broker"], "dev-a")[0]
        assert not connect(a["broker"].replace(password, "wrong" + password[5:]), "dev-a-wrong")[0]
        assert not connect(f"mqtts://localhost:{port}?ca={ca}", "anon")[0]
        # dev-a's identity cannot read dev-b's receipts (the ACL keys on the user name)
        t = Topics("plant")
        coord = toml(out / "coordinator" / "coordinator.toml")
        boss = MqttLink(coord["broker"], "boss").start()
        spy = MqttLink(a["broker"], "dev-a-spy", on_message=lambda topic, payload, retained: seen.append(topic))
        spy.subscribe(t.ack("dev-b"), 1)
        spy.subscribe(t.ack("dev-a"), 1)
        spy.start()
        assert boss.wait_connected(10) and spy.wait_connected(10)
        time.sleep(0.5)
        boss.publish(t.ack("dev-b"), b"{}")
        boss.publish(t.ack("dev-a"), b"{}")
        wait_for(lambda: t.ack("dev-a") in seen, 10, what="dev-a's own receipt")
        time.sleep(0.5)
        assert t.ack("dev-b") not in seen
        spy.close()
        boss.close()
        # revoking dev-b removes its user
        b_url = toml(out / "devices" / "dev-b" / "agent.toml")["broker"]
        r = subprocess.run([sys.executable, "-m", "coordinator.cli", "provision", "--fleet", "plant", "--revoke", "dev-b",
                            "-o", str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "dev-b:" not in (out / "broker" / "passwd").read_text()
        broker.stop()
        broker = ProvisionedBroker(out).start()
        assert not connect(b_url, "dev-b")[0] and connect(a["broker"], "dev-a")[0]
    finally:
        broker.stop()
