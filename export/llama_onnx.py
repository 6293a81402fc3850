"""Llama-family inference graph written directly in ONNX with onnxruntime's fused operators.

The torch exporter turns each decoder layer into ~60 small nodes (rotary slices, head reshapes,
GQA repeats, mask arithmetic, cache concatenation); at batch 1 their dispatch cost is larger than
the 4-bit matmuls themselves. This builder emits per layer: two SkipSimplifiedLayerNormalization
(residual add + RMSNorm), four MatMuls (what the quantizers act on: q/k/v packed into one, fed
packed to attention, gate/up into one and split, then o and down), one GroupQueryAttention (rotary,
KV-cache append, grouped heads, causal softmax), SiLU as Sigmoid + Mul, and per group of modules
with LoRA targets one low-rank term over per-layer inputs that the engine packs once per adapter
(``edge_runtime.lowrank``; the asymmetric 4-bit recipe folds its offsets into the same term). Same
token/cache inputs and outputs as the torch-exported graph (``export.graphs.LlamaGraph``);
``position_ids`` is accepted but positions come from the attention mask (contiguous, right-padded
sequences, which is what the engine feeds).

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


def build_llama_onnx(graph, path, lora_targets, opset: int) -> list[dict]:
    """Write the inference graph of ``graph`` (an ``export.graphs.LlamaGraph``) to ``path``; returns its
    low-rank LoRA slots (``edge_runtime.lowrank.Slot`` as JSON) for the manifest."""
    from onnx import TensorProto, helper, numpy_helper

    L, nh, nkv, hd = graph.n_layers, graph.n_heads, graph.n_kv, graph.head_dim
    cfg = graph.cfg
    vocab = graph.head_wT.shape[1]
    eps = float(graph.eps)
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

    slots: list[dict] = []
    r = graph.lora.rank
    lowrank_inputs = []

    def lowrank(tag: str, names: list[str], modules: dict, i: int, inp: str) -> str | None:
        """The group's LoRA term ``(x @ L) @ R`` over per-layer inputs packed once per adapter by the
        engine (``edge_runtime.lowrank``): one matmul pair for all of the group's targets, added before
        the split. Zero defaults serve the base model; quantizers may prepend a base prefix."""
        tg = [m for m in names if m in lora_targets]
        if not tg:
            return None
        cols, c = {}, 0
        for m in names:
            cols[m] = c
            c += modules[m].out_features
        k_in = modules[names[0]].in_features
        ln, rn = f"lowrank.{i}.{'+'.join(names)}.L", f"lowrank.{i}.{'+'.join(names)}.R"
        const(ln, np.zeros((k_in, r * len(tg)), np.float32))
        const(rn, np.zeros((r * len(tg), c), np.float32))
        lowrank_inputs.append(helper.make_tensor_value_info(ln, TensorProto.FLOAT, [k_in, r * len(tg)]))
        lowrank_inputs.append(helper.make_tensor_value_info(rn, TensorProto.FLOAT, [r * len(tg), c]))
        slots.append(
            {
                "layer": i,
                "matmul": f"{tag}.mm",  # the group's weight matmul: the quantizer is told, it does not search
                "L": ln,
                "R": rn,
                "in": k_in,
                "out": c,
                "prefix": 0,
                "targets": [[m, cols[m], modules[m].out_features] for m in tg],
            }
        )
        # FusedMatMul, not MatMul: weight quantizers must leave these (graph inputs with defaults) alone
        u = node("FusedMatMul", [inp, ln], [f"{tag}.lr_u"], f"{tag}.lr_u", domain=MS, alpha=1.0)
        return node("FusedMatMul", [u, rn], [f"{tag}.lr_d"], f"{tag}.lr_d", domain=MS, alpha=1.0)

    def linears(prefix, inp, modules: dict, i, split: bool = True):
        """One MatMul for the modules that read the same input (q/k/v, gate/up), plus the group's LoRA
        delta, split after (unless ``split`` is False: the packed output is returned); the node is
        named ``<prefix>.<m1>+<m2>...`` so quantizer options can still find a module by name."""
        names = list(modules)
        w = np.concatenate([t(modules[m].weight).T for m in names], axis=1)
        tag = f"{prefix}.{'+'.join(names)}"
        y = node("MatMul", [inp, const(f"{tag}.weight.T", w)], [f"{tag}.mm"], f"{tag}.mm")
        if any(getattr(modules[m], "bias", None) is not None for m in names):
            bias = np.concatenate(
                [
                    t(modules[m].bias)
                    if getattr(modules[m], "bias", None) is not None
                    else np.zeros(modules[m].out_features, np.float32)
                    for m in names
                ]
            )
            y = node("Add", [y, const(f"{tag}.bias", bias)], [f"{tag}.b"], f"{tag}.bias")
        d = lowrank(tag, names, modules, i, inp)
        if d is not None:
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
            h, residual = node(
                "SkipSimplifiedLayerNormalization",
                [residual, delta, w_in],
                [f"{p}.h_attn", "", "", f"{p}.resid_in"],
                f"{p}.norm_in",
                domain=MS,
                epsilon=eps,
            )
        (qkv,) = linears(p, h, {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}, i, split=False)
        a = node(
            "GroupQueryAttention",
            [
                qkv,
                "",
                "",
                f"past.{i}.key",
                f"past.{i}.value",
                "seqlens_k",
                "total_len",
                "cos_cache",
                "sin_cache",
            ],  # packed q/k/v: no Split
            [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"],
            f"{p}.gqa",
            domain=MS,
            num_heads=nh,
            kv_num_heads=nkv,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(1.0 / np.sqrt(hd)),
        )[0]
        (o,) = linears(p, a, {"o_proj": attn.o_proj}, i)
        w_post = const(f"{p}.post_attention_layernorm.weight", t(layer.post_attention_layernorm.weight))
        h2, residual = node(
            "SkipSimplifiedLayerNormalization",
            [residual, o, w_post],
            [f"{p}.h_mlp", "", "", f"{p}.resid_mlp"],
            f"{p}.norm_post",
            domain=MS,
            epsilon=eps,
        )
        g, u = linears(p, h2, {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}, i)
        sg = node("Sigmoid", [g], [f"{p}.sig"], f"{p}.sig")
        act = node("Mul", [node("Mul", [g, sg], [f"{p}.silu"], f"{p}.silu"), u], [f"{p}.act"], f"{p}.act")
        (delta,) = linears(p, act, {"down_proj": mlp.down_proj}, i)
    hf = node(
        "SkipSimplifiedLayerNormalization",
        [residual, delta, const("norm.weight", t(graph.norm_w))],
        ["final_norm"],
        "final_norm",
        domain=MS,
        epsilon=eps,
    )
    # The head runs on positions logits_from.. only: generation needs the last one (for a 512-token
    # prompt the head over every position is a fifth of the prefill's multiply-adds and a 100 MB
    # tensor); scoring leaves the input at its default, 0, for all of them.
    tail = node(
        "Slice",
        [
            hf,
            "logits_from",
            const("lm_head.slice_end", np.array([np.iinfo(np.int64).max], np.int64)),
            const("lm_head.slice_axis", np.array([1], np.int64)),
        ],
        ["final_norm_tail"],
        "lm_head_positions",
    )
    node("MatMul", [tail, const("lm_head.weight.T", t(graph.head_wT))], ["logits"], "lm_head")
    inits.append(numpy_helper.from_array(np.zeros(1, np.int64), "logits_from"))

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1]),  # default 0: every position
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "positions", vocab])]
    for i in range(L):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kv}", TensorProto.FLOAT, ["batch", nkv, "past", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, ["batch", nkv, "total", hd]))
    inputs += lowrank_inputs
    g = helper.make_graph(nodes, "edgefm_llama", inputs, outputs, inits)
    model = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)], producer_name="edgefm", ir_version=9
    )
    from export import onnxfile

    onnxfile.save(model, path)  # external data beside it when the weights pass protobuf's limit
    return slots
