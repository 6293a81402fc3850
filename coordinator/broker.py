"""Embedded broker for the quickstart: a mosquitto child process on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edge_runtime.errors import ConfigError


def find_mosquitto() -> str | None:
    """The mosquitto binary, if installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )


def start_mosquitto(conf: Path, port: int, log_path: Path, timeout: float = 10.0) -> subprocess.Popen:
    """Start mosquitto with ``conf`` and wait until ``port`` accepts connections (shared with the test fixtures)."""
    binary = find_mosquitto()
    if not binary:
        raise ConfigError("no MQTT broker: install mosquitto (apt-get install mosquitto) or pass --broker mqtt://HOST:PORT")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"mosquitto exited at start: {Path(log_path).read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise ConfigError(f"mosquitto did not start listening on {port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Terminate a child (mosquitto saves its persistence file on SIGTERM); kill and reap it if it hangs."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class EmbeddedBroker:
    """Start/stop a local mosquitto (persistence on, loopback only)."""

    def __init__(self, workdir: Path | None = None, port: int | None = None):
        self.binary = find_mosquitto()
        if not self.binary:
            raise ConfigError("no MQTT broker: install mosquitto (apt-get install mosquitto) or pass --broker mqtt://HOST:PORT")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgefm-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"
        user = "user root\n" if os.getuid() == 0 else ""  # as root mosquitto would drop to 'mosquitto' and lose our files
        (self.workdir / "mosquitto.conf").write_text(
            user + f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {self.workdir}/\n"
            "max_packet_size 268435455\nmax_queued_messages 100000\nmax_inflight_messages 100\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> "EmbeddedBroker":
        """Start and wait for the port."""
        self.proc = start_mosquitto(self.workdir / "mosquitto.conf", self.port, self.workdir / "mosquitto.log")
        return self

    def stop(self) -> None:
        """Terminate the broker."""
        stop_process(self.proc)
        self.proc = None
