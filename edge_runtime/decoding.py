"""What shapes each next-token choice beyond plain sampling, as OpenAI documents it: ``logit_bias``,
``presence_penalty`` / ``frequency_penalty``, and structured output (``response_format``) through
llguidance's token masks over the bundle's own tokenizer. Plus the log-probabilities a response reports.

Pure numpy except the grammar matcher, which llguidance (a maintained Rust library) runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.sampling import log_softmax


def apply_bias_and_penalties(
    logits: np.ndarray,
    counts: dict[int, int],
    *,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: dict[int, float] | None = None,
) -> np.ndarray:
    """OpenAI's adjustment: ``logit[j] += bias[j] - counts[j] * frequency - (counts[j] > 0) * presence``,
    ``counts`` being how often each token was generated so far in this completion (the prompt is not counted)."""
    if not (counts and (presence or frequency)) and not bias:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    if presence or frequency:
        for tok, c in counts.items():
            out[tok] -= c * frequency + presence
    for tok, b in (bias or {}).items():
        out[tok] += b
    return out


def top_logprobs(row: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of a logits row with their log-probabilities, most likely first."""
    lp = log_softmax(row)
    if k <= 0:
        return []
    idx = np.argpartition(-lp, min(k, lp.size - 1))[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx if np.isfinite(lp[i])]


class Constraint:
    """A grammar the output must follow (llguidance): masks the tokens that would break it, step by step."""

    def __init__(self, ll_tokenizer: Any, grammar: str):
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = LLMatcher(ll_tokenizer, grammar)
        if self.matcher.is_error():
            raise ConfigError(f"the schema cannot be compiled: {self.matcher.get_error()}")
        self.vocab = ll_tokenizer.vocab_size
        self._mask = allocate_token_bitmask(1, self.vocab)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._mask)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)
        out = np.full(logits.shape, -np.inf, np.float32)
        n = min(self.vocab, logits.size)
        out[:n] = np.where(bits[:n], logits[:n], -np.inf)
        return out

    def accept(self, tok: int) -> None:
        if not self.matcher.consume_token(tok):
            raise ConfigError(f"the grammar refused token {tok}: {self.matcher.get_error()}")


# JSON as json.dumps writes it (", " and ": ", no other whitespace): a small model can no longer spend
# its whole budget on newlines between tokens; a schema's own "x-guidance" options override this.
JSON_LAYOUT: Any = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}  # llguidance's JsonCompileOptions


def response_format_grammar(fmt: Any) -> str | None:
    """llguidance grammar for an OpenAI ``response_format`` (None: free text). Raises ConfigError on a bad one."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ConfigError('\'response_format\' must be {"type": "text" | "json_object" | "json_schema", ...}')
    from llguidance import LLMatcher

    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ConfigError("'response_format.json_schema' must be an object with a 'schema' object")
    return LLMatcher.grammar_from_json_schema(spec.get("schema", {}), defaults=JSON_LAYOUT)


@dataclasses.dataclass
class Steering:
    """Everything that changes next-token logits for one completion, and the state it keeps."""

    presence: float = 0.0
    frequency: float = 0.0
    bias: dict[int, float] | None = None
    constraint: Constraint | None = None
    counts: dict[int, int] = dataclasses.field(default_factory=dict)

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        out = apply_bias_and_penalties(logits, self.counts, presence=self.presence, frequency=self.frequency, bias=self.bias)
        return self.constraint.apply(out) if self.constraint is not None else out

    def accept(self, tok: int) -> None:
        self.counts[tok] = self.counts.get(tok, 0) + 1
        if self.constraint is not None:
            self.constraint.accept(tok)
