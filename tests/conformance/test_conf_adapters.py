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


def max_logit_diff(bundle, adapter_path, torch_model) -> float:
    """Largest |logit difference| on TEXT between the bundle with our adapter file and a torch (PEFT) model."""
    from edge_runtime.engine import Engine
    ids = Engine(bundle).encode(TEXT)
    _, got = engine_logits(bundle, adapter_path, ids)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor([ids])).logits.numpy()
    return float(np.abs(got - ref).max())


@pytest.mark.parametrize("alpha,rslora", [(8.0, False), (32.0, False), (16.0, True)])
def test_from_peft_matches_peft_model(tmp_path, tmp_path_factory, tiny_llama_dir, alpha, rslora):
    from export.interop import from_peft
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")   # exported with alpha 16
    assert json.loads((bundle / "manifest.json").read_text())["adapter"]["alpha"] == 16.0
    model = peft_adapter(tiny_llama_dir, tmp_path / "peft", alpha=alpha, rslora=rslora)
    from_peft(tmp_path / "peft", bundle, tmp_path / "ours.safetensors")
    assert max_logit_diff(bundle, tmp_path / "ours.safetensors", model) <= 1e-4


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
    from edge_runtime.errors import ProtocolError
    from edge_runtime.protocol.adapter import load_adapter
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    tensors, meta = load_adapter(bundle / "adapter.safetensors")
    with pytest.raises(ProtocolError, match="bad_field: adapter alpha 8 differs"):
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
    assert max_logit_diff(bundle, tmp_path / "a.safetensors", model) <= 1e-4


def test_to_peft_of_the_packaged_smollm2_names_a_loadable_base(smollm2_bundle, smollm2_source, tmp_path):
    from export.interop import to_peft
    to_peft(smollm2_bundle / "adapter.safetensors", smollm2_bundle, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(smollm2_source.resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft")
    assert model.config.model_type == "llama"


def test_running_agent_loads_peft_and_edgefm_adapters(tmp_path, tmp_path_factory, tiny_llama_dir):
    """POST /v1/adapters and `edgefm-agent adapters load`: verified, gated on the held-out slice, served
    (with PeftModel's logits) or kept as refused with the reason; broken adapters get a clear 400."""
    import base64
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    from edge_runtime.protocol.adapter import load_adapter
    from helpers import examples, served_agent
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")

    def post(url, body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with served_agent(bundle, tmp_path / "agent") as (agent, url):
        post(url + "/v1/examples", {"examples": examples(40)})
        # a small PEFT adapter (alpha 8 on a bundle exported with 16), loaded with the CLI
        model = peft_adapter(tiny_llama_dir, tmp_path / "small", alpha=8.0, seed=1)
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_" in n:
                    prm.mul_(0.05)
        model.save_pretrained(tmp_path / "small")
        r = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "adapters", "load", str(tmp_path / "small"),
                            "--name", "small", "--url", url], capture_output=True, text=True, timeout=300)
        res = json.loads(r.stdout)
        assert res["id"] == "loaded-small" and res["reason"] in ("adopted", "worse_than_current", "worse_than_base",
                                                                 "worse_than_base_on_both", "forgetting")
        assert r.returncode == (0 if res["adopted"] else 3)
        ids = agent.engine.encode(TEXT)
        entry = next(a for a in agent.store.adapters() if a["id"] == "loaded-small")
        tensors, meta = load_adapter(entry["path"])
        got, _ = agent.engine.forward(np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None],
                                      agent.engine.empty_past(1), agent.engine.make_active(tensors, meta))
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits.numpy()
        assert float(np.abs(got - ref).max()) <= 1e-4          # what was loaded acts as PeftModel does
        # a wild adapter is judged worse than the base and kept, not served
        peft_adapter(tiny_llama_dir, tmp_path / "wild", alpha=64.0, seed=2)
        code, res = post(url + "/v1/adapters", {"name": "wild", "peft": {
            "adapter_config": json.loads((tmp_path / "wild" / "adapter_config.json").read_text()),
            "adapter_model": base64.b64encode((tmp_path / "wild" / "adapter_model.safetensors").read_bytes()).decode()}})
        assert code == 200 and not res["adopted"] and res["reason"] == "worse_than_base" and res["active"] != "loaded-wild"
        kinds = {a["id"]: a["kind"] for a in agent.store.adapters()}
        assert kinds["loaded-wild"] == "refused"
        # the bundle's own adapter (the base model) through the edgefm path: not worse than anything here
        code, res = post(url + "/v1/adapters", {"name": "base-copy",
                                                "adapter": base64.b64encode((bundle / "adapter.safetensors").read_bytes()).decode()})
        assert code == 200 and res["adopted"] and res["active"] == "loaded-base-copy", res
        # broken inputs: clear 400s, nothing changes
        raw = (bundle / "adapter.safetensors").read_bytes()
        code, res = post(url + "/v1/adapters", {"adapter": base64.b64encode(raw[:-7]).decode()})
        assert code == 400 and "adapter" in res["error"]["message"]
        code, res = post(url + "/v1/adapters", {"adapter": "not base64!"})
        assert code == 400 and res["error"]["param"] == "adapter"
        cfg = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
        weights = (tmp_path / "small" / "adapter_model.safetensors").read_bytes()
        code, res = post(url + "/v1/adapters", {"peft": {"adapter_config": {**cfg, "r": 2}, "adapter_model": base64.b64encode(weights).decode()}})
        assert code == 400 and "rank 2" in res["error"]["message"]
        assert agent.active_id == "loaded-base-copy"
