"""Fuzzing every decoder that reads what others send (issue 12): mutated inputs, zero crashes.

A *crash* is anything but the decoder's documented refusal: an exception that is not an
``EdgefmError`` (``ProtocolError``, ``BundleError``, ...) in-process, or a 5xx from the agent's HTTP
API. Inputs are mutations of valid seeds (byte flips, insertions, deletions, truncations, splices,
and for JSON, values replaced by other types and extremes), so most reach deep into each decoder.

    python bench/fuzz.py                 # 100,000 inputs per decoder, recorded in BENCHMARKS.md
    python bench/fuzz.py -n 2000 --no-record

Decoders: update (the coordinator's whole validation: envelope, header, signature, codec, body,
shapes, norm), global pointer, fleet JSON messages (round, receipt, status), manifest, adapter file,
and the agent's HTTP bodies (chat, completions, examples, adapters, rollback) through a real server.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import record  # noqa: E402
from edge_runtime.errors import EdgefmError  # noqa: E402

BUNDLE = ROOT / "tests" / "data" / "tiny-bundle"
EXTREMES = [None, True, False, 0, -1, 1, 2**31, -2**63, 2**64, 1e308, -1e308, float("nan"), "", "x" * 5000, "\u0000",
            "../../etc/passwd", [], [None], {}, {"a": {"b": {"c": []}}}, "0" * 64, "ff" * 32, 3.5, "1"]


# ---------------------------------------------------------------------------- mutations

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        op = rng.randrange(6)
        if not b:
            b = bytearray(rng.randbytes(rng.randrange(1, 64)))
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randrange(1, 32))
        elif op == 3:
            del b[i:i + rng.randrange(1, 64)]
        elif op == 4:
            b = b[:i]
        else:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randrange(1, 64)]
    return bytes(b)


def mutate_json(obj, rng: random.Random, depth: int = 0):
    """A structure-aware mutation: some value (or key) replaced, dropped or duplicated."""
    if isinstance(obj, dict) and obj and depth < 6:
        out = dict(obj)
        k = rng.choice(list(out))
        op = rng.randrange(5)
        if op == 0:
            del out[k]
        elif op == 1:
            out[k] = rng.choice(EXTREMES)
        elif op == 2:
            out[k] = mutate_json(out[k], rng, depth + 1)
        elif op == 3:
            out[rng.choice(["", "kind", "x" * 300, k + "_"])] = rng.choice(EXTREMES)
        else:
            out[k] = [out[k]] * rng.randrange(0, 4)
        return out
    if isinstance(obj, list) and obj and depth < 6:
        out = list(obj)
        i = rng.randrange(len(out))
        op = rng.randrange(4)
        if op == 0:
            del out[i]
        elif op == 1:
            out[i] = mutate_json(out[i], rng, depth + 1)
        elif op == 2:
            out[i] = rng.choice(EXTREMES)
        else:
            out = out * rng.randrange(0, 5)
        return out
    return rng.choice(EXTREMES) if rng.random() < 0.7 else obj


def mutate_json_bytes(obj, rng: random.Random) -> bytes:
    if rng.random() < 0.6:
        try:
            return json.dumps(mutate_json(obj, rng)).encode()
        except (ValueError, TypeError):
            pass
    return mutate_bytes(json.dumps(obj).encode(), rng)


# ---------------------------------------------------------------------------- targets

def targets(work: Path):
    """name -> (seeds, mutate(seed, rng) -> input, run(input)); ``run`` raises only on refusal or crash."""
    from coordinator.validate import Limits, validate_update
    from edge_runtime.protocol.adapter import adapter_from_bytes, load_adapter
    from edge_runtime.protocol.codec import CodecSpec
    from edge_runtime.protocol.manifest import Manifest
    from edge_runtime.protocol.messages import (GlobalPointer, UpdateHeader, dump_json_message, encode_update, make_pointer,
                                                parse_json_message)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    tensors, meta = load_adapter(BUNDLE / "adapter.safetensors")
    shapes = {k: tuple(v) for k, v in meta.shapes.items()}
    rng = np.random.default_rng(0)
    signer = Ed25519PrivateKey.generate()   # the device's key; the coordinator holds its public half
    limits = Limits(meta.base_fingerprint, shapes, 64 << 20, 1e4, None, {"dev-1": signer.public_key()})
    updates = []
    for codec in (CodecSpec("fp32", "zstd"), CodecSpec("fp16", "none"), CodecSpec("int8", "zstd")):
        h = UpdateHeader(device_id="dev-1", update_id="u" * 32, base_version=3, num_examples=40,
                         base_fingerprint=meta.base_fingerprint, codec=codec)
        delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
        updates.append(encode_update(h, delta, signer=signer))
    blob = (BUNDLE / "adapter.safetensors").read_bytes()
    ptr, _ = make_pointer(7, 6, meta.base_fingerprint, blob, round=2, metrics={"loss": 1.5}, epoch="a1b2c3")
    messages = [ptr.to_json(),
                {"kind": "round", "mode": "sync", "round": 4, "base_version": 3, "deadline": 1.7e9, "selected": ["dev-1"],
                 "train_a": True, "epoch": "a1b2c3"},
                {"kind": "receipt", "update_id": "u" * 32, "status": "accepted", "reason": None, "version": 4, "device_id": "dev-1"},
                {"kind": "status", "device_id": "dev-1", "state": "serving", "global_version": 3}]
    messages = [json.loads(dump_json_message(m)) for m in messages]   # as sent: with the protocol version field
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    unsigned = Limits(meta.base_fingerprint, shapes, 64 << 20, 1e4)   # a fleet without device keys: bodies get decoded
    mdir = work / "manifest"
    mdir.mkdir()

    def run_update(data):
        validate_update("dev-1", data, limits)

    def run_update_unsigned(data):
        validate_update("dev-1", data, unsigned)

    def mutate_header(seed: bytes, r: random.Random) -> bytes:
        """The envelope's JSON header mutated (the body and its hash kept): reaches codec and body decoding."""
        n = int.from_bytes(seed[4:8], "little")
        header = json.loads(seed[8:8 + n])
        header.pop("signature", None)
        hb = mutate_json_bytes(header, r) if r.random() < 0.9 else json.dumps(header).encode()
        out = seed[:4] + len(hb).to_bytes(4, "little") + hb + seed[8 + n:]
        return out if r.random() < 0.8 else mutate_bytes(out, r)

    def run_pointer(data):
        GlobalPointer.from_bytes(data)

    from coordinator.state import State
    from edge_runtime.protocol.messages import DeviceStatus, Receipt, RoundAnnouncement
    state = State(work / "coordinator")

    def run_message(data):
        """What each side does with a fleet JSON message: check its fields, then (status) record it."""
        msg = parse_json_message(data)
        kind = msg.get("kind")
        if kind == "round":
            RoundAnnouncement.from_json(msg)
        elif kind == "receipt":
            Receipt.from_json(msg)
        else:
            state.seen_device("dev-1", DeviceStatus.from_json(msg))

    def run_manifest(data):
        (mdir / "manifest.json").write_bytes(data)
        Manifest.load(mdir)

    def run_adapter(data):
        adapter_from_bytes(data, expect_fingerprint=meta.base_fingerprint, expect_shapes=meta.shapes)

    return {
        "update (coordinator validation)": (updates, lambda s, r: mutate_bytes(s, r), run_update),
        "update, header mutated (fleet without device keys)": (updates, mutate_header, run_update_unsigned),
        "global pointer": ([json.dumps(messages[0]).encode()], lambda s, r: mutate_json_bytes(json.loads(s), r), run_pointer),
        "round / receipt / status": ([json.dumps(m).encode() for m in messages[1:]],
                                     lambda s, r: mutate_json_bytes(json.loads(s), r), run_message),
        "manifest": ([json.dumps(manifest).encode()], lambda s, r: mutate_json_bytes(json.loads(s), r), run_manifest),
        "adapter file": ([blob], lambda s, r: mutate_bytes(s, r), run_adapter),
    }


def fuzz_inprocess(name, seeds, mutate, run, n, seed) -> dict:
    rng = random.Random(seed)
    outcomes, crashes, t0 = Counter(), [], time.perf_counter()
    for i in range(n):
        data = mutate(rng.choice(seeds), rng)
        try:
            run(data)
            outcomes["accepted"] += 1
        except EdgefmError as exc:
            outcomes[getattr(getattr(exc, "reason", None), "value", type(exc).__name__)] += 1
        except Exception as exc:  # a crash: anything but the documented refusal
            outcomes["CRASH"] += 1
            if len(crashes) < 5:
                crashes.append(f"{type(exc).__name__}: {exc} :: {traceback.format_exc(limit=-3)!r}"[:600])
    return {"name": name, "n": n, "seconds": time.perf_counter() - t0, "outcomes": outcomes, "crashes": crashes}


def fuzz_http(n, seed, work: Path) -> dict:
    """Mutated JSON bodies POSTed to the real agent API (tiny bundle); a 5xx (or a dropped connection) is a crash."""
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.server import serve_in_thread
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = Agent(AgentConfig(bundle=str(BUNDLE), data_dir=str(work / "agent"), port=port, auto_train=False,
                              max_examples=1000, general_replay_fraction=0.0))
    srv, _ = serve_in_thread(agent.api, "127.0.0.1", port)
    agent.start()
    seeds = [("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                       "temperature": 0.5, "logprobs": True, "top_logprobs": 2, "stop": ["\n"]}),
             ("/v1/chat/completions", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                                       "max_tokens": 3, "response_format": {"type": "json_object"}, "n": 2, "seed": 1}),
             ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3, "echo": True, "logprobs": 2, "logit_bias": {"5": -100}}),
             ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, "presence_penalty": 1.0, "stream": True}),
             ("/v1/examples", {"examples": [{"text": "a b c"}, {"prompt": "Q", "completion": " A"}]}),
             ("/v1/adapters/rollback", {"to": "bundle"}),
             ("/v1/adapters", {"path": str(work / "nope.safetensors"), "name": "x"})]
    rng = random.Random(seed)
    outcomes, crashes, t0 = Counter(), [], time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for i in range(n):
            path, body = rng.choice(seeds)
            data = mutate_json_bytes(body, rng)
            try:
                conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                outcomes[r.status] += 1
                if r.status >= 500 and len(crashes) < 5:
                    crashes.append(f"{r.status} {path} {data[:300]!r}")
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            except (OSError, http.client.HTTPException) as exc:
                outcomes["dropped"] += 1
                if len(crashes) < 5:
                    crashes.append(f"{type(exc).__name__} {path} {data[:300]!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    finally:
        conn.close()
        srv.shutdown()
        agent.stop()
    bad = sum(c for k, c in outcomes.items() if k == "dropped" or (isinstance(k, int) and k >= 500))
    out = Counter({str(k): v for k, v in outcomes.items()})
    if bad:
        out["CRASH"] = bad
    return {"name": "agent HTTP bodies (real server)", "n": n, "seconds": time.perf_counter() - t0, "outcomes": out,
            "crashes": crashes}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100_000, help="inputs per decoder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--http", type=int, default=10_000, help="HTTP bodies (each may generate tokens: ~25/s on 2 cores)")
    ap.add_argument("--only", default=None, help="substring of a decoder name")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefm-bench-fuzz-"))
    results = []
    try:
        for name, (seeds, mutate, run) in targets(work).items():
            if args.only and args.only not in name:
                continue
            results.append(fuzz_inprocess(name, seeds, mutate, run, args.n, args.seed))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "crashes"}, default=str), flush=True)
        if not args.only or args.only in "agent HTTP bodies":
            results.append(fuzz_http(args.http, args.seed, work))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "crashes"}, default=str), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = ["| decoder | inputs | crashes | inputs/s | what happened (top outcomes) |", "|---|---|---|---|---|"]
    for r in results:
        top = ", ".join(f"{k} {v}" for k, v in r["outcomes"].most_common(5) if k != "CRASH")
        rows.append(f"| {r['name']} | {r['n']:,} | {r['outcomes'].get('CRASH', 0)} | {r['n'] / r['seconds']:,.0f} | {top} |")
    crashes = [c for r in results for c in r["crashes"]]
    body = ("Mutated inputs (byte flips, insertions, deletions, truncations, splices; JSON values replaced by other "
            "types and extremes) from valid seeds; a crash is any exception other than the decoder's documented refusal "
            "(an `EdgefmError`), or for the HTTP API a 5xx or a dropped connection. Seed "
            f"{args.seed}.\n\n" + "\n".join(rows) + "\n\n"
            + ("Crashes (first of each decoder):\n\n" + "\n".join(f"- `{c}`" for c in crashes) if crashes else "Zero crashes.") + "\n")
    if args.no_record:
        print(body)
    else:
        record("Fuzzing the decoders (issue 12)", body, f"python bench/fuzz.py -n {args.n} --http {args.http} --seed {args.seed}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
