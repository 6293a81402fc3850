"""Export-friendly forwards of supported architectures, with LoRA slots as inputs and an explicit KV cache.

We re-express the Hugging Face model's forward with its own weights rather than tracing the HF
module: the graph then has exactly the inputs we want (stacked LoRA tensors, per-layer past
key/values), a constant pre-transposed LM head that quantizers can see, and no cache objects.
``export.verify`` checks these forwards against the HF model (max abs logit diff).

LoRA inputs are stacked per target module: ``lora_A.<module>`` ``[layers, rank, in]`` and
``lora_B.<module>`` ``[layers, out, rank]``; the adapter contract's per-layer names map onto them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.protocol.adapter import stacked_names

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
SUPPORTED = {
    "llama": "Llama, SmolLM2, Mistral-style (LlamaForCausalLM)",
    "qwen2": "Qwen2 (Qwen2ForCausalLM)",
    "qwen3": "Qwen3 (Qwen3ForCausalLM)",
    "bert": "BERT, MiniLM (BertModel / BertForSequenceClassification)",
}


@dataclasses.dataclass
class LoraSpec:
    """Which modules get LoRA slots, at what rank and alpha."""

    targets: tuple[str, ...]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_input_names(targets) -> list[str]:
    """Graph input names of the stacked LoRA tensors, in graph order."""
    return [n for t in targets for n in stacked_names(t)]


def _lora(x, w, b, A, B, scale):
    y = F.linear(x, w, b)
    return y + (x @ A.transpose(-1, -2)) @ B.transpose(-1, -2) * scale


def _recomputed_layer(graph, i, x, cos, sin, bias, loras):
    """Layer ``i`` with activation checkpointing, written so that it survives tracing and ORT.

    A custom autograd function saves only the layer input; its backward re-runs the layer under
    ``torch.func.vjp``. The recomputation reads its input through ``x + 0 * g[0]`` (g: the incoming
    gradient), which (1) orders it after the gradient arrives, so the runtime cannot schedule it early
    and keep everything alive anyway, and (2) keeps common-subexpression elimination from merging it
    with the forward copy."""
    targets = list(loras)
    flat = [t for name in targets for t in (loras[name][0][i], loras[name][1][i])]

    def run(x_, *ab):
        lo = {name: (ab[2 * j], ab[2 * j + 1]) for j, name in enumerate(targets)}
        return graph.layer(i, x_, cos, sin, bias, None, lo)[0]

    class Layer(torch.autograd.Function):
        @staticmethod
        def forward(x_, *ab):
            return run(x_, *ab)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, g):
            x_, *ab = ctx.saved_tensors
            x_ = x_ + 0.0 * g.reshape(-1)[0]
            _, vjp = torch.func.vjp(run, x_, *ab)
            return vjp(g)

    return Layer.apply(x, *flat)


class LlamaGraph(nn.Module):
    """Llama-family decoder: (ids, mask, positions, past kv..., lora...) -> (logits, present kv...)."""

    def __init__(self, hf_model, lora: LoraSpec):
        super().__init__()
        cfg = hf_model.config
        self.cfg = cfg
        self.lora = lora
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        base = hf_model.model
        self.embed = base.embed_tokens.weight
        self.layers = base.layers
        self.norm_w = base.norm.weight
        # Constant, pre-transposed head weight: a MatMul with a constant B is what ORT quantizers act on.
        self.register_buffer("head_wT", hf_model.lm_head.weight.detach().t().contiguous().clone(), persistent=False)
        theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-able module."""
        l0 = self.layers[0]
        mods = {
            "q_proj": l0.self_attn.q_proj,
            "k_proj": l0.self_attn.k_proj,
            "v_proj": l0.self_attn.v_proj,
            "o_proj": l0.self_attn.o_proj,
            "gate_proj": l0.mlp.gate_proj,
            "up_proj": l0.mlp.up_proj,
            "down_proj": l0.mlp.down_proj,
        }
        return {k: (m.in_features, m.out_features) for k, m in mods.items()}

    def _rms(self, x, w):
        # Written as x / sqrt(mean(x^2) + eps) * w: the form onnxruntime fuses into SimplifiedLayerNormalization.
        var = x.pow(2).mean(-1, keepdim=True)
        return x / torch.sqrt(var + self.eps) * w

    def _rope(self, x, cos, sin):
        # chunk, not slicing: the backward of a split is one Concat, that of two slices two zero-filled
        # ScatterNDs along the last axis (each between transposes: ~6% of a training step)
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
        return x * cos + rot * sin

    def hidden_states(self, input_ids, attention_mask, position_ids, past, loras, recompute: bool = False):
        """Run the decoder; returns final hidden states and the new (key, value) per layer.

        ``recompute`` (training graphs): each layer keeps only its input for the backward pass and
        recomputes its activations there (activation checkpointing; no present key/values)."""
        bsz, seq = input_ids.shape
        x = F.embedding(input_ids, self.embed)
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq  # [b, s, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [b, 1, s, hd]
        total = attention_mask.shape[1]
        past_len = total - seq
        # causal + padding mask as an additive bias [b, 1, s, total]
        q_pos = torch.arange(seq, device=x.device)[:, None] + past_len
        k_pos = torch.arange(total, device=x.device)[None, :]
        allowed = (k_pos <= q_pos)[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        presents = []
        # each stacked [layers, ...] LoRA tensor split once: the backward stacks the layers' gradients
        # (one Concat) instead of scattering each into a zero-filled copy of the whole stack
        # (split, not unbind: onnxruntime runs unbind's SplitToSequence / SequenceAt several times slower)
        loras = {t: tuple([p.squeeze(0) for p in T.split(1, 0)] for T in AB) for t, AB in loras.items()}
        for i in range(self.n_layers):
            if recompute:
                x = _recomputed_layer(self, i, x, cos, sin, bias, loras)
                continue
            x, k, v = self.layer(
                i,
                x,
                cos,
                sin,
                bias,
                None if past is None else (past[2 * i], past[2 * i + 1]),
                {t: (A[i], B[i]) for t, (A, B) in loras.items()},
            )
            presents += [k, v]
        return self._rms(x, self.norm_w), presents

    def layer(self, i, x, cos, sin, bias, past_kv, loras):
        """Decoder layer ``i``: returns the new hidden states and this step's full key/value.
        ``loras`` maps a target to this layer's (A [r, in], B [out, r])."""
        layer = self.layers[i]
        attn = layer.self_attn
        bsz, seq = x.shape[0], x.shape[1]
        rep = self.n_heads // self.n_kv

        def proj(name, module, inp):
            if name in loras:
                return _lora(inp, module.weight, module.bias, loras[name][0], loras[name][1], self.lora.scale)
            return F.linear(inp, module.weight, module.bias)

        h = self._rms(x, layer.input_layernorm.weight)
        q = proj("q_proj", attn.q_proj, h).view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = proj("k_proj", attn.k_proj, h).view(bsz, seq, self.n_kv, self.head_dim).transpose(1, 2)
        v = proj("v_proj", attn.v_proj, h).view(bsz, seq, self.n_kv, self.head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3
            q = self._rms(q, attn.q_norm.weight)
            k = self._rms(k, attn.k_norm.weight)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        kr, vr = (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) if rep > 1 else (k, v)
        scores = (q @ kr.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        a = torch.softmax(scores, dim=-1) @ vr
        a = a.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim)
        x = x + proj("o_proj", attn.o_proj, a)
        h = self._rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        g = proj("gate_proj", mlp.gate_proj, h)
        u = proj("up_proj", mlp.up_proj, h)
        return x + proj("down_proj", mlp.down_proj, F.silu(g) * u), k, v

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        n_past = 2 * self.n_layers
        past, lora_flat = list(rest[:n_past]), rest[n_past:]
        loras = {t: (lora_flat[2 * j], lora_flat[2 * j + 1]) for j, t in enumerate(self.lora.targets)}
        h, presents = self.hidden_states(input_ids, attention_mask, position_ids, past, loras)
        return (h @ self.head_wT, *presents)


class BertGraph(nn.Module):
    """BERT-family encoder: (ids, mask, lora...) -> logits (classification) or pooled L2-normalised embeddings."""

    def __init__(self, hf_model, lora: LoraSpec, task: str):
        super().__init__()
        self.lora = lora
        self.task = task
        self.bert = hf_model.bert if hasattr(hf_model, "bert") else hf_model
        self.classifier = getattr(hf_model, "classifier", None)
        self.eps = self.bert.config.layer_norm_eps
        self.n_heads = self.bert.config.num_attention_heads

    def _target_modules(self, layer):
        return {
            "query": layer.attention.self.query,
            "key": layer.attention.self.key,
            "value": layer.attention.self.value,
            "attn_out": layer.attention.output.dense,
            "ffn_in": layer.intermediate.dense,
            "ffn_out": layer.output.dense,
        }

    def module_dims(self) -> dict[str, tuple[int, int]]:
        return {k: (m.in_features, m.out_features) for k, m in self._target_modules(self.bert.encoder.layer[0]).items()}

    def encode(self, input_ids, attention_mask, loras):
        """Final hidden states [b, s, h]."""
        emb = self.bert.embeddings
        seq = input_ids.shape[1]
        pos = torch.arange(seq, device=input_ids.device)[None]
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(pos) + emb.token_type_embeddings(torch.zeros_like(input_ids))
        x = F.layer_norm(x, x.shape[-1:], emb.LayerNorm.weight, emb.LayerNorm.bias, self.eps)
        bias = torch.where(attention_mask[:, None, None, :] > 0, 0.0, torch.finfo(torch.float32).min)
        bsz, hdim = x.shape[0], x.shape[-1]
        hd = hdim // self.n_heads
        for i, layer in enumerate(self.bert.encoder.layer):
            mods = self._target_modules(layer)

            def proj(name, inp):
                if name in loras:
                    A, B = loras[name]
                    return _lora(inp, mods[name].weight, mods[name].bias, A[i], B[i], self.lora.scale)
                return F.linear(inp, mods[name].weight, mods[name].bias)

            q = proj("query", x).view(bsz, seq, self.n_heads, hd).transpose(1, 2)
            k = proj("key", x).view(bsz, seq, self.n_heads, hd).transpose(1, 2)
            v = proj("value", x).view(bsz, seq, self.n_heads, hd).transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1) @ v
            a = a.transpose(1, 2).reshape(bsz, seq, hdim)
            ln1 = layer.attention.output.LayerNorm
            x = F.layer_norm(proj("attn_out", a) + x, (hdim,), ln1.weight, ln1.bias, self.eps)
            h = F.gelu(proj("ffn_in", x))
            ln2 = layer.output.LayerNorm
            x = F.layer_norm(proj("ffn_out", h) + x, (hdim,), ln2.weight, ln2.bias, self.eps)
        return x

    def head(self, x, attention_mask):
        """Task head over final hidden states."""
        if self.task == "classification":
            pooled = torch.tanh(F.linear(x[:, 0], self.bert.pooler.dense.weight, self.bert.pooler.dense.bias))
            return F.linear(pooled, self.classifier.weight, self.classifier.bias)
        m = attention_mask.to(x.dtype)[..., None]
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def forward(self, input_ids, attention_mask, *lora_flat):
        loras = {t: (lora_flat[2 * j], lora_flat[2 * j + 1]) for j, t in enumerate(self.lora.targets)}
        return self.head(self.encode(input_ids, attention_mask, loras), attention_mask)


def hf_module(hf_model, family: str, layer: int, target: str):
    """The torch Linear a LoRA target refers to in the Hugging Face model."""
    if family == "llama":
        lyr = hf_model.model.layers[layer]
        return getattr(lyr.self_attn, target) if target in ("q_proj", "k_proj", "v_proj", "o_proj") else getattr(lyr.mlp, target)
    bert = hf_model.bert if hasattr(hf_model, "bert") else hf_model
    lyr = bert.encoder.layer[layer]
    return {
        "query": lyr.attention.self.query,
        "key": lyr.attention.self.key,
        "value": lyr.attention.self.value,
        "attn_out": lyr.attention.output.dense,
        "ffn_in": lyr.intermediate.dense,
        "ffn_out": lyr.output.dense,
    }[target]
