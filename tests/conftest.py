"""Shared fixtures: real Mosquitto brokers and tiny random checkpoints (no downloads)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from broker import Mosquitto  # noqa: E402


@pytest.fixture
def broker(tmp_path):
    """A plain Mosquitto on a free loopback port."""
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def broker_acl(tmp_path):
    """Mosquitto with a password file and an ACL: devices may write only under their own id."""
    acl = ("user coordinator\ntopic readwrite edgefm/#\n\n"
           "pattern write edgefm/v1/+/device/%u/#\npattern read edgefm/v1/+/device/%u/ack\n"
           "pattern read edgefm/v1/+/global/#\npattern read edgefm/v1/+/round\n")
    b = Mosquitto(tmp_path / "broker", users={"coordinator": "cpass", "dev-1": "p1", "dev-2": "p2"}, acl=acl).start()
    yield b
    b.stop()


@pytest.fixture
def broker_tls(tmp_path):
    """Mosquitto with TLS (CA and certificates generated for the test)."""
    b = Mosquitto(tmp_path / "broker", tls=True).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama-style checkpoint + tokenizer saved as a HF directory."""
    pytest.importorskip("torch")
    from export.tiny import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT-style checkpoint + tokenizer saved as a HF directory."""
    pytest.importorskip("torch")
    from export.tiny import make_tiny_bert
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
