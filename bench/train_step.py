"""One LoRA training step on SmolLM2-135M (batch 8 x seq 128, rank 8 on q/v): edgefm's ONNX training graph
(stock onnxruntime + numpy AdamW) vs torch eager + PEFT, each in its own process, same machine, same run.
Usage: python bench/train_step.py [--steps 3] [--rounds 2] [--schemes int4,int4-mb2,int4-mb2-keep]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, ROOT, cached_bundle_ok, graph_mb, peak_rss_mb, record, run_json  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
B, S = 8, 128


def variant(name: str) -> tuple[str, int | None, bool, bool]:
    """``int4``, ``int4-mb2`` (graph of 2 rows, 4 calls a step), ``int4-pure`` (no native kernels),
    ``int4-keep`` (activations kept, not recomputed): (quantization, training microbatch, native kernels,
    recompute)."""
    parts = name.split("-")
    micro = next((int(p[2:]) for p in parts[1:] if p.startswith("mb")), None)
    return parts[0], micro, "pure" not in parts[1:], "keep" not in parts[1:]


def bundle(name: str) -> Path:
    scheme, micro, _, recompute = variant(name)
    out = CACHE / f"smollm2-{scheme}{f'-mb{micro}' if micro else ''}{'' if recompute else '-keep'}-train"
    if not cached_bundle_ok(out):
        CACHE.mkdir(parents=True, exist_ok=True)
        extra = ["--train-microbatch", str(micro)] if micro else []
        extra += [] if recompute else ["--no-train-recompute"]
        subprocess.run([PY, "-m", "export.cli", "build", "smollm2", "-o", str(out), "--quant", scheme, "--train-batch", str(B),
                        "--train-seq", str(S), "--no-verify", *extra], check=True)
    return out


def batch(vocab: int):
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, (B, S)).astype(np.int64)


def child_torch(steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from export.source import resolve
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(resolve("smollm2", log=lambda *_: None), dtype=torch.float32,
                                                 attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.from_numpy(batch(model.config.vocab_size))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return {"steps_s": times[1:], "peak_rss_mb": peak_rss_mb(), "loss": float(loss)}


def child_onnx(scheme: str, steps: int) -> dict:
    from edge_runtime.protocol.adapter import stack_adapter
    from edge_runtime.optim import AdamWConfig, adamw_step, clip_by_global_norm
    from edge_runtime.protocol.adapter import load_adapter
    from edge_runtime.protocol.manifest import Manifest
    from edge_runtime.trainer import OnnxTrainer
    from tokenizers import Tokenizer
    b = bundle(scheme)
    m = Manifest.load(b)
    tr = OnnxTrainer(b, m, Tokenizer.from_file(str(b / "tokenizer" / "tokenizer.json")), threads=2, native=variant(scheme)[2])
    tensors, _ = load_adapter(b / "adapter.safetensors")
    params = stack_adapter(tensors, tr.targets, tr.layers)
    mom = {k: np.zeros_like(v) for k, v in params.items()}
    vel = {k: np.zeros_like(v) for k, v in params.items()}
    ids = batch(int(m.model["vocab"]))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}
    cfg = AdamWConfig(lr=2e-4)
    times = []
    for step in range(1, steps + 2):
        t = time.perf_counter()
        loss, grads = tr.loss_and_grads(params, feeds)
        grads, _ = clip_by_global_norm(grads, 1.0)
        params, mom, vel, _ = adamw_step(params, grads, mom, vel, step, cfg)
        times.append(time.perf_counter() - t)
    return {"steps_s": times[1:], "peak_rss_mb": peak_rss_mb(), "loss": loss,
            "train_graph_mb": graph_mb(b / "train.onnx"), "native": tr.native, "microbatch": tr.microbatch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds: each runs every variant once")
    ap.add_argument("--schemes", default="int4")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_torch(args.steps) if args.child == "torch" else child_onnx(args.child, args.steps)))
        return
    schemes = args.schemes.split(",")
    for s in schemes:
        bundle(s)
    # rounds interleave the variants (this machine's speed drifts by 2x over minutes): each round runs
    # every variant's process once, in turn; a variant's step time is the median of all its rounds' steps
    res: dict[str, dict] = {}
    for _ in range(args.rounds):
        for s in ["torch", *schemes]:
            out = run_json([PY, __file__, "--child", s, "--steps", str(args.steps)])
            if s in res:
                res[s]["steps_s"] += out["steps_s"]
                res[s]["peak_rss_mb"] = max(res[s]["peak_rss_mb"], out["peak_rss_mb"])
            else:
                res[s] = out
    for r in res.values():
        r["step_s"] = float(np.median(r["steps_s"]))
        r["best_s"] = float(np.min(r["steps_s"]))
    t = res["torch"]
    rows = [f"| torch eager + PEFT (fp32 base) | {t['step_s']:.2f} s ({t['best_s']:.2f} s) | 1.00x (1.00x) | {t['peak_rss_mb']:.0f} MB | 1.00 | {t['loss']:.3f} |"]
    for s in schemes:
        r = res[s]
        how = f"{'native Q8 kernels' if r['native'] else 'onnxruntime alone'}, graph of {r['microbatch']} rows"
        how += "" if variant(s)[3] else ", activations kept (no recomputation)"
        rows.append(f"| edgefm train.onnx ({s}: {variant(s)[0]} bundle, 8-bit frozen base once, {how}, {r['train_graph_mb']:.0f} MB "
                    f"graph) | {r['step_s']:.2f} s ({r['best_s']:.2f} s) | "
                    f"{t['step_s'] / r['step_s']:.2f}x ({t['best_s'] / r['best_s']:.2f}x) | {r['peak_rss_mb']:.0f} MB | "
                    f"{r['peak_rss_mb'] / t['peak_rss_mb']:.2f} | {r['loss']:.3f} |")
    body = f"""One optimizer step (forward, backward, clipping, AdamW), batch {B} x sequence {S}, LoRA rank 8 on q_proj/v_proj,
2 threads, {args.steps} steps after one warm-up, each variant in its own process (peak RSS of that process), {args.rounds}
interleaved rounds (each runs every variant once, in turn): step time as median (best) over all rounds' steps.

| variant | step time, median (best) | speed vs torch, median (best) | peak RSS | memory vs torch | loss |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n\nGoal (issue 3): at least as fast as torch + PEFT, with peak memory at most half of it."
    record("SmolLM2-135M training step (issue 3)", body, f"python bench/train_step.py --steps {args.steps} --rounds {args.rounds} --schemes {args.schemes}")


if __name__ == "__main__":
    main()
