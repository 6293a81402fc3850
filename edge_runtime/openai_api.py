"""The OpenAI request contract, as plain functions over request bodies: which parameters each endpoint
takes and what each does here (``PARAMETERS``), their validation, and the shapes of log-probabilities and
tool calls. Every parameter the OpenAI API documents is either honoured with its documented meaning or
refused with a 400 naming it; nothing is silently ignored."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any


class ApiError(Exception):
    """An error answered to the client in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# How each parameter is handled: "yes" honoured; "inert" accepted because it cannot change the output
# (identifiers for the caller's own bookkeeping); "default-only" accepted only at its default value
# (null, or the value given), refused otherwise.
_COMMON = {
    "model": "yes",
    "user": "inert",
    "stream": "yes",
    "stream_options": "yes",
    "seed": "yes",
    "stop": "yes",
    "temperature": "yes",
    "top_p": "yes",
    "top_k": "yes",
    "max_tokens": "yes",
    "n": "yes",
    "presence_penalty": "yes",
    "frequency_penalty": "yes",
    "logit_bias": "yes",
}
PARAMETERS: dict[str, dict[str, Any]] = {
    "completions": {
        **_COMMON,
        "prompt": "yes",
        "echo": "yes",
        "logprobs": "yes",
        "best_of": ("default-only", 1),
        "suffix": ("default-only", None),
    },
    "chat": {
        **_COMMON,
        "messages": "yes",
        "max_completion_tokens": "yes",
        "logprobs": "yes",
        "top_logprobs": "yes",
        "response_format": "yes",
        "tools": "yes",
        "tool_choice": "yes",
        "parallel_tool_calls": "yes",
        "metadata": "inert",
        "safety_identifier": "inert",
        "prompt_cache_key": "inert",
        "service_tier": "inert",
        "store": ("default-only", False),
        "modalities": ("default-only", ["text"]),
        "audio": ("default-only", None),
        "prediction": ("default-only", None),
        "reasoning_effort": ("default-only", None),
        "verbosity": ("default-only", None),
        "web_search_options": ("default-only", None),
        "functions": ("default-only", None),
        "function_call": ("default-only", None),
    },
    "embeddings": {"model": "yes", "input": "yes", "user": "inert", "encoding_format": "yes", "dimensions": "yes"},
}


def check_parameters(body: dict, endpoint: str) -> None:
    """Refuse (400, naming it) a parameter this endpoint does not know or cannot honour."""
    table = PARAMETERS[endpoint]
    for key, value in body.items():
        how = table.get(key)
        if how is None:
            raise ApiError(
                400,
                f"unrecognized request argument supplied: {key!r} (this endpoint takes: {', '.join(sorted(table))})",
                key,
                "unknown_parameter",
            )
        if isinstance(how, tuple) and value is not None and value != how[1]:
            raise ApiError(
                400,
                f"'{key}' is not supported by this local agent (only {json.dumps(how[1])} or null)",
                key,
                "unsupported_parameter",
            )


def number(body: dict, key: str, default, lo, hi, kind=float):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"'{key}' must be a {'integer' if kind is int else 'number'}", key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}", key)
    return kind(v)


def stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return stop
    raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")


MAX_N = 8


def sampling_params(body: dict, default_max: int = 64) -> dict:
    """Validated sampling parameters from an OpenAI-style request body."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return {
        "max_new_tokens": number(body, key, default_max, 1, 4096, int),
        "temperature": number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": number(body, "top_p", 1.0, 0.0, 1.0),
        "top_k": number(body, "top_k", 0, 0, 100000, int),
        "seed": None if body.get("seed") is None else number(body, "seed", 0, -(2**63), 2**63 - 1, int),
    }


def choices_per_prompt(body: dict) -> int:
    """``n`` (null = 1): completions per prompt, each with its own sampling stream."""
    n = number(body, "n", 1, 1, MAX_N, int)
    if n > 1 and body.get("stream"):
        raise ApiError(400, "n > 1 cannot be streamed by this agent; drop 'stream' or use n = 1", "n")
    return n


def steering_options(body: dict, vocab: int) -> dict:
    """presence/frequency penalties and logit_bias ({token id: -100..100}) as ``Steering`` fields."""
    bias_in = body.get("logit_bias")
    bias: dict[int, float] = {}
    if bias_in is not None:
        if not isinstance(bias_in, dict) or len(bias_in) > 300:
            raise ApiError(400, "'logit_bias' must be an object of at most 300 {token id: bias} entries", "logit_bias")
        for k, v in bias_in.items():
            if not str(k).isdigit() or int(k) >= vocab:
                raise ApiError(400, f"'logit_bias' key {k!r} is not a token id of this model (0..{vocab - 1})", "logit_bias")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise ApiError(400, f"'logit_bias' values must be numbers in [-100, 100] (got {v!r})", "logit_bias")
            bias[int(k)] = float(v)
    return {
        "presence": number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency": number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "bias": bias or None,
    }


def chat_logprobs(body: dict) -> int | None:
    """Top alternatives per token to report (chat: ``logprobs`` true + ``top_logprobs`` 0..20), None: off."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError(400, "'logprobs' must be true or false", "logprobs")
    if top is not None and not want:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return number(body, "top_logprobs", 0, 0, 20, int) if want else None


def completion_logprobs(body: dict) -> int | None:
    """Completions: ``logprobs`` is the number (0..5) of alternatives per token; None: off."""
    if body.get("logprobs") is None:
        return None
    return number(body, "logprobs", 0, 0, 5, int)


def include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
        raise ApiError(400, "'stream_options' takes only 'include_usage'", "stream_options")
    if not body.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    return bool(opts.get("include_usage"))


def prompts(body: dict) -> list[str | list[int]]:
    """Completions ``prompt``: a string, a list of strings, a list of token ids, or a list of those lists."""
    p = body.get("prompt")
    bad = ApiError(
        400,
        "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists (1-16 prompts)",
        "prompt",
    )
    if isinstance(p, str):
        return [p]
    if not isinstance(p, list) or not p:
        raise bad
    if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [list(p)]
    if len(p) > 16:
        raise bad
    out: list[str | list[int]] = []
    for item in p:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            out.append(list(item))
        else:
            raise bad
    return out


def token_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs_content(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> list[dict]:
    """Chat ``logprobs.content`` from (token text, logprob, [(alternative text, logprob)...])."""
    return [{**token_entry(t, lp), "top_logprobs": [token_entry(a, alp) for a, alp in alts]} for t, lp, alts in entries]


def completion_logprobs_block(entries: list[tuple[str, float, list[tuple[str, float]]]], start_offset: int = 0) -> dict:
    """Completions ``logprobs``: parallel lists of tokens, their logprobs, top alternatives and text offsets."""
    offsets, pos = [], start_offset
    for t, _, _ in entries:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": [t for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [{a: alp for a, alp in alts} for _, _, alts in entries],
        "text_offset": offsets,
    }


def chat_messages(msgs: Any) -> list[dict]:
    """Messages as the chat template expects them: text parts joined, ``developer`` as ``system``; an
    assistant message may carry ``tool_calls`` with null content, a ``tool`` message its ``tool_call_id``."""
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, f"messages[{i}] needs a role of system/developer/user/assistant/tool", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if any(not isinstance(p, dict) or p.get("type") not in ("text", "refusal") for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported by this model", "messages")
            content = "".join(p.get("text", p.get("refusal", "")) for p in content)
        calls = m.get("tool_calls")
        if content is None and m["role"] == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        if calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise ApiError(400, f"messages[{i}].tool_calls must be a list of function calls", "messages")
            out["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"].get("arguments"))}} for c in calls
            ]
        if m["role"] == "tool":
            out["tool_call_id"] = m.get("tool_call_id")
        clean.append(out)
    return clean


def _arguments(raw: Any) -> Any:
    """Templates render arguments as objects; the API carries them as JSON strings."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def tools_for_template(body: dict, template: str) -> list[dict] | None:
    """``tools`` to render with the chat template (None: no tools). Refused when the model's template
    has no place for tools (the model was not trained to call them) or ``tool_choice`` asks what the
    agent cannot guarantee."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise ApiError(400, '\'tool_choice\' may be "auto" or "none" here (forcing a call is not supported)', "tool_choice")
    if not tools or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict) and t["function"].get("name")
        for t in tools
    ):
        raise ApiError(400, '\'tools\' must be a list of {"type": "function", "function": {"name": ...}}', "tools")
    if "tools" not in template:
        raise ApiError(400, "this model's chat template has no tool support: it was not trained to call tools", "tools")
    return tools


_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """Tool calls in a model's output (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks,
    the format tool-trained chat templates ask for, or a whole-output JSON call) -> (remaining content or
    None, OpenAI ``tool_calls``). Calls to tools that were not offered are left as text."""
    names = {t["function"]["name"] for t in tools}
    blocks = _TOOL_CALL.findall(text)
    if not blocks and text.strip().startswith("{"):
        blocks = [text.strip()]
    calls = []
    for raw in blocks:
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("name") not in names:
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
            }
        )
    if not calls:
        return text, []
    rest = _TOOL_CALL.sub("", text).strip() if _TOOL_CALL.search(text) else ""
    return (rest or None), calls
