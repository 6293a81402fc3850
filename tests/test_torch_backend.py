"""The optional torch trainer gives the same gradients as the ONNX training graph on an fp32 base."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import examples, tiny_bundle

pytestmark = pytest.mark.slow


def test_torch_and_onnx_backends_same_gradients(tmp_path_factory, tiny_llama_dir):
    pytest.importorskip("peft")
    from tokenizers import Tokenizer
    from edge_runtime.protocol.adapter import stack_adapter
    from edge_runtime.protocol.adapter import load_adapter
    from edge_runtime.protocol.manifest import Manifest
    from edge_runtime.torch_trainer import TorchTrainer
    from edge_runtime.trainer import OnnxTrainer
    from export.verify import random_adapter
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    m = Manifest.load(b)
    tok = Tokenizer.from_file(str(b / "tokenizer" / "tokenizer.json"))
    onnx_tr = OnnxTrainer(b, m, tok)
    torch_tr = TorchTrainer(b, m, tok, model_dir=str(tiny_llama_dir))
    _, meta = load_adapter(b / "adapter.safetensors")
    params = stack_adapter(random_adapter(meta.shapes, seed=5, scale=0.1), onnx_tr.targets, onnx_tr.layers)
    batch = onnx_tr.make_batch(examples(3) + [{"text": "valve", "prompt": "va"}])  # padding + a prompt mask
    l1, g1 = onnx_tr.loss_and_grads(params, batch)
    l2, g2 = torch_tr.loss_and_grads(params, batch)
    assert abs(l1 - l2) / abs(l2) < 1e-5
    for k in g1:
        rel = np.abs(g1[k] - g2[k]).max() / np.abs(g2[k]).max()
        assert rel <= 1e-4, (k, rel)


def test_agent_with_torch_backend_trains(tmp_path, tmp_path_factory, tiny_llama_dir):
    pytest.importorskip("peft")
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    a = Agent(AgentConfig(bundle=str(b), data_dir=str(tmp_path / "a"), auto_train=False, min_new_examples=1, steps_per_round=3,
                          learning_rate=1e-2, trainer_backend="torch", torch_model=str(tiny_llama_dir)))
    a.api.add_examples(examples(16))
    r = a.train_once(forced=True)
    assert r["status"] == "trained" and r["losses"][-1] < r["losses"][0]
    a.stop()
