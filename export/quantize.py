"""Weight quantizers for exported graphs: a registry of small classes around onnxruntime.quantization,
plus our own asymmetric 4-bit recipe.

Measured on SmolLM2-135M (GGUF Q4_1 source expanded to fp32; held-out perplexity 41.18 in fp32;
2-core x86, onnxruntime 1.31, fused-operator graph; BENCHMARKS.md has the run with its command):

| recipe | decode vs torch fp32 | perplexity vs fp32 |
|---|---|---|
| int8 = 8-bit weight-only MatMulNBits, symmetric, accuracy level 4 | 6.9x | +0.6% |
| int8-dynamic (quantize_dynamic, per-channel) | 8.0x | +54% |
| int4 asym (default): min/max grid per block of 32 + offset term, 8-bit head | 6.7x | +0.3% |
| int4 RTN symmetric block 32 + 8-bit head (`--int4-algo rtn`) | 8.1x | +11.6% |
| int4 HQQ + 8-bit down_proj and head (`--int4-algo hqq --sensitive-8bit down_proj`) | 0.8x | +0.9% |

Symmetric recipes on another run (2026-12-02, 2-core AMD EPYC, Python docstrings: fp32 perplexity 24.03;
`bench/decode.py`, decode vs torch eager):

| recipe | decode vs torch fp32 | perplexity vs fp32 |
|---|---|---|
| int4 RTN symmetric + 8-bit head (`--int4-algo rtn`) | 13.2x | +26.9% |
| int4 sym: symmetric, scale searched per block against the activations (`--int4-algo sym`), 8-bit head | 11.4x | +8.1% |
| int4 sym + 4-bit head (`--int4-algo sym --head quant`): the fewest bytes a token (75 MB) | 12.2x | +12.7% |
| int4 asym + 4-bit head (`--head quant`) | 11.4x | +3.8% |

(rtn and sym run the same kernel on the same number of bytes: their decode differs by this machine's noise.)
Without the activation weights the same search gave +24.8% (+8.1% with them): SmolLM2's few channels with
activations in the hundreds decide most of the error, and a plain least-squares fit spends the grid on
the others.

The asym weights reproduce the source grid exactly; what perplexity moves is the int8 activations of
accuracy level 4 (SmolLM2 has outlier activations of several hundred in its third layer, which make
the result sensitive to last-bit differences: the same weights gave +0.01% and +0.3% with block sums
computed by a matmul or by ReduceSum).

Why asym: the source weights already sit on the GGUF Q4_1 grid (16 levels m + d*k per block of 32),
which no symmetric or integer-zero-point 4-bit grid reproduces, and float zero points (HQQ) take
onnxruntime's slow dequantize path on CPU. ``apply_asym_int4`` keeps the fast symmetric kernel
(implicit zero point 8) and adds the per-block offset as ``S(x) @ C`` with S(x) the sums of x over
each block: exact for grid-sourced weights, a better min/max fit than RTN for any other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from edge_runtime import native
from edge_runtime.errors import ExportError
from export import onnxfile


@dataclasses.dataclass
class QuantRecipe:
    """How the frozen base is stored."""

    scheme: Literal["fp32", "int8", "int8-dynamic", "int4", "nf4"] = "int4"
    block_size: int = 32  # int4 / nf4 block
    accuracy_level: int = 4  # MatMulNBits compute precision (0 default, 1 fp32, 4 int8)
    head: Literal["quant", "int8", "fp32"] = "int8"  # the (tied) LM head: the scheme, 8-bit weight-only, or fp32
    algo: Literal["asym", "sym", "hqq", "rtn"] = (
        "asym"  # int4: asym (min/max grid + offsets), sym (symmetric, scale searched), rtn (symmetric), hqq (slow on CPU)
    )
    sensitive_8bit: tuple[str, ...] = ()  # int4/nf4: modules kept in 8-bit weight-only (e.g. down_proj)
    train_base: Literal["same", "int8", "fp32"] = "int8"  # frozen base inside train.onnx (8-bit keeps gradients close)

    def __post_init__(self):
        if self.scheme not in QUANTIZERS:
            raise ExportError(f"unknown quantization {self.scheme!r}; choose one of {sorted(QUANTIZERS)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ExportError(f"block size {self.block_size} not supported; use 16, 32, 64, 128 or 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError("accuracy level must be 0-4 (see onnxruntime MatMulNBits)")
        if self.head not in ("quant", "int8", "fp32"):
            raise ExportError("head must be 'quant', 'int8' or 'fp32'")
        if self.algo not in ("asym", "sym", "hqq", "rtn"):
            raise ExportError("int4 algo must be 'asym', 'sym', 'rtn' or 'hqq'")
        self.sensitive_8bit = tuple(self.sensitive_8bit)


def const_matmuls(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """MatMul node name -> shape of its constant B (what weight-only quantizers act on)."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def head_nodes(model: onnx.ModelProto, output_name: str = "logits") -> list[str]:
    """Names of the MatMul nodes producing the LM-head output."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and output_name in n.output]


def nodes_for_modules(model: onnx.ModelProto, module_shapes: dict[str, tuple[int, int]], modules: tuple[str, ...]) -> list[str]:
    """MatMul nodes that compute one of ``modules``.

    Graphs from the fused builder name them ``layers.<i>.<m1>+<m2>.mm`` (a packed q/k/v or gate/up
    matmul is selected when any of its modules is asked for); torch-exported graphs are matched by the
    (in, out) shape of the constant B, which identifies Llama linears unambiguously (down_proj is the
    only [intermediate, hidden] one)."""
    wanted = {tuple(module_shapes[m]) for m in modules if m in module_shapes}
    others = {tuple(s) for m, s in module_shapes.items() if m not in modules}
    wanted -= others  # never catch a module we did not ask for when shapes coincide
    out = []
    for n, shape in const_matmuls(model).items():
        parts = n.split(".")
        named = len(parts) == 4 and parts[0] == "layers" and parts[3] == "mm"
        if (named and set(parts[2].split("+")) & set(modules)) or (not named and shape in wanted):
            out.append(n)
    return out


def fold_initializer_transposes(model: onnx.ModelProto) -> int:
    """Replace ``Transpose(initializer)`` by a pre-transposed initializer (in place, through chains of
    transposes, to a fixpoint); returns how many were folded.

    The exported training graph feeds many MatMuls with a transposed frozen weight; weight-only
    quantizers only act on MatMuls whose B is a constant, so without this pass those weights stay
    fp32 next to their quantized copies (the file grew instead of shrinking)."""
    from onnx import numpy_helper

    graph_inputs = {i.name for i in model.graph.input}
    total = 0
    while True:
        inits = {i.name: i for i in model.graph.initializer}
        folded = 0
        keep_nodes = []
        new_inits = []
        for node in model.graph.node:
            src = node.input[0] if node.op_type == "Transpose" and node.input else None
            if src in inits and src not in graph_inputs:
                arr = numpy_helper.to_array(inits[src])
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                new_inits.append(
                    numpy_helper.from_array(np.ascontiguousarray(arr.transpose(perm) if perm else arr.T), node.output[0])
                )
                folded += 1
                continue
            keep_nodes.append(node)
        if not folded:
            return total
        total += folded
        del model.graph.node[:]
        model.graph.node.extend(keep_nodes)
        model.graph.initializer.extend(new_inits)
        used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
        for i in [i for i in model.graph.initializer if i.name not in used]:
            model.graph.initializer.remove(i)


def _quiet_ort_quantizers() -> None:
    """onnxruntime's quantizers log one INFO line per node (hundreds); our progress lines say enough."""
    import logging

    for name in (
        "onnxruntime.quantization",
        "onnxruntime.quantization.matmul_nbits_quantizer",
        "onnxruntime.quantization.matmul_bnb4_quantizer",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def _nbits(model, bits, recipe, exclude=(), algo=None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet_ort_quantizers()
    q = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=recipe.block_size,
        is_symmetric=bits == 8 or recipe.algo == "rtn",
        accuracy_level=recipe.accuracy_level,
        nodes_to_exclude=list(exclude),
        algo_config=algo,
    )
    q.process()
    return q.model.model


class Quantizer:
    """Base quantizer: copies the graph unchanged (fp32)."""

    name = "fp32"

    def apply(
        self,
        src: Path,
        dst: Path,
        recipe: QuantRecipe,
        *,
        head: list[str],
        sensitive: list[str],
        lowrank: dict | None = None,
        calibration: list[int] | None = None,
    ) -> None:
        """Write a quantized copy of ``src`` to ``dst``; ``calibration``: token ids of real text for recipes
        that weigh their rounding by the activations (``--int4-algo sym``)."""
        onnxfile.copy(src, dst)


class Int8DynamicQuantizer(Quantizer):
    """ORT dynamic int8 (activations quantized per tensor at run time): fast, but costs perplexity."""

    name = "int8-dynamic"

    def apply(self, src, dst, recipe, *, head, sensitive, lowrank=None, calibration=None):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # MatMul only: quantizing the embedding Gather makes decode slower (dequantize every step).
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=head if recipe.head == "fp32" else [],
            use_external_data_format=onnxfile.has_external_data(src),
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )


class Int8WeightOnlyQuantizer(Quantizer):
    """8-bit weight-only (MatMulNBits bits=8, symmetric): near-fp32 quality at int8 speed; also the
    training graph's frozen base."""

    name = "int8"

    def apply(self, src, dst, recipe, *, head, sensitive, lowrank=None, calibration=None):
        model = onnxfile.load(src)
        fold_initializer_transposes(model)
        onnxfile.save(_nbits(model, 8, recipe, exclude=head if recipe.head == "fp32" else []), dst)


def asym_int4_blocks(w: np.ndarray, block: int, divisors=(15, 14, 13, 12)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit blocks along axis 0 of ``w`` [K, N]: w ~= s * (q - 8) + c per block.

    Returns codes q [N, K/block, block] (0..15), scales s [N, K/block] and offsets c [N, K/block].
    Per block, the step is (max - min) / d for the divisor d in ``divisors`` with the least squared
    error, then refit by least squares on the chosen codes: a block whose values already sit on a
    16-level grid (a GGUF Q4_0/Q4_1 source) is reproduced exactly."""
    K, N = w.shape
    x = np.ascontiguousarray(w.T, dtype=np.float64).reshape(N, K // block, block)
    mn, mx = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    best: list[np.ndarray] = []
    for d in divisors:
        s = np.maximum((mx - mn) / d, 1e-30)
        c = mn + 8 * s
        q = np.clip(np.rint((x - c) / s) + 8, 0, 15)
        err = ((s * (q - 8) + c - x) ** 2).sum(-1, keepdims=True)
        if not best:
            best = [q, s, c, err]
        else:
            better = err < best[3]
            for i, v in enumerate((q, s, c, err)):
                best[i] = np.where(better, v, best[i])
    q, s, c, err = best
    # least-squares refit of (s, c) for the chosen codes; kept only where it lowers the error
    u = q - 8
    um, xm = u.mean(-1, keepdims=True), x.mean(-1, keepdims=True)
    var = ((u - um) ** 2).sum(-1, keepdims=True)
    s2 = np.where(var > 0, ((u - um) * (x - xm)).sum(-1, keepdims=True) / np.where(var > 0, var, 1), s)
    s2 = np.where(s2 > 0, s2, s)
    c2 = xm - s2 * um
    q2 = np.clip(np.rint((x - c2) / s2) + 8, 0, 15)
    err2 = ((s2 * (q2 - 8) + c2 - x) ** 2).sum(-1, keepdims=True)
    take = err2 < err
    q, s, c = np.where(take, q2, q), np.where(take, s2, s), np.where(take, c2, c)
    return q.astype(np.uint8), s[..., 0].astype(np.float32), c[..., 0].astype(np.float32)


SYM_STEPS = np.linspace(0.8, 1.2, 21)  # sym_int4_blocks: the scales tried, as multiples of the max-abs scale


def sym_int4_blocks(w: np.ndarray, block: int, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit blocks along axis 0 of ``w`` [K, N]: w ~= s * (q - 8) per block, no offset.

    Returns codes q [N, K/block, block] (0..15) and scales s [N, K/block]. Per block, the value of
    largest magnitude fixes the sign (it may take level -8, the grid's longer side); each scale of
    ``SYM_STEPS`` times amax / 8 is tried, refit by least squares on its codes (sum(x u) / sum(u u)),
    and the one of least squared error kept. Round to nearest at amax / 8 (``--int4-algo rtn``, llama.cpp's
    Q4_0) is the candidate 1.0 before its refit, so the result is never worse than it.

    ``importance`` [K]: weights of the squared error per input channel (the mean square of the
    activations that meet it, ``input_importance``): an error on a channel whose inputs are large moves
    the output more, so the search trades it against errors where the inputs are small."""
    K, N = w.shape
    x = np.ascontiguousarray(w.T, dtype=np.float64).reshape(N, K // block, block)
    imp = (
        np.ones((1, K // block, block))
        if importance is None
        else np.asarray(importance, np.float64).reshape(1, K // block, block)
    )
    idx = np.abs(x).argmax(-1)[..., None]
    peak = np.take_along_axis(x, idx, -1)  # signed value of largest magnitude
    base = np.where(peak != 0, -peak / 8, 1e-30)  # its code is -8 at step 1.0

    def candidates():
        for f in SYM_STEPS:
            s = base * f
            u = np.clip(np.rint(x / s), -8, 7)
            uu = (imp * u * u).sum(-1, keepdims=True)
            s_fit = np.where(uu > 0, (imp * u * x).sum(-1, keepdims=True) / np.where(uu > 0, uu, 1), s)
            yield s, u
            yield s_fit, np.clip(np.rint(x / np.where(s_fit != 0, s_fit, 1e-30)), -8, 7)

    found = candidates()
    best_s, best_q = next(found)
    best_err = (imp * (best_s * best_q - x) ** 2).sum(-1, keepdims=True)
    for cs, cu in found:
        err = (imp * (cs * cu - x) ** 2).sum(-1, keepdims=True)
        better = err < best_err
        best_q, best_s, best_err = np.where(better, cu, best_q), np.where(better, cs, best_s), np.where(better, err, best_err)
    return (best_q + 8).astype(np.uint8), best_s[..., 0].astype(np.float32)


def input_importance(model: onnx.ModelProto, ids: list[int], window: int = 256) -> dict[str, np.ndarray]:
    """The mean square of each constant-weight MatMul's input over the tokens ``ids``, per input channel
    (keyed by the input's tensor name): ``model`` (a causal-LM inference graph in fp32) run by
    onnxruntime over non-overlapping windows from an empty cache, those inputs added as outputs."""
    import onnxruntime as ort
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    wanted = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in wanted if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds_spec = {i.name: i for i in sess.get_inputs()}
    sums: dict[str, np.ndarray] = {}
    count = 0
    for start in range(0, len(ids), window):
        chunk = np.asarray(ids[start : start + window], np.int64)[None]
        n = chunk.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": chunk}
        for name, spec in feeds_spec.items():
            if name == "attention_mask":
                feeds[name] = np.ones((1, n), np.int64)
            elif name == "position_ids":
                feeds[name] = np.arange(n, dtype=np.int64)[None]
            elif name.startswith("past."):
                feeds[name] = np.zeros((1, int(spec.shape[1]), 0, int(spec.shape[3])), np.float32)
        outs = sess.run(wanted, feeds)
        for name, v in zip(wanted, outs):
            v = v.reshape(-1, v.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + (v * v).sum(0)
        count += n
    return {name: v / max(count, 1) for name, v in sums.items()}


def apply_asym_int4(
    model: onnx.ModelProto,
    block: int,
    accuracy_level: int,
    exclude: set[str],
    lowrank: dict[str, tuple[str, str]] | None = None,
    *,
    symmetric: bool = False,
    importance: dict[str, np.ndarray] | None = None,
) -> list[str]:
    """Replace each MatMul(x, const W) (not excluded, K divisible by ``block``) by
    ``MatMulNBits(x, q, s) + S(x) @ C``: the symmetric 4-bit kernel (implicit zero point 8) plus
    a per-block offset, S(x) [..., K/block] the sums of x over each block and C [K/block, N] the offsets,
    as one ``BlockOffsetAdd`` call (``block_offset_add_function``; a native kernel where the device has
    it). Where the builder says a MatMul has a low-rank LoRA term over the inputs L, R (``lowrank``:
    matmul node name -> (L, R); see ``edge_runtime.lowrank``), P and C are prepended to L's and R's
    defaults instead: one matmul pair for offsets and LoRA. Returns the names of nodes later
    quantization passes must leave alone (none: the offset matmuls live inside the function).

    ``symmetric``: blocks by ``sym_int4_blocks`` instead (weighted by ``importance`` of the MatMul's input
    where given), plain MatMulNBits nodes without an offset term."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    lowrank = lowrank or {}
    graph_inputs = {i.name: i for i in model.graph.input}
    nodes, new_inits = [], []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:  # every graph edgefm-export writes is opset 18
        raise ExportError(f"the int4 rewrite needs an opset >= 15 graph (Shape with an end); this one is opset {opset}")
    uses_function = False

    for node in model.graph.node:
        b = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        init = inits.get(b) if b else None
        if (
            init is None
            or node.name in exclude
            or len(init.dims) != 2
            or init.dims[0] % block
            or init.data_type != onnx.TensorProto.FLOAT
        ):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(init)
        K, N = w.shape
        if symmetric:
            q, s = sym_int4_blocks(w, block, (importance or {}).get(node.input[0]))
            c = None
        else:
            q, s, c = asym_int4_blocks(w, block)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        x, y, tag = node.input[0], node.output[0], node.name or str(b)
        form = "Q4s" if symmetric else "Q4a"
        new_inits += [numpy_helper.from_array(packed, f"{b}_{form}"), numpy_helper.from_array(s, f"{b}_scales")]
        fused = c is None or node.name in lowrank  # no offsets, or they ride on the group's low-rank LoRA term: no separate path
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, f"{b}_{form}", f"{b}_scales"],
                [y if fused else f"{y}_q4"],
                name=f"{tag}_{form}",
                domain="com.microsoft",
                K=K,
                N=N,
                bits=4,
                block_size=block,
                accuracy_level=accuracy_level,
            )
        )
        if c is None:
            continue
        if fused:
            L, R = lowrank[node.name]
            _prepend_lowrank(inits, graph_inputs, L, block_sum_matrix(K, block), axis=1)
            _prepend_lowrank(inits, graph_inputs, R, np.ascontiguousarray(c.T), axis=0)
            continue
        # the offset term as one call of the model-local function edgefm.native:BlockOffsetAdd (C in fp16):
        # onnxruntime runs edge_runtime's native kernel for it where that is registered, and inlines the
        # function body (the same computation in standard operators) everywhere else
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(c.T).astype(np.float16), f"{b}_offsets"))
        nodes.append(
            helper.make_node(
                BLOCK_OFFSET_ADD,
                [f"{y}_q4", x, f"{b}_offsets"],
                [y],
                name=f"{tag}_offset",
                domain=NATIVE_DOMAIN,
                blocks=[-1, block],
            )
        )
        uses_function = True
    replaced = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"} - {n.input[1] for n in nodes if len(n.input) > 1}
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for i in [i for i in model.graph.initializer if i.name in replaced]:
        model.graph.initializer.remove(i)
    model.graph.initializer.extend(new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if uses_function:
        model.functions.append(block_offset_add_function(opset))
        model.opset_import.append(helper.make_opsetid(NATIVE_DOMAIN, 1))
    return []


NATIVE_DOMAIN = native.DOMAIN  # edge_runtime/data/kernels.c registers its kernels under this domain
BLOCK_OFFSET_ADD = "BlockOffsetAdd"


def block_offset_add_function(opset: int):
    """The ONNX function ``BlockOffsetAdd(y, x, C) = y + S(x) @ float(C)``, S(x) the sums of x over blocks
    (attribute ``blocks`` = [-1, block]): the reference form of the native kernel of the same name."""
    from onnx import AttributeProto, helper

    blocks = helper.make_node("Constant", [], ["blocks"])
    blocks.attribute.append(helper.make_attribute_ref("value_ints", AttributeProto.INTS))
    blocks.attribute[0].ref_attr_name = "blocks"
    body = [
        helper.make_node("Shape", ["x"], ["lead"], end=-1),
        blocks,
        helper.make_node("Concat", ["lead", "blocks"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["grouped"]),
        helper.make_node("Constant", [], ["last"], value_ints=[-1]),
        helper.make_node("ReduceSum", ["grouped", "last"], ["sums"], keepdims=0),
        helper.make_node("Cast", ["C"], ["C32"], to=onnx.TensorProto.FLOAT),
        helper.make_node("MatMul", ["sums", "C32"], ["offset"]),
        helper.make_node("Add", ["y", "offset"], ["out"]),
    ]
    return helper.make_function(
        NATIVE_DOMAIN, BLOCK_OFFSET_ADD, ["y", "x", "C"], ["out"], body, [helper.make_opsetid("", opset)], attributes=["blocks"]
    )


Q4_MATMUL, Q4_MATMUL_OFFSET, Q8_LINEAR = "Q4MatMul", "Q4MatMulOffset", "Q8Linear"
Q4_BLOCK = native.Q4_BLOCK


def _regrouped_nbits_body(bits: int) -> list:
    """Function body nodes: the regrouped bytes P back to MatMulNBits' layout (a constant Transpose and
    Reshape, folded at load), the fp16 scales S [K/32, N] to float [N, K/32], and MatMulNBits at int8
    compute (accuracy level 4, what the kernels do) on them: Y = X @ W."""
    from onnx import AttributeProto, helper

    def ref(node, name, attr, kind):
        node.attribute.append(helper.make_attribute_ref(name, kind))
        node.attribute[-1].ref_attr_name = attr
        return node

    nbits = helper.make_node(
        "MatMulNBits", ["X", "B", "ST"], ["Y"], domain="com.microsoft", bits=bits, block_size=Q4_BLOCK, accuracy_level=4
    )
    for a in ("K", "N"):
        ref(nbits, a, a, AttributeProto.INT)
    return [
        helper.make_node("Transpose", ["P"], ["B5"], perm=[0, 3, 1, 2, 4]),
        ref(helper.make_node("Constant", [], ["shape"]), "value_ints", "shape", AttributeProto.INTS),
        helper.make_node("Reshape", ["B5", "shape"], ["B"]),
        helper.make_node("Cast", ["S"], ["S32"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Transpose", ["S32"], ["ST"], perm=[1, 0]),
        nbits,
    ]


NBITS_ATTRS = ["K", "N", "shape"]  # the Q4/Q8 functions' attributes: MatMulNBits' K and N, and its B's shape


def q4_functions(opset: int) -> list:
    """The ONNX functions ``Q4MatMul(X, P, S)`` and ``Q4MatMulOffset(X, P, S, C)``: a 4-bit linear by the
    regrouped bytes P (``edge_runtime.native.q4_pack``) with fp16 scales S [K/32, N] (and the asymmetric
    recipe's offsets C [K/32, N], added as ``BlockOffsetAdd``); their bodies (``_regrouped_nbits_body``)
    are the reference form of the native kernels."""
    from onnx import helper

    body = _regrouped_nbits_body(4)
    offset = helper.make_node(BLOCK_OFFSET_ADD, ["Y", "X", "C"], ["YC"], domain=NATIVE_DOMAIN, blocks=[-1, Q4_BLOCK])
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(NATIVE_DOMAIN, 1)]
    return [
        helper.make_function(NATIVE_DOMAIN, Q4_MATMUL, ["X", "P", "S"], ["Y"], body, opsets, attributes=NBITS_ATTRS),
        helper.make_function(
            NATIVE_DOMAIN, Q4_MATMUL_OFFSET, ["X", "P", "S", "C"], ["YC"], [*body, offset], opsets, attributes=NBITS_ATTRS
        ),
    ]


def q8_linear_function(opset: int):
    """The ONNX function ``Q8Linear(X, P, S)``: an 8-bit weight-only linear by MatMulNBits' bytes regrouped
    (``edge_runtime.native.q8_pack``) with fp16 scales S [K/32, N]; its body (``_regrouped_nbits_body``)
    is the reference form of the native kernel."""
    from onnx import helper

    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_function(
        NATIVE_DOMAIN, Q8_LINEAR, ["X", "P", "S"], ["Y"], _regrouped_nbits_body(8), opsets, attributes=NBITS_ATTRS
    )


def native_linears(model: onnx.ModelProto) -> int:
    """Rewrite (in place) each MatMulNBits node the native kernels take (4 or 8 bits, blocks of 32, no
    zero points, N a multiple of 16, int8 compute: accuracy level 4) to a call of Q4MatMul (folding a
    BlockOffsetAdd that adds its offsets into Q4MatMulOffset) or Q8Linear; returns how many were
    rewritten. The bytes are the same, regrouped (``edge_runtime.native.q4_pack`` / ``q8_pack``); the
    scales become fp16 [K/32, N] (as the offsets are): 0.06 instead of 0.125 bytes a weight. Original
    bytes stay only where something else reads them (a tied embedding's row lookups)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    nodes, added, folded, count = [], [], set(), 0
    for node in model.graph.node:
        if id(node) in folded:
            continue
        a = {x.name: x.i for x in node.attribute}
        bits = a.get("bits")
        if (
            node.op_type != "MatMulNBits"
            or len(node.input) != 3
            or bits not in (4, 8)
            or a.get("block_size") != Q4_BLOCK
            or a.get("accuracy_level") != 4  # the kernels compute with int8 activations, as level 4 does
            or a.get("N", 0) % 16
            or node.input[1] not in inits
            or node.input[2] not in inits
        ):
            nodes.append(node)
            continue
        K, N = a["K"], a["N"]
        nb = K // Q4_BLOCK
        b = numpy_helper.to_array(inits[node.input[1]]).reshape(N, nb, 4 * bits)
        s = numpy_helper.to_array(inits[node.input[2]]).reshape(N, nb)
        if bits == 4:
            packed = native.q4_pack(np.stack([b & 15, b >> 4], -1).reshape(N, nb, Q4_BLOCK))  # the values, in order
        else:
            packed = native.q8_pack(b)
        p_name, s_name = f"{node.input[1]}_P", f"{node.input[2]}_T16"
        added += [
            numpy_helper.from_array(packed, p_name),
            numpy_helper.from_array(np.ascontiguousarray(s.T).astype(np.float16), s_name),
        ]
        attrs: dict[str, Any] = dict(name=node.name, domain=NATIVE_DOMAIN, K=K, N=N, shape=[N, nb, 4 * bits])
        after = users.get(node.output[0], [])
        if (
            bits == 4
            and len(after) == 1
            and after[0].op_type == BLOCK_OFFSET_ADD
            and after[0].domain == NATIVE_DOMAIN
            and list(after[0].input[:2]) == [node.output[0], node.input[0]]
        ):
            folded.add(id(after[0]))
            call = helper.make_node(
                Q4_MATMUL_OFFSET, [node.input[0], p_name, s_name, after[0].input[2]], [after[0].output[0]], **attrs
            )
        else:
            call = helper.make_node(
                Q4_MATMUL if bits == 4 else Q8_LINEAR, [node.input[0], p_name, s_name], list(node.output), **attrs
            )
        nodes.append(call)
        count += 1
    if not count:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(added)
    _drop_unused(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    have = {f.name for f in model.functions if f.domain == NATIVE_DOMAIN}
    wanted = [block_offset_add_function(opset), *q4_functions(opset), q8_linear_function(opset)]
    model.functions.extend(f for f in wanted if f.name not in have)
    if not any(o.domain == NATIVE_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(NATIVE_DOMAIN, 1))
    return count


ATTENTION = "Attention"
ATTENTION_ATTRS = ["num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"]


def attention_function():
    """The ONNX function ``Attention(QKV, past_key, past_value, seqlens_k, total_len, cos, sin)``: onnxruntime's
    GroupQueryAttention on packed q/k/v with rotary, its body; the native kernel runs one token's decode step
    itself and calls GroupQueryAttention for the rest (edge_runtime/data/kernels.c)."""
    from onnx import AttributeProto, helper

    gqa = helper.make_node(
        "GroupQueryAttention",
        ["QKV", "", "", "past_key", "past_value", "seqlens_k", "total_len", "cos", "sin"],
        ["Y", "present_key", "present_value"],
        domain="com.microsoft",
    )
    kinds = {"scale": AttributeProto.FLOAT}
    for a in ATTENTION_ATTRS:
        gqa.attribute.append(helper.make_attribute_ref(a, kinds.get(a, AttributeProto.INT)))
    return helper.make_function(
        NATIVE_DOMAIN,
        ATTENTION,
        ["QKV", "past_key", "past_value", "seqlens_k", "total_len", "cos", "sin"],
        ["Y", "present_key", "present_value"],
        [gqa],
        [helper.make_opsetid("com.microsoft", 1)],
        attributes=ATTENTION_ATTRS,
    )


def native_attention(model: onnx.ModelProto) -> int:
    """Rewrite (in place) each GroupQueryAttention node on packed q/k/v (no separate key and value inputs) to a
    call of ``Attention`` (``attention_function``); returns how many were rewritten."""
    from onnx import helper

    count = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.input) != 9:
            continue
        if node.input[1] or node.input[2] or {a.name for a in node.attribute} - set(ATTENTION_ATTRS):
            continue
        ins = [node.input[0], *node.input[3:]]
        call = helper.make_node(ATTENTION, ins, list(node.output), name=node.name, domain=NATIVE_DOMAIN)
        call.attribute.extend(node.attribute)
        node.CopyFrom(call)
        count += 1
    if count:
        if not any(f.name == ATTENTION and f.domain == NATIVE_DOMAIN for f in model.functions):
            model.functions.append(attention_function())
        if not any(o.domain == NATIVE_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(NATIVE_DOMAIN, 1))
    return count


Q8_MATMUL, Q8_MATMUL_TRANS_B = "Q8MatMul", "Q8MatMulTransB"
Q8_OPSET = 21  # the Q8 functions' bodies dequantize with a blocked DequantizeLinear (opset 21 on)


def q8_functions() -> list:
    """The ONNX functions ``Q8MatMulTransB(X, Q, S) = X @ D^T`` and ``Q8MatMul(X, Q, S) = X @ D``, D [R, C] =
    Q (int8) * S (one scale per block of ``block`` along C): the reference forms of the native kernels
    of the same names (edge_runtime/data/kernels.c)."""
    from onnx import AttributeProto, helper

    def dequantize():
        node = helper.make_node("DequantizeLinear", ["Q", "S"], ["D"], axis=1)
        node.attribute.append(helper.make_attribute_ref("block_size", AttributeProto.INT))
        node.attribute[-1].ref_attr_name = "block"
        return node

    opsets = [helper.make_opsetid("", Q8_OPSET)]
    trans_b = [dequantize(), helper.make_node("Transpose", ["D"], ["DT"]), helper.make_node("MatMul", ["X", "DT"], ["Y"])]
    plain = [dequantize(), helper.make_node("MatMul", ["X", "D"], ["Y"])]
    return [
        helper.make_function(NATIVE_DOMAIN, Q8_MATMUL_TRANS_B, ["X", "Q", "S"], ["Y"], trans_b, opsets, attributes=["block"]),
        helper.make_function(NATIVE_DOMAIN, Q8_MATMUL, ["X", "Q", "S"], ["Y"], plain, opsets, attributes=["block"]),
    ]


def q8_quantize(d: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit blocks along the last axis of D [R, C]: Q int8 in [-127, 127], S = absmax / 127."""
    r, c = d.shape
    blocks = d.astype(np.float32).reshape(r, c // block, block)
    s = np.abs(blocks).max(-1) / 127.0
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / s[:, :, None]), -127, 127).astype(np.int8).reshape(r, c)
    return q, s


def _weight_sources(model: onnx.ModelProto, inits: dict) -> dict[str, tuple[str, bool]]:
    """Name of a 2-D float initializer, or of a chain of 2-D Transposes over one -> (the first initializer
    holding the same values in either orientation, transposed?). The exported step keeps a frozen weight
    and its transpose as two initializers (the export folds ``W.t()``), or one behind Transpose nodes."""
    import hashlib

    from onnx import numpy_helper

    out: dict[str, tuple[str, bool]] = {}
    seen: dict[bytes, str] = {}
    for name, t in inits.items():
        if len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(t)
        key, key_t = (hashlib.sha256(a.tobytes() + str(a.shape).encode()).digest() for a in (w, np.ascontiguousarray(w.T)))
        if key_t in seen:
            out[name] = (seen[key_t], True)
        elif key in seen:
            out[name] = (seen[key], False)
        else:
            seen[key] = name
            out[name] = (name, False)
    for node in model.graph.node:  # topological order: a chain's links come before their users
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if node.op_type == "Transpose" and node.input[0] in out and perm == [1, 0]:
            src, flipped = out[node.input[0]]
            out[node.output[0]] = (src, not flipped)
    return out


def share_frozen_base(model: onnx.ModelProto, block: int) -> int:
    """Rewrite a training graph's matmuls by frozen 2-D weights (in place) to Q8MatMul / Q8MatMulTransB
    calls reading one 8-bit copy per weight; returns how many weights were shared.

    The exported step multiplies by each frozen weight W in both orientations (x @ W^T forward and in
    the recomputation, dy @ W backward). Weight-only 8-bit MatMulNBits packs along the reduction axis,
    so it held two quantized copies of each weight, and onnxruntime a prepacked copy of each; here D is
    quantized once, with its blocks along the forward's reduction axis (the first use in graph order).
    A tied embedding's row lookups read the same 8-bit copy."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    used_by_matmul = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"} | {
        n.input[0] for n in model.graph.node if n.op_type == "Transpose"
    }
    candidates = {k: v for k, v in inits.items() if k not in graph_inputs and k in used_by_matmul}
    sources = _weight_sources(model, candidates)
    uses: dict[str, list[tuple[onnx.NodeProto, bool]]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in sources:
            src, flipped = sources[node.input[1]]
            uses.setdefault(src, []).append((node, flipped))
    tables = {
        n.input[0]: numpy_helper.to_array(inits[n.input[0]])
        for n in model.graph.node
        if n.op_type == "Gather"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT
        and len(inits[n.input[0]].dims) == 2
    }
    shared = 0
    for src, nodes in uses.items():
        w = numpy_helper.to_array(inits[src])
        d_is_src = nodes[0][1]  # first use x @ W^T: D = W; first use x @ W: D = W^T
        d = w if d_is_src else w.T
        if d.shape[1] % block:
            continue  # left to the caller's quantizer
        q, sc = q8_quantize(np.ascontiguousarray(d), block)
        qn, sn = f"{src}.q8", f"{src}.q8_scales"
        model.graph.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(sc, sn)])
        for node, flipped in nodes:
            op = Q8_MATMUL_TRANS_B if flipped == d_is_src else Q8_MATMUL  # B = D^T or B = D
            call = helper.make_node(
                op, [node.input[0], qn, sn], list(node.output), name=node.name, domain=NATIVE_DOMAIN, block=block
            )
            node.CopyFrom(call)
        for table, rows in tables.items():  # the tied embedding: the same values as D, row for row
            if rows.shape == d.shape and np.array_equal(rows, d):
                _gather_rows_from_q8(model, table, qn, sn, block)
        shared += 1
    if shared:
        _drop_unused(model)
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < Q8_OPSET:
                o.version = Q8_OPSET  # the standard operators of these graphs mean the same at 21 as at 18
        if not any(o.domain == NATIVE_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(NATIVE_DOMAIN, 1))
        model.functions.extend(q8_functions())
    return shared


def _gather_rows_from_q8(model: onnx.ModelProto, table: str, qn: str, sn: str, block: int) -> None:
    """Row lookups in ``table`` (the tied embedding) read its 8-bit copy instead: Gather the int8 rows
    and their scales, one scale per element by a constant index (any rank of ids), multiply. The float
    table then leaves the graph (SmolLM2: 113 MB of the data file)."""
    from onnx import helper, numpy_helper

    width = next(i for i in model.graph.initializer if i.name == qn).dims[1]
    index = f"{qn}.block_of_column"
    added = False
    for node in list(model.graph.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[0] != table or axis != 0:
            continue
        if not added:
            model.graph.initializer.append(numpy_helper.from_array(np.arange(width, dtype=np.int64) // block, index))
            added = True
        out, tag = node.output[0], node.name or node.output[0]
        nodes = [
            helper.make_node("Gather", [qn, node.input[1]], [f"{tag}.q8_rows"], name=f"{tag}.q8_rows"),
            helper.make_node("Gather", [sn, node.input[1]], [f"{tag}.q8_row_scales"], name=f"{tag}.q8_row_scales"),
            helper.make_node("Gather", [f"{tag}.q8_row_scales", index], [f"{tag}.q8_scales"], name=f"{tag}.q8_scales", axis=-1),
            helper.make_node(
                "Cast", [f"{tag}.q8_rows"], [f"{tag}.q8_floats"], name=f"{tag}.q8_floats", to=onnx.TensorProto.FLOAT
            ),
            helper.make_node("Mul", [f"{tag}.q8_floats", f"{tag}.q8_scales"], [out], name=f"{tag}.q8_dequantize"),
        ]
        at = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for k, n in enumerate(nodes):
            model.graph.node.insert(at + k, n)


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads (to a fixpoint)."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    for i in [i for i in model.graph.initializer if i.name not in needed]:
        model.graph.initializer.remove(i)


class SharedInt8TrainingQuantizer(Quantizer):
    """The training graph's frozen base in 8 bits, one copy per weight for forward and backward
    (``share_frozen_base``); matmuls it cannot share go to 8-bit MatMulNBits."""

    name = "int8"

    def apply(self, src, dst, recipe, *, head, sensitive, lowrank=None, calibration=None):
        model = onnxfile.load(src)
        share_frozen_base(model, recipe.block_size)
        fold_initializer_transposes(model)
        if const_matmuls(model):
            model = _nbits(model, 8, recipe)
        onnxfile.save(model, dst)


def embedding_from_int8_head(src: Path, dst: Path, head: list[str]) -> bool:
    """In the quantized inference graph ``dst``, read a tied embedding's rows from the 8-bit LM head
    (MatMulNBits bits=8 without zero points: uint8 q + 128 times a scale per block) instead of its
    float table, which leaves the graph; True if it did. Tied: the float graph ``src`` has the table
    equal, value for value, to the head's weight transposed. Saves the table's size in the bundle,
    and resident memory: each token served touches its float row (4 bytes an element) in the data
    file's mapping, 1 byte in the 8-bit rows (SmolLM2: a 113 MB table a long-running agent ends up
    holding, ~75 MB of it after sampling 64 general-text passages)."""
    from onnx import helper, numpy_helper

    fp = onnxfile.load(src)
    inits = {i.name: i for i in fp.graph.initializer}
    gathers = [
        n
        for n in fp.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and not any(a.name == "axis" and a.i for a in n.attribute)
    ]
    heads = [n for n in fp.graph.node if n.name in head and n.op_type == "MatMul" and n.input[1] in inits]
    if len(gathers) != 1 or len(heads) != 1:
        return False
    table, weight = (numpy_helper.to_array(inits[n]) for n in (gathers[0].input[0], heads[0].input[1]))
    if table.ndim != 2 or table.shape[::-1] != weight.shape or not np.array_equal(table, weight.T):
        return False
    del fp, inits, weight
    model = onnxfile.load(dst)
    outputs = set(heads[0].output)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits" and outputs & set(n.output)]
    attrs = {a.name: a.i for a in nbits[0].attribute} if len(nbits) == 1 else {}
    if attrs.get("bits") != 8 or len(nbits[0].input) != 3 or attrs.get("N") != table.shape[0]:
        return False
    qn, sn = nbits[0].input[1], nbits[0].input[2]
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == gathers[0].input[0])
    ids, out, tag = gather.input[1], gather.output[0], gather.name or gather.output[0]
    width = np.array([table.shape[1]], np.int64)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(width, f"{tag}.width"),
            numpy_helper.from_array(np.array(128.0, np.float32), f"{tag}.zero"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{tag}.last"),
        ]
    )
    nodes = [
        helper.make_node("Gather", [qn, ids], [f"{tag}.q8_rows"]),
        helper.make_node("Gather", [sn, ids], [f"{tag}.q8_row_scales"]),
        helper.make_node("Cast", [f"{tag}.q8_rows"], [f"{tag}.q8_floats"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sub", [f"{tag}.q8_floats", f"{tag}.zero"], [f"{tag}.q8_centered"]),
        helper.make_node("Unsqueeze", [f"{tag}.q8_row_scales", f"{tag}.last"], [f"{tag}.q8_scales"]),
        helper.make_node("Mul", [f"{tag}.q8_centered", f"{tag}.q8_scales"], [f"{tag}.q8_blocks"]),
        helper.make_node("Shape", [ids], [f"{tag}.ids_shape"]),
        helper.make_node("Concat", [f"{tag}.ids_shape", f"{tag}.width"], [f"{tag}.shape"], axis=0),
        helper.make_node("Reshape", [f"{tag}.q8_blocks", f"{tag}.shape"], [out]),
    ]
    for k, n in enumerate(nodes):
        n.name = f"{tag}.embed_{k}"
    at = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    for k, n in enumerate(nodes):
        model.graph.node.insert(at + k, n)
    _drop_unused(model)
    onnxfile.save(model, dst)
    return True


def native_check_model() -> onnx.ModelProto:
    """The graph edge_runtime.native checks a freshly built kernel library with, one node per kernel
    (shipped as edge_runtime/data/native_check.onnx: devices have no onnx package to build it)."""
    from onnx import TensorProto, helper, numpy_helper

    from edge_runtime.native import (
        CHECK_SHAPE,
        Q4_CHECK_SHAPE,
        Q8_CHECK_SHAPE,
        check_offsets,
        check_q4_weight,
        check_q8_linear,
        check_q8_weight,
    )

    k, n, block = CHECK_SHAPE
    r8, c8, block8 = Q8_CHECK_SHAPE
    k4, n4 = Q4_CHECK_SHAPE
    c = check_offsets()
    q, s = check_q8_weight()
    q4, s4, c4 = check_q4_weight()
    b8, s8 = check_q8_linear()
    q4_attrs: dict[str, Any] = dict(domain=NATIVE_DOMAIN, K=k4, N=n4, shape=[n4, k4 // Q4_BLOCK, 16])
    nodes = [
        helper.make_node(BLOCK_OFFSET_ADD, ["y", "x", "C"], ["out"], name="check", domain=NATIVE_DOMAIN, blocks=[-1, block]),
        helper.make_node(Q8_MATMUL_TRANS_B, ["x_t", "Q", "S"], ["y_t"], name="check_t", domain=NATIVE_DOMAIN, block=block8),
        helper.make_node(Q8_MATMUL, ["x_n", "Q", "S"], ["y_n"], name="check_n", domain=NATIVE_DOMAIN, block=block8),
        helper.make_node(Q4_MATMUL, ["x_4", "P4", "S4"], ["y_4"], name="check_4", **q4_attrs),
        helper.make_node(Q4_MATMUL_OFFSET, ["x_4", "P4", "S4", "C4"], ["y_4c"], name="check_4c", **q4_attrs),
        helper.make_node(
            Q8_LINEAR,
            ["x_4", "P8", "S8"],
            ["y_8"],
            name="check_8",
            domain=NATIVE_DOMAIN,
            K=k4,
            N=n4,
            shape=[n4, k4 // Q4_BLOCK, Q4_BLOCK],
        ),
    ]

    def io(name, width):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", width])

    graph = helper.make_graph(
        nodes,
        "native_check",
        [io("y", n), io("x", k), io("x_t", c8), io("x_n", r8), io("x_4", k4)],
        [io("out", n), io("y_t", r8), io("y_n", c8), io("y_4", n4), io("y_4c", n4), io("y_8", n4)],
        [
            helper.make_tensor("C", TensorProto.FLOAT16, list(c.shape), c.tobytes(), raw=True),
            numpy_helper.from_array(q, "Q"),
            numpy_helper.from_array(s, "S"),
            numpy_helper.from_array(native.q4_pack(q4), "P4"),
            numpy_helper.from_array(s4, "S4"),
            numpy_helper.from_array(c4, "C4"),
            numpy_helper.from_array(native.q8_pack(b8), "P8"),
            numpy_helper.from_array(s8, "S8"),
        ],
    )
    opsets = [helper.make_opsetid("", Q8_OPSET), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(NATIVE_DOMAIN, 1)]
    functions = [block_offset_add_function(Q8_OPSET), *q8_functions(), *q4_functions(Q8_OPSET), q8_linear_function(Q8_OPSET)]
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=10)


def block_sum_matrix(K: int, block: int) -> np.ndarray:
    """P [K, K/block] with x @ P = the sums of x over each block of ``block`` inputs."""
    p = np.zeros((K, K // block), np.float32)
    p[np.arange(K), np.arange(K) // block] = 1.0
    return p


def _prepend_lowrank(inits: dict, graph_inputs: dict, name: str, part: np.ndarray, axis: int) -> None:
    """Put ``part`` in front of low-rank input ``name``'s default (columns for L, rows for R) and widen
    the declared input shape to match."""
    from onnx import numpy_helper

    init, gi = inits.get(name), graph_inputs.get(name)
    if init is None or gi is None:
        raise ExportError(f"low-rank input {name} has no default initializer or is not a graph input")
    merged = np.concatenate([part.astype(np.float32), numpy_helper.to_array(init)], axis=axis)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(merged), name))
    dims = gi.type.tensor_type.shape.dim
    for d, v in zip(dims, merged.shape):
        d.dim_value = int(v)


class Int4Quantizer(Quantizer):
    name = "int4"

    def apply(self, src, dst, recipe, *, head, sensitive, lowrank=None, calibration=None):
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        model = onnxfile.load(src)
        keep8 = list(sensitive) + (head if recipe.head == "int8" else [])
        keep32 = head if recipe.head == "fp32" else []
        if recipe.algo == "asym":
            # at int8 compute (level 4) the native Q4MatMulOffset adds every linear's offsets inside its matmul; riding
            # on the low-rank LoRA term instead widens that term's two matmuls (SmolLM2 decode 7% slower, measured)
            fuse = lowrank if recipe.accuracy_level != 4 else None
            keep32 = keep32 + apply_asym_int4(model, recipe.block_size, recipe.accuracy_level, set(keep8 + keep32), fuse)
        elif recipe.algo == "sym":
            importance = input_importance(model, calibration) if calibration else None
            apply_asym_int4(
                model, recipe.block_size, recipe.accuracy_level, set(keep8 + keep32), symmetric=True, importance=importance
            )
        else:
            algo = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=4) if recipe.algo == "hqq" else None
            model = _nbits(model, 4, recipe, exclude=keep8 + keep32, algo=algo)
        if keep8:  # second pass: what is still a float MatMul (minus fp32-kept nodes) goes 8-bit
            model = _nbits(model, 8, recipe, exclude=keep32)
        onnxfile.save(model, dst)


class Nf4Quantizer(Quantizer):
    name = "nf4"

    def apply(self, src, dst, recipe, *, head, sensitive, lowrank=None, calibration=None):
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        model = onnxfile.load(src)
        keep = list(sensitive) + head if recipe.head != "quant" else list(sensitive)
        q = MatMulBnb4Quantizer(model, quant_type=MatMulBnb4Quantizer.NF4, block_size=recipe.block_size, nodes_to_exclude=keep)
        q.process()
        model = q.model.model
        if recipe.head == "int8" or sensitive:
            model = _nbits(model, 8, recipe, exclude=head if recipe.head == "fp32" else [])
        onnxfile.save(model, dst)


QUANTIZERS: dict[str, Quantizer] = {
    q.name: q for q in (Quantizer(), Int8DynamicQuantizer(), Int4Quantizer(), Nf4Quantizer(), Int8WeightOnlyQuantizer())
}


def quantize_graph(
    src: Path,
    dst: Path,
    recipe: QuantRecipe,
    *,
    module_shapes: dict[str, tuple[int, int]] | None = None,
    head_output: str | None = "logits",
    training: bool = False,
    lowrank_slots: list[dict] | None = None,
    calibration: list[int] | None = None,
) -> str:
    """Quantize one graph file per the recipe; returns the scheme actually applied. ``lowrank_slots``:
    the builder's low-rank LoRA slots (each names its group's weight ``matmul`` and its L/R inputs);
    ``calibration``: token ids of real text (inference graphs of recipes that use it)."""
    model = onnx.load(str(src), load_external_data=False)
    head = head_nodes(model, head_output) if head_output else []
    sensitive = nodes_for_modules(model, module_shapes or {}, recipe.sensitive_8bit) if recipe.scheme in ("int4", "nf4") else []
    scheme = recipe.scheme
    if training and scheme != "fp32":
        scheme = {"same": scheme, "int8": "int8", "fp32": "fp32"}[recipe.train_base]
    quantizer = SharedInt8TrainingQuantizer() if training and scheme == "int8" else QUANTIZERS[scheme]
    try:
        lowrank = {sl["matmul"]: (sl["L"], sl["R"]) for sl in lowrank_slots or []}
        quantizer.apply(Path(src), Path(dst), recipe, head=head, sensitive=sensitive, lowrank=lowrank, calibration=calibration)
        if head and not training and recipe.head == "int8" and scheme in ("int4", "nf4", "int8"):
            embedding_from_int8_head(Path(src), Path(dst), head)
        if not training and scheme in ("int4", "nf4", "int8"):  # after the embedding: it reads the head's own bytes
            model = onnxfile.load(dst)
            # the 4/8-bit linears and the attention as edgefm.native calls (onnxruntime's operators inside, as fallback)
            if native_linears(model) + native_attention(model):
                onnxfile.save(model, dst)
    except ExportError:
        raise
    except Exception as exc:  # translate onnxruntime/onnx failures at the boundary
        raise ExportError(f"{scheme} quantization of {Path(src).name} failed: {exc}") from exc
    return scheme
