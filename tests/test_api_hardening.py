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
    from edge_runtime.agent import Agent, AgentConfig
    from edge_runtime.server import serve_in_thread
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    cfg = AgentConfig(bundle=str(bundle), data_dir=str(tmp_path / "a"), port=free_port(), auto_train=False, http_idle_timeout_s=1.0)
    agent = Agent(cfg)
    srv, _ = serve_in_thread(agent, "127.0.0.1", cfg.port)
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
