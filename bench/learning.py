"""Learning through the real product: does federated LoRA across real agents get close to centralized
training, improve every device's domain, beat local-only on unseen domains, and avoid forgetting?

Every number comes from the programs users run: a Mosquitto broker, `edgefm-coordinator serve` (sync
FedAvg) and `edgefm-agent run` processes fed through `POST /v1/examples` and trained by round
announcements or `POST /v1/train {"wait": true}`; the final global adapter is taken with
`edgefm-coordinator export`, local and centralized results from each agent's `/v1/adapters`.
Agents run with their default training settings (learning rate, steps, replay, gate).

Per task (four real-text domains, one per device; strongly non-IID) and seed:
- federated: 4 agents + coordinator, R sync rounds;
- local-only: 4 agents, no broker, R sessions each (what each device serves at the end);
- centralized: one agent given every device's examples, R sessions with the same total optimizer steps
  as the federated run (read from the agents' /metrics).
Evaluation (in this process, with the bundle's engine): held-out loss per domain on texts no agent was
sent, and perplexity on general text no agent trains on (Debian's license texts: forgetting).

Usage: python bench/learning.py [--tasks stdlib,sympy] [--seeds 0,1,2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, ROOT, record  # noqa: E402
from devices.fleet import http_json  # noqa: E402

DEVICES = 4
AGENT_SETTINGS: dict = {}   # --agent: settings to try instead of the agent's defaults


def task_domains(task: str) -> dict[str, list[str]]:
    """Texts per domain of one task."""
    from devices import data
    if task == "stdlib":
        return {f: data.stdlib_docstrings(f) for f in ("text", "files", "net", "concurrency")}
    if task == "sympy":
        return {f: data.module_docstrings(mods) for f, mods in data.SYMPY_FAMILIES.items()}
    raise SystemExit(f"unknown task {task!r}: stdlib | sympy")


def general_texts(n: int = 16) -> list[str]:
    """General English no agent trains on: paragraphs of the license texts every Debian system ships."""
    paras = []
    for name in ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-3", "Artistic"):
        p = Path("/usr/share/common-licenses") / name
        if p.is_file():
            paras += [" ".join(x.split()) for x in p.read_text(errors="replace").split("\n\n") if len(" ".join(x.split())) > 300]
    if len(paras) < n:
        raise SystemExit("need /usr/share/common-licenses (Debian's base-files) for the general-text set")
    random.Random(0).shuffle(paras)
    return [x[:600] for x in paras[:n]]


def split_task(domains: dict[str, list[str]], seed: int, per_device: int, heldout: int):
    """Per domain: texts to send to that domain's device, and texts kept for evaluation only."""
    rng = random.Random(seed)
    send, held = {}, {}
    for d, texts in domains.items():
        t = sorted(texts)
        rng.shuffle(t)
        held[d], send[d] = t[:heldout], t[heldout:heldout + per_device]
    return send, held


# ---------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Child processes of one run; all are stopped on exit."""

    def __init__(self, work: Path):
        self.work, self.procs = work, []
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.work / "logs" / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(p)
        return p

    def agent(self, name: str, bundle: Path, broker: str | None, fleet: str, **settings) -> str:
        port = free_port()
        ddir = self.work / name
        ddir.mkdir(parents=True, exist_ok=True)
        conf = {"threads_inference": 1, "threads_training": 1, "max_train_seconds": 3600, "auto_train": False, **AGENT_SETTINGS, **settings}
        (ddir / "agent.toml").write_text("".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
                                                 for k, v in conf.items()))
        cmd = [PY, "-m", "edge_runtime.cli", "run", "--bundle", str(bundle), "--device-id", name, "--fleet", fleet,
               "--data-dir", str(ddir), "--port", str(port), "--config", str(ddir / "agent.toml")]
        p = self.spawn(name, cmd + (["--broker", broker] if broker else []))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.work / 'logs' / (name + '.log')}")
            try:
                http_json(url + "/healthz", timeout=2)
                return url
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"{name} did not start") from None
                time.sleep(0.3)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def steps_run(url: str) -> int:
    """Optimizer steps an agent has run (its /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        metrics = r.read().decode()
    for line in metrics.splitlines():
        if line.startswith("edgefm_training_steps_total"):
            return int(float(line.split()[-1]))
    return 0


def served_adapter(url: str) -> Path:
    """The adapter file an agent serves now."""
    res = http_json(url + "/v1/adapters")
    return Path(next(a["path"] for a in res["adapters"] if a["id"] == res["active"]))


def latest_candidate(url: str) -> Path:
    """The newest local training result of an agent, whether its gate let it serve or not."""
    res = http_json(url + "/v1/adapters")
    return Path(next(a["path"] for a in res["adapters"] if a["id"].startswith("local-")))


def send(url: str, texts: list[str]) -> dict:
    return http_json(url + "/v1/examples", {"examples": [{"text": t} for t in texts]})


# ---------------------------------------------------------------------------- runs
def run_federated(bundle: Path, send_by_dom: dict, rounds: int, work: Path, coordinator_settings: dict | None = None) -> dict:
    """Broker + coordinator + one agent per domain; returns the final global adapter and what the agents did."""
    from coordinator.broker import EmbeddedBroker
    broker = EmbeddedBroker(work / "broker").start()
    procs = Procs(work)
    try:
        urls = {d: procs.agent(f"fed-{d}", bundle, broker.url, "bench") for d in send_by_dom}
        intake = {d: send(urls[d], texts) for d, texts in send_by_dom.items()}
        state = work / "coordinator"
        conf = work / "coordinator.toml"
        conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in (coordinator_settings or {}).items()))
        coord = procs.spawn("coordinator", [PY, "-m", "coordinator.cli", "--state-dir", str(state), "serve", "--bundle", str(bundle),
                                            "--config", str(conf),
                                            "--broker", broker.url, "--fleet", "bench", "--mode", "sync",
                                            "--rounds", str(rounds), "--min-updates", str(len(urls)), "--round-timeout", "3600"])
        t0 = time.time()
        while coord.poll() is None:
            if time.time() - t0 > 7200:
                raise RuntimeError("federated run did not finish in 2 h")
            time.sleep(2)
        if coord.returncode != 0:
            raise RuntimeError(f"coordinator failed; see {work / 'logs' / 'coordinator.log'}")
        out = work / "global.safetensors"
        subprocess.run([PY, "-m", "coordinator.cli", "--state-dir", str(state), "export", "--version", str(rounds), "-o", str(out)],
                       check=True, capture_output=True)
        # every agent takes the final global in (its gate decides whether it serves)
        deadline = time.time() + 600
        while any(http_json(u + "/v1/status")["global_version"] < rounds for u in urls.values()):
            if time.time() > deadline:
                raise RuntimeError("agents did not receive the final global")
            time.sleep(1)
        time.sleep(2)
        status = {d: http_json(u + "/v1/status") for d, u in urls.items()}
        clog = (work / "logs" / "coordinator.log").read_text(errors="replace")
        return {"bounded_updates": clog.count(" bounded: "), "global": out, "steps": {d: steps_run(u) for d, u in urls.items()}, "intake": intake,
                "coverage": {d: s["training_coverage"] for d, s in status.items()},
                "disconnects": {d: s["broker_disconnects"] for d, s in status.items()},
                "gate": {d: [(g["kind"], g["candidate"], g["reason"]) for g in reversed(s["gate_decisions"])] for d, s in status.items()},
                "served": {d: s["active_adapter"] for d, s in status.items()}, "seconds": time.time() - t0}
    finally:
        procs.stop()
        broker.stop()


def run_local_and_central(bundle: Path, send_by_dom: dict, rounds: int, central_steps: int, work: Path) -> dict:
    """Local-only agents (R sessions each) and one centralized agent (pooled data, same total steps), side by side."""
    procs = Procs(work)
    try:
        per_session = -(-central_steps // rounds)
        urls = {d: procs.agent(f"local-{d}", bundle, None, "bench-local") for d in send_by_dom}
        central = procs.agent("central", bundle, None, "bench-central", steps_per_round=per_session, max_steps_per_session=per_session)
        for d, texts in send_by_dom.items():
            send(urls[d], texts)
            send(central, texts)
        import concurrent.futures as cf

        def sessions(url):
            return [http_json(url + "/v1/train", {"wait": True}, timeout=3600) for _ in range(rounds)]
        with cf.ThreadPoolExecutor(len(urls) + 1) as ex:
            futs = {d: ex.submit(sessions, u) for d, u in {**urls, "central": central}.items()}
            results = {d: f.result() for d, f in futs.items()}
        for d, res in results.items():
            bad = [r for r in res if r.get("status") != "trained"]
            if bad:
                raise RuntimeError(f"{d}: session did not train: {bad[0]}")
        status = {d: http_json(u + "/v1/status") for d, u in {**urls, "central": central}.items()}
        # centralized is the reference for what training achieves: its result, whatever its own gate said
        return {"local": {d: served_adapter(u) for d, u in urls.items()}, "central": latest_candidate(central),
                "local_last": {d: latest_candidate(u) for d, u in urls.items()},
                "central_steps": steps_run(central), "local_steps": {d: steps_run(u) for d, u in urls.items()},
                "local_coverage": {d: s["training_coverage"] for d, s in status.items()},
                "local_gate": {d: [(g["kind"], g["candidate"], g["reason"]) for g in reversed(s["gate_decisions"])] for d, s in status.items()}}
    finally:
        procs.stop()


# ---------------------------------------------------------------------------- evaluation
class Evaluator:
    def __init__(self, bundle: Path, held: dict[str, list[str]], general: list[str]):
        from edge_runtime.engine import Engine
        from edge_runtime.protocol.adapter import load_adapter
        self.eng = Engine(bundle, threads=2, verify=False)
        self.load = load_adapter
        self.seq = int(self.eng.manifest.training.seq)
        from edge_runtime.gate import anchor_texts
        self.sets = {**held, "general": general, "everyday": anchor_texts()}

    def __call__(self, path: Path) -> dict[str, float]:
        tensors, meta = self.load(path)
        act = self.eng.make_active(tensors, meta)
        out = {}
        for name, texts in self.sets.items():
            tot = cnt = 0.0
            for t in texts:
                s, c = self.eng.score(self.eng.encode(t)[:self.seq], act)
                tot, cnt = tot + s, cnt + c
            out[name] = tot / cnt
        return out


def one_run(bundle: Path, task: str, seed: int, args, work: Path) -> dict:
    send_by_dom, held = split_task(task_domains(task), seed, args.per_device, args.heldout)
    ev = Evaluator(bundle, held, general_texts())
    doms = list(send_by_dom)
    t0 = time.time()
    fed = run_federated(bundle, send_by_dom, args.rounds, work / "fed", json.loads(args.coordinator) if args.coordinator else None)
    if args.federated_only:  # coordinator settings tried: the federated run alone (--append: merged into the saved run)
        part = {"task": task, "seed": seed, "base": ev(bundle / "adapter.safetensors"), "federated": ev(fed["global"]),
                "fed_steps": fed["steps"], "fed_served": fed["served"], "fed_gate": fed["gate"], "disconnects": fed["disconnects"],
                "bounded_updates": fed["bounded_updates"], "intake": fed["intake"],
                "fed_never_used": {d: c["never_used"] for d, c in fed["coverage"].items()}, "seconds": time.time() - t0}
        print(json.dumps({k: v for k, v in part.items() if k != "fed_gate"}, default=str), flush=True)
        return part
    total_steps = sum(fed["steps"].values())
    lc = run_local_and_central(bundle, send_by_dom, args.rounds, total_steps, work / "local")
    res = {"base": ev(bundle / "adapter.safetensors"), "federated": ev(fed["global"]), "centralized": ev(lc["central"])}
    local = {d: ev(p) for d, p in lc["local"].items()}
    res["local-only"] = {k: float(np.mean([local[d][k] for d in doms])) for k in doms + ["general", "everyday"]}
    last = {d: ev(p) for d, p in lc["local_last"].items()}
    res["local-only (last result, served or not)"] = {k: float(np.mean([last[d][k] for d in doms])) for k in doms + ["general", "everyday"]}
    res["local-only (own domain)"] = {d: local[d][d] for d in doms}
    res["local-only (unseen domains)"] = {k: float(np.mean([local[d][k] for d in doms if d != k])) for k in doms}
    never_used = {d: c["never_used"] for d, c in {**fed["coverage"], **{f"local-{k}": v for k, v in lc["local_coverage"].items()}}.items()}
    run = {"task": task, "seed": seed, "domains": doms, "results": res, "fed_steps": fed["steps"], "central_steps": lc["central_steps"],
           "local_steps": lc["local_steps"], "never_used": never_used, "fed_gate": fed["gate"], "local_gate": lc["local_gate"],
           "fed_served": fed["served"], "disconnects": fed["disconnects"], "bounded_updates": fed["bounded_updates"], "intake": fed["intake"], "seconds": time.time() - t0}
    print(json.dumps({k: v for k, v in run.items() if k not in ("fed_gate", "local_gate")}, default=str), flush=True)
    return run


def summarize(runs: list[dict], args) -> str:
    def gain(r, name):
        b = r["results"]["base"]
        return float(np.mean([b[d] - r["results"][name][d] for d in r["domains"]]))

    def share(r, name):
        c = gain(r, "centralized")
        return gain(r, name) / c if c > 0 else float("nan")

    def ppl_change(r, name, key="general"):
        return float(np.exp(r["results"][name][key] - r["results"]["base"][key]) - 1)

    def ms(xs, fmt):
        xs = np.array(xs, float)
        return f"{fmt(xs.mean())} ± {fmt(xs.std()).lstrip('+')}" if len(xs) > 1 else fmt(xs.mean())

    pct = lambda x: f"{x:.0%}"  # noqa: E731
    pp = lambda x: f"{x:+.1%}"  # noqa: E731
    f3 = lambda x: f"{x:.3f}"  # noqa: E731
    lines = []
    order = args.tasks.split(",")
    for task in sorted(dict.fromkeys(r["task"] for r in runs), key=lambda t: (t not in order, order.index(t) if t in order else t)):
        rs = [r for r in runs if r["task"] == task]
        doms = rs[0]["domains"]
        lines += [f"### Task `{task}` (domains: {', '.join(doms)}; seeds {', '.join(str(r['seed']) for r in rs)})", "",
                  "Held-out loss per domain (nats/token, mean ± spread over seeds; lower is better), general-text perplexity "
                  "change from the base model, share of the centralized gain.", "",
                  f"| method | {' | '.join(doms)} | general ppl vs base (license texts) | everyday-prose ppl vs base (the agents' anchor) "
                  f"| of centralized gain |", f"|---|{'---|' * len(doms)}---|---|---|"]
        for name in ("base", "local-only", "local-only (own domain)", "local-only (unseen domains)",
                     "local-only (last result, served or not)", "federated", "centralized"):
            cells = [ms([r["results"][name][d] for r in rs], f3) for d in doms]
            gen = ms([ppl_change(r, name) for r in rs], pp) if "general" in rs[0]["results"][name] else ""
            gen += " | " + (ms([ppl_change(r, name, "everyday") for r in rs], pp) if "everyday" in rs[0]["results"][name] else "")
            frac = ms([share(r, name) for r in rs], pct) if "general" in rs[0]["results"][name] else ""
            lines.append(f"| {name} | {' | '.join(cells)} | {gen} | {frac} |")
        fed_frac = [share(r, "federated") for r in rs]
        improved = all(r["results"]["federated"][d] < r["results"]["base"][d] for r in rs for d in doms)
        unseen = [np.mean([r["results"]["federated"][d] - r["results"]["local-only (unseen domains)"][d] for d in doms]) for r in rs]
        never = sum(sum(r["never_used"].values()) for r in rs)
        lines += ["", f"- federated share of the centralized gain: {ms(fed_frac, pct)} (goal >= 90%)",
                  f"- federated improves every domain over the base model in every seed: {'yes' if improved else 'no'}",
                  f"- federated minus local-only on unseen domains (loss; negative = federated better): {ms(unseen, lambda x: f'{x:+.3f}')}",
                  f"- general-text perplexity (license texts / everyday prose): federated {ms([ppl_change(r, 'federated') for r in rs], pp)}"
                  f" / {ms([ppl_change(r, 'federated', 'everyday') for r in rs], pp)}, local-only as served "
                  f"{ms([ppl_change(r, 'local-only') for r in rs], pp)} / {ms([ppl_change(r, 'local-only', 'everyday') for r in rs], pp)}, "
                  f"centralized {ms([ppl_change(r, 'centralized') for r in rs], pp)} / "
                  f"{ms([ppl_change(r, 'centralized', 'everyday') for r in rs], pp)} (goal <= +5%)",
                  f"- training examples never used by the end of a run (all agents, all seeds): {never} (goal 0)",
                  f"- optimizer steps: federated {ms([sum(r['fed_steps'].values()) for r in rs], lambda x: f'{x:.0f}')} in total "
                  f"(per device {', '.join(str(v) for v in rs[0]['fed_steps'].values())} in seed {rs[0]['seed']}), centralized "
                  f"{ms([r['central_steps'] for r in rs], lambda x: f'{x:.0f}')}",
                  "- what the federated devices serve at the end (their gates decide): "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(collections.Counter(
                      a.split("-")[0] if a != "bundle" else "base (bundle)" for r in rs for a in r["fed_served"].values()).items()))
                  + f" of {sum(len(r['fed_served']) for r in rs)} device-runs",
                  f"- MQTT disconnects of the agents during the federated runs: {sum(sum(r['disconnects'].values()) for r in rs)}",
                  "- updates the coordinator's influence bounds cut (weight or norm), of all federated updates: "
                  + (f"{sum(r['bounded_updates'] for r in rs if 'bounded_updates' in r)} of "
                     f"{sum(len(r['fed_steps']) * args.rounds for r in rs if 'bounded_updates' in r)}"
                     + (f" (runs from before the bounds not counted: {sum('bounded_updates' not in r for r in rs)})"
                        if any('bounded_updates' not in r for r in rs) else "")),
                  f"- gate (seed {rs[0]['seed']}): federated agents serve "
                  + ", ".join(f"{d}: {s}" for d, s in rs[0]["fed_served"].items())
                  + "; decisions: " + "; ".join(f"{d}: " + ", ".join(f"{c} {why}" for _, c, why in g) for d, g in rs[0]["fed_gate"].items()),
                  f"- gate (seed {rs[0]['seed']}), local-only agents: " + "; ".join(
                      f"{d}: " + ", ".join(f"{c} {why}" for _, c, why in g) for d, g in rs[0]["local_gate"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="stdlib,sympy")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-device", type=int, default=48, help="examples sent to each device (the agent holds ~10%% back)")
    ap.add_argument("--heldout", type=int, default=16, help="evaluation texts per domain (never sent to an agent)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--agent", default=None, help="JSON of agent settings to try (default: the agent's defaults)")
    ap.add_argument("--coordinator", default=None, help="JSON of coordinator settings (default: the coordinator's defaults)")
    ap.add_argument("--federated-only", action="store_true", help="only the federated run, no table (for trying settings)")
    ap.add_argument("--append", action="store_true", help="add these runs to the saved ones (same task and seed: replaced)")
    ap.add_argument("--render", action="store_true", help="rewrite the table from the runs saved by the last run (.cache/bench)")
    args = ap.parse_args()
    AGENT_SETTINGS.update(json.loads(args.agent) if args.agent else {})
    plan = [(task, int(seed)) for seed in args.seeds.split(",") for task in args.tasks.split(",")]
    if args.render:
        write_results(json.loads((ROOT / ".cache" / "bench" / "learning-runs.json").read_text()), len(plan), args)
        return
    from devices.fleet import cached_bundle
    bundle = cached_bundle("smollm2", "rpi5")
    saved = ROOT / ".cache" / "bench" / "learning-runs.json"
    saved_runs = json.loads(saved.read_text()) if args.append and saved.is_file() else []
    runs = [r for r in saved_runs if (r["task"], r["seed"]) not in set(plan)]
    # seed-major order (plan above): a run cut short still has every task
    for task, seed in plan:
        work = Path(tempfile.mkdtemp(prefix="edgefm-bench-learning-"))
        try:
            run = one_run(bundle, task, seed, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if args.federated_only:
            if not args.append:
                continue
            # the coordinator's settings change only the federated run: merged into the saved run of the same task
            # and seed (its local-only and centralized runs use no coordinator)
            old = next((r for r in saved_runs if (r["task"], r["seed"]) == (task, seed)), None)
            if old is None:
                raise SystemExit(f"--federated-only --append: no saved run for {task} seed {seed} to merge into")
            run = {**old, "results": {**old["results"], "federated": run["federated"]},
                   "never_used": {**{d: n for d, n in old["never_used"].items() if d.startswith("local-")}, **run["fed_never_used"]},
                   **{k: run[k] for k in ("fed_steps", "fed_served", "fed_gate", "disconnects", "bounded_updates", "intake")},
                   "federated_redone": {"coordinator": args.coordinator, "date": time.strftime("%Y-%m-%dT%H:%M")}}
        runs.append(run)
        write_results(runs, len(plan), args)   # after every run: a cut-off session still leaves what was measured


def write_results(runs: list[dict], planned: int, args) -> None:
    """The learning table (BENCHMARKS.md unless --no-record) and the raw runs (.cache/bench/learning-runs.json)."""
    from edge_runtime.config import LEARNING_RATE, PROX_MU, AgentConfig
    d = AgentConfig(bundle="x")
    settings = ", ".join(f"{k} {v}" for k, v in AGENT_SETTINGS.items()) or (
        f"lr {LEARNING_RATE}, prox_mu {PROX_MU}, steps per session {d.steps_per_round} (more while new data remains, up to "
        f"{d.max_steps_per_session}), replay {d.replay_fraction}")
    body = (f"SmolLM2-135M-Instruct, rpi5-profile bundle (int4 inference, 8-bit frozen base in train.onnx, batch 4 x 64 tokens, "
            f"LoRA rank 8 on q/v). {DEVICES} agents, one domain each (strongly non-IID), {args.per_device} examples sent to each "
            f"through `POST /v1/examples`, {args.rounds} sync FedAvg rounds through Mosquitto and `edgefm-coordinator serve`"
            f"{' (' + args.coordinator + ')' if args.coordinator else ''}. Agent settings: {settings}. Local-only: the same "
            f"agents without a broker, {args.rounds} `train-now` sessions each, evaluated on what each serves. Centralized: one "
            f"agent with every device's examples and the federated run's total optimizer steps, evaluated on its last result. "
            f"Evaluation: {args.heldout} texts per domain never sent to an agent; general text: Debian license paragraphs "
            f"(no agent trains on them)."
            + (f" **Partial: {len(runs)} of {planned} runs.**" if len(runs) < planned else "") + "\n\n" + summarize(runs, args))
    out = ROOT / ".cache" / "bench" / "learning-runs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=1, default=str))
    if args.no_record:
        print(body, flush=True)
    else:
        record("Federated learning through real agents (issue 11)", body,
               f"python bench/learning.py --tasks {args.tasks} --seeds {args.seeds} --rounds {args.rounds}"
               + (f" --agent '{args.agent}'" if args.agent else "") + (f" --coordinator '{args.coordinator}'" if args.coordinator else ""))


if __name__ == "__main__":
    main()
