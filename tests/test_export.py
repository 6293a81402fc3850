"""Export of tiny random models in every scheme: parity, gradients, interop, errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from helpers import tiny_bundle

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("quant", ["fp32", "int8", "int8-dynamic", "int4", "nf4"])
def test_causal_lm_bundle_every_scheme(tmp_path_factory, tiny_llama_dir, quant):
    from edge_runtime.engine import Engine
    from edge_runtime.protocol.manifest import Manifest, verify_files
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, quant)
    m = verify_files(b)
    c = m.checks
    assert m.quant.scheme == quant and set(m.files) >= {"model.onnx", "train.onnx", "adapter.safetensors", "tokenizer/tokenizer.json"}
    # the weights sit in data files beside the graphs: onnxruntime then loads each tensor straight
    # into its buffer instead of holding the whole graph's bytes (bench/api_latency.py: agent memory)
    assert {"model.onnx.data", "train.onnx.data"} <= set(m.files)
    if quant == "fp32":
        assert c["logits_max_abs_diff_with_adapter"] <= 1e-4       # stated bound
        assert c["grad_max_rel_err"] <= 1e-4                       # vs torch autograd
        assert c["greedy_agreement"] == 1.0
        assert abs(c["perplexity_ratio"] - 1) < 1e-4
    else:
        # quantized: the export reports perplexity next to fp32; on this tiny random model the
        # schemes stay within 2% (real-model numbers are in BENCHMARKS.md)
        assert abs(c["perplexity_ratio"] - 1) < 0.02, c
        assert c["greedy_agreement"] >= 0.5, c
    eng = Engine(b)
    out = list(eng.generate(eng.encode("the quick brown"), max_new_tokens=5, stop_ids=set()))
    assert len(out) == 5
    if quant != "fp32":  # weights really are smaller
        fp = Manifest.load(tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32"))
        size = lambda man: man.files["model.onnx"]["size"] + man.files["model.onnx.data"]["size"]  # noqa: E731
        assert size(m) < size(fp)


@pytest.mark.parametrize("torch_graph", [False, True], ids=["fused-builder", "torch-onnx"])
def test_kv_cache_generation_equals_full_recompute(tmp_path_factory, tiny_llama_dir, torch_graph):
    from edge_runtime.engine import Engine
    eng = Engine(tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32", torch_inference_graph=torch_graph))
    assert eng.manifest.io.kv_cache == ("separate" if torch_graph else "shared")
    assert (eng.manifest.checks["logits_max_abs_diff_with_adapter"] <= 1e-4)   # both graphs match torch
    import onnx
    inits = [i.name for i in onnx.load(str(eng.dir / "model.onnx"), load_external_data=False).graph.initializer]
    assert len(inits) == len(set(inits))                                          # every constant written once
    prompt = eng.encode("sensors report the temperature")
    cached = list(eng.generate(prompt, max_new_tokens=8, stop_ids=set()))
    ids = list(prompt)
    for _ in range(8):  # no cache: re-run the whole sequence each step
        n = len(ids)
        logits, _ = eng.forward(np.array([ids]), np.ones((1, n)), np.arange(n)[None], eng.empty_past(1))
        ids.append(int(np.argmax(logits[0, -1])))
    assert cached == ids[len(prompt):]


def test_missing_lora_inputs_serve_the_base_model(tmp_path_factory, tiny_llama_dir):
    import onnxruntime as ort
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    from edge_runtime.engine import Engine
    eng = Engine(b)
    sess = ort.InferenceSession(str(b / "model.onnx"))
    ids = np.array([eng.encode("hello world")])
    n = ids.shape[1]
    base = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n)[None], **eng.empty_past(1)}
    without = sess.run(["logits"], base)[0]
    with_zero = eng.forward(ids, np.ones((1, n)), np.arange(n)[None], eng.empty_past(1))[0]  # initial adapter: B = 0
    np.testing.assert_allclose(without, with_zero, atol=1e-5)


def test_peft_round_trip_same_logits(tmp_path, tmp_path_factory, tiny_llama_dir):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from edge_runtime.engine import Engine
    from edge_runtime.protocol.adapter import load_adapter, save_adapter
    from export.interop import from_peft, to_peft
    from export.verify import random_adapter
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    _, meta = load_adapter(b / "adapter.safetensors")
    ours = random_adapter(meta.shapes, seed=7, scale=0.1)
    save_adapter(tmp_path / "a.safetensors", ours, meta)
    to_peft(tmp_path / "a.safetensors", b, tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    eng = Engine(b)
    ids = eng.encode("valve 7 closed at noon")
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor([ids])).logits.numpy()
    got, _ = eng.forward(np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None], eng.empty_past(1),
                         eng.make_active(ours, meta))
    assert float(np.abs(got - ref).max()) <= 1e-4
    # and back from PEFT: identical tensors
    from_peft(tmp_path / "peft", b, tmp_path / "back.safetensors")
    back, _ = load_adapter(tmp_path / "back.safetensors", expect_fingerprint=meta.base_fingerprint)
    for k in ours:
        np.testing.assert_array_equal(back[k], ours[k])


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_onnx_adapter_file_overrides_lora_inputs(tmp_path, tmp_path_factory, tiny_llama_dir, quant):
    import onnxruntime as ort
    from edge_runtime.engine import Engine
    from edge_runtime.protocol.adapter import load_adapter, save_adapter
    from export.interop import to_onnx_adapter
    from export.verify import random_adapter
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, quant)
    _, meta = load_adapter(b / "adapter.safetensors")
    ours = random_adapter(meta.shapes, seed=3, scale=0.1)
    save_adapter(tmp_path / "a.safetensors", ours, meta)
    to_onnx_adapter(tmp_path / "a.safetensors", b, tmp_path / "a.onnx_adapter")
    eng = Engine(b)
    ids = np.array([eng.encode("door sensor")])
    n = ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n)[None], **eng.empty_past(1)}
    sess = ort.InferenceSession(str(b / "model.onnx"))
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "a.onnx_adapter"))
    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    got = sess.run(["logits"], feeds, ro)[0]
    ref = eng.forward(ids, np.ones((1, n)), np.arange(n)[None], eng.empty_past(1), eng.make_active(ours, meta))[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("task", ["classification", "embedding"])
def test_bert_bundles(tmp_path_factory, tiny_bert_dir, task):
    from edge_runtime.engine import Engine
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_bert_dir, "fp32", task=task)
    from edge_runtime.protocol.manifest import Manifest
    m = Manifest.load(b)
    assert m.checks["output_max_abs_diff_with_adapter"] <= 1e-4
    eng = Engine(b)
    if task == "classification":
        assert m.checks["grad_max_rel_err"] <= 1e-4
        assert eng.classify(["a b c", "hello"]).shape == (2, 3)
    else:
        e = eng.embed(["a b c", "hello world"])
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)


def test_unsupported_architecture_and_no_half_written_bundle(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "export.cli", "build", str(tmp_path / "gpt2"), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "not supported" in r.stderr and "llama" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_verify_detects_corruption(tmp_path, tmp_path_factory, tiny_llama_dir):
    import shutil
    b = tmp_path / "copy"
    shutil.copytree(tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32"), b)
    ok = subprocess.run([sys.executable, "-m", "export.cli", "verify", str(b)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    with open(b / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    bad = subprocess.run([sys.executable, "-m", "export.cli", "verify", str(b)], capture_output=True, text=True)
    assert bad.returncode == 1 and "model.onnx does not match its sha256" in bad.stderr


def test_cli_help_explains_itself():
    for mod in ("export.cli", "edge_runtime.cli", "coordinator.cli", "devices.cli"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout and len(r.stdout) > 300, mod


def test_archive_bundle_serves_from_tar(tmp_path, tiny_llama_dir):
    from edge_runtime.engine import Engine
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "export.cli", "build", str(tiny_llama_dir), "-o", str(out), "--quant", "fp32",
                        "--archive", "--no-verify", "--no-train-graph", "--lora-rank", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[export" in r.stderr and "bundle written" in r.stderr     # progress per stage
    tar = out.with_suffix(".tar")
    import shutil
    shutil.rmtree(out)                                                # only the archive is shipped to the device
    eng = Engine(tar)
    assert len(list(eng.generate(eng.encode("hello"), max_new_tokens=3, stop_ids=set()))) == 3


def test_asym_int4_reproduces_grid_weights_and_beats_symmetric_rtn():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from export.quantize import apply_asym_int4, asym_int4_blocks
    rng = np.random.default_rng(0)
    K, N, blk = 96, 40, 32
    # weights on a GGUF Q4_1-style grid (min m, step d, 16 levels per block of 32 along K)
    d = rng.uniform(0.01, 0.03, (N, K // blk, 1))
    m = rng.uniform(-0.3, 0.0, (N, K // blk, 1))
    levels = rng.integers(0, 16, (N, K // blk, blk))
    w_grid = (m + d * levels).reshape(N, K).T.astype(np.float32)
    q, s, c = asym_int4_blocks(w_grid, blk)
    rec = (s[..., None] * (q.astype(np.float32) - 8) + c[..., None]).reshape(N, K).T
    assert np.abs(rec - w_grid).max() < 1e-6                      # exact up to float rounding
    # generic weights: lower error than symmetric round-to-nearest with the same block
    w = rng.standard_normal((K, N)).astype(np.float32)
    q, s, c = asym_int4_blocks(w, blk)
    rec = (s[..., None] * (q.astype(np.float32) - 8) + c[..., None]).reshape(N, K).T
    blocks = w.T.reshape(N, K // blk, blk)
    sym_s = np.abs(blocks).max(-1, keepdims=True) / 7
    sym = (np.clip(np.rint(blocks / sym_s), -7, 7) * sym_s).reshape(N, K).T
    assert np.sqrt(((rec - w) ** 2).mean()) < 0.8 * np.sqrt(((sym - w) ** 2).mean())
    # the graph rewrite: MatMulNBits (implicit zero point 8) + block sums @ offsets == dequantized weights,
    # the offsets held in fp16 (one BlockOffsetAdd call; here onnxruntime inlines its standard-operator body)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, N])],
                              [numpy_helper.from_array(w_grid, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert apply_asym_int4(model, blk, accuracy_level=1, exclude=set()) == []
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "BlockOffsetAdd"]
    assert [f.name for f in model.functions] == ["BlockOffsetAdd"]
    assert "W" not in {i.name for i in model.graph.initializer}   # the fp32 weight is gone
    q, s, c = asym_int4_blocks(w_grid, blk)
    w_stored = (s[..., None] * (q.astype(np.float32) - 8) + c.astype(np.float16).astype(np.float32)[..., None]).reshape(N, K).T
    assert np.abs(w_stored - w_grid).max() < 2e-4                 # fp16 offsets: the grid up to half precision
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, K)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w_stored, rtol=1e-4, atol=1e-4)


def test_sym_int4_search_reproduces_a_symmetric_grid_and_never_loses_to_rtn():
    from export.quantize import sym_int4_blocks
    rng = np.random.default_rng(1)
    K, N, blk = 64, 24, 32

    def rec(q, s):
        return (s[..., None] * (q.astype(np.float64) - 8)).reshape(N, K).T

    # weights on a symmetric grid (levels -8..7 times a scale per block, the value of largest magnitude at -8 * s):
    # reproduced exactly, codes included
    s0 = rng.uniform(0.01, 0.05, (N, K // blk, 1))
    u0 = rng.integers(-8, 8, (N, K // blk, blk))
    u0[..., 0] = -8
    w_grid = (s0 * u0).reshape(N, K).T
    q, s = sym_int4_blocks(w_grid, blk)
    np.testing.assert_array_equal(q.astype(int) - 8, u0)
    assert np.abs(rec(q, s) - w_grid).max() < 1e-6
    for seed in range(5):  # any weights, any channel weights: never a larger weighted error than round-to-nearest
        r = np.random.default_rng(seed)
        w = r.standard_normal((K, N)) * np.exp(r.standard_normal((K, 1)))
        imp = np.exp(3 * r.standard_normal(K))
        blocks = w.T.reshape(N, K // blk, blk)
        peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
        rtn = (np.clip(np.rint(blocks / (-peak / 8)), -8, 7) * (-peak / 8)).reshape(N, K).T
        q, s = sym_int4_blocks(w, blk, imp)
        err = lambda r_: (imp[:, None] * (r_ - w) ** 2).sum()  # noqa: E731
        assert err(rec(q, s)) <= err(rtn) * (1 + 1e-9)
        assert q.min() >= 0 and q.max() <= 15
    # the weights move the error: one channel a thousand times as important comes out closer than unweighted
    w = np.random.default_rng(7).standard_normal((K, N))
    imp = np.ones(K)
    imp[5] = 1000.0
    plain, weighted = rec(*sym_int4_blocks(w, blk)), rec(*sym_int4_blocks(w, blk, imp))
    assert np.abs(weighted[5] - w[5]).mean() < 0.5 * np.abs(plain[5] - w[5]).mean()


def test_input_importance_is_the_mean_square_of_what_each_linear_reads(tmp_path_factory, tiny_llama_dir):
    """The calibration of ``--int4-algo sym``: per input channel, the mean square of the activations each
    weight matmul of the fp32 inference graph reads; the first layer's q/k/v read the RMS-normed embeddings,
    checked against transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    from export import onnxfile
    from export.quantize import input_importance
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    model = onnxfile.load(b / "model.onnx")
    ids = list(np.random.default_rng(0).integers(5, 200, 40))
    imp = input_importance(model, ids, window=16)  # windows of 16, 16 and 8 tokens, each from an empty cache
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        h = hf.model.layers[0].input_layernorm(hf.model.embed_tokens(torch.tensor([ids])))[0].numpy()
    want = (h.astype(np.float64) ** 2).mean(0)
    np.testing.assert_allclose(imp["layers.0.h_attn"], want, rtol=1e-4)  # the fused builder's name of q/k/v's input
    assert all((v >= 0).all() and v.ndim == 1 for v in imp.values())


def test_int4_sym_bundle_calls_the_symmetric_kernel(tmp_path_factory, tiny_llama_dir):
    """``--int4-algo sym``: plain 4-bit linears (Q4MatMul, no offsets), calibrated at export, within the
    export's own quality checks; the 4-bit head too with ``--head quant``."""
    import onnx
    from edge_runtime.engine import Engine
    from edge_runtime.protocol.manifest import verify_files
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "int4", algo="sym", head="quant")
    m = verify_files(b)
    assert m.quant.scheme == "int4"
    ops = [n.op_type for n in onnx.load(str(b / "model.onnx"), load_external_data=False).graph.node]
    layers = int(m.model["layers"])
    assert ops.count("Q4MatMul") == 4 * layers + 1 and "Q4MatMulOffset" not in ops and "Q8Linear" not in ops
    assert abs(m.checks["perplexity_ratio"] - 1) < 0.05, m.checks
    eng = Engine(b)
    assert len(list(eng.generate(eng.encode("valve 2 opens"), max_new_tokens=4, stop_ids=set()))) == 4


def test_int4_linears_call_the_native_kernel_with_matmulnbits_inside(tmp_path_factory, tiny_llama_dir):
    """The default int4 graph (int8 compute) calls edgefm.native:Q4MatMul / Q4MatMulOffset for its 4-bit
    linears and Q8Linear for its 8-bit head: the compiled kernel where the device has one, the function body (onnxruntime's MatMulNBits
    on the regrouped bytes, plus the offsets) where not. Both give the same logits; the regrouping is
    lossless."""
    import onnx
    from edge_runtime import native
    from edge_runtime.engine import Engine
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "int4")
    nodes = onnx.load(str(b / "model.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    layers = Engine(b).layers
    assert ops.count("Q4MatMulOffset") == 4 * layers   # q/k/v, o, gate/up, down: offsets inside (none on the low-rank term)
    assert all(sl.get("prefix", 0) == 0 for sl in Engine(b).manifest.io.lowrank)
    assert [n.name for n in nodes if n.op_type == "Q8Linear"] == ["lm_head_Q8"]  # the 8-bit head
    assert ops.count("Attention") == layers and "GroupQueryAttention" not in ops  # attention: the native call too
    assert not [n for n in nodes if n.op_type == "MatMulNBits"]
    eng, pure = Engine(b), Engine(b, native=False)
    assert eng.native and not pure.native
    ids = eng.encode("pump 3 pressure rising")
    args = (np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None], eng.empty_past(1))
    got, want = eng.forward(*args)[0], pure.forward(*args)[0]
    # both round the activations to int8 per block, but not by the same float steps (MLAS's are its own): an activation
    # near a rounding boundary can land one step apart (one position of 14 here); the rest agree to float precision
    off = np.abs(got - want).max(-1)[0] / np.abs(want).max()
    assert (off <= 1e-4).mean() >= 0.9 and off.max() <= 0.02, off
    # the regrouping is lossless: P unpacked is MatMulNBits' B, S the scales in fp16
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (48, 3, 32)).astype(np.uint8)
    p = native.q4_pack(q)
    b_bytes = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    np.testing.assert_array_equal(p.transpose(0, 3, 1, 2, 4).reshape(48, 3, 16), b_bytes)
    # (graphs at another compute precision keep MatMulNBits: test_int4_bundle_feeds_lora_through_the_offset_slots)


def test_sensitive_modules_stay_8bit_in_packed_graphs(tmp_path, tmp_path_factory, tiny_llama_dir):
    import onnx
    from export.quantize import QuantRecipe, quantize_graph
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    dst = tmp_path / "m.onnx"
    quantize_graph(b / "model.onnx", dst, QuantRecipe("int4", sensitive_8bit=("down_proj",)), module_shapes={})
    nodes = onnx.load(str(dst), load_external_data=False).graph.node
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}
    bits.update({n.name: 4 for n in nodes if n.op_type in ("Q4MatMul", "Q4MatMulOffset")})   # the native kernels' calls
    bits.update({n.name: 8 for n in nodes if n.op_type == "Q8Linear"})
    down = {k: v for k, v in bits.items() if "down_proj" in k}
    packed = {k: v for k, v in bits.items() if "q_proj+k_proj+v_proj" in k or "gate_proj+up_proj" in k}
    assert down and set(down.values()) == {8}            # the sensitive module: 8-bit
    assert packed and set(packed.values()) == {4}        # packed q/k/v and gate/up: 4-bit
    assert [v for k, v in bits.items() if k.startswith("lm_head")] == [8]   # the head: 8-bit by default


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                     ("k_proj", "up_proj")])
def test_fused_graph_packs_lora_per_module_group(tmp_path_factory, tiny_llama_dir, targets):
    """LoRA on any subset of the linears: the packed per-group delta equals HF with B·A merged into the
    weights (the build's own check, <= 1e-4, raises otherwise), one FusedMatMul pair per group and
    layer, and q/k/v reach attention packed (no Split there)."""
    import onnx
    from edge_runtime.protocol.manifest import Manifest
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32", lora_targets=targets)
    m = Manifest.load(b)
    assert m.checks["logits_max_abs_diff_with_adapter"] <= 1e-4
    g = onnx.load(str(b / "model.onnx")).graph
    layers = int(m.model["layers"])
    groups = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gu", "up_proj": "gu",
              "down_proj": "down"}
    assert sum(n.op_type == "FusedMatMul" for n in g.node) == 2 * layers * len({groups[t] for t in targets})
    assert not any(n.op_type == "Split" and "q_proj+k_proj+v_proj" in n.name for n in g.node)
    assert len(m.io.lowrank) == layers * len({groups[t] for t in targets})       # one slot per group and layer


def test_asym_int4_offsets_join_the_lowrank_lora_term():
    """Where a linear has a low-rank LoRA term, the int4 offsets are prepended to its L/R defaults (no
    separate offset path) and the packed feeds give exactly x @ (W + scale * A^T B^T) for grid weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from edge_runtime.lowrank import Slot, pack_slot
    from export.quantize import apply_asym_int4
    rng = np.random.default_rng(1)
    K, N, blk, r = 64, 24, 32, 2
    d = rng.uniform(0.01, 0.03, (N, K // blk, 1))
    levels = rng.integers(0, 16, (N, K // blk, blk))
    w = (rng.uniform(-0.3, 0.0, (N, K // blk, 1)) + d * levels).reshape(N, K).T.astype(np.float32)
    ms = "com.microsoft"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"], name="g.mm"),
             helper.make_node("FusedMatMul", ["x", "L"], ["u"], name="g.lr_u", domain=ms, alpha=1.0),
             helper.make_node("FusedMatMul", ["u", "R"], ["dl"], name="g.lr_d", domain=ms, alpha=1.0),
             helper.make_node("Add", ["y0", "dl"], ["y"], name="g.out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K]),
                                           helper.make_tensor_value_info("L", TensorProto.FLOAT, [K, r]),
                                           helper.make_tensor_value_info("R", TensorProto.FLOAT, [r, N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, N])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros((K, r), np.float32), "L"),
                               numpy_helper.from_array(np.zeros((r, N), np.float32), "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)], ir_version=9)
    # the builder tells the quantizer which matmul has which low-rank term (no search by node names)
    assert apply_asym_int4(model, blk, accuracy_level=1, exclude=set(), lowrank={"g.mm": ("L", "R")}) == []
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "FusedMatMul", "FusedMatMul", "Add"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    prefix = K // blk
    assert inits["L"].shape == (K, prefix + r) and inits["R"].shape == (prefix + r, N)
    assert [d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim] == [K, prefix + r]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, K)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w, rtol=1e-4, atol=1e-4)   # defaults: the base
    a, b = rng.standard_normal((r, K)).astype(np.float32), rng.standard_normal((N, r)).astype(np.float32)
    slot = Slot(0, "L", "R", K, N, prefix, (("m", 0, N),))
    L, R = pack_slot(slot, {"layers.0.m.lora_A": a, "layers.0.m.lora_B": b}, r, 0.5, inits["L"][:, :prefix], inits["R"][:prefix])
    np.testing.assert_allclose(sess.run(None, {"x": x, "L": L, "R": R})[0], x @ (w + 0.5 * a.T @ b.T), rtol=1e-4, atol=1e-4)


def test_int4_bundle_feeds_lora_through_the_offset_slots(tmp_path, tiny_llama_dir):
    """A real int4 bundle: q/k/v offsets live in the low-rank slots (lowrank.safetensors holds them),
    the other groups keep their offset path. With weights already on the 4-bit grid and fp32 compute
    (accuracy level 1) the int4 graph is exact, so with an adapter it must give the fp32 bundle's logits,
    whether the offset term runs as the native kernel or as its standard-operator form."""
    import shutil
    import onnx
    import torch
    from transformers import AutoModelForCausalLM
    from edge_runtime.engine import Engine
    from edge_runtime.protocol.adapter import load_adapter
    from export.build import BuildOptions, Progress, build_bundle
    from export.quantize import QuantRecipe, asym_int4_blocks
    from export.verify import random_adapter
    src = tmp_path / "grid"
    shutil.copytree(tiny_llama_dir, src)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():   # snap every decoder linear onto the asym grid (blocks of 32 along the input)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                q, sc, c = asym_int4_blocks(mod.weight.numpy().T, 32)
                c = c.astype(np.float16).astype(np.float32)   # the graph keeps o/gate-up/down offsets in fp16
                rec = (sc[..., None] * (q.astype(np.float32) - 8) + c[..., None]).reshape(mod.out_features, -1)
                mod.weight.copy_(torch.from_numpy(rec))
    model.save_pretrained(src)
    bundles = {}
    for name, recipe in (("fp32", QuantRecipe("fp32")), ("int4", QuantRecipe("int4", accuracy_level=1, head="fp32"))):
        bundles[name] = tmp_path / name
        build_bundle(str(src), bundles[name], BuildOptions(quant=recipe, lora_rank=4, with_training=False, verify=False),
                     log=Progress(quiet=True))
    m = Engine(bundles["int4"]).manifest
    assert m.io.lora_layout == "lowrank" and "lowrank.safetensors" in m.files
    assert all(sl["prefix"] == int(m.model["hidden"]) // 32 for sl in m.io.lowrank)
    names = [n.name for n in onnx.load(str(bundles["int4"] / "model.onnx"), load_external_data=False).graph.node]
    assert not any("q_proj+k_proj+v_proj" in n and n.endswith("_offset") for n in names)
    assert any("down_proj" in n and n.endswith("_offset") for n in names)
    _, meta = load_adapter(bundles["int4"] / "adapter.safetensors")
    ad = random_adapter(meta.shapes, seed=11, scale=0.3)
    out = {}
    for q, b in bundles.items():
        eng = Engine(b)
        ids = eng.encode("pump 3 pressure rising")
        args = (np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None], eng.empty_past(1))
        out[q] = (eng.forward(*args)[0], eng.forward(*args, eng.make_active(ad, meta))[0])
    assert eng.native is True   # the test machine has a C compiler: the int4 graph ran the compiled kernel
    eng = Engine(bundles["int4"], native=False)   # the same graph without the compiled kernel
    assert eng.native is False
    out["int4-pure"] = (eng.forward(*args)[0], eng.forward(*args, eng.make_active(ad, meta))[0])
    assert np.abs(out["fp32"][1] - out["fp32"][0]).max() > 0.5                 # the adapter changes the logits
    for q in ("int4", "int4-pure"):
        np.testing.assert_allclose(out[q][0], out["fp32"][0], atol=2e-4)      # base: exact on grid weights
        np.testing.assert_allclose(out[q][1], out["fp32"][1], atol=2e-4)      # with the adapter: the same


@pytest.mark.parametrize("quant,torch_graph", [("int4", False), ("fp32", True)], ids=["int4-fused", "fp32-torch-onnx"])
def test_graphs_over_the_size_limit_keep_weights_in_external_data(tmp_path, tiny_llama_dir, monkeypatch, quant, torch_graph):
    """As if the tiny model were a 2 GB one: every graph goes through external data (torch export,
    offline simplification of the training graph, quantization, LoRA defaults) and the bundle serves
    the same logits as one whose intermediate graphs were single files."""
    import export.onnxfile as onnxfile
    from edge_runtime.engine import Engine
    from edge_runtime.protocol.manifest import verify_files
    from export.build import BuildOptions, Progress, build_bundle
    from export.quantize import QuantRecipe
    ref = tiny_bundle(tmp_path / "ref", tiny_llama_dir, quant, torch_inference_graph=torch_graph)
    monkeypatch.setattr(onnxfile, "EXTERNAL_DATA_BYTES", 1000)
    out = tmp_path / "big"
    build_bundle(str(tiny_llama_dir), out, BuildOptions(quant=QuantRecipe(quant), lora_rank=4, train_batch=4, train_seq=32,
                                                        torch_inference_graph=torch_graph), log=Progress(quiet=True))
    m = verify_files(out)                                    # the data files are hashed like every other file
    assert {"model.onnx.data", "train.onnx.data"} <= set(m.files), sorted(m.files)
    assert not [p.name for p in out.iterdir() if ".fp32" in p.name or ".opt" in p.name]   # no leftovers
    a, b = Engine(out), Engine(ref)
    ids = a.encode("valve 7 closed at noon")
    args = (np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None], a.empty_past(1))
    np.testing.assert_allclose(a.forward(*args)[0], b.forward(*args)[0], atol=1e-5)
    assert list(a.generate(ids, max_new_tokens=5, stop_ids=set())) == list(b.generate(ids, max_new_tokens=5, stop_ids=set()))


def test_generation_runs_the_head_on_the_last_prompt_position_only(tmp_path_factory, tiny_llama_dir):
    """The fused graph's head starts at ``logits_from``: generation asks for the last position (its
    logits equal that row of a full forward), scoring leaves the default and gets every position."""
    from edge_runtime.engine import Engine

    eng = Engine(tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "int4"))
    # the engine sees the input (onnxruntime lists inputs with a default apart, as overridable initializers: until
    # 2026-12 every prompt ran the head over all its positions, a fifth of a 512-token prefill)
    assert "logits_from" in eng.input_names
    ids = eng.encode("valve 7 closed at noon and the pump restarted")
    n = len(ids)
    feeds = {
        "input_ids": np.array([ids]),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n)[None],
        **eng.empty_past(1),
        **eng.adapter.feeds,
    }
    full = eng.forward(feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"], eng.empty_past(1))[0]
    assert full.shape[1] == n  # default: every position
    last = eng.session.run(["logits"], {**feeds, "logits_from": np.array([n - 1], np.int64)})[0]
    assert last.shape == (1, 1, full.shape[-1])
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5)


def test_shipped_native_check_graph_is_what_the_exporter_writes():
    """edge_runtime/data/native_check.onnx (devices cannot build it: no onnx package there) is exactly
    the exporter's graph of one node per native kernel, and its standard-operator form (the functions
    inlined, no library registered) computes what the kernels are checked against."""
    import onnxruntime as ort
    from edge_runtime.native import CHECK_MODEL, Q8_CHECK_SHAPE, check_q8_weight, q8_dequantize
    from export.quantize import native_check_model
    assert CHECK_MODEL.read_bytes() == native_check_model().SerializeToString()
    sess = ort.InferenceSession(str(CHECK_MODEL), providers=["CPUExecutionProvider"])
    r, c, _ = Q8_CHECK_SHAPE
    d = q8_dequantize(*check_q8_weight())
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.standard_normal((2, 5, i.shape[-1])).astype(np.float32) for i in sess.get_inputs()}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    np.testing.assert_allclose(got["y_t"], feeds["x_t"] @ d.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["y_n"], feeds["x_n"] @ d, rtol=1e-5, atol=1e-5)


def test_training_graph_reads_one_8bit_copy_of_each_frozen_weight(tmp_path, tiny_llama_dir):
    """train.onnx of a quantized bundle multiplies by each frozen weight in both orientations (forward,
    recomputation, input gradient) through Q8MatMulTransB / Q8MatMul calls on one int8 copy. With the
    weights already on the 8-bit grid (blocks of 32 along the input) the 8-bit step is exact, so its loss
    and LoRA gradients must be the fp32 bundle's, with the compiled kernels and without them."""
    import shutil
    import onnx
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from edge_runtime.protocol.adapter import load_adapter, stack_adapter
    from edge_runtime.protocol.manifest import Manifest
    from edge_runtime.trainer import OnnxTrainer
    from export.build import BuildOptions, Progress, build_bundle
    from export.quantize import QuantRecipe, q8_quantize
    from export.verify import random_adapter
    from helpers import examples
    src = tmp_path / "grid"
    shutil.copytree(tiny_llama_dir, src)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():   # every frozen weight (decoder linears, the tied embedding/head) onto the grid
        for name, p in model.named_parameters():
            if p.ndim == 2:
                q, s = q8_quantize(p.numpy(), 32)
                p.copy_(torch.from_numpy((q.reshape(len(q), -1, 32) * s[..., None]).reshape(p.shape)))
    model.save_pretrained(src)
    bundles = {}
    for name in ("fp32", "int8"):
        bundles[name] = tmp_path / name
        build_bundle(str(src), bundles[name], BuildOptions(quant=QuantRecipe(name), lora_rank=4, train_batch=3, train_seq=24,
                                                           verify=False), log=Progress(quiet=True))
    graph = onnx.load(str(bundles["int8"] / "train.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMulNBits" not in ops and ops.count("Q8MatMul") > 0 and ops.count("Q8MatMulTransB") > ops.count("Q8MatMul")
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    cfg = model.config
    assert len(int8) == 7 * cfg.num_hidden_layers + 1   # q k v o gate up down per layer, the tied head: once each
    floats = [list(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert [cfg.vocab_size, cfg.hidden_size] not in floats   # embedding lookups read the head's 8-bit rows
    m = Manifest.load(bundles["int8"])
    tok = Tokenizer.from_file(str(bundles["int8"] / "tokenizer" / "tokenizer.json"))
    _, meta = load_adapter(bundles["int8"] / "adapter.safetensors")
    out = {}
    for name, native in (("fp32", True), ("int8", True), ("int8", False)):
        tr = OnnxTrainer(bundles[name], m, tok, native=native)
        params = stack_adapter(random_adapter(meta.shapes, seed=3, scale=0.2), tr.targets, tr.layers)
        batch = tr.make_batch(examples(2) + [{"text": "valve 7 closed", "prompt": "valve"}])
        out[(name, native)] = tr.loss_and_grads(params, batch)
        assert tr.native is (name == "int8" and native)   # the machine has a C compiler: kernels in use
    loss, grads = out[("fp32", True)]
    for key in (("int8", True), ("int8", False)):
        assert abs(out[key][0] - loss) <= 1e-5 * abs(loss), key
        for k, g in grads.items():
            np.testing.assert_allclose(out[key][1][k], g, rtol=1e-4, atol=1e-4 * np.abs(g).max(), err_msg=f"{key} {k}")


def test_microbatched_training_graph_gives_the_whole_batch_step(tmp_path_factory, tiny_llama_dir):
    """--train-microbatch: the graph takes 2 rows and the trainer runs it twice per step of 4 examples;
    loss and gradients are the whole batch's (means weighted by scored tokens: rows of different
    lengths, a prompt mask, a padding row)."""
    import onnx
    from tokenizers import Tokenizer
    from edge_runtime.protocol.adapter import load_adapter, stack_adapter
    from edge_runtime.protocol.manifest import Manifest
    from edge_runtime.trainer import OnnxTrainer
    from export.verify import random_adapter
    from helpers import examples
    whole = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "int8", train_batch=4)
    micro = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "int8", train_batch=4, train_microbatch=2)
    mw, mm = Manifest.load(whole), Manifest.load(micro)
    assert (mw.training.batch, mw.training.microbatch) == (4, None) and (mm.training.batch, mm.training.microbatch) == (4, 2)
    graph_input = onnx.load(str(micro / "train.onnx"), load_external_data=False).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_value == 2
    tok = Tokenizer.from_file(str(whole / "tokenizer" / "tokenizer.json"))
    _, meta = load_adapter(whole / "adapter.safetensors")
    rows = [examples(1)[0], {"text": "valve 7 closed after the pressure test", "prompt": "valve 7"}, {"text": "ok"}]
    out = []
    for b, m in ((whole, mw), (micro, mm)):
        tr = OnnxTrainer(b, m, tok)
        params = stack_adapter(random_adapter(meta.shapes, seed=4, scale=0.2), tr.targets, tr.layers)
        out.append(tr.loss_and_grads(params, tr.make_batch(rows)))   # 3 examples: the 4th row is padding
    assert abs(out[0][0] - out[1][0]) <= 1e-5 * abs(out[0][0])
    for k, g in out[0][1].items():
        np.testing.assert_allclose(out[1][1][k], g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=k)


def test_tied_embedding_reads_the_8bit_head_rows(tmp_path_factory, tiny_llama_dir):
    """With an 8-bit head (the int4 default) the tied embedding's float table leaves the inference graph:
    its rows come from the head's uint8 rows and scales ((q - 128) * scale, one scale per block)."""
    import onnx
    from onnx import numpy_helper
    import onnxruntime as ort
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "int4")
    model = onnx.load(str(b / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    vocab, hidden = 384, 64
    assert not any(a.dtype == np.float32 and a.shape == (vocab, hidden) for a in inits.values())
    # the rows are the head's own 8-bit bytes: the ones its Q8Linear call reads, regrouped, with fp16 scales
    gathers = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    q = inits[next(v for k, v in gathers.items() if k.endswith("q8_rows"))]
    s = inits[next(v for k, v in gathers.items() if k.endswith("q8_row_scales"))]
    head = next(n for n in model.graph.node if n.op_type == "Q8Linear" and "logits" in n.output)
    from edge_runtime.native import q8_pack
    np.testing.assert_array_equal(inits[head.input[1]], q8_pack(q.reshape(vocab, hidden // 32, 32)))
    np.testing.assert_array_equal(inits[head.input[2]], s.reshape(vocab, -1).T.astype(np.float16))
    want = ((q.astype(np.float32) - 128) * s[..., None]).reshape(vocab, hidden)
    # the graph's embedding output: the lookup's last node, exposed as an extra output of a copy
    out = next(n for n in model.graph.node if n.op_type == "Reshape" and n.input[0].endswith("q8_blocks")).output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 77, 383, 0]], np.int64)
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32 if "float" in i.type else np.int64)
             for i in sess.get_inputs()}
    feeds.update({"input_ids": ids, "attention_mask": np.ones((1, 4), np.int64), "position_ids": np.arange(4)[None]})
    for name in [i.name for i in sess.get_inputs() if i.name.startswith("past.")]:
        feeds[name] = np.zeros((1, feeds[name].shape[1], 0, feeds[name].shape[3]), np.float32)
    got = sess.run([out], feeds)[0]
    np.testing.assert_array_equal(got[0], want[ids[0]])


def test_training_graph_keeping_activations_gives_the_recomputing_step(tmp_path_factory, tiny_llama_dir):
    """--no-train-recompute: each frozen weight's forward runs once (no recomputation in the backward),
    and loss and LoRA gradients are the recomputing graph's. Neither graph scatters gradients into
    zero-filled copies (rotary halves, stacked LoRA tensors) nor raises anything to the power 1."""
    import onnx
    from onnx import numpy_helper
    from tokenizers import Tokenizer
    from edge_runtime.protocol.adapter import load_adapter, stack_adapter
    from edge_runtime.protocol.manifest import Manifest
    from edge_runtime.trainer import OnnxTrainer
    from export.cli import build_options, parser
    from export.verify import random_adapter
    from helpers import examples
    args = parser().parse_args(["build", "m", "-o", "out", "--no-train-recompute"])
    assert build_options(args).train_recompute is False
    assert build_options(parser().parse_args(["build", "m", "-o", "out"])).train_recompute is True
    root = tmp_path_factory.getbasetemp()
    bundles = {rc: tiny_bundle(root, tiny_llama_dir, "int8", train_recompute=rc) for rc in (True, False)}
    graphs = {rc: onnx.load(str(b / "train.onnx"), load_external_data=False).graph for rc, b in bundles.items()}
    ops = {rc: [n.op_type for n in g.node] for rc, g in graphs.items()}
    for rc, g in graphs.items():
        rows = {i.name: i.dims[0] for i in g.initializer if i.data_type == onnx.TensorProto.INT8}
        vocab = max(rows.values())   # the tied head's 8-bit copy [vocab, hidden]
        forward = [n for n in g.node if n.op_type == "Q8MatMulTransB"]
        chunks = sum(rows[n.input[1]] == vocab for n in forward)   # the head runs once a chunk of positions
        layer_forward = len(forward) - chunks
        # the recomputation runs each layer's forward matmuls again (tiny model: 2 layers x 7), all but down_proj's,
        # whose output the backward does not read
        assert layer_forward == 2 * 7 + (2 * 6 if rc else 0), (rc, layer_forward)
        assert chunks == (2 if rc else 1), (rc, chunks)   # 31 positions: chunks of 16, or one of ~128 rows (4 x 31)
        # the head's own scatters: the backward of h[:, :-1] (ScatterND) and each chunk's one-hot targets
        # (ScatterElements); per-layer scatters (rotary halves, stacked LoRA tensors) are gone
        assert ops[rc].count("ScatterND") <= 1 and ops[rc].count("ScatterElements") <= chunks, rc
        consts = {i.name: numpy_helper.to_array(i) for i in g.initializer if not i.external_data and i.data_type == onnx.TensorProto.FLOAT}
        consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
        powers = [float(consts[n.input[1]].reshape(())) for n in g.node if n.op_type == "Pow" and n.input[1] in consts]
        assert powers and 1.0 not in powers, (rc, powers)
    assert ops[True].count("Q8MatMul") - ops[False].count("Q8MatMul") == 1   # the head's input gradient: once a chunk
    m = Manifest.load(bundles[True])
    tok = Tokenizer.from_file(str(bundles[True] / "tokenizer" / "tokenizer.json"))
    _, meta = load_adapter(bundles[True] / "adapter.safetensors")
    out = []
    for b in bundles.values():
        tr = OnnxTrainer(b, m, tok)
        params = stack_adapter(random_adapter(meta.shapes, seed=5, scale=0.2), tr.targets, tr.layers)
        out.append(tr.loss_and_grads(params, tr.make_batch(examples(3) + [{"text": "valve 7 closed", "prompt": "valve"}])))
    assert abs(out[0][0] - out[1][0]) <= 1e-5 * abs(out[0][0])
    for k, g in out[0][1].items():
        np.testing.assert_allclose(out[1][1][k], g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=k)


def test_unit_powers_leave_the_graph():
    """drop_unit_powers: Pow(x, 1) goes and its users read x; other powers, and a Pow(x, 1) that is a graph
    output, stay; the graph computes what it did."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from export.torch_onnx import drop_unit_powers
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("Pow", ["x", "one"], ["p1"]),
        helper.make_node("Constant", [], ["one_i"], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Pow", ["p1", "one_i"], ["p2"]),
        helper.make_node("Pow", ["p2", "two"], ["sq"]),
        helper.make_node("Mul", ["sq", "p2"], ["y"]),
        helper.make_node("Pow", ["x", "one"], ["z"]),
    ]
    io = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [3])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [io("x")], [io("y"), io("z")], [one, two]),
                              opset_imports=[helper.make_opsetid("", 18)])
    x = np.array([-1.5, 0.5, 3.0], np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert drop_unit_powers(model) == 2
    onnx.checker.check_model(model)
    pows = [(n.input[0], n.input[1]) for n in model.graph.node if n.op_type == "Pow"]
    assert pows == [("x", "two"), ("x", "one")]   # x ** 2 now reads x; the output z keeps its node
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6)
