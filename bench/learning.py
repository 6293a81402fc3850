"""Learning quality: does federated LoRA get close to centralized training, beat local-only on unseen
domains, and avoid forgetting? Same data, same optimizer-step budget, one run, SmolLM2-135M int4 bundle.

Devices: one Python-stdlib docstring family each (strongly non-IID). Held-out: per family, plus a general
prose passage no device trains on (forgetting). Methods: base; local-only; FedAvg; FedAvg with int8+zstd
updates; SVD (exact B·A mean, LoRA-aware); centralized LoRA on the pooled data.
Usage: python bench/learning.py [--rounds 4] [--steps 4]
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, ROOT, record  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
FAMILIES = ["text", "files", "net", "concurrency"]
GENERAL = ("The lighthouse keeper climbed the narrow stairs every evening, counting the steps as his father had done before "
           "him. At the top he trimmed the wick, polished the great lens, and watched the weather come in from the west. "
           "Ships passed far out on the horizon, their lights small and steady, and he wrote each one into the logbook.")


def bundle() -> Path:
    """The same bundle the demo uses (rpi5 profile: int4, rank 8 q/v), batch 4 x 64 training graph."""
    from devices.fleet import cached_bundle
    return cached_bundle("smollm2", "rpi5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--heldout", type=int, default=8)
    args = ap.parse_args()
    from coordinator import aggregate as agg
    from coordinator.strategies import make_strategy
    from devices.data import stdlib_docstrings
    from edge_runtime.engine import Engine, stack_adapter, unstack_adapter
    from edge_runtime.optim import AdamWConfig, adamw_step, clip_by_global_norm
    from edge_runtime.protocol.adapter import load_adapter
    from edge_runtime.protocol.codec import CodecSpec, decode_payload, encode_payload
    from edge_runtime.trainer import OnnxTrainer
    b = bundle()
    eng = Engine(b, threads=2, verify=False)
    tr = OnnxTrainer(b, eng.manifest, eng.tokenizer, threads=2, optim=AdamWConfig(lr=args.lr))
    v0, meta = load_adapter(b / "adapter.safetensors")
    rng = random.Random(0)
    train, held = {}, {}
    for f in FAMILIES:
        docs = stdlib_docstrings(f)
        rng.shuffle(docs)
        held[f], train[f] = docs[:args.heldout], docs[args.heldout:]
    seq = tr.S

    def evaluate(tensors) -> dict[str, float]:
        act = eng.make_active(tensors, meta)
        out = {}
        for f, texts in list(held.items()) + [("general", [GENERAL])]:
            tot = cnt = 0.0
            for t in texts:
                s, c = eng.score(eng.encode(t)[:seq], act)
                tot, cnt = tot + s, cnt + c
            out[f] = tot / cnt
        return out

    def train_local(start, pool, steps, seed):
        """k AdamW steps from ``start`` on batches sampled from ``pool``."""
        r = random.Random(seed)
        p = stack_adapter(start, tr.targets, tr.layers)
        m = {k: np.zeros_like(x) for k, x in p.items()}
        v = {k: np.zeros_like(x) for k, x in p.items()}
        for step in range(1, steps + 1):
            batch = tr.make_batch([{"text": r.choice(pool)} for _ in range(tr.B)])
            _, g = tr.loss_and_grads(p, batch)
            g, _ = clip_by_global_norm(g, 1.0)
            p, m, v, _ = adamw_step(p, g, m, v, step, tr.optim)
        return unstack_adapter(p, tr.targets)

    R, K, N = args.rounds, args.steps, len(FAMILIES)
    results = {"base": evaluate(v0)}
    print("base", results["base"], flush=True)
    # local-only: each device R*K steps on its own family; metrics averaged over devices
    local = {f: train_local(v0, train[f], R * K, i) for i, f in enumerate(FAMILIES)}
    local_eval = {f: evaluate(t) for f, t in local.items()}
    results["local-only"] = {d: float(np.mean([local_eval[f][d] for f in FAMILIES])) for d in FAMILIES + ["general"]}
    results["local-only (own domain)"] = {f: local_eval[f][f] for f in FAMILIES}
    results["local-only (unseen domains)"] = {d: float(np.mean([local_eval[f][d] for f in FAMILIES if f != d])) for d in FAMILIES}
    print("local", results["local-only"], flush=True)
    bytes_round = {}

    def federated(strategy: str, codec: CodecSpec):
        s = make_strategy(strategy, rank=int(meta.rank))
        g = v0
        for r in range(R):
            acc = s.begin(g)
            for i, f in enumerate(FAMILIES):
                loc = train_local(g, train[f], K, 100 * r + i)
                delta = {k: loc[k] - g[k] for k in g}
                wire = encode_payload(delta, codec)
                bytes_round[(strategy, codec.dtype, codec.compression)] = len(wire)
                delta = decode_payload(wire, codec, max_decoded_bytes=1 << 30)
                s.fold(acc, float(len(train[f])), delta, g)
            g = s.finish(acc, g)
        return evaluate(g)

    results["FedAvg (fp32 updates)"] = federated("fedavg", CodecSpec("fp32", "none"))
    print("fedavg", results["FedAvg (fp32 updates)"], flush=True)
    results["FedAvg (int8+zstd updates)"] = federated("fedavg", CodecSpec("int8", "zstd"))
    results["FedAvg (int4+zstd updates)"] = federated("fedavg", CodecSpec("int4", "zstd"))
    results["SVD of B·A (LoRA-aware)"] = federated("svd", CodecSpec("fp16", "zstd"))
    pooled = [t for f in FAMILIES for t in train[f]]
    results["centralized (pooled data)"] = evaluate(train_local(v0, pooled, R * K * N, 7))
    print("central", results["centralized (pooled data)"], flush=True)
    base = results["base"]
    cent = results["centralized (pooled data)"]
    gain = lambda res: float(np.mean([base[d] - res[d] for d in FAMILIES]))  # noqa: E731
    rows = []
    for name, res in results.items():
        doms = " | ".join(f"{res[d]:.3f}" if d in res else "" for d in FAMILIES)
        gen = f"{np.exp(res['general']):.2f} ({np.exp(res['general'] - base['general']) - 1:+.1%})" if "general" in res else ""
        frac = f"{gain(res) / gain(cent):.0%}" if "general" in res and gain(cent) > 0 else ""
        rows.append(f"| {name} | {doms} | {gen} | {frac} |")
    full = bytes_round[("fedavg", "fp32", "none")]
    ref = results["FedAvg (fp32 updates)"]
    codec_rows = []
    for dt in ("int8", "int4"):
        size = bytes_round[("fedavg", dt, "zstd")]
        res = results[f"FedAvg ({dt}+zstd updates)"]
        loss = float(np.mean([abs(res[d] - ref[d]) / ref[d] for d in FAMILIES]))
        codec_rows.append(f"| {dt} + zstd | {size / 1e6:.3f} MB | {full / size:.1f}x | {loss:.2%} |")
    body = f"""SmolLM2-135M rpi5-profile bundle (int4 inference, 8-bit frozen base in train.onnx, batch 4 x 64 tokens, LoRA rank 8 q/v), {N} devices,
one stdlib docstring family each, {R} rounds x {K} local steps (local-only: {R * K} steps per device; centralized:
{R * K * N} steps on the pooled data), AdamW lr {args.lr}. Cells: held-out loss (nats/token, lower is better) per
family; general-text perplexity (forgetting) and its change from the base; share of the centralized improvement.

| method | {' | '.join(FAMILIES)} | general-text ppl (vs base) | of centralized gain |
|---|{'---|' * len(FAMILIES)}---|---|
""" + "\n".join(rows) + f"""

Bytes uploaded per device per round (the delta of a rank-8 q/v adapter, 460,800 parameters):

| update codec | bytes | fewer than fp32 | held-out loss change vs fp32 updates (relative, mean of families) |
|---|---|---|---|
| fp32 | {full / 1e6:.3f} MB | 1.0x | 0 |
""" + "\n".join(codec_rows) + f"""

Goals (issue 6): federated >= 90% of the centralized gain and better than local-only on unseen domains; general
perplexity +5% at most; compressed codec >= 8x fewer bytes at <= 1% relative metric loss."""
    record("Federated learning quality (issue 6)", body, f"python bench/learning.py --rounds {R} --steps {K} --lr {args.lr}")


if __name__ == "__main__":
    main()
