"""Weight quantizers for exported graphs: a registry of small classes around onnxruntime.quantization."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Literal

import onnx

from edge_runtime.errors import ExportError


@dataclasses.dataclass
class QuantRecipe:
    """How the frozen base is stored."""

    scheme: Literal["fp32", "int8", "int4", "nf4"] = "int4"
    block_size: int = 32          # int4 / nf4 block
    accuracy_level: int = 4       # MatMulNBits compute precision (0 default, 1 fp32, 4 int8)
    head: Literal["quant", "fp32"] = "quant"   # the (tied) LM head: quantize with the scheme, or keep fp32

    def __post_init__(self):
        if self.scheme not in QUANTIZERS:
            raise ExportError(f"unknown quantization {self.scheme!r}; choose one of {sorted(QUANTIZERS)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ExportError(f"block size {self.block_size} not supported; use 16, 32, 64, 128 or 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError("accuracy level must be 0-4 (see onnxruntime MatMulNBits)")
        if self.head not in ("quant", "fp32"):
            raise ExportError("head must be 'quant' or 'fp32'")


def head_nodes(model: onnx.ModelProto, output_name: str = "logits") -> list[str]:
    """Names of the MatMul nodes producing the LM-head output (kept fp32 when head='fp32')."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and output_name in n.output]


class Quantizer:
    """Base quantizer: copies the graph unchanged (fp32)."""

    name = "fp32"

    def apply(self, src: Path, dst: Path, recipe: QuantRecipe, exclude: list[str]) -> None:
        """Write a quantized copy of ``src`` to ``dst``."""
        shutil.copyfile(src, dst)


class Int8Quantizer(Quantizer):
    name = "int8"

    def apply(self, src, dst, recipe, exclude):
        from onnxruntime.quantization import QuantType, quantize_dynamic
        # MatMul only: quantizing the embedding Gather makes decode slower (dequantize every step).
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})


class Int4Quantizer(Quantizer):
    name = "int4"

    def apply(self, src, dst, recipe, exclude):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        model = onnx.load(str(src))
        q = MatMulNBitsQuantizer(model, bits=4, block_size=recipe.block_size, is_symmetric=True,
                                 accuracy_level=recipe.accuracy_level, nodes_to_exclude=exclude)
        q.process()
        onnx.save(q.model.model, str(dst))


class Nf4Quantizer(Quantizer):
    name = "nf4"

    def apply(self, src, dst, recipe, exclude):
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer
        model = onnx.load(str(src))
        q = MatMulBnb4Quantizer(model, quant_type=MatMulBnb4Quantizer.NF4, block_size=recipe.block_size,
                                nodes_to_exclude=exclude)
        q.process()
        onnx.save(q.model.model, str(dst))


QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (Quantizer(), Int8Quantizer(), Int4Quantizer(), Nf4Quantizer())}


def quantize_graph(src: Path, dst: Path, recipe: QuantRecipe, *, head_output: str | None = "logits") -> None:
    """Quantize one graph file per the recipe."""
    exclude = head_nodes(onnx.load(str(src), load_external_data=False), head_output) if (recipe.head == "fp32" and head_output) else []
    try:
        QUANTIZERS[recipe.scheme].apply(Path(src), Path(dst), recipe, exclude)
    except ExportError:
        raise
    except Exception as exc:  # translate onnxruntime/onnx failures at the boundary
        raise ExportError(f"{recipe.scheme} quantization of {Path(src).name} failed: {exc}") from exc
