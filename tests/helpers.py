"""Test helpers: tiny bundles (built once per session), waiting, in-process agents and coordinators."""
from __future__ import annotations

import socket
import time
from pathlib import Path

_CACHE: dict = {}


def tiny_bundle(tmp_root: Path, model_dir: Path, quant: str = "fp32", task: str = "causal-lm", **kw) -> Path:
    """Export a tiny bundle once per (quant, task, options) and reuse it."""
    key = (str(model_dir), quant, task, tuple(sorted(kw.items())))
    if key not in _CACHE:
        from export.build import BuildOptions, Progress, build_bundle
        from export.quantize import QuantRecipe
        out = Path(tmp_root) / f"bundle-{task}-{quant}-{abs(hash(key)) % 10**8}"
        recipe = QuantRecipe(scheme=quant, algo=kw.pop("algo", "asym"), head=kw.pop("head", "int8"))
        opts = BuildOptions(task=task, quant=recipe, lora_rank=kw.pop("lora_rank", 4),
                            train_batch=kw.pop("train_batch", 4), train_seq=kw.pop("train_seq", 32), **kw)
        build_bundle(str(model_dir), out, opts, log=Progress(quiet=True))
        _CACHE[key] = out
    return _CACHE[key]


def wait_for(pred, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``pred`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEXTS = [
    "sensor 4 reports temperature 21 degrees and humidity 40 percent",
    "the pump in hall b was restarted after a pressure alarm",
    "valve 7 closed at noon and reopened at two",
    "battery level on node 12 dropped to 30 percent overnight",
    "the conveyor belt speed was set to 1.5 meters per second",
    "maintenance replaced the filter on unit 3",
    "the fan on rack 2 is running at full speed",
    "door sensor on gate a reported open for ten minutes",
]


def examples(n: int, offset: int = 0) -> list[dict]:
    """n distinct short training texts."""
    return [{"text": f"{TEXTS[(i + offset) % len(TEXTS)]} (log {i + offset})"} for i in range(n)]


class served_agent:
    """An agent on ``bundle`` serving its HTTP API on a free loopback port (context manager): yields
    (agent, base_url). ``kw`` are AgentConfig fields."""

    def __init__(self, bundle: Path, data_dir: Path, **kw):
        self.bundle, self.data_dir, self.kw = bundle, data_dir, kw

    def __enter__(self):
        from edge_runtime.agent import Agent
        from edge_runtime.config import AgentConfig
        from edge_runtime.server import serve_in_thread
        cfg = AgentConfig(bundle=str(self.bundle), data_dir=str(self.data_dir), port=free_port(),
                          **{"auto_train": False, **self.kw})
        self.agent = Agent(cfg)
        self.srv, _ = serve_in_thread(self.agent.api, "127.0.0.1", cfg.port)
        self.agent.start()
        return self.agent, f"http://127.0.0.1:{cfg.port}"

    def __exit__(self, *exc):
        self.srv.shutdown()
        self.srv.server_close()
        self.agent.stop()


def rewrite_bundle_file(bundle: Path, name: str, text: str | None) -> None:
    """Replace (or with None, delete) one file of a bundle and re-hash the manifest (tests of bundle variants)."""
    import json
    from edge_runtime.protocol.manifest import hash_files
    p = Path(bundle) / name
    if text is None:
        p.unlink()
    else:
        p.write_text(text)
    mf = Path(bundle) / "manifest.json"
    m = json.loads(mf.read_text())
    names = [n for n in m["files"] if (Path(bundle) / n).is_file()] + ([name] if text is not None and name not in m["files"] else [])
    m["files"] = hash_files(Path(bundle), names)
    mf.write_text(json.dumps(m, indent=2))


class MemoryLink:
    """An in-memory stand-in for MqttLink (the ``edge_runtime.transport.Link`` protocol) for unit tests
    of coordinator logic: what is published is recorded (retained messages kept per topic); ``deliver``
    hands a message to the owner's ``on_message`` as the broker would, with an ack that records it."""

    def __init__(self, on_message=None, on_connect=None):
        import threading
        self.on_message, self.on_connect = on_message, on_connect
        self.connected = threading.Event()
        self.published: list[tuple[str, bytes, bool]] = []
        self.retained: dict[str, bytes] = {}
        self.subscribed: list[str] = []
        self.acked: list[str] = []

    def start(self):
        self.connected.set()
        if self.on_connect:
            self.on_connect()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscribed.append(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        self.published.append((topic, payload, retain))
        if retain:
            self.retained[topic] = payload
        return len(self.published)

    def close(self) -> None:
        self.connected.clear()

    def deliver(self, topic: str, payload: bytes, name: str = "") -> None:
        """A message from the fleet (its ack records ``name``)."""
        self.on_message(topic, payload, False, lambda: self.acked.append(name))

    def messages(self, topic: str) -> list:
        """The JSON messages published on ``topic``, in order."""
        import json
        return [json.loads(p) for t, p, _ in self.published if t == topic]
