"""On-device LoRA training with stock onnxruntime: train.onnx gives loss + gradients, AdamW runs in numpy."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime import native as native_kernels
from edge_runtime.engine import session_options, uses_native_ops
from edge_runtime.protocol.adapter import is_lora_a, stack_adapter, unstack_adapter
from edge_runtime.errors import BundleError, TrainingError
from edge_runtime.memory import release_free_heap
from edge_runtime.optim import AdamWConfig, adamw_step, clip_by_global_norm
from edge_runtime.protocol.manifest import Manifest
from edge_runtime.protocol.tensors import decode_tensors, encode_tensors


@dataclasses.dataclass
class TrainResult:
    """What one training session did."""

    tensors: dict[str, np.ndarray]  # per-layer adapter tensors after training
    steps: int
    losses: list[float]
    examples_used: list[int]
    seconds: float
    stopped: str  # budget | steps | yielded | data


class OnnxTrainer:
    """Runs train.onnx steps over batches built from stored examples."""

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        tokenizer,
        *,
        threads: int | None = 1,
        optim: AdamWConfig | None = None,
        native: bool = True,
    ):
        """``native``: run the device's compiled kernels for the graph's edgefm.native functions (the frozen
        base's Q8 matmuls) where it has them; False: their standard-operator form."""
        self.bundle = Path(bundle)
        self.native = native
        self.m = manifest
        self.tok = tokenizer
        self.threads = threads
        self.optim = optim or AdamWConfig()
        if not manifest.training.graph:
            raise BundleError(
                f"{bundle}: this bundle has no training graph (exported with --no-train-graph or an embedding task)"
            )
        self.B, self.S = int(manifest.training.batch), int(manifest.training.seq)
        self.microbatch = int(manifest.training.graph_batch)  # rows per graph call; a step is B / microbatch calls
        self.targets = list(manifest.adapter.targets)
        self.layers = int(manifest.model["layers"])
        self._session = None

    @property
    def session(self):
        """The training session, created on first use (keeps memory low while idle)."""
        if self._session is None:
            import onnxruntime as ort

            so = session_options(self.threads)
            so.enable_mem_pattern = False
            graph = self.bundle / "train.onnx"
            self.native = self.native and uses_native_ops(graph) and native_kernels.register(so)
            release_free_heap()  # what serving left free in the heap, before the session's peak adds to it
            self._session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        return self._session

    def release(self) -> None:
        """Drop the training session (frees its memory and hands it back to the kernel)."""
        self._session = None
        release_free_heap()

    def make_batch(self, examples: list[dict]) -> dict[str, np.ndarray]:
        """Tokenize into a fixed [B, S] batch; loss only on real (and, with a prompt, completion) tokens."""
        B, S = self.B, self.S
        ids = np.zeros((B, S), np.int64)
        am = np.zeros((B, S), np.int64)
        lm = np.zeros((B, S), np.float32)
        if self.m.task == "causal-lm":
            for r, ex in enumerate(examples[:B]):
                toks = self.tok.encode(ex["text"], add_special_tokens=False).ids[:S]
                n = len(toks)
                ids[r, :n] = toks
                am[r, :n] = 1
                start = len(self.tok.encode(ex["prompt"], add_special_tokens=False).ids) if ex.get("prompt") else 0
                lm[r, min(start, n) : n] = 1
            return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}
        labels = np.zeros((B,), np.int64)
        rows = [examples[i % len(examples)] for i in range(B)]
        for r, ex in enumerate(rows):
            toks = self.tok.encode(ex["text"]).ids[:S]
            ids[r, : len(toks)] = toks
            am[r, : len(toks)] = 1
            labels[r] = int(ex.get("label") or 0)
        return {"input_ids": ids, "attention_mask": am, "labels": labels}

    def loss_and_grads(self, stacked: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients of one batch through train.onnx: one forward+backward per microbatch of rows
        (bundles exported with ``--train-microbatch``), combined as the whole batch's."""
        names = [o.name[len("grad.") :] for o in self.session.get_outputs()[1:]]
        parts: list[tuple[float, dict[str, np.ndarray], float]] = []
        for r0 in range(0, self.B, self.microbatch):
            rows = {k: v[r0 : r0 + self.microbatch] for k, v in batch.items()}
            weight = microbatch_weight(rows, self.m.task)
            if weight == 0 and parts:  # rows with nothing to learn (padding past the examples): nothing to run
                continue
            outs = self.session.run(None, {**rows, **stacked})
            parts.append((float(outs[0]), dict(zip(names, outs[1:])), weight))
        loss, grads = combine_microbatches(parts)
        if not np.isfinite(loss) or not all(np.all(np.isfinite(g)) for g in grads.values()):
            raise TrainingError("non-finite loss or gradient; step skipped and adapter left unchanged")
        return loss, grads

    def train(
        self,
        start: dict[str, np.ndarray],
        next_examples: Callable[[int], list[dict]],
        *,
        max_steps: int,
        max_seconds: float,
        should_yield: Callable[[], bool] = lambda: False,
        resume: dict | None = None,
        checkpoint: Callable[[dict], None] | None = None,
        checkpoint_every: int = 4,
        train_a: bool = True,
        prox_mu: float = 0.0,
        on_step: Callable[[int, float], None] | None = None,
        on_used: Callable[[list[int]], None] | None = None,
    ) -> TrainResult:
        """Run up to ``max_steps`` AdamW steps within ``max_seconds``, pausing while ``should_yield()``.

        ``prox_mu`` > 0 adds the proximal term mu/2 * ||params - start||^2 to the loss (FedProx): the
        adapter stays near the global it started from, which limits drift between devices and forgetting.
        ``on_used`` gets the ids of each batch's examples once its step is done."""
        t0 = time.time()
        params = stack_adapter(start, self.targets, self.layers)
        center = params
        m = {k: np.zeros_like(v) for k, v in params.items()}
        v = {k: np.zeros_like(p) for k, p in params.items()}
        step, losses, used = 0, [], []
        if resume:  # crash recovery: continue from the last checkpoint of this session
            params, m, v, step = resume["params"], resume["m"], resume["v"], resume["step"]
            losses, used = list(resume.get("losses", [])), list(resume.get("used", []))
        stopped = "steps"
        while step < max_steps:
            if time.time() - t0 > max_seconds:
                stopped = "budget"
                break
            waited = 0.0
            while should_yield() and waited < max_seconds:  # serving first: wait for requests to finish
                time.sleep(0.01)
                waited += 0.01
            examples = next_examples(self.B)
            if not examples:
                stopped = "data"
                break
            loss, grads = self.loss_and_grads(params, self.make_batch(examples))
            if prox_mu:
                grads = {k: g + prox_mu * (params[k] - center[k]) for k, g in grads.items()}
            if not train_a:  # frozen-A rounds: only B moves, so the server's average is exact
                grads = {k: (np.zeros_like(g) if is_lora_a(k) else g) for k, g in grads.items()}
            grads, _ = clip_by_global_norm(grads, self.optim.max_grad_norm)
            step += 1
            new_params, m, v, _ = adamw_step(params, grads, m, v, step, self.optim)
            params = new_params if train_a else {k: (params[k] if is_lora_a(k) else p) for k, p in new_params.items()}
            losses.append(loss)
            if on_step:
                on_step(step, loss)
            ids = [e["id"] for e in examples if "id" in e]
            used.extend(ids)
            if on_used:
                on_used(ids)
            if checkpoint and step % checkpoint_every == 0:
                checkpoint({"params": params, "m": m, "v": v, "step": step, "losses": losses, "used": used})
        return TrainResult(unstack_adapter(params, self.targets), step, losses, sorted(set(used)), time.time() - t0, stopped)


def microbatch_weight(rows: dict[str, np.ndarray], task: str) -> float:
    """What a microbatch's mean loss is a mean over: its scored next-token positions (causal LM: the
    loss mask from the second position on, as the graph counts them) or its rows (classification)."""
    if task == "causal-lm":
        return float(rows["loss_mask"][:, 1:].sum())
    return float(len(rows["labels"]))


def combine_microbatches(parts: list[tuple[float, dict[str, np.ndarray], float]]) -> tuple[float, dict[str, np.ndarray]]:
    """The whole batch's mean loss and gradients from each microbatch's (mean loss, gradients, weight):
    means weighted by what each one averaged over. All weights 0 (nothing scored): the first part,
    whose loss and gradients are then 0 as the graph computes them."""
    total = sum(w for _, _, w in parts)
    if total == 0:
        return parts[0][0], parts[0][1]
    loss = sum(w * part_loss for part_loss, _, w in parts) / total
    grads = {k: sum(w * g[k] for _, g, w in parts if w) / total for k in parts[0][1]}
    return float(loss), {k: np.asarray(v, np.float32) for k, v in grads.items()}


def save_checkpoint(path: Path, state: dict, extra: dict) -> None:
    """Atomically write optimizer state + params (safetensors, no pickle)."""
    import json

    tensors = {}
    for group in ("params", "m", "v"):
        for k, a in state[group].items():
            tensors[f"{group}/{k}"] = a
    meta = {
        "step": str(state["step"]),
        "losses": json.dumps(state["losses"]),
        "used": json.dumps(state["used"]),
        "extra": json.dumps(extra),
    }
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_bytes(encode_tensors(tensors, meta))
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[dict, dict] | None:
    """Read a checkpoint; None if missing or unreadable (a torn write is discarded, never trusted)."""
    import json

    try:
        tensors, meta = decode_tensors(Path(path).read_bytes())
        state = {
            "params": {},
            "m": {},
            "v": {},
            "step": int(meta["step"]),
            "losses": json.loads(meta["losses"]),
            "used": json.loads(meta["used"]),
        }
        for k, a in tensors.items():
            group, name = k.split("/", 1)
            state[group][name] = a
        return state, json.loads(meta["extra"])
    except Exception:
        return None
