"""PEFT LoRA <-> edgefm adapter, as plain functions over arrays (no torch: agents load PEFT adapters
too). PEFT names a module's factors ``base_model.model.<module path>.lora_A.weight`` / ``lora_B``, and
scales B·A by ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA); a bundle's graph scales
every adapter by the bundle's own ``alpha / r``, so B is rescaled on the way in and PEFT gets the
bundle's alpha on the way out."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_runtime.errors import BundleError
from edge_runtime.protocol.adapter import AdapterMeta, lora_names
from edge_runtime.protocol.manifest import Manifest

PEFT_TASK = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "embedding": "FEATURE_EXTRACTION"}


def peft_module_path(family: str, task: str, layer: int, target: str) -> str:
    """Module path PEFT uses for a LoRA target (for adapter_model.safetensors keys)."""
    if family == "llama":
        group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        return f"model.layers.{layer}.{group}.{target}"
    prefix = "bert." if task == "classification" else ""
    sub = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    }[target]
    return f"{prefix}encoder.layer.{layer}.{sub}"


def _keys(m: Manifest, layer: int, target: str) -> tuple[str, str]:
    path = peft_module_path(m.architecture, m.task, layer, target)
    return f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"


def adapter_from_peft(
    cfg: dict[str, Any], weights: dict[str, np.ndarray], m: Manifest, *, version: int = 0
) -> tuple[dict[str, np.ndarray], AdapterMeta]:
    """A PEFT LoRA (its adapter_config.json as a dict and its tensors) as this bundle's adapter; raises
    BundleError saying what does not fit."""
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise BundleError("not a PEFT LoRA adapter (adapter_config.json peft_type must be LORA)")
    if cfg.get("use_dora"):
        raise BundleError("DoRA adapters do not convert (DoRA changes the weight norm; it has no LoRA-slot form)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise BundleError(f"PEFT {key} (per-module rank or alpha) is not supported: the bundle has one rank and alpha")
    try:
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise BundleError("adapter_config.json needs numeric 'r' and 'lora_alpha'") from None
    if rank != m.adapter.rank:
        raise BundleError(
            f"PEFT rank {rank} differs from the bundle's LoRA slots (rank {m.adapter.rank}); "
            f"re-export the bundle with --lora-rank {rank}"
        )
    bundle_alpha = float(m.adapter.alpha)
    rescale = (alpha / (rank**0.5 if cfg.get("use_rslora") else rank)) / (bundle_alpha / rank)
    unknown = [k for k in weights if ".lora_" in k and not any(f".{t}.lora_" in k for t in m.adapter.targets)]
    if unknown:
        raise BundleError(
            f"the PEFT adapter trains modules this bundle has no slots for (e.g. {unknown[0]}); "
            f"re-export with matching --lora-targets"
        )
    tensors = {}
    for i in range(int(m.model["layers"])):
        for t in m.adapter.targets:
            na, nb = lora_names(i, t)
            ka, kb = _keys(m, i, t)
            if ka in weights and kb in weights:
                tensors[na] = np.asarray(weights[ka], np.float32)
                tensors[nb] = (np.asarray(weights[kb], np.float64) * rescale).astype(np.float32)
            else:  # a target PEFT did not train: zero contribution
                tensors[na] = np.zeros(m.adapter.shapes[na], np.float32)
                tensors[nb] = np.zeros(m.adapter.shapes[nb], np.float32)
            if list(tensors[na].shape) != list(m.adapter.shapes[na]) or list(tensors[nb].shape) != list(m.adapter.shapes[nb]):
                raise BundleError(
                    f"PEFT factors for layer {i} {t} have shapes {tensors[na].shape}/{tensors[nb].shape}; "
                    f"the bundle expects {m.adapter.shapes[na]}/{m.adapter.shapes[nb]}"
                )
    meta = AdapterMeta(
        base_fingerprint=m.base_fingerprint,
        target_modules=list(m.adapter.targets),
        rank=rank,
        alpha=bundle_alpha,
        shapes={k: list(v.shape) for k, v in tensors.items()},
        version=version,
    )
    return tensors, meta


def adapter_to_peft(
    tensors: dict[str, np.ndarray], meta: AdapterMeta, m: Manifest, base_model: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our adapter as PEFT's adapter_config.json (dict) and adapter_model tensors."""
    weights = {}
    for i in range(int(m.model["layers"])):
        for t in meta.target_modules:
            na, nb = lora_names(i, t)
            ka, kb = _keys(m, i, t)
            weights[ka], weights[kb] = tensors[na], tensors[nb]
    cfg = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK[m.task],
        "r": meta.rank,
        "lora_alpha": meta.alpha,
        "target_modules": list(meta.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    return cfg, weights
