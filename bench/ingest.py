"""Coordinator ingest rate vs the broker's raw rate, and memory with 10 vs 1000 updates.

Updates are SmolLM2-135M rank-8 q/v adapters (30 layers; 460,800 parameters), fp32 codec.
Baseline: the same encoded payloads published by one paho client and received by another through the
same Mosquitto, in the same run. Coordinator: publish -> validate -> fold -> update log + SQLite (group commit) -> PUBACK.
Usage: python bench/ingest.py [--updates 200]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
    from edge_runtime.protocol.manifest import AdapterSpec, Manifest, QuantSpec
    d.mkdir(parents=True, exist_ok=True)
    fp = "b" * 64
    sh = shapes()
    tensors = {k: np.zeros(s, np.float32) for k, s in sh.items()}
    save_adapter(d / "adapter.safetensors", tensors, AdapterMeta(fp, ["q_proj", "v_proj"], RANK, 16.0, sh))
    Manifest(task="causal-lm", architecture="llama", model={"layers": LAYERS}, quant=QuantSpec("int4"),
             adapter=AdapterSpec(RANK, 16.0, ["q_proj", "v_proj"], sh), files={}, base_fingerprint=fp).save(d)
    return d, fp


def make_updates(n: int, fp: str, codec: str = "fp32", seed: int = 0) -> list[tuple[str, bytes]]:
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.messages import UpdateHeader, encode_update
    rng = np.random.default_rng(seed)
    base = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes().items()}
    out = []
    for i in range(n):
        dev = f"dev-{i}"   # one update per device: async takes one per device per version (issue 12)
        h = UpdateHeader(device_id=dev, update_id=uuid.uuid4().hex, base_version=0, num_examples=8, base_fingerprint=fp,
                         codec=CodecSpec(codec, "none"))
        t = {k: v + np.float32(i * 1e-4) for k, v in base.items()}
        out.append((dev, encode_update(h, t)))
    return out


def publisher(url: str, topic_fmt: str, n: int, fp: str, codec: str) -> None:
    """Child process: publish n pre-encoded updates (QoS 1) as fast as the client allows."""
    from edge_runtime.transport import MqttLink
    msgs = make_updates(n, fp, codec)
    acked = [0]
    pub = MqttLink(url, f"bench-pub-{uuid.uuid4().hex[:6]}", clean_start=True,
                   on_published=lambda mid: acked.__setitem__(0, acked[0] + 1)).start()
    assert pub.wait_connected(10)
    c0 = self_cpu()
    for dev, payload in msgs:
        while pub.publish(topic_fmt.format(dev=dev), payload, qos=1) is None:
            time.sleep(0.005)
    deadline = time.time() + 600
    while acked[0] < n and time.time() < deadline:  # every PUBACK in before disconnecting
        time.sleep(0.05)
    print(json.dumps({"cpu_publish": self_cpu() - c0}))
    pub.close()


def spawn_publisher(url: str, topic_fmt: str, n: int, fp: str, codec: str):
    import subprocess
    return subprocess.Popen([PY, __file__, "--publish", url, topic_fmt, str(n), fp, codec], stdout=subprocess.PIPE, text=True)


def wait_cpu(p) -> float:
    """Wait for a publisher; the CPU seconds it spent publishing (not encoding the updates beforehand)."""
    out, _ = p.communicate()
    return json.loads(out.strip().splitlines()[-1])["cpu_publish"]


def proc_cpu(pid: int) -> float:
    """CPU seconds a running process has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    """CPU seconds this process has used so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def baseline_rate(url: str, n: int, fp: str, tuned: bool = False) -> dict:
    """Messages/s received by a plain paho subscriber from a plain paho publisher (separate processes);
    ``tuned``: the subscriber's process gets the coordinator's allocator setting."""
    from edge_runtime.transport import MqttLink
    if tuned:
        from edge_runtime.memory import keep_large_buffers
        assert keep_large_buffers()
    times: list[float] = []
    done = threading.Event()

    def on_message(topic, payload, retained):
        times.append(time.perf_counter())
        if len(times) == n:
            done.set()

    sub = MqttLink(url, f"bench-sub-{uuid.uuid4().hex[:6]}", on_message=on_message, clean_start=True)
    sub.subscribe("bench/#", 1)
    sub.start()
    assert sub.wait_connected(10)
    time.sleep(0.5)
    c0 = self_cpu()
    p = spawn_publisher(url, "bench/{dev}", n, fp, "fp32")
    assert done.wait(600), f"baseline received {len(times)}/{n}"
    c1 = self_cpu()
    cpu_pub = wait_cpu(p)
    sub.close()
    return {"rate": (n - 1) / (times[-1] - times[0]), "cpu_recv": c1 - c0, "cpu_pub": cpu_pub}


def coordinator_child(url: str, state: str, bundle: str, n: int, codec: str) -> None:
    """Run in a subprocess: the coordinator; a separate publisher process sends n updates. Prints the rate
    (first to last update handled) and the peak RSS of the coordinator process."""
    import logging
    logging.disable(logging.INFO)
    from coordinator.config import CoordinatorConfig
    from coordinator.service import Coordinator
    # a fleet (so an MQTT session) of its own: a shared persistent session would hand this run messages
    # a previous run left unacknowledged, timed as if they were this run's
    fleet = f"bench-{uuid.uuid4().hex[:8]}"
    c = Coordinator(CoordinatorConfig(bundle=bundle, state_dir=state, broker=url, fleet=fleet, mode="async",
                                      buffer_size=10**9, max_staleness=10))
    first: list[float] = []
    acked: list[float] = []
    handle, enqueue = c.intake.update, c.enqueue

    def timed(*args):
        if not first:
            first.append(time.perf_counter())
        return handle(*args)

    def enqueue_timed(topic, payload, retained, ack):
        # the PUBACK is sent only once the update is durable (group commit): time that, not the fold
        enqueue(topic, payload, retained, lambda: (ack(), acked.append(time.perf_counter())))

    c.intake.update = timed  # type: ignore[method-assign]
    c.enqueue = enqueue_timed  # type: ignore[method-assign]
    c.start()
    assert c.link.wait_connected(10)
    time.sleep(0.5)
    c0 = self_cpu()
    p = spawn_publisher(url, c.topics.update("DEV").replace("DEV", "{dev}"), n, c.fingerprint, codec)
    while len(acked) < n or c.open.count() < n:   # folded, or held for judging with its batch
        time.sleep(0.05)  # the times come from the callbacks; a tight poll here would only compete for the GIL
    end = acked[-1]
    c1 = self_cpu()
    cpu_pub = wait_cpu(p)
    c.stop()
    print(json.dumps({"rate": (n - 1) / (end - first[0]), "peak_rss_mb": peak_rss_mb(), "cpu_recv": c1 - c0, "cpu_pub": cpu_pub}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--child", nargs=4, metavar=("URL", "STATE", "BUNDLE", "N"))
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--baseline", nargs=4, metavar=("URL", "N", "FP", "TUNED"))
    ap.add_argument("--publish", nargs=5, metavar=("URL", "TOPIC_FMT", "N", "FP", "CODEC"))
    ap.add_argument("--rates-only", action="store_true", help="skip the memory runs; print, do not record")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs of each rate measurement")
    args = ap.parse_args()
    if args.publish:
        u, fmt, n, fp, codec = args.publish
        publisher(u, fmt, int(n), fp, codec)
        return
    if args.baseline:
        u, n, fp, tuned = args.baseline
        print(json.dumps(baseline_rate(u, int(n), fp, tuned == "1")))
        return
    if args.child:
        coordinator_child(args.child[0], args.child[1], args.child[2], int(args.child[3]), args.codec)
        return
    from coordinator.broker import EmbeddedBroker
    tmp = Path(tempfile.mkdtemp(prefix="edgefm-bench-"))
    broker = EmbeddedBroker(tmp / "broker").start()
    try:
        bundle, fp = fake_bundle(tmp / "bundle")
        size = len(make_updates(1, fp)[0][1])
        bpid = broker.proc.pid

        def with_broker_cpu(fn):
            b0 = proc_cpu(bpid)
            r = fn()
            return {**r, "cpu_broker": proc_cpu(bpid) - b0}

        # interleaved (plain baseline, tuned baseline, coordinator) x repeat: drift on a shared machine
        # hits all three alike
        bases, tuned, runs = [], [], []
        for i in range(args.repeat):
            bases.append(with_broker_cpu(lambda: run_json([PY, __file__, "--baseline", broker.url, str(args.updates), fp, "0"])))
            tuned.append(with_broker_cpu(lambda: run_json([PY, __file__, "--baseline", broker.url, str(args.updates), fp, "1"])))
            runs.append(with_broker_cpu(lambda i=i: run_json([PY, __file__, "--child", broker.url, str(tmp / f"state-rate-{i}"),
                                                              str(bundle), str(args.updates)])))
        if args.rates_only:
            m10 = m1000 = {"peak_rss_mb": float("nan")}
        else:
            m10 = run_json([PY, __file__, "--child", broker.url, str(tmp / "state-10"), str(bundle), "10", "--codec", "fp16"])
            m1000 = run_json([PY, __file__, "--child", broker.url, str(tmp / "state-1000"), str(bundle), "1000", "--codec", "fp16"])
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # state dirs of a run are ~1-3 GB of update logs and checkpoints
    import statistics
    rows = (("two plain paho clients (baseline)", bases), ("the same, subscriber with the coordinator's allocator setting", tuned),
            ("coordinator: receive, validate, store durably, fold", runs))
    for name, rs in rows:
        print(name, " ".join(f"{r['rate']:.0f}/s" for r in rs), file=sys.stderr)

    def best(rs):
        return max(rs, key=lambda r: r["rate"])

    def med(rs):
        return statistics.median(r["rate"] for r in rs)

    def ms(r, k):
        return 1000 * r[k] / args.updates
    ratio, ratio_med = best(runs)["rate"] / best(bases)["rate"], med(runs) / med(bases)
    ratio_t, ratio_t_med = best(runs)["rate"] / best(tuned)["rate"], med(runs) / med(tuned)
    def all_runs(rs):
        return " / ".join(f"{r['rate']:.0f}" for r in rs)
    table = "\n".join(f"| {name} | {best(rs)['rate']:.1f} | {med(rs):.1f} | {best(rs)['rate'] * size / 1e6:.0f} | {all_runs(rs)} |"
                      for name, rs in rows)
    cpu = "\n".join(f"| {name.split(':')[0]} | {ms(best(rs), 'cpu_recv'):.2f} ms | {ms(best(rs), 'cpu_broker'):.2f} ms | "
                    f"{ms(best(rs), 'cpu_pub'):.2f} ms |" for name, rs in rows)
    body = f"""Updates of a SmolLM2-135M rank-8 q/v adapter (460,800 parameters), {size / 1e6:.2f} MB each (fp32 codec), through one
Mosquitto on loopback; {args.updates} updates sent by a publisher in its own process; rate timed on the receiving side
(baseline: first to last message received; coordinator: first update handled to the last PUBACK, which is sent only
after the update is validated, folded and durably committed). {args.repeat} runs of each, interleaved.

| path | best updates/s | median | MB/s (best) | all runs |
|---|---|---|---|---|
{table}

| ratio coordinator / baseline | best of runs | median of runs |
|---|---|---|
| vs plain paho (**the goal: >= 0.5**) | **{ratio:.2f}** | **{ratio_med:.2f}** |
| vs paho with the same allocator setting | {ratio_t:.2f} | {ratio_t_med:.2f} |

Receiving is most of a plain paho client's cost: with glibc's defaults each multi-megabyte copy paho makes of a
message is a fresh mmap that faults in page by page. The coordinator raises glibc's mmap/trim thresholds at start
(`keep_large_buffers`, `edge_runtime/memory.py`), which the second row applies to the plain subscriber too
(that row is erratic on this machine: its subscriber costs ~1 ms per message, but the broker's CPU per message
then swings between ~1.5 and ~5 ms from run to run, so it is shown for completeness, not as the goal's baseline).
Accepted updates are made durable per batch in the update log with one XOR parity record per batch (one
damaged payload is rebuilt from it), plus a checkpoint of the running sum once the log outweighs one; they
are held and judged in batches of 16 (weight and norm bounds, direction check). Writing every payload twice
(2026-12-01) had cut the rate to 0.25-0.30 of plain paho; parity brought it back (2026-12-02).

CPU time per update in the best run of each (the machine has {os.cpu_count()} cores, shared by all three processes):

| path | receiver | broker | publisher |
|---|---|---|---|
{cpu}

Peak memory of the coordinator process (fp16 updates, streaming FedAvg accumulator):

| updates in the round | peak RSS | ratio |
|---|---|---|
| 10 | {m10['peak_rss_mb']:.0f} MB | 1.00 |
| 1000 | {m1000['peak_rss_mb']:.0f} MB | {m1000['peak_rss_mb'] / m10['peak_rss_mb']:.2f} (goal <= 2) |
"""
    if args.rates_only:
        print(body)
        return
    record("Coordinator ingest (issue 5)", body, "python bench/ingest.py --updates %d --repeat %d" % (args.updates, args.repeat))


if __name__ == "__main__":
    main()
