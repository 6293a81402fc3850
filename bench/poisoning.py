"""Poisoning: how far can 20% of the devices move the fleet's held-out metric, with and without the
coordinator's defences?

Through the product: four honest devices are real `edgefm-agent run` processes, each sent one domain's
texts through `POST /v1/examples` and trained once (`POST /v1/train {"wait": true}`); their updates are
what they trained (`local - base`). A fifth device is the attacker (20% of the fleet): it holds valid
credentials and sees every honest update (the worst case), and publishes one crafted update. For every
aggregation rule and attack, a fresh `edgefm-coordinator serve` (sync, one round, every online device
selected) receives the five updates over a real Mosquitto exactly as agents send them (status, round
announcement, update with the round's id), publishes version 1, and `edgefm-coordinator export` hands
it to the evaluation: held-out loss on texts no device was sent, averaged over the four domains.

Attacks (the attacker claims the honest median of examples unless stated):
- scaled_x10: ten times one honest device's update (steers the fleet towards one domain);
- sign_flip: the negated mean of the honest updates, at ten times the honest median norm;
- noise: Gaussian noise at ten times the honest median norm;
- nan: an honest update with NaN entries;
- inflated_examples: the negated honest mean at the honest median norm, claiming 10^9 examples.

The figure per rule and attack is the held-out perplexity change from the same rule's clean round
(four honest updates and no attacker); the issue's goal: the defaults within 2%.

Usage: python bench/poisoning.py [--task sympy] [--seeds 0] [--no-record]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, ROOT, record  # noqa: E402
from bench.learning import Evaluator, Procs, general_texts, latest_candidate, send, split_task, task_domains  # noqa: E402
from devices.fleet import http_json  # noqa: E402

FLEET = "poison"
ATTACKER = "mallory"
ATTACKS = ("clean", "scaled_x10", "sign_flip", "noise", "nan", "inflated_examples")
RULES = {  # name -> coordinator settings
    "FedAvg, no defences": {"strategy": "fedavg", "examples_multiple": 0.0, "norm_multiple": 0.0, "direction_share": 0.0},
    "bounds only (weight, norm)": {"direction_share": 0.0},
    "defaults (bounds + direction check)": {},
    "median alone": {"strategy": "median", "examples_multiple": 0.0, "norm_multiple": 0.0, "direction_share": 0.0},
    "trimmed_mean alone (trim 1)": {"strategy": "trimmed_mean", "trim": 1, "examples_multiple": 0.0, "norm_multiple": 0.0,
                                    "direction_share": 0.0},
}
CLEAN_REFERENCE = "FedAvg, no defences"


def flat(t: dict) -> np.ndarray:
    return np.concatenate([np.asarray(t[k], np.float64).ravel() for k in sorted(t)])


def honest_updates(bundle: Path, send_by_dom: dict, work: Path) -> tuple[dict, dict]:
    """One training session per honest device through the real agent; returns (updates, base tensors):
    updates maps device id -> (examples used, local - base)."""
    from edge_runtime.protocol.adapter import load_adapter
    base, _ = load_adapter(bundle / "adapter.safetensors")
    procs = Procs(work)
    try:
        urls = {d: procs.agent(f"honest-{d}", bundle, None, FLEET) for d in send_by_dom}
        for d, texts in send_by_dom.items():
            send(urls[d], texts)
        with cf.ThreadPoolExecutor(len(urls)) as ex:
            res = dict(zip(urls, ex.map(lambda u: http_json(u + "/v1/train", {"wait": True}, timeout=3600), urls.values())))
        out = {}
        for d, r in res.items():
            if r.get("status") != "trained":
                raise RuntimeError(f"honest device {d} did not train: {r}")
            local, _ = load_adapter(latest_candidate(urls[d]))
            out[d] = (int(r["examples_used"]), {k: (local[k] - base[k]).astype(np.float32) for k in base})
        return out, base
    finally:
        procs.stop()


def attack_update(kind: str, honest: dict, seed: int) -> tuple[int, dict] | None:
    """The attacker's (claimed examples, delta), or None for the clean round."""
    if kind == "clean":
        return None
    rng = np.random.default_rng(seed)
    deltas = [d for _, d in honest.values()]
    claims = sorted(n for n, _ in honest.values())
    claim = int(np.median(claims))
    median_norm = float(np.median([np.linalg.norm(flat(d)) for d in deltas]))
    mean = {k: np.mean([d[k] for d in deltas], axis=0) for k in deltas[0]}
    mean_norm = float(np.linalg.norm(flat(mean)))

    def scaled(t, norm):
        return {k: (v * (norm / mean_norm)).astype(np.float32) for k, v in t.items()}
    if kind == "scaled_x10":
        return claim, {k: (10 * v).astype(np.float32) for k, v in deltas[0].items()}
    if kind == "sign_flip":
        return claim, scaled({k: -v for k, v in mean.items()}, 10 * median_norm)
    if kind == "noise":
        g = {k: rng.standard_normal(v.shape) for k, v in mean.items()}
        gn = float(np.linalg.norm(flat(g)))
        return claim, {k: (v * (10 * median_norm / gn)).astype(np.float32) for k, v in g.items()}
    if kind == "nan":
        d = {k: v.copy() for k, v in deltas[0].items()}
        for v in d.values():
            v.reshape(-1)[::7] = np.nan
        return claim, d
    if kind == "inflated_examples":
        return 10**9, scaled({k: -v for k, v in mean.items()}, median_norm)
    raise ValueError(kind)


class Watcher:
    """An MQTT client that records the round announcement and the receipts."""

    def __init__(self, url: str):
        from edge_runtime.protocol.topics import Topics
        from edge_runtime.transport import MqttLink
        self.topics = Topics(FLEET)
        self.round: dict | None = None
        self.receipts: dict[str, dict] = {}
        self.got = threading.Condition()
        self.link = MqttLink(url, f"bench-{uuid.uuid4().hex[:8]}", on_message=self._on, clean_start=True).start()
        self.link.subscribe(self.topics.round)
        self.link.subscribe(self.topics.all_devices("ack"))
        if not self.link.wait_connected(15):
            raise RuntimeError("cannot reach the bench broker")

    def _on(self, topic: str, payload: bytes, retained: bool) -> None:
        msg = json.loads(payload)
        with self.got:
            if topic == self.topics.round:
                self.round = msg
            elif msg.get("update_id"):
                self.receipts[msg["update_id"]] = msg
            self.got.notify_all()

    def wait(self, pred, timeout: float, what: str):
        with self.got:
            if not self.got.wait_for(pred, timeout):
                raise RuntimeError(f"timed out waiting for {what}")


def forged_update(header, tensors: dict) -> bytes:
    """An update message built without the encoder's own checks (the attacker's code is its own: NaN gets
    through to the wire)."""
    import hashlib
    import struct

    from edge_runtime.protocol.codec import CODECS
    from edge_runtime.protocol.messages import UPDATE_MAGIC
    from edge_runtime.protocol.tensors import encode_tensors
    payload = encode_tensors(CODECS["fp32"].encode(tensors))
    header.payload_sha256, header.payload_size, header.signature = hashlib.sha256(payload).hexdigest(), len(payload), None
    hbytes = json.dumps(header.to_json(), separators=(",", ":")).encode()
    return UPDATE_MAGIC + struct.pack("<I", len(hbytes)) + hbytes + payload


def one_round(bundle: Path, updates: list[tuple[str, int, dict]], settings: dict, work: Path) -> tuple[Path, dict]:
    """A fresh coordinator, one sync round over a real broker with these devices' updates; returns the
    exported version-1 adapter and the receipts by device."""
    from coordinator.broker import EmbeddedBroker
    from edge_runtime.protocol.adapter import load_adapter
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.messages import UpdateHeader, dump_json_message, encode_update
    _, meta = load_adapter(bundle / "adapter.safetensors")
    broker = EmbeddedBroker(work / "broker").start()
    procs = Procs(work)
    watcher = None
    try:
        watcher = Watcher(broker.url)
        for dev, _, _ in updates:  # presence first: a sync round selects the devices online when it opens
            watcher.link.publish(watcher.topics.status(dev), dump_json_message(
                {"kind": "status", "device_id": dev, "state": "online", "base_fingerprint": meta.base_fingerprint}), retain=True)
        conf = work / "coordinator.toml"
        # every device of the round selected (and the round's target: it closes when all have answered, or at
        # the deadline with all but one when the coordinator refuses one)
        conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {**settings, "devices_per_round": len(updates),
                                                                          "over_selection": 0.0}.items()))
        state = work / "coordinator"
        coord = procs.spawn("coordinator", [PY, "-m", "coordinator.cli", "--state-dir", str(state), "serve", "--bundle", str(bundle),
                                            "--config", str(conf), "--broker", broker.url, "--fleet", FLEET, "--mode", "sync",
                                            "--rounds", "1", "--min-updates", str(len(updates) - 1), "--round-timeout", "60"])
        watcher.wait(lambda: watcher.round is not None and set(watcher.round.get("selected") or []) >= {d for d, _, _ in updates},
                     120, "a round that selects every device")
        r = watcher.round
        ids = {}
        for dev, n, delta in updates:
            h = UpdateHeader(device_id=dev, update_id=uuid.uuid4().hex, base_version=int(r["base_version"]), num_examples=n,
                             base_fingerprint=meta.base_fingerprint, round=r["round"], codec=CodecSpec("fp32", "none"))
            ids[dev] = h.update_id
            finite = all(np.isfinite(v).all() for v in delta.values())
            watcher.link.publish(watcher.topics.update(dev), encode_update(h, delta) if finite else forged_update(h, delta))
        watcher.wait(lambda: all(i in watcher.receipts for i in ids.values()), 120, "receipts for every update")
        late = [d for d, i in ids.items() if d != ATTACKER and watcher.receipts[i].get("status") != "accepted"]
        if late:  # an honest update refused (e.g. the round closed at its deadline on a loaded machine): not a valid cell
            raise RuntimeError(f"honest updates not accepted: {[(d, watcher.receipts[ids[d]]) for d in late]}")
        coord.wait(120)
        if coord.returncode != 0:
            raise RuntimeError(f"coordinator failed; see {work / 'logs' / 'coordinator.log'}")
        out = work / "v1.safetensors"
        subprocess.run([PY, "-m", "coordinator.cli", "--state-dir", str(state), "export", "--version", "1", "-o", str(out)],
                       check=True, capture_output=True)
        st = json.loads(subprocess.run([PY, "-m", "coordinator.cli", "--state-dir", str(state), "status", "--json"],
                                       check=True, capture_output=True, text=True).stdout)
        receipts = {dev: dict(watcher.receipts[i]) for dev, i in ids.items()}
        if ATTACKER in receipts and st["updates"]["excluded"]:  # judged with its batch after the receipt
            receipts[ATTACKER]["status"] = "excluded"
        return out, receipts
    finally:
        if watcher:
            watcher.link.close()
        procs.stop()
        broker.stop()


def mean_loss(res: dict, doms: list[str]) -> float:
    return float(np.mean([res[d] for d in doms]))


def run_seed(bundle: Path, task: str, seed: int, args) -> dict:
    send_by_dom, held = split_task(task_domains(task), seed, args.per_device, args.heldout)
    doms = list(send_by_dom)
    ev = Evaluator(bundle, held, general_texts())
    work = Path(tempfile.mkdtemp(prefix="edgefm-bench-poisoning-"))
    try:
        t0 = time.time()
        cache = ROOT / ".cache" / "bench" / f"poisoning-honest-{task}-{seed}-{args.per_device}.npz"
        if args.reuse_honest and cache.is_file():
            z = np.load(cache, allow_pickle=False)
            honest = {d: (int(z[f"{d}/n"]), {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(d + "/") and not k.endswith("/n")})
                      for d in doms}
        else:
            honest, _ = honest_updates(bundle, send_by_dom, work / "honest")
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **{f"{d}/n": np.int64(n) for d, (n, _) in honest.items()},
                     **{f"{d}/{k}": v for d, (_, t) in honest.items() for k, v in t.items()})
        print(f"seed {seed}: honest updates in {time.time() - t0:.0f} s "
              f"(examples {[n for n, _ in honest.values()]}, norms {[round(float(np.linalg.norm(flat(d))), 3) for _, d in honest.values()]})",
              flush=True)
        base = ev(bundle / "adapter.safetensors")
        cells: dict = {}
        for rule, settings in RULES.items():
            if args.rules and not any(rule.startswith(x) for x in args.rules.split(",")):
                continue
            for attack in ATTACKS:
                if args.attacks and attack != "clean" and attack not in args.attacks.split(","):
                    continue
                ups = [(f"dev-{d}", n, delta) for d, (n, delta) in honest.items()]
                a = attack_update(attack, honest, seed)
                if a is not None:
                    ups.insert(0, (ATTACKER, a[0], a[1]))   # first: judged before any honest update is seen
                t1 = time.time()
                path, receipts = one_round(bundle, ups, settings, work / f"r-{len(cells)}")
                res = ev(path)
                cells[(rule, attack)] = {"loss": mean_loss(res, doms), "general": res["general"],
                                         "attacker": receipts.get(ATTACKER, {}).get("status")}
                print(f"  {rule:28s} {attack:18s} held-out loss {cells[(rule, attack)]['loss']:.4f} "
                      f"attacker {cells[(rule, attack)]['attacker']} ({time.time() - t1:.0f} s)", flush=True)
        return {"seed": seed, "base": mean_loss(base, doms), "base_general": base["general"],
                "cells": {f"{r}|{a}": v for (r, a), v in cells.items()},
                "honest_examples": [n for n, _ in honest.values()]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(runs: list[dict], task: str) -> str:
    def change(run, rule, attack):
        c = run["cells"]
        return float(np.exp(c[f"{rule}|{attack}"]["loss"] - c[f"{rule}|clean"]["loss"]) - 1)
    lines = ["| rule | " + " | ".join(a for a in ATTACKS if a != "clean") + " | clean round: gain kept vs FedAvg |",
             "|---|" + "---|" * len(ATTACKS)]
    worst_default = moved_default = 0.0
    for rule in RULES:
        row = []
        for attack in ATTACKS[1:]:
            vals = [change(r, rule, attack) for r in runs]
            status = {r["cells"][f"{rule}|{attack}"]["attacker"] for r in runs}
            row.append(f"{100 * np.mean(vals):+.1f}%" + (" (refused)" if status == {"rejected"} else " (excluded)" if status == {"excluded"} else ""))
            if rule.startswith("defaults"):
                worst_default = max(worst_default, max(vals))
                moved_default = max(moved_default, max(abs(v) for v in vals))
        kept = [(r["base"] - r["cells"][f"{rule}|clean"]["loss"]) / (r["base"] - r["cells"][f"{CLEAN_REFERENCE}|clean"]["loss"]) for r in runs]
        lines.append(f"| {rule} | " + " | ".join(row) + f" | {100 * np.mean(kept):.0f}% |")
    gains = [r["base"] - r["cells"][f"{CLEAN_REFERENCE}|clean"]["loss"] for r in runs]
    return (f"Task `{task}`, seeds {', '.join(str(r['seed']) for r in runs)}; 4 honest devices (one domain each) + 1 attacker = 20%. "
            f"Held-out perplexity change caused by the attacker, against the same rule's clean round (mean over seeds; "
            f"positive = worse). The clean FedAvg round lowers the held-out loss by {np.mean(gains):.3f} nats/token from the base model "
            f"({np.mean([r['base'] for r in runs]):.3f}).\n\n" + "\n".join(lines) +
            f"\n\n- largest harm under the defaults (held-out perplexity up): {100 * worst_default:.1f}% (goal <= 2%); largest "
            f"change either way: {100 * moved_default:.1f}% (a copy of an honest update, clipped to the norm bound, counts as "
            f"one more honest device and helps)\n"
            f"- \"(refused)\": the coordinator rejected the attacker's update outright (receipt `rejected`); \"(excluded)\": "
            f"accepted, then counted for nothing by the direction check (`edgefm-coordinator status`: `excluded`).\n"
            f"- \"gain kept\": the clean round's held-out gain over the base model with this rule, against plain FedAvg's.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="sympy")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--per-device", type=int, default=48)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--reuse-honest", action="store_true", help="reuse the honest updates of the last run with the same task, "
                    "seed and size (.cache/bench) instead of training them again (for trying rules)")
    ap.add_argument("--rules", default="", help="only rules whose names start with these (comma-separated; for trying)")
    ap.add_argument("--attacks", default="", help="only these attacks (comma-separated; for trying)")
    args = ap.parse_args()
    from devices.fleet import cached_bundle
    bundle = cached_bundle("smollm2", "rpi5")
    runs = [run_seed(bundle, args.task, int(s), args) for s in args.seeds.split(",")]
    if args.rules or args.attacks:
        print(json.dumps(runs, indent=1))
        return
    body = ("One sync round through `edgefm-coordinator serve` and a real Mosquitto; honest updates from real agents "
            "(SmolLM2-135M-Instruct, rpi5 bundle, one `train-now` session each on 48 examples of their domain); the "
            "attacker's update published like a device's, first in the round.\n\n" + render(runs, args.task))
    cmd = f"python bench/poisoning.py --task {args.task} --seeds {args.seeds}"
    if args.no_record:
        print(body)
    else:
        record("Poisoning: 20% of the devices attacking (issue 12)", body, cmd)


if __name__ == "__main__":
    main()
