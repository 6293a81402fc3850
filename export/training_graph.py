"""The training graph: one AdamW-free training step, loss and gradients of the LoRA tensors only,
traced with make_fx over ``torch.func.grad_and_value`` and exported at a fixed batch x sequence. The
losses are written by hand (log-softmax/gather/mean; the exported backward of ``F.cross_entropy``
came out scaled by the batch size in prototyping); a decoder's can fuse the LM head with its loss.
Devices run it with onnxruntime (edge_runtime/trainer.py), without torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from export.graphs import BertGraph, LlamaGraph, lora_input_names
from export.onnxfile import mb
from export.torch_onnx import export_module, simplify_offline

if TYPE_CHECKING:
    from export.build import BuildOptions


def _fused_head_nll():
    """Head matmul + NLL with a hand-written backward, evaluated in sequence chunks.

    Forward returns (loss, d loss / d h) so that backward only scales the saved [b, s, hidden] gradient:
    the [b, s, vocab] logits, softmax and their gradients exist one chunk at a time (about 200 MB per
    full copy for SmolLM2 at batch 8 x 128, several copies in a plain autograd graph)."""
    import torch

    class FusedHeadNLL(torch.autograd.Function):
        @staticmethod
        def forward(h, w_t, targets, weights, chunk):
            loss = h.new_zeros(())
            grads = []
            b, hidden = h.shape[0], h.shape[-1]
            for s0 in range(0, h.shape[1], chunk):
                # 2-D matmuls against the constant head: exported as MatMul(x, const) (quantizable, no
                # [b, hidden, vocab] Expand of the weight, which cost 900 MB at batch 8)
                hc = h[:, s0 : s0 + chunk].reshape(-1, hidden)
                tc, wc = targets[:, s0 : s0 + chunk].reshape(-1), weights[:, s0 : s0 + chunk].reshape(-1)
                logits = hc @ w_t
                lse = torch.logsumexp(logits, dim=-1)
                tgt = torch.gather(logits, -1, tc[:, None])[:, 0]
                loss = loss + ((lse - tgt) * wc).sum()
                onehot = torch.zeros_like(logits).scatter(-1, tc[:, None], 1.0)
                p = torch.exp(logits - lse[:, None]) - onehot
                grads.append(((p * wc[:, None]) @ w_t.transpose(0, 1)).reshape(b, -1, hidden))
            return loss, torch.cat(grads, dim=1)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(output[1])

        @staticmethod
        def backward(ctx, grad_loss, _grad_of_grad):
            (grad_h,) = ctx.saved_tensors
            return grad_loss * grad_h, None, None, None, None

    return FusedHeadNLL


HEAD_CHUNK = 16  # positions of each head/NLL chunk (memory-lean graphs: SmolLM2 logits of 2 rows, ~6 MB a copy)
HEAD_CHUNK_ROWS = 128  # graphs that keep activations: chunks of about this many rows (batch x positions), ~25 MB a copy


def causal_lm_loss(graph: LlamaGraph, targets, *, fused: bool = False, recompute: bool = True, chunk: int | None = None):
    """Mean next-token NLL over positions where loss_mask is 1 (hand-written: F.cross_entropy's exported
    backward came out scaled by the batch size). ``fused`` exports the memory-lean form (chunked head/NLL,
    and with ``recompute`` per-layer activation recomputation); the plain
    form is the autograd reference the exported gradients are checked against."""
    import torch

    fused_fn = _fused_head_nll() if fused else None

    def loss_fn(lora, input_ids, attention_mask, loss_mask):
        loras = {t: (lora[2 * j], lora[2 * j + 1]) for j, t in enumerate(targets)}
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        h, _ = graph.hidden_states(input_ids, attention_mask, pos, None, loras, recompute=fused and recompute)
        w = loss_mask[:, 1:]
        if fused_fn is not None:
            # where activations are kept (memory to spare), chunks of about HEAD_CHUNK_ROWS rows whatever the graph's
            # batch: a graph of 2 rows in chunks of 16 positions ran the head in calls of 32 rows, each re-reading the
            # whole 8-bit head (the head 276 -> 194 ms of a 2-row call; peak +50-70 MB)
            positions = chunk or (HEAD_CHUNK if recompute else max(1, HEAD_CHUNK_ROWS // input_ids.shape[0]))
            loss, _ = fused_fn.apply(h[:, :-1], graph.head_wT, input_ids[:, 1:], w / w.sum().clamp(min=1.0), positions)
            return loss
        logp = torch.log_softmax(h[:, :-1] @ graph.head_wT, dim=-1)
        nll = -torch.gather(logp, -1, input_ids[:, 1:, None])[..., 0]
        return (nll * w).sum() / w.sum().clamp(min=1.0)

    return loss_fn


def classification_loss(graph: BertGraph, targets):
    """Mean cross-entropy of class logits (hand-written log-softmax/gather)."""
    import torch

    def loss_fn(lora, input_ids, attention_mask, labels):
        loras = {t: (lora[2 * j], lora[2 * j + 1]) for j, t in enumerate(targets)}
        logits = graph.head(graph.encode(input_ids, attention_mask, loras), attention_mask)
        logp = torch.log_softmax(logits, dim=-1)
        return -torch.gather(logp, -1, labels[:, None]).mean()

    return loss_fn


def export_train(graph, tmp: Path, opts: BuildOptions, loras, log, *, external: bool = False) -> None:
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    loss_fn = (
        causal_lm_loss(graph, opts.lora_targets, fused=True, recompute=opts.train_recompute)
        if opts.task == "causal-lm"
        else classification_loss(graph, opts.lora_targets)
    )

    def step(input_ids, attention_mask, third, *lora):
        grads, loss = torch.func.grad_and_value(loss_fn)(tuple(lora), input_ids, attention_mask, third)
        return (loss, *grads)

    B, S = opts.train_graph_batch, opts.train_seq
    ids = torch.randint(0, 100, (B, S))
    am = torch.ones(B, S, dtype=torch.long)
    third = am.float() if opts.task == "causal-lm" else torch.zeros(B, dtype=torch.long)
    lora_rand = [torch.randn_like(t) * 0.01 for t in loras]
    gm = make_fx(step)(ids, am, third, *lora_rand)

    class Step(torch.nn.Module):
        def __init__(self, gm):
            super().__init__()
            self.gm = gm

        def forward(self, input_ids, attention_mask, third, *lora):
            return self.gm(input_ids, attention_mask, third, *lora)

    names = lora_input_names(opts.lora_targets)
    third_name = "loss_mask" if opts.task == "causal-lm" else "labels"
    export_module(
        Step(gm),
        (ids, am, third, *lora_rand),
        tmp / "train.fp32.onnx",
        ["input_ids", "attention_mask", third_name] + names,
        ["loss"] + [f"grad.{n}" for n in names],
        optimize=False,
        external=external,
    )
    simplify_offline(tmp / "train.fp32.onnx")
    log(f"training graph: {mb(tmp / 'train.fp32.onnx')}")
