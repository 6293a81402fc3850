"""Adapter interop: our adapter <-> PEFT (adapter_config.json + adapter_model.safetensors) and ORT .onnx_adapter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_runtime.errors import ExportError, ProtocolError
from edge_runtime.protocol.adapter import AdapterMeta, load_adapter, lora_names, save_adapter
from edge_runtime.protocol.manifest import Manifest
from edge_runtime.protocol.tensors import decode_tensors, encode_tensors
from export.graphs import peft_module_path

PEFT_TASK = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "embedding": "FEATURE_EXTRACTION"}


def base_model_path(source: str) -> str:
    """What PEFT's ``base_model_name_or_path`` must say for ``AutoPeftModel*.from_pretrained(dir)`` to find
    the base model: the local transformers checkpoint the bundle was exported from (a packaged model
    or a GGUF file resolves to its cached conversion), else the hub id as given."""
    from export.source import resolve
    try:
        return str(Path(resolve(source, log=lambda *_: None)).resolve()) if not _is_hub_id(source) else source
    except ExportError:
        return source


def _is_hub_id(source: str) -> bool:
    return "/" in source and not Path(source).exists() and not source.startswith((".", "/"))


def to_peft(adapter_path: Path, bundle: Path, out_dir: Path) -> Path:
    """Write a PEFT LoRA directory loadable with ``PeftModel.from_pretrained(source_model, out_dir)`` and
    ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` (base_model_name_or_path names the source)."""
    m = Manifest.load(bundle)
    tensors, meta = load_adapter(adapter_path, expect_fingerprint=m.base_fingerprint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {}
    for i in range(int(m.model["layers"])):
        for t in meta.target_modules:
            path = peft_module_path(m.architecture, m.task, i, t)
            na, nb = lora_names(i, t)
            weights[f"base_model.model.{path}.lora_A.weight"] = tensors[na]
            weights[f"base_model.model.{path}.lora_B.weight"] = tensors[nb]
    (out_dir / "adapter_model.safetensors").write_bytes(encode_tensors(weights, {"format": "pt"}))
    cfg = {"peft_type": "LORA", "task_type": PEFT_TASK[m.task], "r": meta.rank, "lora_alpha": meta.alpha,
           "target_modules": list(meta.target_modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
           "inference_mode": True, "base_model_name_or_path": base_model_path(m.source), "use_rslora": False, "use_dora": False,
           "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def from_peft(peft_dir: Path, bundle: Path, out_path: Path, *, version: int = 0) -> Path:
    """Convert a PEFT LoRA directory (same base model, targets within the bundle's slots) to our adapter."""
    m = Manifest.load(bundle)
    peft_dir = Path(peft_dir)
    try:
        cfg = json.loads((peft_dir / "adapter_config.json").read_text())
        weights, _ = decode_tensors((peft_dir / "adapter_model.safetensors").read_bytes())
    except (OSError, ValueError, ProtocolError) as exc:
        raise ExportError(f"{peft_dir}: not a readable PEFT LoRA directory ({exc})") from None
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise ExportError("only LoRA adapters convert (DoRA changes the weight norm; it has no LoRA-slot form)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ExportError(f"PEFT {key} (per-module rank or alpha) is not supported: the bundle has one rank and alpha")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if rank != m.adapter["rank"]:
        raise ExportError(f"PEFT rank {rank} differs from the bundle's LoRA slots (rank {m.adapter['rank']}); re-export with --lora-rank {rank}")
    # The bundle's graph scales every adapter by its own alpha / r. PEFT scales by lora_alpha / r
    # (lora_alpha / sqrt(r) with rsLoRA): B is rescaled here so the adapter acts exactly as in PEFT.
    bundle_alpha = float(m.adapter["alpha"])
    peft_scale = alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
    rescale = peft_scale / (bundle_alpha / rank)
    tensors = {}
    for i in range(int(m.model["layers"])):
        for t in m.adapter["targets"]:
            path = peft_module_path(m.architecture, m.task, i, t)
            na, nb = lora_names(i, t)
            ka, kb = f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"
            if ka in weights:
                tensors[na], tensors[nb] = weights[ka].astype(np.float32), (weights[kb] * rescale).astype(np.float32)
            else:  # a target PEFT did not train: zero contribution
                shp_a, shp_b = m.adapter["shapes"][na], m.adapter["shapes"][nb]
                tensors[na], tensors[nb] = np.zeros(shp_a, np.float32), np.zeros(shp_b, np.float32)
    unknown = [k for k in weights if ".lora_" in k and not any(f".{t}.lora_" in k for t in m.adapter["targets"])]
    if unknown:
        raise ExportError(f"PEFT adapter trains modules this bundle has no slots for (e.g. {unknown[0]}); re-export with matching --lora-targets")
    meta = AdapterMeta(base_fingerprint=m.base_fingerprint, target_modules=list(m.adapter["targets"]), rank=rank,
                       alpha=bundle_alpha, shapes={k: list(v.shape) for k, v in tensors.items()}, version=version)
    save_adapter(out_path, tensors, meta)
    return Path(out_path)


def to_onnx_adapter(adapter_path: Path, bundle: Path, out_path: Path) -> Path:
    """Write an ORT ``.onnx_adapter`` holding the LoRA inputs of the bundle's model.onnx for an adapter:
    the per-layer low-rank inputs of fused decoder graphs (base part included, alpha/rank applied; see
    ``edge_runtime.lowrank``), or the raw stacked A/B tensors of torch-exported graphs (which scale
    by alpha/rank themselves)."""
    import onnxruntime as ort
    from edge_runtime.engine import stack_adapter
    from edge_runtime.lowrank import LowRankLayout
    m = Manifest.load(bundle)
    tensors, meta = load_adapter(adapter_path, expect_fingerprint=m.base_fingerprint)
    layout = LowRankLayout.from_bundle(Path(bundle), m)
    feeds = layout.feeds(tensors) if layout else stack_adapter(tensors, list(meta.target_modules), int(m.model["layers"]))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(meta.version))
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()})
    fmt.export_adapter(str(out_path))
    return Path(out_path)
