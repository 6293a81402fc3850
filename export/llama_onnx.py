"""Llama-family inference graph written directly in ONNX with onnxruntime's fused operators.

The torch exporter turns each decoder layer into ~60 small nodes (rotary slices, head reshapes,
GQA repeats, mask arithmetic, cache concatenation); at batch 1 their dispatch cost is larger than
the 4-bit matmuls themselves. This builder emits per layer: two SkipSimplifiedLayerNormalization
(residual add + RMSNorm), four MatMuls (what the quantizers act on: q/k/v packed into one, fed
packed to attention, gate/up into one and split, then o and down), one GroupQueryAttention (rotary,
KV-cache append, grouped heads, causal softmax), SiLU as Sigmoid + Mul, and per group of modules
with LoRA targets one Gather + FusedMatMul pair for A and for B (the stacked LoRA inputs are packed
per group once per run). Same inputs and outputs as the torch-exported graph
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

    packed_lora: dict[str, tuple[str, str]] = {}

    def group_lora(names: list[str], modules: dict) -> tuple[str, str] | None:
        """Once per run, for a group of modules sharing one MatMul: the stacked LoRA inputs of its
        targets packed so one FusedMatMul pair serves the whole group, A as [L, r*T, in] (targets'
        rows one after another) and B as [L, sum(out), r*T] (each target's B in its rows and its own r
        columns, zeros elsewhere). Each layer then gathers its slice: 2 Gathers and 2 FusedMatMuls
        per group instead of per target, and the delta is added before the split."""
        tg = [m for m in names if m in lora_targets]
        if not tg:
            return None
        key = "+".join(names)
        if key in packed_lora:
            return packed_lora[key]
        r = graph.lora.rank
        if len(tg) == 1 and len(names) == 1:
            packed_lora[key] = (f"lora_A.{tg[0]}", f"lora_B.{tg[0]}")
            return packed_lora[key]
        a = f"lora_A.{tg[0]}" if len(tg) == 1 else node("Concat", [f"lora_A.{m}" for m in tg], [f"lora.{key}.A"],
                                                          f"lora.{key}.A", axis=1)
        parts = []
        for m in names:
            if m in tg:
                j = tg.index(m)
                pads = const(f"lora.{key}.{m}.pads", np.array([0, 0, j * r, 0, 0, (len(tg) - 1 - j) * r], np.int64))
                parts.append(node("Pad", [f"lora_B.{m}", pads], [f"lora.{key}.{m}.B"], f"lora.{key}.{m}.pad") if len(tg) > 1
                             else f"lora_B.{m}")
            else:
                parts.append(const(f"{key}.lora_zeros.{m}", np.zeros((L, modules[m].out_features, r * len(tg)), np.float32)))
        b = node("Concat", parts, [f"lora.{key}.B"], f"lora.{key}.B", axis=1)
        packed_lora[key] = (a, b)
        return packed_lora[key]

    def linears(prefix, inp, modules: dict, i, split: bool = True):
        """One MatMul for the modules that read the same input (q/k/v, gate/up), plus the group's LoRA
        delta, split after (unless ``split`` is False: the packed output is returned); the node is
        named ``<prefix>.<m1>+<m2>...`` so quantizer options can still find a module by name."""
        names = list(modules)
        w = np.concatenate([t(modules[m].weight).T for m in names], axis=1)
        tag = f"{prefix}.{'+'.join(names)}"
        y = node("MatMul", [inp, const(f"{tag}.weight.T", w)], [f"{tag}.mm"], f"{tag}.mm")
        if any(getattr(modules[m], "bias", None) is not None for m in names):
            bias = np.concatenate([t(modules[m].bias) if getattr(modules[m], "bias", None) is not None
                                   else np.zeros(modules[m].out_features, np.float32) for m in names])
            y = node("Add", [y, const(f"{tag}.bias", bias)], [f"{tag}.b"], f"{tag}.bias")
        packed = group_lora(names, modules)
        if packed is not None:
            idx = const(f"idx{i}", np.array(i, np.int64))
            a = node("Gather", [packed[0], idx], [f"{tag}.A"], f"{tag}.A", axis=0)
            b = node("Gather", [packed[1], idx], [f"{tag}.B"], f"{tag}.B", axis=0)
            xa = node("FusedMatMul", [inp, a], [f"{tag}.xa"], f"{tag}.xa", domain=MS, transB=1, alpha=1.0)
            d = node("FusedMatMul", [xa, b], [f"{tag}.lora"], f"{tag}.lora", domain=MS, transB=1, alpha=scale)
            y = node("Add", [y, d], [f"{tag}.out"], f"{tag}.out")
        if len(names) == 1 or not split:
            return [y]
        sizes = const(f"{tag}.sizes", np.array([modules[m].out_features for m in names], np.int64))
        return node("Split", [y, sizes], [f"{tag}.{m}" for m in names], f"{tag}.split", axis=-1)

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
        (qkv,) = linears(p, h, {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}, i, split=False)
        a = node("GroupQueryAttention", [qkv, "", "", f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_len",
                                         "cos_cache", "sin_cache"],  # packed q/k/v: no Split
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
