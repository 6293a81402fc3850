"""The agent API against hostile clients on the same machine: web pages (CSRF, DNS rebinding), bad
lengths, idle sockets."""
from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from helpers import examples, free_port, tiny_bundle

pytestmark = pytest.mark.slow


@pytest.fixture
def agent_url(tmp_path, tmp_path_factory, tiny_llama_dir):
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.server import serve_in_thread
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    cfg = AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / "a"), port=free_port(), auto_train=False, http_idle_timeout_s=1.0)
    agent = Agent(cfg)
    srv, _ = serve_in_thread(agent.api, "127.0.0.1", cfg.port)
    agent.start()
    yield agent, cfg.port
    srv.shutdown()
    agent.stop()


def request(port, method, path, body=b"", headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    c.close()
    return out


def test_web_pages_cannot_reach_the_api(agent_url):
    agent, port = agent_url
    body = json.dumps({"examples": examples(3)}).encode()
    status, res = request(port, "POST", "/v1/examples", body, {"Origin": "http://evil.example", "Content-Type": "application/json"})
    assert status == 403 and res["error"]["code"] == "forbidden_origin"
    status, _ = request(port, "GET", "/v1/status", headers={"Host": "evil.example:80"})
    assert status == 403
    assert agent.store.count_examples()["train"] + agent.store.count_examples()["heldout"] == 0   # nothing stored
    assert request(port, "POST", "/v1/examples", body, {"Content-Type": "application/json"})[0] == 200  # a local app


def test_negative_content_length_is_refused(agent_url):
    _, port = agent_url
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/examples HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n" + b"x" * 1000)
        head = s.recv(200)
    assert head.startswith(b"HTTP/1.1 400")


def test_idle_sockets_are_closed(agent_url):
    _, port = agent_url
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    t0 = time.time()
    for s in idle:
        assert s.recv(10) == b""                      # closed by the server, not held open
        s.close()
    assert time.time() - t0 < 8


def test_connections_over_the_limit_get_503_not_resets(tmp_path, tmp_path_factory, tiny_llama_dir):
    """max_connections bounds the threads: with every slot held by idle sockets, 100 concurrent
    requests are each answered 503 + Retry-After (no reset, no thread); when the slots free up the
    API serves again; a burst of 100 concurrent requests on free slots is answered in full."""
    import concurrent.futures
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.server import serve_in_thread
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    cfg = AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / "a"), port=free_port(), auto_train=False,
                      http_idle_timeout_s=30.0, max_connections=4)
    agent = Agent(cfg)
    srv, _ = serve_in_thread(agent.api, "127.0.0.1", cfg.port)
    agent.start()

    def get(path="/healthz"):
        c = http.client.HTTPConnection("127.0.0.1", cfg.port, timeout=30)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.getheader("Retry-After"), json.loads(r.read() or b"{}")
        except OSError as exc:
            return type(exc).__name__, None, None
        finally:
            c.close()
    try:
        holders = [socket.create_connection(("127.0.0.1", cfg.port), timeout=10) for _ in range(4)]
        time.sleep(0.5)
        with concurrent.futures.ThreadPoolExecutor(50) as ex:
            got = list(ex.map(lambda _: get("/v1/status"), range(100)))
        assert {g[0] for g in got} == {503}, {g[0] for g in got}
        assert all(g[1] == "1" and g[2]["error"]["code"] == "busy" for g in got)
        for s in holders:
            s.close()
        deadline = time.time() + 10
        while get()[0] != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert get("/v1/status")[0] == 200
        with concurrent.futures.ThreadPoolExecutor(100) as ex:
            burst = [g[0] for g in ex.map(lambda _: get(), range(100))]
        assert set(burst) <= {200, 503} and burst.count(200) >= 4, burst   # answered, never reset
    finally:
        srv.shutdown()
        agent.stop()
