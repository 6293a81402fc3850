"""Llama-family inference graph written directly in ONNX with onnxruntime's fused operators.

The torch exporter turns each decoder layer into ~60 small nodes (rotary slices, head reshapes,
GQA repeats, mask arithmetic, cache concatenation); at batch 1 their dispatch cost is larger than
the 4-bit matmuls themselves. This builder emits per layer: two SkipSimplifiedLayerNormalization
(residual add + RMSNorm), four MatMuls (what the quantizers act on: q/k/v packed into one and
gate/up into one, each followed by a Split, then o and down), one GroupQueryAttention (rotary,
KV-cache append, grouped heads, causal softmax), SiLU as Sigmoid + Mul, and per LoRA target a
Gather + FusedMatMul pair for A and for B. Same inputs and outputs as the torch-exported graph
(``export.graphs.LlamaGraph``), so bundles, engine and verification are unchanged; ``position_ids``
is accepted but positions come from the attention mask (contiguous, right-padded sequences, which is
what the engine feeds).

Limits (the builder says so and the torch path is used instead): Qwen3's per-head q/k norms, rotary
scaling other than plain RoPE, attention biases other than q/k/v.
"""
from __future__ import annotations

import numpy as np

MS = "com.microsoft"


def unsupported(graph) -> str | None:
    """None if this ``LlamaGraph`` can be built here; else what stands in the way."""
    cfg = graph.cfg
    layer = graph.layers[0]
    if getattr(layer.self_attn, "q_norm", None) is not None:
        return "per-head q/k RMSNorm (Qwen3)"
    rs = getattr(cfg, "rope_scaling", None) or {}
    kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
    if kind not in (None, "default"):
        return f"rope scaling {kind!r}"
    if getattr(layer.self_attn.o_proj, "bias", None) is not None or getattr(layer.mlp.down_proj, "bias", None) is not None:
        return "output/MLP biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    return None


def build_llama_onnx(graph, path, lora_targets, opset: int) -> None:
    """Write the inference graph of ``graph`` (an ``export.graphs.LlamaGraph``) to ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    L, nh, nkv, hd = graph.n_layers, graph.n_heads, graph.n_kv, graph.head_dim
    cfg = graph.cfg
    vocab = graph.head_wT.shape[1]
    eps = float(graph.eps)
    scale = float(graph.lora.scale)
    max_pos = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
    nodes, inits = [], []

    names: set[str] = set()

    def const(name, arr):
        if name not in names:  # shared constants (layer indices) are written once
            names.add(name)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, ins, outs, name, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=name, domain=domain, **attrs))
        named = [o for o in outs if o]
        return named[0] if len(named) == 1 else named

    def t(x):
        return x.detach().float().cpu().numpy()

    # sequence bookkeeping for GroupQueryAttention
    node("ReduceSum", ["attention_mask", const("axes1", np.array([1], np.int64))], ["mask_len"], "mask_len", keepdims=0)
    node("Sub", ["mask_len", const("one_i64", np.array(1, np.int64))], ["seqlens_k64"], "seqlens_k64")
    node("Cast", ["seqlens_k64"], ["seqlens_k"], "seqlens_k", to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"], "mask_shape")
    node("Gather", ["mask_shape", const("one_idx", np.array([1], np.int64))], ["total64"], "total64", axis=0)
    node("Cast", ["total64"], ["total_len"], "total_len", to=TensorProto.INT32)
    inv = t(graph.inv_freq)
    freqs = np.arange(max_pos, dtype=np.float32)[:, None] * inv[None, :]
    const("cos_cache", np.cos(freqs).astype(np.float32))
    const("sin_cache", np.sin(freqs).astype(np.float32))
    x = node("Gather", [const("embed.weight", t(graph.embed)), "input_ids"], ["embeds"], "embed", axis=0)

    def lora(y, name, target, inp, i):
        if target not in lora_targets:
            return y
        a = node("Gather", [f"lora_A.{target}", const(f"idx{i}", np.array(i, np.int64))], [f"{name}.A"], f"{name}.A", axis=0)
        b = node("Gather", [f"lora_B.{target}", f"idx{i}"], [f"{name}.B"], f"{name}.B", axis=0)
        xa = node("FusedMatMul", [inp, a], [f"{name}.xa"], f"{name}.xa", domain=MS, transB=1, alpha=1.0)
        d = node("FusedMatMul", [xa, b], [f"{name}.lora"], f"{name}.lora", domain=MS, transB=1, alpha=scale)
        return node("Add", [y, d], [f"{name}.out"], f"{name}.out")

    def linears(prefix, inp, modules: dict, i):
        """One MatMul for the modules that read the same input (q/k/v, gate/up), split after; the node
        is named ``<prefix>.<m1>+<m2>...`` so quantizer options can still find a module by name."""
        names = list(modules)
        w = np.concatenate([t(modules[m].weight).T for m in names], axis=1)
        tag = f"{prefix}.{'+'.join(names)}"
        y = node("MatMul", [inp, const(f"{tag}.weight.T", w)], [f"{tag}.mm"], f"{tag}.mm")
        if any(getattr(modules[m], "bias", None) is not None for m in names):
            bias = np.concatenate([t(modules[m].bias) if getattr(modules[m], "bias", None) is not None
                                   else np.zeros(modules[m].out_features, np.float32) for m in names])
            y = node("Add", [y, const(f"{tag}.bias", bias)], [f"{tag}.b"], f"{tag}.bias")
        if len(names) == 1:
            outs = [y]
        else:
            sizes = const(f"{tag}.sizes", np.array([modules[m].out_features for m in names], np.int64))
            outs = node("Split", [y, sizes], [f"{tag}.{m}" for m in names], f"{tag}.split", axis=-1)
        return [lora(o, f"{prefix}.{m}", m, inp, i) for o, m in zip(outs, names)]

    residual, delta = x, None
    for i in range(L):
        layer = graph.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        p = f"layers.{i}"
        w_in = const(f"{p}.input_layernorm.weight", t(layer.input_layernorm.weight))
        if delta is None:
            h = node("SimplifiedLayerNormalization", [residual, w_in], [f"{p}.h_attn"], f"{p}.norm_in", axis=-1, epsilon=eps)
        else:
            h, residual = node("SkipSimplifiedLayerNormalization", [residual, delta, w_in],
                               [f"{p}.h_attn", "", "", f"{p}.resid_in"], f"{p}.norm_in", domain=MS, epsilon=eps)
        q, k, v = linears(p, h, {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}, i)
        a = node("GroupQueryAttention", [q, k, v, f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_len",
                                         "cos_cache", "sin_cache"],
                 [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"], f"{p}.gqa", domain=MS,
                 num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0, scale=float(1.0 / np.sqrt(hd)))[0]
        (o,) = linears(p, a, {"o_proj": attn.o_proj}, i)
        w_post = const(f"{p}.post_attention_layernorm.weight", t(layer.post_attention_layernorm.weight))
        h2, residual = node("SkipSimplifiedLayerNormalization", [residual, o, w_post],
                            [f"{p}.h_mlp", "", "", f"{p}.resid_mlp"], f"{p}.norm_post", domain=MS, epsilon=eps)
        g, u = linears(p, h2, {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}, i)
        sg = node("Sigmoid", [g], [f"{p}.sig"], f"{p}.sig")
        act = node("Mul", [node("Mul", [g, sg], [f"{p}.silu"], f"{p}.silu"), u], [f"{p}.act"], f"{p}.act")
        (delta,) = linears(p, act, {"down_proj": mlp.down_proj}, i)
    hf = node("SkipSimplifiedLayerNormalization", [residual, delta, const("norm.weight", t(graph.norm_w))],
              ["final_norm"], "final_norm", domain=MS, epsilon=eps)
    node("MatMul", [hf, const("lm_head.weight.T", t(graph.head_wT))], ["logits"], "lm_head")

    dims = {m: graph.module_dims()[m] for m in lora_targets}
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    for i in range(L):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kv}", TensorProto.FLOAT, ["batch", nkv, "past", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, ["batch", nkv, "total", hd]))
    for tname in lora_targets:
        fin, fout = dims[tname]
        inputs.append(helper.make_tensor_value_info(f"lora_A.{tname}", TensorProto.FLOAT, [L, graph.lora.rank, fin]))
        inputs.append(helper.make_tensor_value_info(f"lora_B.{tname}", TensorProto.FLOAT, [L, fout, graph.lora.rank]))
    g = helper.make_graph(nodes, "edgefm_llama", inputs, outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="edgefm", ir_version=9)
    onnx.save(model, str(path))
