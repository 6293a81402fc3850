"""Optional torch training backend (extra `[torch-train]`): PEFT LoRA over the source model, optionally
with a bitsandbytes 4-bit NF4 base (QLoRA) on CUDA devices such as a Jetson.

Same interface and adapter format as the ONNX trainer: ``loss_and_grads(stacked_params, batch)``
returns the masked mean next-token NLL and one gradient per stacked LoRA tensor, so the agent,
the optimizer and the federated protocol do not care which backend ran. Imported lazily: the
device path never needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.protocol.adapter import stacked_names
from edge_runtime.trainer import OnnxTrainer


class TorchTrainer(OnnxTrainer):
    """LoRA gradients from torch + PEFT (fp32 base on CPU, or a 4-bit base with bitsandbytes on CUDA)."""

    def __init__(
        self,
        bundle: Path,
        manifest,
        tokenizer,
        *,
        model_dir: str,
        load_4bit: bool = False,
        device: str | None = None,
        threads: int | None = None,
        optim=None,
    ):
        try:
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise ConfigError(
                f"the torch trainer needs the [torch-train] extra (pip install 'edgefm[torch-train]'): {exc}"
            ) from None
        if manifest.task != "causal-lm":
            raise ConfigError("the torch trainer supports causal-lm bundles")
        # The ONNX trainer's batching and loop are reused; only the step differs.
        self.bundle, self.m, self.tok, self.threads = Path(bundle), manifest, tokenizer, threads
        from edge_runtime.optim import AdamWConfig

        self.optim = optim or AdamWConfig()
        self.B, self.S = int(manifest.training.batch), int(manifest.training.seq)
        self.targets = list(manifest.adapter.targets)
        self.layers = int(manifest.model["layers"])
        self._session = None
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if threads:
            torch.set_num_threads(threads)
        kwargs: dict[str, Any] = {"attn_implementation": "eager"}
        if load_4bit:
            if self.device != "cuda":
                raise ConfigError("a 4-bit (bitsandbytes NF4) base needs a CUDA device; use load_4bit=False on CPU")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        else:
            kwargs["dtype"] = torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        if not load_4bit:
            model = model.to(self.device)
        for p in model.parameters():
            p.requires_grad_(False)
        rank, alpha = int(manifest.adapter.rank), float(manifest.adapter.alpha)
        lora: Any = LoraConfig  # PEFT types lora_alpha as int; a float alpha (e.g. 16.0 or 8.5) is what it applies
        self.model: Any = get_peft_model(
            model, lora(r=rank, lora_alpha=alpha, target_modules=self.targets, lora_dropout=0.0, bias="none")
        ).eval()
        self._params = {}
        for i in range(self.layers):
            lyr = self.model.base_model.model.model.layers[i]
            for t in self.targets:
                mod = getattr(lyr.self_attn, t) if t in ("q_proj", "k_proj", "v_proj", "o_proj") else getattr(lyr.mlp, t)
                self._params[(i, t)] = (mod.lora_A["default"].weight, mod.lora_B["default"].weight)

    def loss_and_grads(self, stacked, batch):
        """Masked mean next-token NLL and d loss / d LoRA, in the stacked layout."""
        torch = self.torch
        with torch.no_grad():
            for (i, t), (a, b) in self._params.items():
                a.copy_(torch.from_numpy(stacked[stacked_names(t)[0]][i]))
                b.copy_(torch.from_numpy(stacked[stacked_names(t)[1]][i]))
        for a, b in self._params.values():
            a.grad = b.grad = None
        ids = torch.from_numpy(batch["input_ids"]).to(self.device)
        am = torch.from_numpy(batch["attention_mask"]).to(self.device)
        lm = torch.from_numpy(batch["loss_mask"]).to(self.device)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -torch.gather(logp, -1, ids[:, 1:, None])[..., 0]
        w = lm[:, 1:]
        loss = (nll * w).sum() / w.sum().clamp(min=1.0)
        loss.backward()
        grads = {}
        for t in self.targets:
            grads[stacked_names(t)[0]] = np.stack(
                [self._params[(i, t)][0].grad.detach().cpu().float().numpy() for i in range(self.layers)]
            )
            grads[stacked_names(t)[1]] = np.stack(
                [self._params[(i, t)][1].grad.detach().cpu().float().numpy() for i in range(self.layers)]
            )
        return float(loss), grads
