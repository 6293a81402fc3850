"""Load: a thousand devices connected at once over TLS (client certificates, signed updates) through a
real Mosquitto to one `edgefm-coordinator serve`.

Everything is the product's: `edgefm-coordinator provision` makes the CA, one certificate and Ed25519
key per device, the broker's config and ACL; Mosquitto runs that config; the coordinator runs the
provisioned coordinator.toml (async, a version every `--buffer` updates). The devices are paho clients
built by the agent's own transport (`MqttLink`, the agent's TLS and session settings), spread over a few
processes; each connects with its own certificate, and once all are connected each publishes one update
signed with its own key (the SmolLM2 rpi5 adapter's shapes, the agent's fp16 codec) and waits for the
coordinator's receipt. All stay connected until every device has its receipt.

Reported: time to connect everyone, updates per second from the first publish to the last receipt,
what the coordinator counted (`edgefm-coordinator status --json`: every accepted update, the versions
published), peak memory of the coordinator and of the broker.

Usage: python bench/load.py [--devices 1000] [--procs 4] [--buffer 100] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, peak_rss_mb, record  # noqa: E402
from bench.learning import free_port  # noqa: E402

FLEET = "load"


def more_files() -> None:
    """Child processes may hold thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


# ---------------------------------------------------------------------------- one client process
def client(keys: Path, bundle: Path, ids: list[str], seed: int) -> None:
    """Connect every device of ``ids``, report, wait for "go" on stdin, publish one signed update each,
    wait for every receipt, report, wait for "close"."""
    from edge_runtime.protocol import signing
    from edge_runtime.protocol.adapter import load_adapter
    from edge_runtime.protocol.codec import CodecSpec, encode_payload
    from edge_runtime.protocol.messages import UpdateHeader, encode_update, parse_json_message
    from edge_runtime.protocol.topics import Topics
    from edge_runtime.transport import MqttLink
    topics = Topics(FLEET)
    tensors, meta = load_adapter(bundle / "adapter.safetensors")
    common = np.random.default_rng(0)   # one fleet: every device's update shares a direction (as real ones do, cosine ~0.4)
    shared = {k: common.standard_normal(v.shape).astype(np.float32) * 1e-3 for k, v in tensors.items()}
    rng = np.random.default_rng(seed + 1)
    receipts: dict[str, str] = {}
    got = threading.Condition()
    links = {}

    def on_message(dev):
        def handle(topic, payload, retained):
            msg = parse_json_message(payload)
            with got:
                receipts[dev] = msg.get("status", "?")
                got.notify_all()
        return handle
    t0 = time.time()
    for dev in ids:
        conf = tomllib.loads((keys / "devices" / dev / "agent.toml").read_text())
        link = MqttLink(conf["broker"], f"{FLEET}-{dev}", on_message=on_message(dev), clean_start=True)
        link.subscribe(topics.ack(dev))
        links[dev] = (link.start(), signing.load_private_key(conf["signing_key"]))
    deadline = time.time() + 600
    while not all(link.connected.is_set() for link, _ in links.values()):
        if time.time() > deadline:
            bad = [d for d, (link, _) in links.items() if not link.connected.is_set()]
            raise SystemExit(f"{len(bad)} devices did not connect, e.g. {bad[0]}: {links[bad[0]][0].last_error}")
        time.sleep(0.05)
    print(json.dumps({"connected": len(links), "seconds": time.time() - t0}), flush=True)
    sys.stdin.readline()   # go
    t1 = time.time()
    # a few bodies (shared direction + own noise), each device signing its own header over one of them: the
    # clients' cost is then what an agent pays to send (sign, TLS), not the benchmark's tensor encoding
    spec = CodecSpec("fp16", "zstd")
    bodies = [encode_payload({k: v + rng.standard_normal(v.shape).astype(np.float32) * 5e-4 for k, v in shared.items()}, spec)
              for _ in range(8)]
    for i, (dev, (link, key)) in enumerate(links.items()):
        h = UpdateHeader(device_id=dev, update_id=uuid.uuid4().hex, base_version=0, num_examples=int(rng.integers(20, 60)),
                         base_fingerprint=meta.base_fingerprint, round=None, codec=spec)
        while link.publish(topics.update(dev), encode_update(h, None, signer=key, payload=bodies[i % len(bodies)])) is None:
            time.sleep(0.1)   # not connected this instant: the agent's outbox would hold it; so do we
    with got:
        got.wait_for(lambda: len(receipts) == len(links), 1800)
    statuses = {s: list(receipts.values()).count(s) for s in set(receipts.values())}
    still = sum(link.connected.is_set() for link, _ in links.values())
    disconnects = sum(link.disconnects for link, _ in links.values())
    print(json.dumps({"receipts": statuses, "published_s": time.time() - t1, "still_connected": still,
                      "disconnects": disconnects, "rss_mb": peak_rss_mb()}), flush=True)
    sys.stdin.readline()   # close
    for link, _ in links.values():
        link.close()


# ---------------------------------------------------------------------------- the run
def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def run(args) -> dict:
    from devices.fleet import cached_bundle
    bundle = cached_bundle("smollm2", "rpi5")
    work = Path(tempfile.mkdtemp(prefix="edgefm-bench-load-"))
    procs: list[subprocess.Popen] = []
    try:
        keys, port = work / "keys", free_port()
        devices = [f"d{i:05d}" for i in range(args.devices)]
        t = time.time()
        subprocess.run([PY, "-m", "coordinator.cli", "provision", "--fleet", FLEET, "--devices", *devices, "--broker-host", "localhost",
                        "--port", str(port), "-o", str(keys)], check=True, capture_output=True)
        provision_s = time.time() - t
        # the provisioned config; as root, plus `user root` (mosquitto would drop to its own user and lose the 0600 keys)
        bconf = work / "mosquitto.conf"
        bconf.write_text((keys / "broker" / "mosquitto.conf").read_text() + ("user root\n" if os.getuid() == 0 else ""))
        broker = subprocess.Popen(["mosquitto", "-c", str(bconf)], stdout=subprocess.DEVNULL,
                                  stderr=open(work / "broker.log", "wb"), preexec_fn=more_files)
        procs.append(broker)
        try:
            wait_port(port)
        except RuntimeError:
            raise RuntimeError(f"mosquitto did not start:\n{(work / 'broker.log').read_text()[-2000:]}") from None
        conf = work / "coordinator.toml"
        # every device sends from v0 at once: staleness would refuse most of them after a few versions (correctly; a
        # real device trains from a newer global), so the load run accepts any staleness
        extra = {"max_staleness": 1_000_000, **(json.loads(args.coordinator) if args.coordinator else {})}
        conf.write_text((keys / "coordinator" / "coordinator.toml").read_text() + f"mode = \"async\"\nbuffer_size = {args.buffer}\n"
                        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items()))
        coord = subprocess.Popen([PY, "-m", "coordinator.cli", "--state-dir", str(work / "state"), "serve", "--bundle", str(bundle),
                                  "--config", str(conf)], stdout=open(work / "coordinator.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(coord)
        deadline = time.time() + 120
        while b"edgefm-coordinator: fleet" not in (work / "coordinator.log").read_bytes():
            if coord.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the coordinator did not start:\n{(work / 'coordinator.log').read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(2)   # its subscriptions on their way (a persistent session keeps what arrives after)
        share = -(-len(devices) // args.procs)
        clients = []
        t = time.time()
        for i in range(args.procs):
            clients.append(subprocess.Popen([PY, __file__, "--client", str(keys), str(bundle), str(i), *devices[i * share:(i + 1) * share]],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=more_files))
        procs += clients
        connected = [json.loads(c.stdout.readline() or "{}") for c in clients]
        if sum(c.get("connected", 0) for c in connected) != len(devices):
            raise RuntimeError(f"not every device connected: {connected}")
        connect_s = time.time() - t
        t = time.time()
        cpu0 = {"coordinator": cpu_s(coord.pid), "broker": cpu_s(broker.pid), "clients": sum(cpu_s(c.pid) for c in clients)}
        for c in clients:
            c.stdin.write("go\n")
            c.stdin.flush()
        done = [json.loads(c.stdout.readline() or "{}") for c in clients]
        ingest_s = time.time() - t
        cpu = {"coordinator": cpu_s(coord.pid) - cpu0["coordinator"], "broker": cpu_s(broker.pid) - cpu0["broker"],
               "clients": sum(cpu_s(c.pid) for c in clients) - cpu0["clients"]}
        receipts: dict[str, int] = {}
        for d in done:
            for k, v in d.get("receipts", {}).items():
                receipts[k] = receipts.get(k, 0) + v
        deadline = time.time() + 300
        want = len(devices) // args.buffer
        while True:
            st = json.loads(subprocess.run([PY, "-m", "coordinator.cli", "--state-dir", str(work / "state"), "status", "--json"],
                                           check=True, capture_output=True, text=True).stdout)
            if st["version"] >= want or time.time() > deadline:
                break
            time.sleep(1)
        coord_rss, broker_rss = peak_rss_mb(coord.pid), peak_rss_mb(broker.pid)
        for c in clients:
            c.stdin.write("close\n")
            c.stdin.flush()
        return {"devices": len(devices), "procs": args.procs, "buffer": args.buffer, "provision_s": provision_s,
                "connect_s": connect_s, "ingest_s": ingest_s, "ingest_cpu_s": cpu, "receipts": receipts, "status": st,
                "still_connected": sum(d.get("still_connected", 0) for d in done),
                "disconnects": sum(d.get("disconnects", 0) for d in done),
                "client_rss_mb": max(d.get("rss_mb", 0) for d in done), "coordinator_rss_mb": coord_rss, "broker_rss_mb": broker_rss}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        keys, bundle, seed, *ids = sys.argv[2:]
        client(Path(keys), Path(bundle), ids, int(seed))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4, help="client processes the devices are spread over")
    ap.add_argument("--buffer", type=int, default=100, help="the coordinator publishes a version every this many updates")
    ap.add_argument("--coordinator", default=None, help="JSON of coordinator settings to try (default: its defaults)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    r = run(args)
    print(json.dumps(r, indent=1), flush=True)
    st = r["status"]
    body = (f"{r['devices']} devices provisioned by `edgefm-coordinator provision` ({r['provision_s']:.0f} s: CA, a client "
            f"certificate and an Ed25519 signing key each, broker config and ACL), one Mosquitto running that config (TLS, "
            f"client certificates required), one `edgefm-coordinator serve` on the provisioned coordinator.toml (async, a "
            f"version every {r['buffer']} updates, any staleness accepted since every device starts from v0, every update's signature checked against fleet.json, bounds and direction "
            f"check on). Devices: paho clients made by the agent's transport (`MqttLink`) over {r['procs']} processes, all "
            f"connected at once; each publishes one signed update (SmolLM2-135M rank-8 q/v adapter shapes, fp16 + zstd, "
            f"as the agent sends) once every device is connected, and waits for its receipt.\n\n"
            f"| measure | value |\n|---|---|\n"
            f"| devices connected at once over TLS | {r['devices']} (connected in {r['connect_s']:.1f} s; still connected at the end: "
            f"{r['still_connected']}; disconnects: {r['disconnects']}) |\n"
            f"| receipts | {', '.join(f'{k} {v}' for k, v in sorted(r['receipts'].items()))} |\n"
            f"| ingest, first publish to last receipt | {r['devices'] / r['ingest_s']:.0f} updates/s ({r['ingest_s']:.1f} s) |\n"
            f"| coordinator's count (`status --json`) | accepted {st['updates']['accepted']}, excluded {st['updates']['excluded']}, "
            f"rejected {st['updates']['rejected']}; versions published {st['version']} |\n"
            f"| peak memory: coordinator / broker / one client process | {r['coordinator_rss_mb']:.0f} MB / {r['broker_rss_mb']:.0f} MB / "
            f"{r['client_rss_mb']:.0f} MB |\n")
    if args.no_record:
        print(body)
    else:
        record("Load: a thousand devices over TLS (issue 12)", body,
               f"python bench/load.py --devices {args.devices} --procs {args.procs} --buffer {args.buffer}")


if __name__ == "__main__":
    main()
