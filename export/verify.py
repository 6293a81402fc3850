"""Checks built into the export and runnable later (`edgefm-export verify`): hashes, parity, perplexity,
greedy agreement, training gradients against torch autograd."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from edge_runtime.errors import ExportError
from edge_runtime.protocol.adapter import lora_names

HELD_OUT_TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening, counting the steps as his father had done "
    "before him. At the top he trimmed the wick, polished the great lens, and watched the weather come in from "
    "the west. Ships passed far out on the horizon, their lights small and steady, and he wrote each one into the "
    "logbook with the time and the direction of the wind. In winter the storms were long and the nights longer, "
    "but the light never failed, and the keeper took a quiet pride in that. When the supply boat came in spring, "
    "he asked for news of the town, for new books, and for seeds to plant in the small garden behind the house."
)

# fp32 bundles must match torch: logits to 1e-4 absolute; training-graph gradients to 1e-2 of each
# tensor's largest gradient. The gradient bound leaves room for float32 summation order through a deep
# backward pass (SmolLM2-135M, 30 layers: 1.6e-3 measured, so 1e-4 failed a correct export after ten
# minutes) while a wrong graph (a missing term, a transposed factor, a bad mask) is off by 1e-1 or more.
FP32_LOGIT_TOL = 1e-4
FP32_GRAD_RTOL = 1e-2


def random_adapter(meta_shapes: dict[str, list[int]], seed: int = 1, scale: float = 0.05) -> dict[str, np.ndarray]:
    """A non-zero adapter (both A and B random) so parity checks exercise the LoRA path."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in meta_shapes.items()}


@contextlib.contextmanager
def merged(hf, family: str, tensors: dict[str, np.ndarray], targets, layers: int, lora_scale: float):
    """Temporarily add scale * B @ A into the HF model's weights (the reference for adapter parity)."""
    import torch
    from export.graphs import hf_module

    deltas = []
    with torch.no_grad():
        for i in range(layers):
            for t in targets:
                na, nb = lora_names(i, t)
                d = torch.from_numpy(tensors[nb] @ tensors[na]) * lora_scale
                mod = hf_module(hf, family, i, t)
                mod.weight += d
                deltas.append((mod, d))
    try:
        yield hf
    finally:
        with torch.no_grad():
            for mod, d in deltas:
                mod.weight -= d


def verify_against_source(bundle: Path, hf, graph, opts, log) -> dict:
    """Run every check that needs the source model; raise ExportError when an fp32 bound is broken."""
    from edge_runtime.engine import Engine

    eng = Engine(bundle, threads=2)
    m = eng.manifest
    checks: dict = {}
    fp32 = m.quant.scheme == "fp32"
    adapter = random_adapter(m.adapter.shapes)
    layers = int(m.model["layers"])
    scale = m.adapter.alpha / m.adapter.rank
    meta = eng.adapter.meta
    active = eng.make_active(adapter, type(meta)(**{**meta.to_json(), "version": 0}))
    import torch

    if m.task == "causal-lm":
        ids = eng.encode(HELD_OUT_TEXT)[:24]
        arr = np.array([ids], np.int64)
        got, _ = eng.forward(arr, np.ones_like(arr), np.arange(len(ids))[None], eng.empty_past(1), active)
        with merged(hf, "llama", adapter, m.adapter.targets, layers, scale), torch.no_grad():
            ref = hf(input_ids=torch.from_numpy(arr)).logits.numpy()
        diff = float(np.abs(got - ref).max())
        checks["logits_max_abs_diff_with_adapter"] = diff
        log(
            f"verify: logits vs torch with a random adapter: max abs diff {diff:.2e}"
            + (f" (limit {FP32_LOGIT_TOL})" if fp32 else "")
        )
        if fp32 and diff > FP32_LOGIT_TOL:
            raise ExportError(f"fp32 parity failed: max abs logit diff {diff:.3g} > {FP32_LOGIT_TOL}")
        # perplexity (base model, zero adapter) and greedy agreement
        ppl_onnx = eng.perplexity(HELD_OUT_TEXT)
        all_ids = eng.encode(HELD_OUT_TEXT)
        tot, cnt = 0.0, 0
        with torch.no_grad():  # same 256-token windows as Engine.perplexity
            for i in range(0, len(all_ids), 256):
                w = torch.tensor([all_ids[i : i + 256]])
                if w.shape[1] < 2:
                    continue
                tot += float(hf(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
                cnt += w.shape[1] - 1
        ppl_torch = float(np.exp(tot / cnt))
        checks.update(perplexity_onnx=ppl_onnx, perplexity_torch_fp32=ppl_torch, perplexity_ratio=ppl_onnx / ppl_torch)
        log(f"verify: held-out perplexity {ppl_onnx:.3f} (torch fp32 {ppl_torch:.3f}, ratio {ppl_onnx / ppl_torch:.4f})")
        prompt = eng.encode(HELD_OUT_TEXT)[:8]
        n = 24
        ours = list(eng.generate(prompt, max_new_tokens=n, stop_ids=set()))
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[
                0, len(prompt) :
            ].tolist()
        agree = sum(a == b for a, b in zip(ours, theirs)) / n
        prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
        checks.update(greedy_agreement=agree, greedy_common_prefix=prefix)
        log(f"verify: greedy decoding agreement {agree:.0%} over {n} tokens (common prefix {prefix})")
    else:
        # inputs of different lengths (padding in the batch), the reference tokenized by transformers itself:
        # a padding or masking fault in the device runtime shows as a difference here
        texts = ["edge devices learn", "the quick brown fox jumps over the lazy dog " * 3]
        eng.set_adapter(active)
        got = eng.embed(texts) if m.task == "embedding" else eng.classify(texts)
        from transformers import AutoTokenizer

        ref_in = AutoTokenizer.from_pretrained(bundle / "tokenizer")(
            texts, padding=True, truncation=True, max_length=eng.max_length, return_tensors="pt"
        )
        with merged(hf, "bert", adapter, m.adapter.targets, layers, scale), torch.no_grad():
            ids, am = ref_in["input_ids"], ref_in["attention_mask"]
            if m.task == "classification":
                ref = hf(input_ids=ids, attention_mask=am).logits.numpy()
            else:
                hs = hf(input_ids=ids, attention_mask=am).last_hidden_state
                mk = am[..., None].float()
                pooled = (hs * mk).sum(1) / mk.sum(1)
                ref = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        diff = float(np.abs(got - ref).max())
        checks["output_max_abs_diff_with_adapter"] = diff
        log(f"verify: {m.task} outputs vs torch with a random adapter: max abs diff {diff:.2e}")
        if fp32 and diff > FP32_LOGIT_TOL:
            raise ExportError(f"fp32 parity failed: max abs diff {diff:.3g} > {FP32_LOGIT_TOL}")
    if m.training.graph:
        rel = check_gradients(bundle, graph, opts, adapter)
        checks["grad_max_rel_err"] = rel
        log(
            f"verify: training-graph gradients vs torch autograd: max relative error {rel:.2e}"
            + (f" (limit {FP32_GRAD_RTOL})" if fp32 else "")
        )
        if fp32 and rel > FP32_GRAD_RTOL:
            raise ExportError(f"fp32 gradient check failed: relative error {rel:.3g} > {FP32_GRAD_RTOL}")
    return checks


def check_gradients(bundle: Path, graph, opts, adapter: dict[str, np.ndarray]) -> float:
    """Max over tensors of max|g_onnx - g_torch| / max|g_torch| on a random batch."""
    import onnxruntime as ort
    import torch
    from edge_runtime.protocol.adapter import stack_adapter, stacked_names
    from export.training_graph import causal_lm_loss, classification_loss

    stacked = stack_adapter(
        adapter, list(opts.lora_targets), int(graph.n_layers if hasattr(graph, "n_layers") else len(graph.bert.encoder.layer))
    )
    names = [n for t in opts.lora_targets for n in stacked_names(t)]
    B, S = opts.train_graph_batch, opts.train_seq
    g = torch.Generator().manual_seed(3)
    vocab = graph.embed.shape[0] if hasattr(graph, "embed") else graph.bert.embeddings.word_embeddings.weight.shape[0]
    ids = torch.randint(0, vocab, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[0, S // 2 :] = 0  # some padding
    if opts.task == "causal-lm":
        third, loss_fn, third_name = am.float(), causal_lm_loss(graph, opts.lora_targets), "loss_mask"
    else:
        nl = graph.classifier.out_features
        third, loss_fn, third_name = (
            torch.randint(0, nl, (B,), generator=g),
            classification_loss(graph, opts.lora_targets),
            "labels",
        )
    lt = [torch.from_numpy(stacked[n]).clone().requires_grad_(True) for n in names]
    loss = loss_fn(tuple(lt), ids, am, third)
    loss.backward()
    sess = ort.InferenceSession(str(Path(bundle) / "train.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": am.numpy(), third_name: third.numpy(), **stacked}
    outs = sess.run(None, feeds)
    rel = abs(float(outs[0]) - loss.item()) / max(abs(loss.item()), 1e-12)
    for t, got in zip(lt, outs[1:]):
        assert t.grad is not None  # every LoRA tensor takes part in the loss
        ref = t.grad.numpy()
        rel = max(rel, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return rel
