"""Local HTTP API of the agent: OpenAI-compatible completions/chat/embeddings + edgefm endpoints.

Standard library only (ThreadingHTTPServer): one thread per request; onnxruntime sessions are
thread-safe, adapters are immutable snapshots, so concurrent requests need no global lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edge_runtime import openai_api as oai
from edge_runtime.decoding import Constraint, Steering, log_softmax, response_format_grammar, top_logprobs
from edge_runtime.errors import ConfigError, EdgefmError
from edge_runtime.openai_api import ApiError, sampling_params  # noqa: F401  (sampling_params: public here too)
from edge_runtime.sampling import find_stop, holdback

if TYPE_CHECKING:
    from edge_runtime.agent import AgentState
    from edge_runtime.config import AgentConfig
    from edge_runtime.engine import Engine
    from edge_runtime.metrics import Metrics
    from edge_runtime.protocol.manifest import Manifest

log = logging.getLogger("edgefm.api")


class AgentApi(Protocol):
    """All the HTTP layer may use of the agent (edge_runtime/agent.py:Agent implements it; mypy checks
    that this module uses nothing else): inference through ``engine``, the API's limits and tokens in
    ``cfg``, and the agent's own operations, never its store or its parts."""

    cfg: AgentConfig
    engine: Engine
    manifest: Manifest
    metrics: Metrics
    inflight: int

    @property
    def paused_reason(self) -> str | None: ...

    @property
    def state(self) -> AgentState: ...

    @property
    def active_id(self) -> str: ...

    def status(self) -> dict: ...

    def metrics_text(self) -> str: ...

    def add_examples(self, items: list[dict], source: str = "api") -> dict: ...

    def heldout_examples(self) -> list[dict]: ...

    def adapter_history(self) -> list[dict]: ...

    def load_external(
        self,
        *,
        adapter: bytes | None = None,
        peft_config: dict | None = None,
        peft_weights: bytes | None = None,
        name: str | None = None,
    ) -> dict: ...

    def rollback(self, to: str | None = None) -> dict: ...

    def train_now(self) -> None: ...

    def train_and_wait(self, timeout: float | None = None) -> dict: ...

    def not_in_flight(self) -> contextlib.AbstractContextManager: ...

    def request_started(self) -> None: ...

    def request_finished(self) -> None: ...


def _hostname(value: str) -> str:
    """'localhost:8080' -> 'localhost', '[::1]:8080' -> '[::1]', 'http://x:1/' -> 'x'."""
    v = value.split("://", 1)[-1].split("/", 1)[0]
    if v.startswith("["):
        return v[: v.index("]") + 1] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def request_origin_refusal(host: str | None, origin: str | None, method: str, bind_host: str) -> str | None:
    """Why a request must be refused (None: serve it). An agent bound to loopback answers only requests
    addressed to a loopback name (DNS rebinding: a web page's own host name resolved to 127.0.0.1) and
    state-changing requests only from no Origin or a loopback one (CSRF from any page the device's
    browser opens). An agent bound elsewhere was exposed on purpose; the Origin rule still applies."""
    from edge_runtime.transport import is_loopback  # one notion of "this machine" for the broker and the API

    loopback_bound = is_loopback(bind_host)
    if loopback_bound and host is not None and not is_loopback(_hostname(host)):
        return f"Host {host!r} is not this device's loopback address; the agent API answers local clients only"
    if method != "GET" and origin is not None and origin != "null":
        name = _hostname(origin).lower()
        if not is_loopback(name) and (loopback_bound or name != bind_host.lower()):
            return f"requests from web pages at {origin!r} are refused (the agent API is for local apps, not browsers)"
    elif method != "GET" and origin == "null":
        return "requests from sandboxed or file:// pages are refused (the agent API is for local apps, not browsers)"
    return None


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-style error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def token_source(header: str | None, api_token: str | None, api_tokens: dict[str, str]) -> str | None:
    """The source an Authorization header authenticates: "api" for ``api_token``, "api:NAME" for a named
    token, "api" too when no token is configured; None when it carries none of them. Every configured
    token is compared (constant time), so timing does not tell which one was close."""
    import hmac

    if api_token is None and not api_tokens:
        return "api"
    given = header[len("Bearer ") :].strip().encode() if header and header.startswith("Bearer ") else b""
    found = None
    for source, tok in [("api", api_token), *((f"api:{n}", t) for n, t in api_tokens.items())]:
        if tok is not None and hmac.compare_digest(given, tok.encode()) and found is None:
            found = source
    return found


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the agent."""

    server_version = "edgefm"
    protocol_version = "HTTP/1.1"
    agent: AgentApi  # set by make_server (on a subclass per server)
    source: str | None = None  # the source the request's token authenticates (token_source)

    def log_message(self, fmt, *args):  # quiet default logging; metrics carry the numbers
        log.debug("%s " + fmt, self.address_string(), *args)

    # -- helpers --
    def _send(self, status: int, obj: Any, content_type: str = "application/json", headers: dict | None = None) -> None:
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ApiError) -> None:
        headers = (
            {"WWW-Authenticate": 'Bearer realm="edgefm-agent"'}
            if err.status == 401
            else {"Retry-After": "60"}
            if err.status == 503
            else None
        )
        self._send(err.status, error_body(err.status, err.message, err.param, err.code), headers=headers)

    def _body(self, limit: int | None = None) -> dict:
        limit = limit or self.agent.cfg.max_request_bytes
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if length < 0:  # read(-1) would read until the client closes, past every limit
            raise ApiError(400, "bad Content-Length: negative")
        if length > limit:
            raise ApiError(413, f"request body of {length} bytes over the {limit}-byte limit")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        route = ROUTES.get((method, path))
        t0 = time.perf_counter()
        a = self.agent
        a.request_started()
        status = 200
        try:
            refusal = request_origin_refusal(self.headers.get("Host"), self.headers.get("Origin"), method, a.cfg.host)
            if refusal:
                raise ApiError(403, refusal, None, "forbidden_origin")
            self.source = token_source(self.headers.get("Authorization"), a.cfg.api_token, a.cfg.api_tokens)
            if self.source is None and path != "/healthz":
                raise ApiError(
                    401,
                    "this agent requires `Authorization: Bearer <api_token>` (the OpenAI client's api_key)",
                    None,
                    "invalid_api_key",
                )
            if route is None and method == "GET" and path.startswith("/v1/models/"):
                name = urllib.parse.unquote(path[len("/v1/models/") :])
                route = lambda h: model_retrieve(h, name)  # noqa: E731
            if route is None:
                known = sorted({p for (_, p) in ROUTES})
                raise ApiError(
                    404 if all(p != path for (_, p) in ROUTES) else 405, f"no route {method} {path}; endpoints: {known}"
                )
            route(self)
        except ApiError as err:
            status = err.status
            self._error(err)
        except EdgefmError as exc:
            status = 503 if type(exc).__name__ == "StoreFull" else 400
            self._error(ApiError(status, str(exc)))
        except (BrokenPipeError, ConnectionResetError):
            status = 499
        except Exception as exc:  # never crash the daemon on a request
            log.exception("request failed")
            status = 500
            try:
                self._error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))
            except OSError:
                pass
        finally:
            a.request_finished()
            a.metrics.observe(
                "edgefm_request_seconds", time.perf_counter() - t0, {"path": path}, help="request latency by endpoint"
            )
            a.metrics.inc("edgefm_requests_total", labels={"path": path, "status": str(status)}, help="requests served")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    # -- streaming --
    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _sse(self, obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()


# ---------------------------------------------------------------------------- generation core


class Generation:
    """One finished completion: its text, why it ended, token counts, and per-token log-probabilities
    (token text, logprob, [(alternative text, logprob)]) when they were asked for."""

    def __init__(self):
        self.text, self.finish, self.prompt_tokens, self.completion_tokens = "", "length", 0, 0
        self.logprobs: list[tuple[str, float, list[tuple[str, float]]]] = []


def _prompt_ids(h: Handler, prompt: str | list[int]) -> list[int]:
    eng = h.agent.engine
    ids = eng.encode(prompt) if isinstance(prompt, str) else prompt
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    vocab = int(eng.dims["vocab"])
    if not isinstance(prompt, str) and any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"token ids in 'prompt' must be in 0..{vocab - 1}", "prompt")
    if len(ids) > h.agent.cfg.max_prompt_tokens:
        raise ApiError(
            400,
            f"prompt has {len(ids)} tokens; this agent accepts at most {h.agent.cfg.max_prompt_tokens}",
            "prompt",
            "context_length_exceeded",
        )
    return ids


def _generate(
    h: Handler,
    ids: list[int],
    params: dict,
    stops: list[str],
    on_text=None,
    *,
    steer: Steering | None = None,
    top_n: int | None = None,
) -> Generation:
    """Generate from prompt token ids. ``on_text(delta, logprob_entries)`` streams text as it becomes safe
    to send (no partial stop sequence, no partial UTF-8); ``top_n`` (not None) records log-probabilities."""
    eng = h.agent.engine
    g = Generation()
    g.prompt_tokens = len(ids)
    max_pos = int(eng.dims.get("max_positions", 2048))
    params = dict(params)
    params["max_new_tokens"] = min(params["max_new_tokens"], max_pos - len(ids))
    if params["max_new_tokens"] < 1:
        raise ApiError(400, f"prompt fills the model's {max_pos}-token context", "prompt", "context_length_exceeded")
    pending: list = []

    def record(tok: int, row: np.ndarray) -> None:
        assert top_n is not None  # record is passed only when log-probabilities were asked for
        lp = log_softmax(row)
        pending[:] = [(eng.decode([tok]), float(lp[tok]), [(eng.decode([a]), alp) for a, alp in top_logprobs(row, top_n)])]

    out_ids: list[int] = []
    emitted, sent_lp = 0, 0
    text = ""
    t0 = time.perf_counter()
    first = None
    try:
        for tok in eng.generate(ids, **params, steer=steer, on_token=record if top_n is not None else None):
            if first is None:
                first = time.perf_counter() - t0
            out_ids.append(tok)
            g.logprobs.extend(pending)
            text = eng.decode(out_ids)
            cut = find_stop(text, stops)
            if cut >= 0:
                text, g.finish = text[:cut], "stop"
                break
            if on_text:
                safe = len(text) - holdback(text, stops)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                    safe = min(safe, len(text) - 1)
                if safe > emitted:
                    on_text(text[emitted:safe], g.logprobs[sent_lp:])
                    emitted, sent_lp = safe, len(g.logprobs)
        else:
            if len(out_ids) < params["max_new_tokens"]:
                g.finish = "stop"
    except ConfigError as exc:  # a grammar that cannot continue
        raise ApiError(400, str(exc), "response_format") from None
    if on_text and (len(text) > emitted or len(g.logprobs) > sent_lp):
        on_text(text[emitted:], g.logprobs[sent_lp:])
    m = h.agent.metrics
    dt = time.perf_counter() - t0
    m.inc("edgefm_generated_tokens_total", len(out_ids), help="tokens generated")
    if first is not None:
        m.observe("edgefm_time_to_first_token_seconds", first, help="prefill latency")
    if len(out_ids) > 1 and first is not None and dt > first:
        m.set("edgefm_decode_tokens_per_second", (len(out_ids) - 1) / (dt - first), help="last request's decode speed")
    g.text, g.completion_tokens = text, len(out_ids)
    return g


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _seeded(params: dict, j: int) -> dict:
    """The j-th of n choices samples its own stream (seed + j when a seed is given)."""
    return params if j == 0 or params["seed"] is None else {**params, "seed": params["seed"] + j}


def completions(h: Handler) -> None:
    body = h._body()
    oai.check_parameters(body, "completions")
    _require_task(h, "causal-lm")
    prompts = oai.prompts(body)
    params, stops, n = sampling_params(body, 16), oai.stops(body), oai.choices_per_prompt(body)
    top_n, echo = oai.completion_logprobs(body), bool(body.get("echo"))
    if echo and top_n is not None:
        raise ApiError(400, "'echo' with 'logprobs' (prompt log-probabilities) is not supported; drop one", "echo")
    if body.get("stream") and len(prompts) > 1:
        raise ApiError(400, "several prompts cannot be streamed by this agent; send them one by one", "prompt")
    steer_opts = oai.steering_options(body, int(h.agent.engine.dims["vocab"]))
    ids_list = [_prompt_ids(h, p) for p in prompts]
    rid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), _model_id(h)
    eng = h.agent.engine
    usage = oai.include_usage(body)
    if body.get("stream"):
        h._sse_start()

        def chunk(text, entries=(), finish=None):
            lp = oai.completion_logprobs_block(list(entries)) if top_n is not None else None
            h._sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}],
                    **({"usage": None} if usage else {}),
                }
            )

        if echo:
            chunk(eng.decode(ids_list[0]))
        g = _generate(h, ids_list[0], params, stops, on_text=chunk, steer=Steering(**steer_opts), top_n=top_n)
        chunk("", (), g.finish)
        if usage:
            h._sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(g.prompt_tokens, g.completion_tokens),
                }
            )
        h._sse("[DONE]")
        return
    choices, pt, ct = [], 0, 0
    for i, ids in enumerate(ids_list):
        pt += len(ids)
        for j in range(n):
            g = _generate(h, ids, _seeded(params, j), stops, steer=Steering(**steer_opts), top_n=top_n)
            ct += g.completion_tokens
            text = (eng.decode(ids) + g.text) if echo else g.text
            choices.append(
                {
                    "index": i * n + j,
                    "text": text,
                    "finish_reason": g.finish,
                    "logprobs": oai.completion_logprobs_block(g.logprobs) if top_n is not None else None,
                }
            )
    h._send(
        200,
        {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": _usage(pt, ct)},
    )


def chat_completions(h: Handler) -> None:
    body = h._body()
    oai.check_parameters(body, "chat")
    messages = oai.chat_messages(body.get("messages"))
    _require_task(h, "causal-lm")
    eng = h.agent.engine
    params, stops, n = sampling_params(body, 64), oai.stops(body), oai.choices_per_prompt(body)
    top_n = oai.chat_logprobs(body)
    steer_opts = oai.steering_options(body, int(eng.dims["vocab"]))
    tools = oai.tools_for_template(body, eng.chat_template()[0])
    try:
        grammar = response_format_grammar(body.get("response_format"))
        prompt = eng.chat_prompt(messages, tools=tools)
        ll_tok = eng.grammar_tokenizer() if grammar else None
    except ConfigError as exc:
        param = "messages" if "template" in str(exc) else "response_format"
        raise ApiError(400, f"{'chat template refused the messages: ' if param == 'messages' else ''}{exc}", param) from None

    def steering() -> Steering:
        try:
            return Steering(**steer_opts, constraint=Constraint(ll_tok, grammar) if grammar else None)
        except ConfigError as exc:
            raise ApiError(400, str(exc), "response_format") from None

    ids = _prompt_ids(h, prompt)
    usage = oai.include_usage(body)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), _model_id(h)
    if body.get("stream"):
        if tools:
            raise ApiError(400, "tool calls cannot be streamed by this agent; drop 'stream' when passing 'tools'", "stream")
        h._sse_start()

        def chunk(delta, entries=None, finish=None):
            lp = {"content": oai.chat_logprobs_content(list(entries or []))} if top_n is not None and entries else None
            h._sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                    **({"usage": None} if usage else {}),
                }
            )

        chunk({"role": "assistant", "content": ""})
        g = _generate(h, ids, params, stops, on_text=lambda t, e: chunk({"content": t}, e), steer=steering(), top_n=top_n)
        chunk({}, None, g.finish)
        if usage:
            h._sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(g.prompt_tokens, g.completion_tokens),
                }
            )
        h._sse("[DONE]")
        return
    choices, ct = [], 0
    for j in range(n):
        g = _generate(h, ids, _seeded(params, j), stops, steer=steering(), top_n=top_n)
        ct += g.completion_tokens
        message: dict[str, Any] = {"role": "assistant", "content": g.text}
        finish = g.finish
        if tools:
            content, calls = oai.parse_tool_calls(g.text, tools)
            if calls:
                message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        choices.append(
            {
                "index": j,
                "message": message,
                "finish_reason": finish,
                "logprobs": {"content": oai.chat_logprobs_content(g.logprobs)} if top_n is not None else None,
            }
        )
    h._send(
        200,
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": _usage(len(ids), ct),
        },
    )


def _inputs(body: dict) -> list[str]:
    inp = body.get("input")
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list) or not inp or not all(isinstance(s, str) and s for s in inp) or len(inp) > 256:
        raise ApiError(400, "'input' must be a non-empty string or a list of 1-256 non-empty strings", "input")
    return inp


def embeddings(h: Handler) -> None:
    body = h._body()
    oai.check_parameters(body, "embeddings")
    texts = _inputs(body)
    _require_task(h, "embedding")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, '\'encoding_format\' must be "float" or "base64"', "encoding_format")
    hidden = int(h.agent.engine.dims["hidden"])
    dims = body.get("dimensions")
    if dims is not None and dims != hidden:  # shortening needs a model trained for it (Matryoshka); this one was not
        raise ApiError(400, f"'dimensions' must be {hidden} (this model's embedding size) or omitted", "dimensions")
    vecs, counts = h.agent.engine.embed_counted(texts)
    ntok = sum(counts)

    def encode(v: np.ndarray):
        if fmt == "base64":
            import base64

            return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()
        return v.astype(float).tolist()

    h._send(
        200,
        {
            "object": "list",
            "model": _model_id(h),
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vecs)],
            "usage": {"prompt_tokens": ntok, "total_tokens": ntok},
        },
    )


def classify(h: Handler) -> None:
    body = h._body()
    texts = _inputs(body)
    _require_task(h, "classification")
    logits = h.agent.engine.classify(texts).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    names = h.agent.manifest.model.get("id2label") or {}
    h._send(
        200,
        {
            "object": "list",
            "model": _model_id(h),
            "data": [
                {"index": i, "label": int(r.argmax()), "label_name": names.get(str(int(r.argmax()))), "probabilities": r.tolist()}
                for i, r in enumerate(p)
            ],
        },
    )


def add_examples(h: Handler) -> None:
    body = h._body()
    items = body.get("examples")
    if not isinstance(items, list) or not items or not all(isinstance(x, dict) for x in items) or len(items) > 10_000:
        raise ApiError(
            400,
            '\'examples\' must be a list of 1-10000 objects like {"text": ...} or {"prompt": ..., "completion": ...}',
            "examples",
        )
    h._send(200, h.agent.add_examples(items, source=h.source or "api"))


def heldout_examples(h: Handler) -> None:
    """What this device held back from training for its gate (local API: the data stays on the device)."""
    h._send(
        200,
        {
            "examples": [
                {k: e[k] for k in ("text", "prompt", "label") if e.get(k) is not None} for e in h.agent.heldout_examples()
            ]
        },
    )


def _require_task(h: Handler, task: str) -> None:
    if h.agent.manifest.task != task:
        raise ApiError(400, f"this agent serves a {h.agent.manifest.task} bundle; this endpoint needs {task}", None, "wrong_task")


def _model_id(h: Handler) -> str:
    return f"edgefm-{h.agent.manifest.model.get('model_type', 'model')}-{h.agent.manifest.quant.scheme}"


def _model_card(h: Handler) -> dict:
    eng = h.agent.engine
    card = {
        "id": _model_id(h),
        "object": "model",
        "created": 0,
        "owned_by": "edgefm",
        "adapter": h.agent.active_id,
        "task": eng.task,
    }
    if eng.task == "causal-lm":
        _, source = eng.chat_template()
        card["chat_template"] = source
        if source == "fallback":
            card["warning"] = (
                "the bundle has no chat template: chat prompts are rendered as 'role: content' lines, "
                "which an instruct model was not trained on; re-export with the model's tokenizer"
            )
    else:
        card["max_input_tokens"] = eng.max_length
    return card


def models(h: Handler) -> None:
    h._send(200, {"object": "list", "data": [_model_card(h)]})


def model_retrieve(h: Handler, name: str) -> None:
    card = _model_card(h)
    if name != card["id"]:
        raise ApiError(404, f"model {name!r} does not exist; this agent serves {card['id']!r}", "model", code="model_not_found")
    h._send(200, card)


def healthz(h: Handler) -> None:
    a = h.agent
    h._send(200, {"status": "ok", "state": a.state.value, "adapter": a.active_id, "paused_reason": a.paused_reason})


def metrics(h: Handler) -> None:
    h._send(200, h.agent.metrics_text(), "text/plain; version=0.0.4")


def status(h: Handler) -> None:
    h._send(200, h.agent.status())


def adapters(h: Handler) -> None:
    h._send(200, {"active": h.agent.active_id, "adapters": h.agent.adapter_history()})


def load_adapter_api(h: Handler) -> None:
    """POST /v1/adapters: an edgefm adapter ({"adapter": base64 safetensors}) or a PEFT LoRA
    ({"peft": {"adapter_config": {...}, "adapter_model": base64 safetensors}}), optional "name";
    verified, judged by the gate on the held-out slice, served or kept as refused with the reason."""
    import base64
    import binascii

    body = h._body(limit=h.agent.cfg.max_adapter_bytes)
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64):
        raise ApiError(400, "'name' must be 1-64 letters, digits, '-' or '_'", "name")
    try:
        if "adapter" in body:
            result = h.agent.load_external(adapter=base64.b64decode(body["adapter"], validate=True), name=name)
        elif isinstance(body.get("peft"), dict):
            peft = body["peft"]
            result = h.agent.load_external(
                peft_config=peft.get("adapter_config"),
                peft_weights=base64.b64decode(peft.get("adapter_model") or "", validate=True),
                name=name,
            )
        else:
            raise ApiError(
                400,
                'send {"adapter": base64 of an edgefm .safetensors} or {"peft": {"adapter_config": '
                '{...}, "adapter_model": base64 of adapter_model.safetensors}}',
                "adapter",
            )
    except (binascii.Error, TypeError):
        raise ApiError(400, "adapter bytes must be base64", "adapter") from None
    h._send(200, result)


def rollback(h: Handler) -> None:
    body = h._body()
    to = body.get("to")
    if to is not None and not isinstance(to, str):
        raise ApiError(400, "'to' must be an adapter id string", "to")
    h._send(200, h.agent.rollback(to))


def train_now(h: Handler) -> None:
    body = h._body()
    if body.get("wait"):
        with h.agent.not_in_flight():  # this request waits; it must not make the session yield to it
            result = h.agent.train_and_wait()
        h._send(200, result)
    else:
        h.agent.train_now()
        h._send(202, {"status": "scheduled"})


ROUTES = {
    ("GET", "/healthz"): healthz,
    ("GET", "/metrics"): metrics,
    ("GET", "/v1/models"): models,
    ("POST", "/v1/completions"): completions,
    ("POST", "/v1/chat/completions"): chat_completions,
    ("POST", "/v1/embeddings"): embeddings,
    ("POST", "/v1/classifications"): classify,
    ("POST", "/v1/examples"): add_examples,
    ("GET", "/v1/examples/heldout"): heldout_examples,
    ("GET", "/v1/status"): status,
    ("GET", "/v1/adapters"): adapters,
    ("POST", "/v1/adapters"): load_adapter_api,
    ("POST", "/v1/adapters/rollback"): rollback,
    ("POST", "/v1/train"): train_now,
}


class AgentHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once: a connection over the limit is
    answered 503 + Retry-After at once (never a reset, never one more thread); the listen backlog holds
    bursts (was 5)."""

    request_queue_size = 128
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if self._slots.acquire(blocking=False):
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._slots.release()
                raise
            return
        body = json.dumps(
            error_body(
                503, f"the agent is serving {self.max_connections} connections (max_connections); retry shortly", code="busy"
            )
        ).encode()
        try:
            request.settimeout(0.2)
            try:
                request.recv(65536)  # what the client already sent: closing on unread data would reset the connection
            except OSError:
                pass
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        """A connection that broke off (reset, timeout) is the client's business, not a traceback on stderr."""
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


def make_server(agent: AgentApi, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server bound to host:port serving ``agent``."""
    # an idle or half-open connection is closed after http_idle_timeout_s (each held a thread for good)
    handler = type("BoundHandler", (Handler,), {"agent": agent, "timeout": agent.cfg.http_idle_timeout_s})
    return AgentHTTPServer((host, port), handler, agent.cfg.max_connections)


def serve_in_thread(agent: AgentApi, host: str, port: int) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start the server on a background thread (tests, fleet)."""
    srv = make_server(agent, host, port)
    t = threading.Thread(target=srv.serve_forever, name="edgefm-http", daemon=True)
    t.start()
    return srv, t
