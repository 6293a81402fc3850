"""Coordinator ingest rate vs the broker's raw rate, and memory with 10 vs 1000 updates.

Updates are SmolLM2-135M rank-8 q/v adapters (30 layers; 460,800 parameters), fp32 codec.
Baseline: the same encoded payloads published by one paho client and received by another through the
same Mosquitto, in the same run. Coordinator: publish -> validate -> blob store + SQLite -> fold.
Usage: python bench/ingest.py [--updates 200]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, peak_rss_mb, record, run_json  # noqa: E402

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8


def shapes() -> dict[str, list[int]]:
    out = {}
    for i in range(LAYERS):
        out[f"layers.{i}.q_proj.lora_A"] = [RANK, HIDDEN]
        out[f"layers.{i}.q_proj.lora_B"] = [HIDDEN, RANK]
        out[f"layers.{i}.v_proj.lora_A"] = [RANK, HIDDEN]
        out[f"layers.{i}.v_proj.lora_B"] = [KV, RANK]
    return out


def fake_bundle(d: Path) -> tuple[Path, str]:
    """Just what the coordinator reads: manifest.json + adapter.safetensors."""
    from edge_runtime.protocol.adapter import AdapterMeta, save_adapter
    from edge_runtime.protocol.manifest import Manifest
    d.mkdir(parents=True, exist_ok=True)
    fp = "b" * 64
    sh = shapes()
    tensors = {k: np.zeros(s, np.float32) for k, s in sh.items()}
    save_adapter(d / "adapter.safetensors", tensors, AdapterMeta(fp, ["q_proj", "v_proj"], RANK, 16.0, sh))
    Manifest(task="causal-lm", architecture="llama", model={"layers": LAYERS}, quant={"scheme": "int4"},
             adapter={"rank": RANK, "alpha": 16.0, "targets": ["q_proj", "v_proj"], "shapes": sh}, files={},
             base_fingerprint=fp).save(d)
    return d, fp


def make_updates(n: int, fp: str, codec: str = "fp32", seed: int = 0) -> list[tuple[str, bytes]]:
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.messages import UpdateHeader, encode_update
    rng = np.random.default_rng(seed)
    base = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes().items()}
    out = []
    for i in range(n):
        dev = f"dev-{i % 50}"
        h = UpdateHeader(device_id=dev, update_id=uuid.uuid4().hex, base_version=0, num_examples=8, base_fingerprint=fp,
                         codec=CodecSpec(codec, "none"))
        t = {k: v + np.float32(i * 1e-4) for k, v in base.items()}
        out.append((dev, encode_update(h, t)))
    return out


def baseline_rate(url: str, msgs: list[tuple[str, bytes]]) -> float:
    """Messages/s between two plain paho clients (QoS 1) through the broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from edge_runtime.transport import BrokerAddress
    a = BrokerAddress.parse(url)
    got = threading.Event()
    count = [0]

    def on_message(c, u, m):
        count[0] += 1
        if count[0] == len(msgs):
            got.set()

    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect(a.host, a.port)
    sub.subscribe("bench/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(50)
    pub.connect(a.host, a.port)
    pub.loop_start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    for dev, m in msgs:
        pub.publish(f"bench/{dev}", m, qos=1)
    assert got.wait(600), f"baseline received {count[0]}/{len(msgs)}"
    dt = time.perf_counter() - t0
    pub.loop_stop()
    sub.loop_stop()
    return len(msgs) / dt


def coordinator_child(url: str, state: str, bundle: str, n: int, codec: str) -> None:
    """Run in a subprocess: coordinator + publisher; prints rate and peak RSS of this process."""
    import logging
    logging.disable(logging.INFO)
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    from edge_runtime.protocol.topics import Topics
    from edge_runtime.transport import MqttLink
    c = Coordinator(CoordinatorConfig(bundle=bundle, state_dir=state, broker=url, fleet="bench", mode="async",
                                      buffer_size=10**9, max_staleness=10))
    c.start()
    assert c.link.wait_connected(10)
    time.sleep(0.5)
    rss_before = peak_rss_mb()
    pub = MqttLink(url, "bench-dev").start()
    assert pub.wait_connected(10)
    topics = Topics("bench")
    if n <= 300:  # rate run: payloads encoded up front, as for the baseline
        msgs = make_updates(n, c.fingerprint, codec)
        gen = iter(msgs)
    else:         # memory run: generated lazily so the publisher does not hold them all
        gen = (make_updates(1, c.fingerprint, codec, seed=i)[0] for i in range(n))
    t0 = time.perf_counter()
    for dev, payload in gen:
        while pub.publish(topics.update(dev), payload, qos=1) is None:
            time.sleep(0.01)
    while c.strategy.count(c.acc) < n:
        time.sleep(0.01)
    dt = time.perf_counter() - t0
    c.stop()
    pub.close()
    print(json.dumps({"rate": n / dt, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--child", nargs=4, metavar=("URL", "STATE", "BUNDLE", "N"))
    ap.add_argument("--codec", default="fp32")
    args = ap.parse_args()
    if args.child:
        coordinator_child(args.child[0], args.child[1], args.child[2], int(args.child[3]), args.codec)
        return
    from coordinator.broker import EmbeddedBroker
    tmp = Path(tempfile.mkdtemp(prefix="edgefm-bench-"))
    broker = EmbeddedBroker(tmp / "broker").start()
    try:
        bundle, fp = fake_bundle(tmp / "bundle")
        msgs = make_updates(args.updates, fp)
        size = len(msgs[0][1])
        base = baseline_rate(broker.url, msgs)
        del msgs
        res = run_json([PY, __file__, "--child", broker.url, str(tmp / "state-rate"), str(bundle), str(args.updates)])
        m10 = run_json([PY, __file__, "--child", broker.url, str(tmp / "state-10"), str(bundle), "10", "--codec", "fp16"])
        m1000 = run_json([PY, __file__, "--child", broker.url, str(tmp / "state-1000"), str(bundle), "1000", "--codec", "fp16"])
    finally:
        broker.stop()
    ratio = res["rate"] / base
    body = f"""Updates of a SmolLM2-135M rank-8 q/v adapter (460,800 parameters), {size / 1e6:.2f} MB each (fp32 codec), through one
Mosquitto on loopback; {args.updates} updates.

| path | updates/s | MB/s |
|---|---|---|
| two plain paho clients (baseline) | {base:.1f} | {base * size / 1e6:.0f} |
| coordinator: receive, validate, store durably, fold | {res['rate']:.1f} | {res['rate'] * size / 1e6:.0f} |
| **ratio** | **{ratio:.2f}** (goal >= 0.5) | |

Peak memory of the coordinator process (fp16 updates, streaming FedAvg accumulator):

| updates in the round | peak RSS | ratio |
|---|---|---|
| 10 | {m10['peak_rss_mb']:.0f} MB | 1.00 |
| 1000 | {m1000['peak_rss_mb']:.0f} MB | {m1000['peak_rss_mb'] / m10['peak_rss_mb']:.2f} (goal <= 2) |
"""
    record("Coordinator ingest (issue 5)", body, "python bench/ingest.py --updates %d" % args.updates)


if __name__ == "__main__":
    main()
