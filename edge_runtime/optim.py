"""AdamW with bias correction, global-norm clipping and LR schedules: plain numpy over LoRA tensors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class AdamWConfig:
    """Optimizer settings (defaults suit LoRA fine-tuning)."""

    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    total_steps: int = 1000

    def __post_init__(self):
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise ValueError("AdamW needs lr > 0, betas in [0, 1), eps > 0")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError("schedule must be 'constant' or 'cosine'")


def learning_rate(cfg: AdamWConfig, step: int) -> float:
    """LR at (0-based) ``step``: linear warm-up, then constant or cosine decay to 10%."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return cfg.lr


def clip_by_global_norm(grads: dict[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns (grads, norm before)."""
    norm = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())))
    if max_norm > 0 and norm > max_norm:
        f = max_norm / (norm + 1e-12)
        grads = {k: g * f for k, g in grads.items()}
    return grads, norm


def adamw_step(
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    m: dict[str, np.ndarray],
    v: dict[str, np.ndarray],
    step: int,
    cfg: AdamWConfig,
):
    """One AdamW update (decoupled weight decay). ``step`` is 1-based. Returns new (params, m, v, lr)."""
    lr = learning_rate(cfg, step - 1)
    b1c = 1 - cfg.beta1**step
    b2c = 1 - cfg.beta2**step
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k].astype(np.float32)
        mk = cfg.beta1 * m[k] + (1 - cfg.beta1) * g
        vk = cfg.beta2 * v[k] + (1 - cfg.beta2) * g * g
        upd = (mk / b1c) / (np.sqrt(vk / b2c) + cfg.eps)
        new_p[k] = (p * (1 - lr * cfg.weight_decay) - lr * upd).astype(np.float32)
        new_m[k], new_v[k] = mk.astype(np.float32), vk.astype(np.float32)
    return new_p, new_m, new_v, lr
