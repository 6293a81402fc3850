"""Adapter interop: our adapter <-> PEFT (adapter_config.json + adapter_model.safetensors) and ORT .onnx_adapter."""

from __future__ import annotations

import json
from pathlib import Path


from edge_runtime.errors import BundleError, ExportError, ProtocolError
from edge_runtime.protocol.adapter import load_adapter, save_adapter
from edge_runtime.protocol.manifest import Manifest
from edge_runtime.protocol.tensors import decode_tensors, encode_tensors
from edge_runtime.protocol.peft import adapter_from_peft, adapter_to_peft


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
    cfg, weights = adapter_to_peft(tensors, meta, m, base_model_path(m.source))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_model.safetensors").write_bytes(encode_tensors(weights, {"format": "pt"}))
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def from_peft(peft_dir: Path, bundle: Path, out_path: Path, *, version: int = 0) -> Path:
    """Convert a PEFT LoRA directory (same base model, targets within the bundle's slots) to our adapter,
    rescaled to the bundle's alpha (``edge_runtime.protocol.peft``)."""
    m = Manifest.load(bundle)
    peft_dir = Path(peft_dir)
    try:
        cfg = json.loads((peft_dir / "adapter_config.json").read_text())
        weights, _ = decode_tensors((peft_dir / "adapter_model.safetensors").read_bytes())
    except (OSError, ValueError, ProtocolError) as exc:
        raise ExportError(f"{peft_dir}: not a readable PEFT LoRA directory ({exc})") from None
    try:
        tensors, meta = adapter_from_peft(cfg, weights, m, version=version)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    save_adapter(out_path, tensors, meta)
    return Path(out_path)


def to_onnx_adapter(adapter_path: Path, bundle: Path, out_path: Path) -> Path:
    """Write an ORT ``.onnx_adapter`` holding the LoRA inputs of the bundle's model.onnx for an adapter:
    the per-layer low-rank inputs of fused decoder graphs (base part included, alpha/rank applied; see
    ``edge_runtime.lowrank``), or the raw stacked A/B tensors of torch-exported graphs (which scale
    by alpha/rank themselves)."""
    import onnxruntime as ort
    from edge_runtime.protocol.adapter import stack_adapter
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
