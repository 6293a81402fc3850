"""Agent API overhead and serving-while-training (SmolLM2-135M int4 bundle).

1. The same completions (16 greedy tokens) through the agent's HTTP API vs calling the engine directly
   in the same process: p50 / p99 latency and tokens/s.
2. p99 latency while the trainer runs, vs idle.
3. Resident memory of the agent process while serving and training.
4. Memory of the real agent daemon (`edgefm-agent run`, its own process, HTTP client outside it) serving
   and training the demo's SmolLM2-135M bundle, for each device profile asked for: peak RSS while serving
   only, and while serving and training a full session, against the profile's memory budget.
Usage: python bench/api_latency.py [--requests 30] [--profiles rpi5,tiny] [--memory-only]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import peak_rss_mb, record  # noqa: E402
from bench.train_step import bundle  # noqa: E402

PROMPTS = ["The pump in hall B", "Maintenance log:", "Temperature report for", "The history of the lighthouse",
           "Sensor readings show", "Dear customer,"]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1000


def vm(pid: int, key: str) -> float:
    """VmRSS / VmHWM (peak) of a process, MB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def single_file_copy(bundle: Path, dst: Path) -> Path:
    """The bundle as exporters before revision 2 wrote it: each graph one file, weights inside (the
    baseline of the memory figure, measured in the same run)."""
    import shutil

    import onnx

    from edge_runtime.protocol.manifest import Manifest, hash_files

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("*.onnx.data", "*.onnx"))
    for g in ("model.onnx", "train.onnx"):
        if (bundle / g).is_file():
            onnx.save_model(onnx.load(str(bundle / g)), str(dst / g))
    m = Manifest.load(bundle)
    m.files = hash_files(dst, sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file() and p.name != "manifest.json"))
    m.save(dst)
    return dst


def agent_memory(profile: str, requests: int, tokens: int, *, single_file: bool = False) -> dict:
    """Run the agent daemon on the demo bundle for ``profile`` (offline, no auto-training), serve
    requests, then serve while it trains one full session; its peak RSS after each phase.
    ``single_file``: the same bundle with each graph in one file (how bundles were written before)."""
    import os
    import shutil
    import socket
    import subprocess

    from bench.common import PY, graph_mb
    from devices.data import module_docstrings
    from devices.fleet import cached_bundle
    from devices.profiles import load_profile

    prof = load_profile(profile)
    b = cached_bundle("smollm2", profile, train_batch=prof.export["train_batch"] if profile == "tiny" else 4, train_seq=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="edgefm-mem-"))
    if single_file:
        b = single_file_copy(b, tmp / "bundle")
    cmd = [PY, "-m", "edge_runtime.cli", "run", "--bundle", str(b), "--profile", profile, "--port", str(port),
           "--data-dir", str(tmp / "data"), "--no-auto-train"]
    log = open(tmp / "agent.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"agent exited: {(tmp / 'agent.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        texts = [t for t in module_docstrings(["json", "csv", "textwrap", "difflib", "heapq", "bisect", "string"]) if len(t) > 200]
        post(base + "/v1/examples", {"examples": [{"text": t} for t in texts[:200]]})
        started = vm(proc.pid, "VmRSS")
        for i in range(requests):
            post(base + "/v1/completions", {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0})
        serving = vm(proc.pid, "VmHWM")
        result: dict = {}
        th = threading.Thread(target=lambda: result.update(post(base + "/v1/train", {"wait": True})), daemon=True)
        th.start()
        served = 0
        while th.is_alive():  # a request a second: serving goes first, so back-to-back requests would stall training
            post(base + "/v1/completions", {"prompt": PROMPTS[served % len(PROMPTS)], "max_tokens": tokens, "temperature": 0})
            served += 1
            th.join(1.0)
        training = vm(proc.pid, "VmHWM")
        return {"profile": profile, "budget_mb": prof.memory_budget_bytes / 2**20, "ram_mb": prof.ram_mb, "started": started,
                "serving": serving, "training": training, "steps": result.get("steps", result.get("training_steps")),
                "served_while_training": served, "result": {k: v for k, v in result.items() if not isinstance(v, (dict, list))},
                "train_graph_mb": graph_mb(b / "train.onnx"), "model_mb": graph_mb(b / "model.onnx")}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if os.environ.get("EDGEFM_KEEP_BENCH"):
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def memory_section(profiles: list[str], tokens: int) -> None:
    rows = []
    runs = [(p, False) for p in profiles]
    if "rpi5" in profiles:  # the baseline: the same bundle as earlier exporters wrote it, measured alongside
        runs.insert(profiles.index("rpi5"), ("rpi5", True))
    for p, single in runs:
        label = f"{p}, graphs as single files (before)" if single else p
        try:
            r = agent_memory(p, 10, tokens, single_file=single)
        except RuntimeError as exc:  # e.g. the agent refuses a bundle its profile's budget cannot hold
            reason = str(exc).strip().splitlines()[-1][:300].replace("|", "/")
            rows.append(f"| {label} | | | | | refused at start: {reason} | |")
            continue
        print(json.dumps(r), file=sys.stderr)
        ok = "yes" if r["training"] <= r["budget_mb"] else "no"
        rows.append(f"| {label} ({r['ram_mb']} MB RAM) | {r['model_mb']:.0f} / {r['train_graph_mb']:.0f} MB | {r['started']:.0f} MB | "
                    f"{r['serving']:.0f} MB | {r['training']:.0f} MB | {r['budget_mb']:.0f} MB: {ok} | {r['served_while_training']} |")
    body = f"""The agent daemon as users run it (`edgefm-agent run --bundle B --profile P --no-auto-train`, offline), its own
process; the client outside it. The bundle is the demo's: SmolLM2-135M exported for the profile (training graph
batch x 64 tokens). 200 real-text examples are added, 10 completions of {tokens} tokens served, then one full
training session is run (`POST /v1/train {{"wait": true}}`: the profile's steps, the gate's evaluation) while
completions keep being served (one a second). Peak RSS = the process's VmHWM after each phase.

| profile | inference / training graph | RSS after start | peak serving | peak serving + training | within budget | completions during training |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + """

Goal (issue 14): the rpi5 bundle served and trained within 700 MB peak RSS; the tiny profile within its budget."""
    record("Agent memory: serving and training SmolLM2-135M (issue 14)", body,
           f"python bench/api_latency.py --memory-only --profiles {','.join(profiles)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--profiles", default="rpi5,tiny", help="device profiles whose demo bundle the daemon memory figure uses")
    ap.add_argument("--memory-only", action="store_true", help="only the daemon memory section")
    args = ap.parse_args()
    if args.profiles:
        memory_section(args.profiles.split(","), args.tokens)
    if args.memory_only:
        return
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.server import serve_in_thread
    b = bundle("int4")
    tmp = Path(tempfile.mkdtemp(prefix="edgefm-api-"))
    agent = Agent(AgentConfig(bundle=str(b), data_dir=str(tmp), port=18080, auto_train=False, threads_inference=2,
                              threads_training=1, steps_per_round=10_000, max_train_seconds=3600, min_new_examples=1))
    srv, _ = serve_in_thread(agent.api, "127.0.0.1", 18080)
    url = "http://127.0.0.1:18080/v1/completions"
    eng = agent.engine
    n = args.requests

    def direct(p):
        t = time.perf_counter()
        toks = list(eng.generate(eng.encode(p), max_new_tokens=args.tokens, stop_ids=set()))
        return time.perf_counter() - t, len(toks)

    def api(p):
        t = time.perf_counter()
        r = post(url, {"prompt": p, "max_tokens": args.tokens, "temperature": 0, "stop": []})
        return time.perf_counter() - t, r["usage"]["completion_tokens"]

    for p in PROMPTS[:2]:
        direct(p), api(p)  # warm-up
    # interleave so drift on this shared machine hits both alike
    d_lat, a_lat, d_tok, a_tok = [], [], 0, 0
    for i in range(n):
        p = PROMPTS[i % len(PROMPTS)]
        dt, k = direct(p)
        d_lat.append(dt)
        d_tok += k
        at, k = api(p)
        a_lat.append(at)
        a_tok += k
    # while training: a background session on the ONNX trainer (1 thread), requests meanwhile
    agent.api.add_examples([{"text": f"{p} number {i} reported normal operation and no alarms."} for i, p in enumerate(PROMPTS * 20)])
    th = threading.Thread(target=agent.train_once, kwargs={"forced": True}, daemon=True)
    th.start()
    t_wait = time.time()
    while agent.metrics.get("edgefm_training_steps_total") < 1 and time.time() - t_wait < 120:
        time.sleep(0.2)  # measure once training is really under way
    t_lat = []
    for i in range(n):
        t_lat.append(api(PROMPTS[i % len(PROMPTS)])[0])
    steps = agent.metrics.get("edgefm_training_steps_total")
    rss_now = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
    agent.cfg.steps_per_round = 0  # let the session end
    body = f"""SmolLM2-135M int4 bundle, {args.tokens} greedy tokens per request, {n} requests per series, 2 inference threads
(training: 1 thread), agent and client in one process (the API numbers include HTTP + JSON).

| series | p50 | p99 | tokens/s |
|---|---|---|---|
| engine called directly | {pct(d_lat, 50):.0f} ms | {pct(d_lat, 99):.0f} ms | {d_tok / sum(d_lat):.1f} |
| through the HTTP API | {pct(a_lat, 50):.0f} ms | {pct(a_lat, 99):.0f} ms | {a_tok / sum(a_lat):.1f} |
| API overhead | {(pct(a_lat, 50) / pct(d_lat, 50) - 1) * 100:+.1f}% | {(pct(a_lat, 99) / pct(d_lat, 99) - 1) * 100:+.1f}% | |
| through the API while training | {pct(t_lat, 50):.0f} ms | {pct(t_lat, 99):.0f} ms | |
| p99 while training / idle p99 | | {pct(t_lat, 99) / pct(a_lat, 99):.2f}x (goal <= 1.5x) | |

Agent process memory while serving and training: {rss_now:.0f} MB resident now, {peak_rss_mb():.0f} MB peak
(training steps completed during the series: {steps:.0f}).
Goals (issue 4): API p50/p99 and tokens/s within 15% of direct calls; p99 while training <= 1.5x idle p99.
"""
    srv.shutdown()
    record("Agent API latency and serving while training (issue 4)", body, f"python bench/api_latency.py --requests {n}")
    import os
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    os._exit(0)  # the training thread is a daemon mid-step; do not wait for it


if __name__ == "__main__":
    main()
