"""torch -> ONNX for the graphs the fused builders do not write: the dynamo exporter at edgefm's opset,
and onnxruntime's provider-independent optimizations applied once at export."""

from __future__ import annotations

from pathlib import Path

from export import onnxfile

OPSET = 18


def export_module(
    module, args, path: Path, input_names, output_names, dynamic_shapes=None, optimize: bool = True, external: bool = False
):
    """torch.onnx (dynamo) export. ``optimize=False`` skips onnxscript's rewrite passes: on a training
    graph of ~10k nodes they take ~70% of the export time (minutes) for what onnxruntime's own
    optimizer does again at load. ``external``: weights to ``<file>.data`` (graphs over 2 GB)."""
    import torch
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(args),
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            external_data=external,
            verbose=False,
            optimize=optimize,
        )


def simplify_offline(path: Path) -> None:
    """onnxruntime's basic, provider-independent graph optimizations (constant folding, common
    subexpressions, redundant nodes) applied once at export and saved in standard operators, then
    constant transposes of frozen weights folded and unit powers dropped: the unoptimized training
    export has ~33k nodes, ~8k after this."""
    import onnxruntime as ort
    from export.quantize import fold_initializer_transposes

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    out = path.with_suffix(".opt.onnx")
    so.optimized_model_filepath = str(out)
    if onnxfile.has_external_data(path):  # the optimized copy must not be one protobuf either
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", onnxfile.data_file(out).name)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    model = onnxfile.load(out)
    fold_initializer_transposes(model)
    drop_unit_powers(model)
    onnxfile.save(model, path, external=onnxfile.has_external_data(path) or None)
    onnxfile.remove(out)


def drop_unit_powers(model) -> int:
    """Remove ``Pow(x, 1)`` nodes (in place; their users read x): the backward of ``x ** 2`` (each RMS
    norm's) is exported as ``2 * x ** 1``, and onnxruntime computes that power element by element
    (~4% of a SmolLM2 training step). Returns how many were dropped."""
    from onnx import numpy_helper

    consts = {i.name: i for i in model.graph.initializer}
    consts.update(
        {n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    )
    outputs = {o.name for o in model.graph.output}

    def is_one(name: str) -> bool:
        a = numpy_helper.to_array(consts[name]) if name in consts else None
        return a is not None and a.size == 1 and float(a.reshape(())) == 1.0

    renamed: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        if node.op_type == "Pow" and len(node.input) == 2 and is_one(node.input[1]) and node.output[0] not in outputs:
            renamed[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(renamed)
