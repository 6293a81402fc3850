"""Build a device bundle: load -> trace/export (inference + training graphs) -> quantize -> verify -> write.

Written to a temporary directory beside the output and renamed at the end, so a failure never leaves
a half-written bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import EdgefmError, ExportError
from edge_runtime.protocol.adapter import AdapterMeta, lora_names, save_adapter, stacked_names
from edge_runtime.protocol.manifest import AdapterSpec, IoSpec, KvCache, LoraLayout, Manifest, QuantSpec, TrainingSpec, hash_files
from export.graphs import BERT_TARGETS, LLAMA_TARGETS, BertGraph, LlamaGraph, LoraSpec, lora_input_names
from export.llama_onnx import build_llama_onnx, unsupported
from export import onnxfile
from export.onnxfile import mb
from export.quantize import QuantRecipe, quantize_graph
from export.torch_onnx import OPSET, export_module
from export.training_graph import export_train

# What the graphs inside a bundle look like beyond the manifest format: caches of exported bundles
# (the demo's, the benches', the conformance tests') export again when it changes.
# 2: graphs keep their tensors in a data file beside them (onnxfile.externalize: less memory to load).
# 3: the fused Llama graph's head runs from position ``logits_from`` on (generation: the last only).
# 4: the asym int4 offset term is one call of the ONNX function edgefm.native:BlockOffsetAdd (C in fp16).
# 5: the training graph reads one 8-bit copy of each frozen weight (Q8MatMul / Q8MatMulTransB functions).
# 6: the profiles' train_microbatch (rpi4, rpi5, tiny): training graphs of fewer rows than a step; a tied
#    embedding read from the 8-bit head's rows (export/quantize.py:embedding_from_int8_head).
# 7: 4-bit linears as edgefm.native:Q4MatMul / Q4MatMulOffset calls (regrouped bytes, fp16 scales; the
#    asymmetric recipe's offsets inside the same call).
# 8: 8-bit linears (the int4 recipes' head, int8 bundles) as edgefm.native:Q8Linear calls (regrouped bytes, fp16
#    scales); a tied embedding keeps reading the head's original bytes.
# 9: at accuracy level 4 (the int4 default) the q/k/v offsets go inside Q4MatMulOffset, not into the low-rank slots.
# 10: training graphs without per-layer scatters in their backward (rotary halves by chunk, stacked LoRA tensors
#     split once), no Pow(x, 1); --no-train-recompute keeps activations (head chunks of ~128 rows there).
# 11: the quantized inference graphs' attention nodes as edgefm.native:Attention calls (GroupQueryAttention inside;
#     the native kernel runs one token's decode step itself).
EXPORTER_REVISION = "11"


class Progress:
    """Stage-by-stage progress lines with times and sizes (stderr)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[export {time.time() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class BuildOptions:
    """Everything `edgefm-export build` can set."""

    task: str = "causal-lm"
    quant: QuantRecipe = dataclasses.field(default_factory=QuantRecipe)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    train_batch: int = 8  # examples per optimizer step
    train_seq: int = 128
    train_microbatch: int | None = None  # rows the training graph takes (a step runs it batch / microbatch times)
    train_recompute: bool = True  # decoders: each layer's activations recomputed in the backward pass (less memory, more work)
    with_training: bool = True
    verify: bool = True
    archive: bool = False
    seed: int = 0
    torch_inference_graph: bool = False  # decoders: torch.onnx export instead of the fused-operator builder

    def __post_init__(self):
        if self.task not in ("causal-lm", "classification", "embedding"):
            raise ExportError(f"unknown task {self.task!r}; choose causal-lm, classification or embedding")
        if self.lora_rank < 1 or self.lora_rank > 256:
            raise ExportError("--lora-rank must be between 1 and 256")
        if self.train_batch < 1 or self.train_seq < 4:
            raise ExportError("training batch must be >= 1 and sequence >= 4")
        if self.train_microbatch is not None and (self.train_microbatch < 1 or self.train_batch % self.train_microbatch):
            raise ExportError(
                f"training microbatch {self.train_microbatch} must divide the batch {self.train_batch} (a step runs the graph "
                "batch / microbatch times)"
            )
        allowed = LLAMA_TARGETS if self.task == "causal-lm" else BERT_TARGETS
        if not self.lora_targets:
            self.lora_targets = ("q_proj", "v_proj") if self.task == "causal-lm" else ("query", "value")
        bad = [t for t in self.lora_targets if t not in allowed]
        if bad:
            raise ExportError(f"LoRA targets {bad} do not exist for {self.task}; choose from {list(allowed)}")

    @property
    def train_graph_batch(self) -> int:
        """Rows the training graph is traced for."""
        return self.train_microbatch or self.train_batch


def initial_adapter(dims: dict[str, tuple[int, int]], targets, layers: int, rank: int, seed: int) -> dict[str, np.ndarray]:
    """PEFT-style init: A ~ kaiming-uniform, B = 0, so the adapter starts as the base model."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        for t in targets:
            fan_in, fan_out = dims[t]
            bound = 1.0 / np.sqrt(fan_in)
            na, nb = lora_names(i, t)
            out[na] = rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32)
            out[nb] = np.zeros((fan_out, rank), np.float32)
    return out


def export_llama(graph: LlamaGraph, tmp: Path, opts: BuildOptions, log, *, external: bool = False) -> dict:
    """Inference graph with KV cache (dynamic batch/seq/past) and the training graph (fixed batch/seq)."""
    import torch
    from torch.export import Dim

    L, kvh, hd = graph.n_layers, graph.n_kv, graph.head_dim
    dims = graph.module_dims()
    loras = []
    for t in opts.lora_targets:
        fin, fout = dims[t]
        loras += [torch.zeros(L, opts.lora_rank, fin), torch.zeros(L, fout, opts.lora_rank)]
    # past 5 / seq 3 avoids 0/1 shape specialisation; an empty past then works for prefill.
    b, s, p = 2, 3, 5
    ids = torch.randint(0, 100, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s)[None].expand(b, s).contiguous()
    past = [torch.zeros(b, kvh, p, hd) for _ in range(2 * L)]
    past_names = [f"past.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    B, S, P, T = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    io: dict[str, Any] = {
        "inputs": ["input_ids", "attention_mask", "position_ids"] + past_names + lora_input_names(opts.lora_targets),
        "outputs": ["logits"] + [n.replace("past.", "present.") for n in past_names],
    }
    why_not = None if opts.torch_inference_graph else unsupported(graph)
    if why_not is None and not opts.torch_inference_graph:
        log(
            f"writing inference graph with fused attention ({L} layers, LoRA on {','.join(opts.lora_targets)} rank {opts.lora_rank})"
        )
        slots = build_llama_onnx(graph, tmp / "model.fp32.onnx", list(opts.lora_targets), OPSET)
        io["kv_cache"] = KvCache.SHARED  # GroupQueryAttention appends in place when past and present are one buffer
        io["lora_layout"] = LoraLayout.LOWRANK  # per-layer low-rank inputs, packed once per adapter (edge_runtime.lowrank)
        io["lowrank"] = slots
        io["inputs"] = io["inputs"][: 3 + 2 * L] + [n for sl in slots for n in (sl["L"], sl["R"])]
    else:
        log(
            f"exporting inference graph with torch.onnx ({L} layers, LoRA on {','.join(opts.lora_targets)} rank {opts.lora_rank})"
            + (f"; the fused builder does not cover {why_not}" if why_not else "")
        )
        export_module(
            graph,
            (ids, mask, pos, *past, *loras),
            tmp / "model.fp32.onnx",
            io["inputs"],
            io["outputs"],
            ({0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}, tuple([{0: B, 2: P}] * (2 * L) + [None] * len(loras))),
            external=external,
        )
    log(f"inference graph: {mb(tmp / 'model.fp32.onnx')}")
    if opts.with_training:
        log(f"tracing one training step (make_fx over grad_and_value, batch {opts.train_graph_batch} x seq {opts.train_seq})")
        export_train(graph, tmp, opts, loras, log, external=external)
    return io


def export_bert(graph: BertGraph, tmp: Path, opts: BuildOptions, log, *, external: bool = False) -> dict:
    """Encoder graph (dynamic batch/seq) and, for classification, the training graph."""
    import torch
    from torch.export import Dim

    L = len(graph.bert.encoder.layer)
    dims = graph.module_dims()
    loras = []
    for t in opts.lora_targets:
        fin, fout = dims[t]
        loras += [torch.zeros(L, opts.lora_rank, fin), torch.zeros(L, fout, opts.lora_rank)]
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    out = "logits" if opts.task == "classification" else "embeddings"
    io = {"inputs": ["input_ids", "attention_mask"] + lora_input_names(opts.lora_targets), "outputs": [out]}
    B, S = Dim("batch"), Dim("seq")
    log(f"exporting {opts.task} graph ({L} layers)")
    export_module(
        graph,
        (ids, mask, *loras),
        tmp / "model.fp32.onnx",
        io["inputs"],
        io["outputs"],
        ({0: B, 1: S}, {0: B, 1: S}, tuple({} for _ in loras)),
        external=external,
    )
    log(f"encoder graph: {mb(tmp / 'model.fp32.onnx')}")
    if opts.with_training and opts.task == "classification":
        export_train(graph, tmp, opts, loras, log, external=external)
    return io


def add_lora_defaults(path: Path, shapes: dict[str, list[int]]) -> None:
    """Give each LoRA input a zero initializer of the same name: not feeding it serves the base model."""
    from onnx import numpy_helper

    model = onnxfile.load(path)
    have = {i.name for i in model.graph.initializer}
    for name, shape in shapes.items():
        if name not in have:
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))
    onnxfile.save(model, path)


def finish_lowrank(model_path: Path, slots: list[dict], rank: int, out_dir: Path) -> list[dict]:
    """After quantization: the base prefix a quantizer put in front of each low-rank input's default
    (asymmetric int4 offsets) goes to ``lowrank.safetensors`` and its width into the slot, so the
    engine can rebuild the inputs for any adapter. Returns the updated slots."""
    from onnx import numpy_helper
    from safetensors.numpy import save_file
    from edge_runtime.lowrank import BASE_FILE

    model = onnxfile.load(model_path)
    inits = {i.name: i for i in model.graph.initializer}
    base, out = {}, []
    for sl in slots:
        L, R = numpy_helper.to_array(inits[sl["L"]]), numpy_helper.to_array(inits[sl["R"]])
        prefix = L.shape[1] - rank * len(sl["targets"])
        if prefix < 0 or R.shape[0] != L.shape[1] or np.any(L[:, prefix:]) or np.any(R[prefix:]):
            raise ExportError(f"low-rank input {sl['L']}/{sl['R']} has an unexpected default (shape {L.shape}/{R.shape})")
        if prefix:
            base[sl["L"]] = np.ascontiguousarray(L[:, :prefix])
            base[sl["R"]] = np.ascontiguousarray(R[:prefix])
        out.append({**{k: v for k, v in sl.items() if k != "matmul"}, "prefix": int(prefix)})
    if base:
        save_file(base, str(out_dir / BASE_FILE))
    return out


def encoder_max_length(src, tok, max_positions: int) -> int:
    """Tokens an encoder reads per input, as its reference implementation does: sentence-transformers'
    ``max_seq_length`` (256 for all-MiniLM-L6-v2) when the checkpoint has one, else the tokenizer's
    ``model_max_length`` when set, capped by the position table."""
    cfg = Path(str(src)) / "sentence_bert_config.json"
    if cfg.is_file():
        n = json.loads(cfg.read_text()).get("max_seq_length")
        if isinstance(n, int) and n > 0:
            return min(n, max_positions)
    n = getattr(tok, "model_max_length", None)
    return min(int(n), max_positions) if isinstance(n, int) and 0 < n < 1_000_000 else max_positions


def calibration_ids(src) -> list[int]:
    """Token ids of the general-text passages shipped with the agent (``edge_runtime/data/anchor.txt``,
    everyday prose, no benchmark text): what ``--int4-algo sym`` weighs its rounding by."""
    from transformers import AutoTokenizer

    from edge_runtime.gate import anchor_texts

    tok = AutoTokenizer.from_pretrained(src)
    return list(tok("\n".join(anchor_texts()))["input_ids"])


def build_bundle(model: str, out: str | Path, opts: BuildOptions, *, log=None) -> Manifest:
    """Export ``model`` into a bundle at ``out`` (directory; plus ``out.tar`` with ``archive``)."""
    import torch

    from export.source import load_model, normalized_dims, weights_hash

    log = log or Progress()
    out = Path(out)
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        raise ExportError(f"{out} already exists; remove it or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t = time.time()
        log(f"loading {model} for {opts.task}")
        hf, config, src, family = load_model(model, opts.task, log)
        dims = normalized_dims(config, family)
        nparams = sum(p.numel() for p in hf.parameters())
        log(f"loaded {config.model_type}: {nparams / 1e6:.1f}M parameters in {time.time() - t:.1f}s")
        tied = family == "llama" and getattr(config, "tie_word_embeddings", False)
        fp32_bytes = 4 * (nparams + (hf.get_input_embeddings().weight.numel() if tied else 0))  # + the head's own copy
        external = fp32_bytes > onnxfile.EXTERNAL_DATA_BYTES
        if external:
            log(
                f"fp32 graphs of {fp32_bytes / 1e9:.1f} GB pass protobuf's 2 GB limit: their weights go to <graph>.onnx.data "
                f"files (graphs that quantization brings under the limit are single files again)"
            )
        spec = LoraSpec(tuple(opts.lora_targets), opts.lora_rank, opts.lora_alpha)
        with torch.no_grad():
            graph: LlamaGraph | BertGraph = (
                LlamaGraph(hf, spec).eval() if family == "llama" else BertGraph(hf, spec, opts.task).eval()
            )
        io = (
            export_llama(graph, tmp, opts, log, external=external)
            if isinstance(graph, LlamaGraph)
            else export_bert(graph, tmp, opts, log, external=external)
        )
        module_dims = graph.module_dims()
        layers = int(dims["layers"])
        stacked_shapes = {}
        for tname in opts.lora_targets:
            fin, fout = module_dims[tname]
            sa, sb = stacked_names(tname)
            stacked_shapes[sa], stacked_shapes[sb] = [layers, opts.lora_rank, fin], [layers, fout, opts.lora_rank]
        head_out = "logits" if family == "llama" else None
        calibration = None
        if family == "llama" and opts.quant.scheme == "int4" and opts.quant.algo == "sym":
            calibration = calibration_ids(src)
            log(f"calibrating the int4 rounding on {len(calibration)} tokens of the shipped anchor text")
        applied = {}
        for g in ("model", "train"):
            src_g = tmp / f"{g}.fp32.onnx"
            if not src_g.exists():
                continue
            t = time.time()
            applied[g] = quantize_graph(
                src_g,
                tmp / f"{g}.onnx",
                opts.quant,
                module_shapes=module_dims,
                head_output=head_out if g == "model" else None,
                training=g == "train",
                lowrank_slots=io.get("lowrank") if g == "model" else None,
                calibration=calibration if g == "model" else None,
            )
            if g == "model" and io.get("lora_layout") is LoraLayout.LOWRANK:
                io["lowrank"] = finish_lowrank(tmp / "model.onnx", io["lowrank"], opts.lora_rank, tmp)
            elif g == "model":
                add_lora_defaults(tmp / "model.onnx", stacked_shapes)
            onnxfile.externalize(tmp / f"{g}.onnx")
            log(f"quantized {g} graph ({applied[g]}): {mb(src_g)} -> {mb(tmp / f'{g}.onnx')} in {time.time() - t:.1f}s")
            onnxfile.remove(src_g)
        # tokenizer
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
        tok.save_pretrained(tmp / "tokenizer")
        if not (tmp / "tokenizer" / "tokenizer.json").is_file():
            raise ExportError("the model's tokenizer has no fast (tokenizer.json) form; the device runtime needs one")
        if family != "llama":
            dims["max_length"] = encoder_max_length(src, tok, int(dims["max_positions"]))
        # fingerprints and adapter
        recipe = dataclasses.asdict(opts.quant)
        recipe["applied"] = applied
        base_fp = hashlib.sha256(
            json.dumps({"weights": weights_hash(hf), "task": opts.task, "family": family}, sort_keys=True).encode()
        ).hexdigest()
        adapter = initial_adapter(module_dims, opts.lora_targets, layers, opts.lora_rank, opts.seed)
        meta = AdapterMeta(
            base_fingerprint=base_fp,
            target_modules=list(opts.lora_targets),
            rank=opts.lora_rank,
            alpha=opts.lora_alpha,
            shapes={k: list(v.shape) for k, v in adapter.items()},
            version=0,
        )
        save_adapter(tmp / "adapter.safetensors", adapter, meta)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        import onnxruntime

        versions = {
            "edgefm": "0.1.0",
            "exporter": EXPORTER_REVISION,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        }
        for mod in ("transformers", "onnx", "optimum"):
            try:
                versions[mod] = __import__(mod).__version__
            except (ImportError, AttributeError):
                pass
        manifest = Manifest(
            task=opts.task,
            architecture=family,
            model=dims,
            quant=QuantSpec(**{**recipe, "sensitive_8bit": list(recipe["sensitive_8bit"])}),
            adapter=AdapterSpec(opts.lora_rank, opts.lora_alpha, list(opts.lora_targets), meta.shapes, stacked_shapes),
            files=hash_files(tmp, files),
            base_fingerprint=base_fp,
            io=IoSpec(**io),
            training=TrainingSpec(
                graph="train.onnx" if (tmp / "train.onnx").exists() else None,
                batch=opts.train_batch,
                seq=opts.train_seq,
                microbatch=opts.train_microbatch if opts.train_graph_batch != opts.train_batch else None,
            ),
            versions=versions,
            opset=OPSET,
            source=str(model),
            recipe_fingerprint=hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest(),
        )
        manifest.save(tmp)
        if opts.verify:
            from export.verify import verify_against_source

            manifest.checks = verify_against_source(tmp, hf, graph, opts, log)
            manifest.save(tmp)
        if out.is_dir():
            out.rmdir()
        tmp.replace(out)
        if opts.archive:
            with tarfile.open(out.with_suffix(".tar"), "w") as tar:
                for p in sorted(out.rglob("*")):
                    tar.add(p, arcname=p.relative_to(out).as_posix(), recursive=False)
            log(f"archive: {out.with_suffix('.tar')} ({mb(out.with_suffix('.tar'))})")
        total = sum(f["size"] for f in manifest.files.values())
        log(f"bundle written to {out} ({total / 1e6:.1f} MB)")
        return manifest
    except EdgefmError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"export failed: {type(exc).__name__}: {exc}") from exc
