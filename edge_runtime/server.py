"""Local HTTP API of the agent: OpenAI-compatible completions/chat/embeddings + edgefm endpoints.

Standard library only (ThreadingHTTPServer): one thread per request; onnxruntime sessions are
thread-safe, adapters are immutable snapshots, so concurrent requests need no global lock.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edge_runtime.errors import ConfigError, EdgefmError
from edge_runtime.sampling import find_stop, holdback

log = logging.getLogger("edgefm.api")


class ApiError(Exception):
    """An error answered to the client in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _num(body: dict, key: str, default, lo, hi, kind=float):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"'{key}' must be a {'integer' if kind is int else 'number'}", key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}", key)
    return kind(v)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return stop
    raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")


def sampling_params(body: dict, default_max: int = 64) -> dict:
    """Validated sampling parameters from an OpenAI-style request body."""
    n = body.get("n")
    if n is not None and n != 1:  # null is what the OpenAI clients send for "default"
        raise ApiError(400, "only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return {"max_new_tokens": _num(body, key, default_max, 1, 4096, int),
            "temperature": _num(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _num(body, "top_p", 1.0, 0.0, 1.0),
            "top_k": _num(body, "top_k", 0, 0, 100000, int),
            "seed": None if body.get("seed") is None else _num(body, "seed", 0, -2**63, 2**63 - 1, int)}


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _hostname(value: str) -> str:
    """'localhost:8080' -> 'localhost', '[::1]:8080' -> '[::1]', 'http://x:1/' -> 'x'."""
    v = value.split("://", 1)[-1].split("/", 1)[0]
    if v.startswith("["):
        return v[:v.index("]") + 1] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def request_origin_refusal(host: str | None, origin: str | None, method: str, bind_host: str) -> str | None:
    """Why a request must be refused (None: serve it). An agent bound to loopback answers only requests
    addressed to a loopback name (DNS rebinding: a web page's own host name resolved to 127.0.0.1) and
    state-changing requests only from no Origin or a loopback one (CSRF from any page the device's
    browser opens). An agent bound elsewhere was exposed on purpose; the Origin rule still applies."""
    loopback_bound = bind_host in LOOPBACK_NAMES
    if loopback_bound and host is not None and _hostname(host).lower() not in LOOPBACK_NAMES:
        return f"Host {host!r} is not this device's loopback address; the agent API answers local clients only"
    if method != "GET" and origin is not None and origin != "null":
        allowed = LOOPBACK_NAMES | ({bind_host} if not loopback_bound else set())
        if _hostname(origin).lower() not in allowed:
            return f"requests from web pages at {origin!r} are refused (the agent API is for local apps, not browsers)"
    elif method != "GET" and origin == "null":
        return "requests from sandboxed or file:// pages are refused (the agent API is for local apps, not browsers)"
    return None


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the agent."""

    server_version = "edgefm"
    protocol_version = "HTTP/1.1"
    agent = None  # set by make_server

    def log_message(self, fmt, *args):  # quiet default logging; metrics carry the numbers
        log.debug("%s " + fmt, self.address_string(), *args)

    # -- helpers --
    def _send(self, status: int, obj: Any, content_type: str = "application/json") -> None:
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ApiError) -> None:
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        self._send(err.status, {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}})

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if length < 0:  # read(-1) would read until the client closes, past every limit
            raise ApiError(400, "bad Content-Length: negative")
        if length > self.agent.cfg.max_request_bytes:
            raise ApiError(413, f"request body of {length} bytes over the {self.agent.cfg.max_request_bytes}-byte limit")
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
            if route is None and method == "GET" and path.startswith("/v1/models/"):
                name = urllib.parse.unquote(path[len("/v1/models/"):])
                route = lambda h: model_retrieve(h, name)  # noqa: E731
            if route is None:
                known = sorted({p for (_, p) in ROUTES})
                raise ApiError(404 if all(p != path for (_, p) in ROUTES) else 405, f"no route {method} {path}; endpoints: {known}")
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
            a.metrics.observe("edgefm_request_seconds", time.perf_counter() - t0, {"path": path},
                              help="request latency by endpoint")
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

def _generate(h: Handler, prompt: str, params: dict, stops: list[str], on_text=None) -> tuple[str, str, int, int]:
    """Generate text; returns (text, finish_reason, prompt_tokens, completion_tokens). ``on_text`` streams deltas."""
    eng = h.agent.engine
    ids = eng.encode(prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    if len(ids) > h.agent.cfg.max_prompt_tokens:
        raise ApiError(400, f"prompt has {len(ids)} tokens; this agent accepts at most {h.agent.cfg.max_prompt_tokens}", "prompt",
                       "context_length_exceeded")
    max_pos = int(eng.dims.get("max_positions", 2048))
    params = dict(params)
    params["max_new_tokens"] = min(params["max_new_tokens"], max_pos - len(ids))
    if params["max_new_tokens"] < 1:
        raise ApiError(400, f"prompt fills the model's {max_pos}-token context", "prompt", "context_length_exceeded")
    out_ids: list[int] = []
    emitted = 0
    text = ""
    finish = "length"
    t0 = time.perf_counter()
    first = None
    for tok in eng.generate(ids, **params):
        if first is None:
            first = time.perf_counter() - t0
        out_ids.append(tok)
        text = eng.decode(out_ids)
        cut = find_stop(text, stops)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        if on_text:
            safe = len(text) - holdback(text, stops)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                safe = min(safe, len(text) - 1)
            if safe > emitted:
                on_text(text[emitted:safe])
                emitted = safe
    else:
        if len(out_ids) < params["max_new_tokens"]:
            finish = "stop"
    if on_text and len(text) > emitted:
        on_text(text[emitted:])
    m = h.agent.metrics
    dt = time.perf_counter() - t0
    m.inc("edgefm_generated_tokens_total", len(out_ids), help="tokens generated")
    if first is not None:
        m.observe("edgefm_time_to_first_token_seconds", first, help="prefill latency")
    if len(out_ids) > 1 and first is not None and dt > first:
        m.set("edgefm_decode_tokens_per_second", (len(out_ids) - 1) / (dt - first), help="last request's decode speed")
    return text, finish, len(ids), len(out_ids)


def completions(h: Handler) -> None:
    body = h._body()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (batches of prompts are not supported)", "prompt")
    params, stops = sampling_params(body, 16), _stops(body)
    _require_task(h, "causal-lm")
    rid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), _model_id(h)
    if body.get("stream"):
        h._sse_start()
        def chunk(text, finish=None):
            h._sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})
        _, finish, _, _ = _generate(h, prompt, params, stops, on_text=chunk)
        chunk("", finish)
        h._sse("[DONE]")
        return
    text, finish, pt, ct = _generate(h, prompt, params, stops)
    h._send(200, {"id": rid, "object": "text_completion", "created": created, "model": model,
                  "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                  "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}})


def chat_completions(h: Handler) -> None:
    body = h._body()
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, f"messages[{i}] needs a role of system/user/assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    params, stops = sampling_params(body, 64), _stops(body)
    _require_task(h, "causal-lm")
    try:
        prompt = h.agent.engine.chat_prompt(clean)
    except ConfigError as exc:
        raise ApiError(400, f"chat template refused the messages: {exc}", "messages") from None
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), _model_id(h)
    if body.get("stream"):
        h._sse_start()
        def chunk(delta, finish=None):
            h._sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})
        chunk({"role": "assistant", "content": ""})
        _, finish, _, _ = _generate(h, prompt, params, stops, on_text=lambda t: chunk({"content": t}))
        chunk({}, finish)
        h._sse("[DONE]")
        return
    text, finish, pt, ct = _generate(h, prompt, params, stops)
    h._send(200, {"id": rid, "object": "chat.completion", "created": created, "model": model,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                               "finish_reason": finish}],
                  "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}})


def _inputs(body: dict) -> list[str]:
    inp = body.get("input")
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list) or not inp or not all(isinstance(s, str) and s for s in inp) or len(inp) > 256:
        raise ApiError(400, "'input' must be a non-empty string or a list of 1-256 non-empty strings", "input")
    return inp


def embeddings(h: Handler) -> None:
    body = h._body()
    texts = _inputs(body)
    _require_task(h, "embedding")
    vecs = h.agent.engine.embed(texts)
    ntok = sum(h.agent.engine.token_counts(texts))
    h._send(200, {"object": "list", "model": _model_id(h),
                  "data": [{"object": "embedding", "index": i, "embedding": v.astype(float).tolist()} for i, v in enumerate(vecs)],
                  "usage": {"prompt_tokens": ntok, "total_tokens": ntok}})


def classify(h: Handler) -> None:
    body = h._body()
    texts = _inputs(body)
    _require_task(h, "classification")
    logits = h.agent.engine.classify(texts).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    names = h.agent.manifest.model.get("id2label") or {}
    h._send(200, {"object": "list", "model": _model_id(h),
                  "data": [{"index": i, "label": int(r.argmax()), "label_name": names.get(str(int(r.argmax()))),
                            "probabilities": r.tolist()} for i, r in enumerate(p)]})


def add_examples(h: Handler) -> None:
    body = h._body()
    items = body.get("examples")
    if not isinstance(items, list) or not items or not all(isinstance(x, dict) for x in items) or len(items) > 10_000:
        raise ApiError(400, "'examples' must be a list of 1-10000 objects like {\"text\": ...} or {\"prompt\": ..., \"completion\": ...}", "examples")
    h._send(200, h.agent.add_examples(items, source="api"))


def heldout_examples(h: Handler) -> None:
    """What this device held back from training for its gate (local API: the data stays on the device)."""
    h._send(200, {"examples": [{k: e[k] for k in ("text", "prompt", "label") if e.get(k) is not None}
                               for e in h.agent.store.heldout_split()]})


def _require_task(h: Handler, task: str) -> None:
    if h.agent.manifest.task != task:
        raise ApiError(400, f"this agent serves a {h.agent.manifest.task} bundle; this endpoint needs {task}", None, "wrong_task")


def _model_id(h: Handler) -> str:
    return f"edgefm-{h.agent.manifest.model.get('model_type', 'model')}-{h.agent.manifest.quant['scheme']}"


def _model_card(h: Handler) -> dict:
    eng = h.agent.engine
    card = {"id": _model_id(h), "object": "model", "created": 0, "owned_by": "edgefm", "adapter": h.agent.active_id,
            "task": eng.task}
    if eng.task == "causal-lm":
        _, source = eng.chat_template()
        card["chat_template"] = source
        if source == "fallback":
            card["warning"] = ("the bundle has no chat template: chat prompts are rendered as 'role: content' lines, "
                               "which an instruct model was not trained on; re-export with the model's tokenizer")
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
    a = h.agent
    a.metrics.set("edgefm_inflight_requests", a.inflight, help="requests being served")
    ob = a.store.outbox_stats()
    a.metrics.set("edgefm_outbox_queued", ob["queued"], help="updates waiting to be sent")
    counts = a.store.count_examples()
    a.metrics.set("edgefm_examples", counts["train"] + counts["heldout"], help="stored examples")
    h._send(200, a.metrics.render(), "text/plain; version=0.0.4")


def status(h: Handler) -> None:
    h._send(200, h.agent.status())


def adapters(h: Handler) -> None:
    h._send(200, {"active": h.agent.active_id, "adapters": h.agent.store.adapters()})


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
    ("GET", "/healthz"): healthz, ("GET", "/metrics"): metrics, ("GET", "/v1/models"): models,
    ("POST", "/v1/completions"): completions, ("POST", "/v1/chat/completions"): chat_completions,
    ("POST", "/v1/embeddings"): embeddings, ("POST", "/v1/classifications"): classify,
    ("POST", "/v1/examples"): add_examples, ("GET", "/v1/examples/heldout"): heldout_examples, ("GET", "/v1/status"): status, ("GET", "/v1/adapters"): adapters,
    ("POST", "/v1/adapters/rollback"): rollback, ("POST", "/v1/train"): train_now,
}


def make_server(agent, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server bound to host:port serving ``agent``."""
    # an idle or half-open connection is closed after http_idle_timeout_s (each held a thread for good)
    handler = type("BoundHandler", (Handler,), {"agent": agent, "timeout": agent.cfg.http_idle_timeout_s})
    server_cls = type("AgentHTTPServer", (ThreadingHTTPServer,), {"request_queue_size": 128})  # listen backlog (was 5)
    srv = server_cls((host, port), handler)
    srv.daemon_threads = True
    return srv


def serve_in_thread(agent, host: str, port: int) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start the server on a background thread (tests, fleet)."""
    srv = make_server(agent, host, port)
    t = threading.Thread(target=srv.serve_forever, name="edgefm-http", daemon=True)
    t.start()
    return srv, t
