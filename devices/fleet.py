"""Fleet simulator: a broker, a coordinator and N agents as separate processes, driven through their
public interfaces (CLIs, HTTP API, MQTT), with per-round evaluation and an optional chaos schedule."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from devices.report import write_report
from edge_runtime.errors import ConfigError


@dataclasses.dataclass
class FleetOptions:
    """`edgefm-fleet run` settings."""

    devices: int = 3
    rounds: int = 3
    model: str = "tiny"  # tiny | a bundle dir | anything edgefm-export accepts
    broker: str | None = None
    insecure: bool = False  # accept a --broker beyond loopback without TLS and credentials
    mode: str = "sync"
    strategy: str = "fedavg"
    chaos: bool = False
    out: str = "./fleet-out"
    profile: str = "rpi5"
    fleet: str = "sim"
    alpha: float = 0.3  # Dirichlet concentration over domains (smaller = more non-IID)
    examples_per_device: int = 48
    heldout_per_domain: int = 8
    steps_per_round: int = 6
    learning_rate: float | None = None  # None: the agent's default (the one the benchmarks measured)
    round_timeout_s: float = 60.0
    timeout_s: float = 900.0
    seed: int = 0
    data: str = "synthetic"  # synthetic | stdlib | a folder of the user's data (one NAME.jsonl or NAME/ per device)
    heldout_fraction: float = 0.1  # --data DIR: share of each device's data kept for the report's evaluation
    codec: str = "fp16"
    compression: str = "zstd"
    quiet: bool = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    """GET (no body) or POST a JSON body to an agent's API; the JSON answer."""
    req = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def readable_bundle(path: Path) -> bool:
    """Whether a cached bundle is what this version would export: a manifest it reads, written by the
    same exporter revision (else the cache exports it again)."""
    from edge_runtime.errors import BundleError
    from edge_runtime.protocol.manifest import Manifest
    from export.build import EXPORTER_REVISION

    try:
        return Manifest.load(path).versions.get("exporter") == EXPORTER_REVISION
    except BundleError:
        return False


def cached_bundle(model: str, profile: str, *, train_batch: int = 4, train_seq: int = 64, log=print, quiet: bool = False) -> Path:
    """Export ``model`` for a device profile once (training graph batch x seq) and reuse it from the cache."""
    from edge_runtime.protocol.manifest import FORMAT_VERSION
    from export.build import Progress, build_bundle
    from export.cli import resolve_options
    from export.source import cache_root

    name = Path(model).name.replace(".", "-")
    key = f"{name}-{profile}-b{train_batch}s{train_seq}"
    out = cache_root() / "bundles" / f"{key}-f{FORMAT_VERSION}"
    for stale in out.parent.glob(f"{key}*"):  # bundles an older exporter wrote for the same settings
        if stale != out and (stale.name == key or stale.name.startswith(f"{key}-f")):
            log(f"removing {stale.name} (written by an older exporter)")
            shutil.rmtree(stale, ignore_errors=True)
    if (out / "manifest.json").is_file() and not readable_bundle(out):
        log(f"removing {out.name} (its manifest is not one this edgefm reads)")
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "manifest.json").is_file():
        log(f"exporting {model} for profile {profile} (once; cached in {out})")
        opts = resolve_options(profile=profile, train_batch=train_batch, train_seq=train_seq, verify=False)
        build_bundle(model, out, opts, log=Progress(quiet=quiet))
    return out


class Fleet:
    """Runs one simulation and returns the report."""

    def __init__(self, opts: FleetOptions):
        self.o = opts
        self.out = Path(opts.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.cmds: dict[str, list[str]] = {}
        self.ports: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.events: list[str] = []
        self.t0 = time.time()
        self.broker: Any = None  # an EmbeddedBroker when the fleet starts its own
        self.names: list[str] = []  # device ids (from --data DIR; else dev-0, dev-1, ...)
        self.intake: dict[str, dict] = {}

    def log(self, msg: str) -> None:
        """Progress line (and an event in the report)."""
        line = f"[fleet {time.time() - self.t0:6.1f}s] {msg}"
        self.events.append(line)
        if not self.o.quiet:
            print(line, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ setup
    def bundle(self) -> Path:
        """The bundle every device runs: given, cached, or exported now."""
        m = self.o.model
        if (Path(m) / "manifest.json").is_file():
            return Path(m)
        from export.build import BuildOptions, Progress, build_bundle

        if m == "tiny":
            out = self.out / "bundle-tiny"
            if not (out / "manifest.json").is_file():
                from export.quantize import QuantRecipe
                from export.tiny import make_tiny_llama

                src = make_tiny_llama(self.out / "tiny-model", layers=2, hidden=64)
                self.log("exporting the tiny model (fp32 bundle)")
                build_bundle(
                    str(src),
                    out,
                    BuildOptions(quant=QuantRecipe("fp32"), lora_rank=4, train_batch=4, train_seq=32),
                    log=Progress(quiet=self.o.quiet),
                )
            return out
        return cached_bundle(m, self.o.profile, log=self.log, quiet=self.o.quiet)

    def datasets(self):
        """Per-device examples and per-domain held-out texts."""
        from devices import data

        if self.o.data not in ("synthetic", "stdlib"):
            user = data.load_user_data(self.o.data)
            bad = [n for n in user if not n.replace("-", "").replace("_", "").isalnum()]
            if bad:
                raise ConfigError(f"--data: device names may hold letters, digits, '-' and '_' only: {bad}")
            self.names = list(user)
            self.o.devices = len(user)
            per_dev, heldout = data.split_user_data(user, self.o.heldout_fraction, self.o.seed)
            mixtures = [{n: float(n == m) for n in user} for m in user]
            out = self.out / "heldout"
            out.mkdir(exist_ok=True)
            for n, texts in heldout.items():
                (out / f"{n}.eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            self.log(
                f"user data from {self.o.data}: {len(user)} devices ({', '.join(f'{n}: {len(e)}' for n, e in zip(user, per_dev))} "
                f"examples to send); held back for evaluation: {out}/NAME.eval.jsonl"
            )
            return per_dev, heldout, mixtures
        if self.o.data == "stdlib":
            texts = {f: data.stdlib_docstrings(f) for f in data.STDLIB_FAMILIES}
        else:
            texts = {d: data.synthetic_domain_texts(d, 400, self.o.seed) for d in data.SYNTHETIC_DOMAINS}
        mixtures = data.dirichlet_partition(sorted(texts), self.o.devices, self.o.alpha, self.o.seed)
        per_dev, heldout = data.device_datasets(
            texts, mixtures, self.o.examples_per_device, self.o.heldout_per_domain, self.o.seed
        )
        return per_dev, heldout, mixtures

    def _spawn(self, name: str) -> None:
        logf = open(self.out / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            self.cmds[name], stdout=logf, stderr=subprocess.STDOUT, cwd=self.out, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def start_agent(self, i: int, bundle: Path, broker: str) -> str:
        name = self.names[i] if self.names else f"dev-{i}"
        port = self.ports.setdefault(name, _free_port())
        ddir = self.out / "agents" / name
        ddir.mkdir(parents=True, exist_ok=True)
        cfg = ddir / "agent.toml"
        cfg.write_text(
            f"steps_per_round = {self.o.steps_per_round}\n"
            + (f"learning_rate = {self.o.learning_rate}\n" if self.o.learning_rate else "")
            + f"min_new_examples = 1\nthreads_inference = 1\nthreads_training = 1\nmax_train_seconds = 300\n"
            f'update_codec = "{self.o.codec}"\nupdate_compression = "{self.o.compression}"\n'
            + ("train_step_delay_s = 1.0\n" if self.o.chaos and i == self.o.devices - 1 else "")
        )
        self.cmds[name] = [
            sys.executable,
            "-m",
            "edge_runtime.cli",
            "run",
            "--bundle",
            str(bundle),
            "--broker",
            broker,
            "--fleet",
            self.o.fleet,
            "--device-id",
            name,
            "--data-dir",
            str(ddir),
            "--port",
            str(port),
            "--config",
            str(cfg),
            "--no-auto-train",
        ] + (["--insecure"] if self.o.insecure else [])
        self._spawn(name)
        return name

    def wait_healthy(self, name: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[name].poll() is not None:
                raise ConfigError(f"{name} exited at start; see {self.out / 'logs' / (name + '.log')}")
            try:
                http_json(f"http://127.0.0.1:{self.ports[name]}/healthz", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise ConfigError(f"{name} did not answer /healthz within {timeout}s")

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        p = self.procs.get(name)
        if p and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ------------------------------------------------------------------ evaluation
    def evaluator(self, bundle: Path):
        from edge_runtime.engine import Engine

        return Engine(bundle, threads=1, verify=False)

    def evaluate(self, eng, tensors, meta, heldout: dict[str, list[str]], seq: int) -> dict[str, float]:
        """Mean NLL per token of a global adapter on each domain's held-out texts."""
        active = eng.make_active(tensors, meta)
        out = {}
        for d, texts in heldout.items():
            tot = cnt = 0.0
            for t in texts:
                s, c = eng.score(eng.encode(t)[:seq], active)
                tot, cnt = tot + s, cnt + c
            out[d] = tot / max(cnt, 1)
        return out

    # ------------------------------------------------------------------ run
    RUN_STATE = ("agents", "coordinator", "broker", "logs")  # per-run state; bundles and models stay cached

    def run(self) -> dict:
        o = self.o
        from edge_runtime.transport import require_secure_broker

        require_secure_broker(o.broker, o.insecure, "edgefm-fleet")  # before minutes of export
        stale = [d for d in self.RUN_STATE if (self.out / d).exists()]
        if stale:  # every run is a fresh fleet: old stores would make agents skip their data and rounds look done
            for d in stale:
                shutil.rmtree(self.out / d, ignore_errors=True)
            self.log(f"removed the previous run's state in {self.out} ({', '.join(stale)})")
        (self.out / "logs").mkdir(exist_ok=True)
        bundle = self.bundle()
        per_dev, heldout, mixtures = self.datasets()
        self.log(
            f"{o.devices} devices, non-IID mixtures (Dirichlet alpha={o.alpha}): "
            + "; ".join(", ".join(f"{d}:{w:.2f}" for d, w in m.items() if w > 0.05) for m in mixtures)
        )
        if o.broker:
            broker = o.broker
        else:
            from coordinator.broker import EmbeddedBroker

            self.broker = EmbeddedBroker(self.out / "broker").start()
            broker = self.broker.url
            self.log(f"embedded broker on {broker}")
        try:
            return self._run(bundle, broker, per_dev, heldout, mixtures)
        finally:
            for name in list(self.procs):
                self.kill(name, signal.SIGTERM)
            if self.broker:
                self.broker.stop()

    def _run(self, bundle, broker, per_dev, heldout, mixtures) -> dict:
        o = self.o
        names = [self.start_agent(i, bundle, broker) for i in range(len(per_dev))]
        for n in names:
            self.wait_healthy(n)
        for i, n in enumerate(names):
            fields = ("text", "prompt", "completion", "label")
            res = http_json(
                f"http://127.0.0.1:{self.ports[n]}/v1/examples",
                {"examples": [{k: e[k] for k in fields if k in e} for e in per_dev[i]]},
            )
            self.intake[n] = res
            gate = http_json(f"http://127.0.0.1:{self.ports[n]}/v1/examples/heldout")["examples"]
            (self.out / "heldout").mkdir(exist_ok=True)
            (self.out / "heldout" / f"{n}.gate.jsonl").write_text("".join(json.dumps(e) + "\n" for e in gate))
            self.log(
                f"{n}: stored {res['added']} examples: {res['train']} to train on, {res['heldout']} held out for its gate "
                f"(heldout/{n}.gate.jsonl)"
            )
        state_dir = self.out / "coordinator"
        self.cmds["coordinator"] = [
            sys.executable,
            "-m",
            "coordinator.cli",
            "--state-dir",
            str(state_dir),
            "serve",
            "--bundle",
            str(bundle),
            "--broker",
            broker,
            "--fleet",
            o.fleet,
            "--mode",
            o.mode,
            "--strategy",
            o.strategy,
            "--rounds",
            str(o.rounds),
            "--min-updates",
            str(o.devices if o.mode == "sync" else max(1, o.devices - 1)),
            "--round-timeout",
            str(o.round_timeout_s),
        ] + (["--insecure"] if o.insecure else [])
        self._spawn("coordinator")
        self.log(
            f"coordinator started ({o.mode}, {o.strategy}, {o.rounds} rounds)"
            + (f"; chaos: {names[-1]} is a slow device (+1 s per training step)" if o.chaos else "")
        )
        eng = self.evaluator(bundle)
        from edge_runtime.gate import anchor_texts

        general = anchor_texts()  # the agents' forgetting anchor: general text no device trains on
        seq = int(eng.manifest.training.seq)
        from coordinator.state import State
        from edge_runtime.protocol.adapter import adapter_from_bytes

        st = None
        evaluated: dict[int, dict] = {}
        probes: list[dict] = []
        chaos_done: set[str] = set()
        deadline = time.time() + o.timeout_s
        final = None
        while time.time() < deadline:
            if self.procs["coordinator"].poll() is not None and final is None:
                final = "exited"
            if st is None and (state_dir / "coordinator.sqlite").exists():
                st = State(state_dir)
            if st is not None:
                for v in sorted(r["version"] for r in st.versions()):
                    if v in evaluated:
                        continue
                    tensors, meta = adapter_from_bytes(st.blobs.get(st.version_sha(v)))
                    by_dom = self.evaluate(eng, tensors, meta, {**heldout, "__general__": general}, seq)
                    general_loss = by_dom.pop("__general__")
                    by_dev = {n: float(sum(mixtures[i][d] * by_dom[d] for d in by_dom)) for i, n in enumerate(names)}
                    row = next((r for r in st.versions() if r["version"] == v), {})
                    evaluated[v] = {
                        "version": v,
                        "round": row.get("round"),
                        "heldout_by_domain": by_dom,
                        "heldout_by_device": by_dev,
                        "heldout_mean": float(np.mean(list(by_dom.values()))),
                        "general_loss": general_loss,
                        **{k: row.get("metrics", {}).get(k) for k in ("bytes", "num_updates", "num_examples")},
                    }
                    self.log(f"global v{v}: held-out loss " + ", ".join(f"{d} {x:.3f}" for d, x in by_dom.items()))
                done_rounds = (
                    sum(1 for r in st.rounds() if r["status"] == "closed")
                    if o.mode == "sync"
                    else max(0, (st.current_version() or 0))
                )
                # chaos schedule: kill + restart an agent after round 1, restart the broker after round 2
                if o.chaos and done_rounds >= 1 and "kill" not in chaos_done:
                    chaos_done.add("kill")
                    victim = names[0]
                    self.log(f"chaos: SIGKILL {victim} and restart it")
                    self.kill(victim)
                    self.restarts[victim] = self.restarts.get(victim, 0) + 1
                    self._spawn(victim)
                    self.wait_healthy(victim)
                if o.chaos and done_rounds >= 2 and "broker" not in chaos_done and self.broker:
                    chaos_done.add("broker")
                    self.log("chaos: restarting the broker")
                    self.broker.stop()
                    time.sleep(1.0)
                    self.broker.start()
                if done_rounds >= o.rounds:
                    break
            # a local request answered while the fleet trains
            n = names[len(probes) % len(names)]
            try:
                t = time.perf_counter()
                http_json(
                    f"http://127.0.0.1:{self.ports[n]}/v1/completions",
                    {"prompt": "pump 3", "max_tokens": 8, "temperature": 0},
                    timeout=30,
                )
                probes.append({"device": n, "latency_ms": (time.perf_counter() - t) * 1000, "ts": time.time() - self.t0})
            except OSError as exc:
                probes.append({"device": n, "latency_ms": None, "error": str(exc)})
            time.sleep(1.0)
        final_version = st.current_version() if st else 0
        self.log(f"rounds done; waiting for every agent to adopt v{final_version}")
        statuses: dict[str, dict] = {}
        wait_until = time.time() + 60
        while time.time() < wait_until:
            statuses = {}
            for n in names:
                try:
                    statuses[n] = http_json(f"http://127.0.0.1:{self.ports[n]}/v1/status", timeout=10)
                except OSError:
                    pass
            if len(statuses) == len(names) and all(
                s["global_version"] == final_version
                and s["outbox"]["queued"] == 0
                and s["outbox"].get("awaiting_receipt", 0) == 0
                for s in statuses.values()
            ):
                break
            time.sleep(0.5)
        by_device = st.updates_by_device() if st else {}
        counted = {d: c["accepted"] for d, c in by_device.items() if c["accepted"]}
        recorded = {d: c["recorded"] for d, c in by_device.items()}
        devices = {}
        for n in names:
            s = statuses.get(n, {})
            ob = s.get("outbox", {})
            devices[n] = {
                "global_version": s.get("global_version"),
                "adapter": s.get("active_adapter"),
                "updates_sent": ob.get("acknowledged", 0) + ob.get("queued", 0),
                "updates_acknowledged": ob.get("acknowledged", 0),
                "updates_queued": ob.get("queued", 0),
                "updates_awaiting_receipt": ob.get("awaiting_receipt", 0),
                "updates_receipted": sum((ob.get("receipts") or {}).values()),
                "updates_counted": counted.get(n, 0),
                "updates_recorded": recorded.get(n, 0),
                "restarts": self.restarts.get(n, 0),
                "mixture": mixtures[names.index(n)],
                "intake": self.intake.get(n),
                "gate_decisions": list(reversed(s.get("gate_decisions", []))),
            }
        nothing_lost = all(
            d["updates_queued"] == 0 and d["updates_awaiting_receipt"] == 0 and d["updates_recorded"] >= d["updates_acknowledged"]
            for d in devices.values()
        )
        rounds_completed = (
            sum(1 for r in st.rounds() if r["status"] == "closed") if (st and o.mode == "sync") else (final_version or 0)
        )
        lat = [float(p["latency_ms"]) for p in probes if p.get("latency_ms") is not None]
        report = {
            "mode": o.mode,
            "strategy": o.strategy,
            "model": o.model,
            "bundle": str(bundle),
            "devices_count": o.devices,
            "rounds_requested": o.rounds,
            "rounds_completed": rounds_completed,
            "final_version": final_version,
            "metric": "held-out loss (nats/token)",
            "rounds": [evaluated[v] for v in sorted(evaluated)],
            "devices": devices,
            "probes": probes,
            "inference_latency_ms": {
                "p50": float(np.percentile(lat, 50)) if lat else None,
                "p99": float(np.percentile(lat, 99)) if lat else None,
                "answered": len(lat),
                "failed": len(probes) - len(lat),
            },
            "chaos": sorted(chaos_done) if o.chaos else False,
            "nothing_lost": nothing_lost,
            "coordinator_updates": st.update_counts() if st else {},
            "duration_s": time.time() - self.t0,
            "events": self.events,
        }
        j, h = write_report(self.out, report)
        self.log(f"report: {j} and {h}")
        return report
