"""SmolLM2-135M decode: torch eager fp32 `generate` vs edgefm ONNX bundles (fp32/int8/int4), one run.

Batch 1, 2 threads, greedy, KV cache, 64 new tokens. Reports decode tokens/s, time to first token,
peak RSS (each variant in its own process), perplexity on the held-out text, and the int4 bundle
against the memory-bandwidth roofline (bandwidth measured in this run / weight bytes read per token).
Usage: python bench/decode.py [--tokens 64] [--variants torch,fp32,int8,int4]
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
from bench.common import PY, ROOT, cached_bundle_ok, peak_rss_mb, record, run_json  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
REPEATS = 7  # best of N: on this shared machine a run of 3 can miss every quiet moment
PROMPT = "The history of the lighthouse begins with the ancient harbours of the Mediterranean, where"


VARIANT_FLAGS = {"int4-hqq": ["--quant", "int4", "--int4-algo", "hqq", "--sensitive-8bit", "down_proj"],
                 "int4-rtn": ["--quant", "int4", "--int4-algo", "rtn"]}


def bundle_for(variant: str) -> Path:
    """Build (once) an inference-only SmolLM2 bundle for a variant (a scheme name or an entry of VARIANT_FLAGS)."""
    out = CACHE / f"smollm2-{variant}"
    if not cached_bundle_ok(out):
        CACHE.mkdir(parents=True, exist_ok=True)
        flags = VARIANT_FLAGS.get(variant, ["--quant", variant])
        subprocess.run([PY, "-m", "export.cli", "build", "smollm2", "-o", str(out), *flags, "--no-train-graph", "--no-verify"],
                       check=True)
    return out


def child_torch(tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from export.source import resolve
    from export.verify import HELD_OUT_TEXT
    torch.set_num_threads(2)
    src = resolve("smollm2", log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        speeds, ttft = [], float("inf")
        for _ in range(REPEATS):  # best of N: the shared machine's load comes and goes
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            total = time.perf_counter() - t0
            n = out.shape[1] - ids.shape[1]
            speeds.append((n - 1) / (total - first))
            ttft = min(ttft, first)
        enc = tok(HELD_OUT_TEXT, return_tensors="pt").input_ids[:, :256]
        ppl = float(torch.exp(model(input_ids=enc, labels=enc).loss))
    return {"tok_s": max(speeds), "tok_s_median": float(np.median(speeds)), "ttft_ms": ttft * 1000,
            "peak_rss_mb": peak_rss_mb(), "ppl": ppl, "file_mb": sum(p.numel() * 4 for p in model.parameters()) / 1e6}


def child_onnx(scheme: str, tokens: int) -> dict:
    from edge_runtime.engine import Engine
    from export.verify import HELD_OUT_TEXT
    b = bundle_for(scheme)
    eng = Engine(b, threads=2, verify=False)
    ids = eng.encode(PROMPT)
    list(eng.generate(ids, max_new_tokens=4, stop_ids=set()))  # warm-up
    speeds, ttft = [], float("inf")
    for _ in range(REPEATS):  # best of N, as for torch
        t0 = time.perf_counter()
        gen = eng.generate(ids, max_new_tokens=tokens, stop_ids=set())
        next(gen)
        first = time.perf_counter() - t0
        n = 1 + sum(1 for _ in gen)
        total = time.perf_counter() - t0
        speeds.append((n - 1) / (total - first))
        ttft = min(ttft, first)
    ppl = eng.perplexity(HELD_OUT_TEXT)
    return {"tok_s": max(speeds), "tok_s_median": float(np.median(speeds)), "ttft_ms": ttft * 1000, "peak_rss_mb": peak_rss_mb(), "ppl": ppl,
            "file_mb": (b / "model.onnx").stat().st_size / 1e6, "weight_bytes_per_token": weight_bytes_per_token(b / "model.onnx")}


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of initializers read for one decode step: everything but the embedding table (one row is
    read) and the LoRA tensors; of a low-rank LoRA input only its base prefix (int4 offsets) counts."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    gathered = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
    manifest = json.loads((path.parent / "manifest.json").read_text())
    prefix = {}
    for sl in manifest["io"].get("lowrank", []):
        prefix[sl["L"]] = sl["in"] * sl["prefix"] * 4
        prefix[sl["R"]] = sl["prefix"] * sl["out"] * 4
    total = 0
    for init in m.graph.initializer:
        size = len(init.raw_data) or np.prod(init.dims) * 4
        if init.name in gathered or init.name.startswith("lora_"):
            continue
        total += int(prefix.get(init.name, size))
    return total


def kernel_floor(variant: str) -> dict:
    """The 4/8-bit matmul kernels alone: every MatMulNBits node of the bundle's graph, fed from graph
    inputs of the right width, run once per "token" on 2 threads (the weights do not fit the caches, so
    each run streams them from memory as a decode step does). Its time bounds the roofline ratio
    that any graph around these kernels can reach."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    m = onnx.load(str(bundle_for(variant) / "model.onnx"))
    keep = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    used = {i for n in keep for i in n.input[1:] if i}
    inits = [i for i in m.graph.initializer if i.name in used]
    attrs = [{a.name: a.i for a in n.attribute} for n in keep]
    widths = sorted({a["K"] for a in attrs})
    nodes = [helper.make_node("MatMulNBits", [f"x{a['K']}", *n.input[1:]], [f"y{j}"], domain="com.microsoft", **a)
             for j, (n, a) in enumerate(zip(keep, attrs))]
    g = helper.make_graph(nodes, "kernels", [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in widths],
                          [helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, None) for j in range(len(nodes))], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=9)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    b = sess.io_binding()
    for k in widths:
        b.bind_cpu_input(f"x{k}", np.random.default_rng(0).standard_normal((1, k)).astype(np.float32))
    for o in sess.get_outputs():
        b.bind_output(o.name, "cpu")
    for _ in range(10):
        sess.run_with_iobinding(b)
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        for _ in range(50):
            sess.run_with_iobinding(b)
        best = min(best, (time.perf_counter() - t) / 50)
    nbytes = sum(len(i.raw_data) for i in inits)
    return {"ms": best * 1e3, "mb": nbytes / 1e6, "gbs": nbytes / best / 1e9, "nodes": len(nodes)}


def memory_bandwidth_gbs() -> float:
    """Copy bandwidth (read + write bytes per second), best of 5, 512 MB buffers."""
    a = np.ones(64 * 2**20, np.float64)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--variants", default="torch,fp32,int8,int8-dynamic,int4,int4-hqq")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        if args.child == "bandwidth":
            res = {"bw_gbs": memory_bandwidth_gbs()}
        elif args.child.startswith("floor:"):
            res = kernel_floor(args.child.split(":", 1)[1])
        else:
            res = child_torch(args.tokens) if args.child == "torch" else child_onnx(args.child, args.tokens)
        print(json.dumps(res))
        return
    variants = args.variants.split(",")
    for v in variants:
        if v != "torch":
            bundle_for(v)
    bw = memory_bandwidth_gbs()
    res, seen = {}, [bw]
    for v in variants:
        res[v] = run_json([PY, __file__, "--child", v, "--tokens", str(args.tokens)])
        if v != "torch":  # next to each timing, in its own process (its buffers must not count in a variant's RSS)
            seen.append(run_json([PY, __file__, "--child", "bandwidth"])["bw_gbs"])
    floor = run_json([PY, __file__, "--child", "floor:int4"]) if "int4" in variants else None
    copy_bw = max(seen)
    # The fp32 decode is a pure stream of its weights, so what it achieved is a bandwidth this machine
    # delivered in this run; when it beats the copy measurement (it can: two threads reading vs one
    # copying), the roofline uses it. The highest bandwidth seen anywhere: the most demanding roofline.
    fp32_bw = res["fp32"]["tok_s"] * res["fp32"]["weight_bytes_per_token"] / 1e9 if "fp32" in res else 0.0
    bw = max(copy_bw, fp32_bw)
    base = res.get("torch")
    rows = []
    for v in variants:
        r = res[v]
        name = {"torch": "torch eager fp32 `generate`", "int8": "edgefm ONNX int8 (8-bit weight-only)",
                "int8-dynamic": "edgefm ONNX int8-dynamic (quantize_dynamic)", "int4": "edgefm ONNX int4 (asym blocks + offset, 8-bit head)",
                "int4-rtn": "edgefm ONNX int4 (symmetric RTN, 8-bit head)",
                "int4-hqq": "edgefm ONNX int4 HQQ + 8-bit down_proj/head"}.get(v, f"edgefm ONNX {v}")
        speed = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else ""
        ppl_rel = f"{(r['ppl'] / res['fp32']['ppl'] - 1) * 100:+.2f}%" if "fp32" in res else ""
        roof = ""
        if "weight_bytes_per_token" in r:
            roofline = bw * 1e9 / r["weight_bytes_per_token"]
            roof = f"{r['tok_s'] / roofline:.0%} of {roofline:.0f}"
        rows.append(f"| {name} | {r['file_mb']:.0f} MB | {r['tok_s']:.1f} / {r['tok_s_median']:.1f} | {speed} | {r['ttft_ms']:.0f} ms | "
                    f"{r['peak_rss_mb']:.0f} MB | {r['ppl']:.2f} | {ppl_rel} | {roof} |")
    body = f"""Batch 1, 2 threads, greedy, KV cache, {args.tokens} new tokens, {REPEATS} runs per variant: decode tok/s as best / median
(speed ratios and roofline use the best; time to first token: the lowest); each variant in its own process; perplexity on
the held-out prose passage of `export/verify.py` (256-token windows). Memory copy bandwidth (read + write, 512 MB,
best of 5) measured at the start and after each ONNX variant, in a process of its own: {min(seen):.1f} to {copy_bw:.1f} GB/s;
the fp32 decode itself streamed {fp32_bw:.1f} GB/s of weights (tok/s x bytes per token). The roofline uses the highest
of these, {bw:.1f} GB/s (the bandwidth of this shared machine drifts during a run; the highest makes the most
demanding roofline, and no variant can then read above 100%). Roofline = bandwidth / weight bytes read per token (all initializers but the
embedding table and the LoRA tensors; of the low-rank LoRA inputs, the int4 offsets they carry count). The source is the GGUF Q4_1 file expanded to fp32.

| variant | model file | decode tok/s (best / median) | vs torch | time to first token | peak RSS | perplexity | vs fp32 | roofline use (tok/s) |
|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n\nGoals (issue 3): int4 >= 4x torch decode tok/s and >= 50% of roofline; int4 / int8 perplexity within 5% / 1% of fp32."
    if floor:
        r4 = res["int4"]
        roof_ms = r4["weight_bytes_per_token"] / (bw * 1e9) * 1e3
        body += f"""

What bounds the int4 ratio, measured in this run: the {floor['nodes']} MatMulNBits kernels of the int4 graph alone
({floor['mb']:.0f} MB of 4/8-bit weights, nothing else in the graph) take {floor['ms']:.2f} ms per token on 2 threads =
{floor['gbs']:.1f} GB/s, against the {roof_ms:.2f} ms the roofline allows for the whole step ({r4['weight_bytes_per_token'] / 1e6:.0f} MB at {bw:.1f} GB/s):
with every other operation free the ratio would be {roof_ms / floor['ms']:.0%}. The full step takes {1e3 / r4['tok_s']:.2f} ms; attention, the
offsets of o/gate-up/down, norms and the run itself are the other {1e3 / r4['tok_s'] - floor['ms']:.2f} ms (docs/architecture.md, Known limits)."""
    record("SmolLM2-135M decode and perplexity (issue 3)", body, f"python bench/decode.py --tokens {args.tokens} --variants {args.variants}")


if __name__ == "__main__":
    main()
