"""Next-token selection and token log-probabilities (pure numpy): greedy, temperature, top-k, top-p,
repetition penalty; ``log_softmax`` and ``nll``, the one place losses and scores are computed from logits."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64; -inf entries (masked tokens) stay -inf."""
    z = np.asarray(logits, np.float64)
    m = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return z - (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target id under its row of logits (shape: ``targets.shape``), in
    float64: log-sum-exp minus the target's logit. One working copy in the logits' own precision
    (sums in float64) instead of log_softmax's float64 rows: for a vocabulary of 49152 a 64-position
    chunk needed ~100 MB of temporaries that way."""
    z = np.asarray(logits)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    m = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0).astype(z.dtype)
    work = np.subtract(z, m)
    np.exp(work, out=work)
    lse = m[..., 0].astype(np.float64) + np.log(np.sum(work, axis=-1, dtype=np.float64))
    picked = np.take_along_axis(z, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return lse - picked.astype(np.float64)


def sample_next(
    logits: np.ndarray, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng: np.random.Generator | None = None
) -> int:
    """Pick a token id from one row of logits; temperature 0 means greedy."""
    if temperature <= 0:  # argmax needs no float64 copy of the vocabulary-sized row (once per token)
        return int(np.argmax(logits))
    logits = np.asarray(logits, dtype=np.float64)
    z = logits / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - np.max(z))
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    rng = rng or np.random.default_rng()
    return int(rng.choice(p.size, p=p))


def find_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop sequence starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters may be the start of a stop sequence (not safe to stream yet)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n
