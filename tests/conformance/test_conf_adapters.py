"""Adapters against PEFT: a PEFT LoRA (any alpha, rsLoRA) converted with from-peft gives PeftModel's logits
on the bundle; to-peft output loads with AutoPeftModelForCausalLM from its own directory."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import tiny_bundle

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TEXT = "valve 7 closed at noon and reopened at two"


def peft_adapter(model_dir, out, *, rank=4, alpha=8.0, rslora=False, dora=False, seed=0):
    """A PEFT LoRA on q/v with random (non-zero) A and B, saved as PEFT does."""
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          use_rslora=rslora, use_dora=dora)
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return model.eval()


def engine_logits(bundle, adapter_path, ids):
    from edge_runtime.engine import Engine
    from edge_runtime.protocol.adapter import load_adapter
    eng = Engine(bundle)
    tensors, meta = load_adapter(adapter_path)
    got, _ = eng.forward(np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None], eng.empty_past(1),
                         eng.make_active(tensors, meta))
    return eng, got


@pytest.mark.parametrize("alpha,rslora", [(8.0, False), (32.0, False), (16.0, True)])
def test_from_peft_matches_peft_model(tmp_path, tmp_path_factory, tiny_llama_dir, alpha, rslora):
    from export.interop import from_peft
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")   # exported with alpha 16
    assert json.loads((bundle / "manifest.json").read_text())["adapter"]["alpha"] == 16.0
    model = peft_adapter(tiny_llama_dir, tmp_path / "peft", alpha=alpha, rslora=rslora)
    from_peft(tmp_path / "peft", bundle, tmp_path / "ours.safetensors")
    from edge_runtime.engine import Engine
    ids = Engine(bundle).encode(TEXT)
    _, got = engine_logits(bundle, tmp_path / "ours.safetensors", ids)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits.numpy()
    assert float(np.abs(got - ref).max()) <= 1e-4


def test_dora_and_per_module_alpha_are_refused(tmp_path, tmp_path_factory, tiny_llama_dir):
    from edge_runtime.errors import ExportError
    from export.interop import from_peft
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    peft_adapter(tiny_llama_dir, tmp_path / "dora", dora=True)
    with pytest.raises(ExportError, match="DoRA"):
        from_peft(tmp_path / "dora", bundle, tmp_path / "x.safetensors")
    peft_adapter(tiny_llama_dir, tmp_path / "pat")
    cfg = json.loads((tmp_path / "pat" / "adapter_config.json").read_text())
    (tmp_path / "pat" / "adapter_config.json").write_text(json.dumps({**cfg, "alpha_pattern": {"q_proj": 4}}))
    with pytest.raises(ExportError, match="alpha_pattern"):
        from_peft(tmp_path / "pat", bundle, tmp_path / "x.safetensors")


def test_adapter_with_another_alpha_is_refused_by_the_engine(tmp_path, tmp_path_factory, tiny_llama_dir):
    from edge_runtime.engine import Engine
    from edge_runtime.errors import BundleError
    from edge_runtime.protocol.adapter import load_adapter
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    tensors, meta = load_adapter(bundle / "adapter.safetensors")
    with pytest.raises(BundleError, match="alpha 8 differs"):
        Engine(bundle).make_active(tensors, type(meta)(**{**meta.to_json(), "alpha": 8.0}))


def test_to_peft_loads_with_auto_peft_model(tmp_path, tmp_path_factory, tiny_llama_dir):
    from edge_runtime.protocol.adapter import load_adapter, save_adapter
    from export.interop import to_peft
    from export.verify import random_adapter
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    _, meta = load_adapter(bundle / "adapter.safetensors")
    ours = random_adapter(meta.shapes, seed=3, scale=0.1)
    save_adapter(tmp_path / "a.safetensors", ours, meta)
    to_peft(tmp_path / "a.safetensors", bundle, tmp_path / "peft")
    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()   # finds the base by itself
    from edge_runtime.engine import Engine
    ids = Engine(bundle).encode(TEXT)
    _, got = engine_logits(bundle, tmp_path / "a.safetensors", ids)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits.numpy()
    assert float(np.abs(got - ref).max()) <= 1e-4


def test_to_peft_of_the_packaged_smollm2_names_a_loadable_base(smollm2_bundle, smollm2_source, tmp_path):
    from export.interop import to_peft
    to_peft(smollm2_bundle / "adapter.safetensors", smollm2_bundle, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(smollm2_source.resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft")
    assert model.config.model_type == "llama"
