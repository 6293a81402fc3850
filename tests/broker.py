"""A real Mosquitto process on a free loopback port, for tests (plain, password+ACL, TLS)."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca_and_certs(dirpath: Path) -> dict[str, Path]:
    """A throwaway CA plus server and client certificates, via the openssl CLI."""
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=edgefm-test-ca")
    for name, cn in (("server", "localhost"), ("client", "dev-1")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name)
    return {k: d / k for k in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


class Mosquitto:
    """One mosquitto process; ``restart()`` keeps the port (and the persistence file) for outage tests."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None, acl: str | None = None,
                 tls: bool = False, persistence: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.certs = make_ca_and_certs(self.workdir / "certs") if tls else {}
        # As root, mosquitto would drop to the 'mosquitto' user and lose access to our temp files.
        lines = ([f"user {__import__('pwd').getpwuid(os.getuid()).pw_name}"] if os.getuid() == 0 else [])
        lines += [f"listener {self.port} 127.0.0.1", "max_packet_size 268435455", "max_inflight_messages 100",
                 "max_queued_messages 100000", "max_queued_bytes 0"]
        lines += [f"persistence {'true' if persistence else 'false'}", f"persistence_location {self.workdir}/"]
        if users:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for u, p in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), u, p], check=True, capture_output=True)
            os.chmod(pw, 0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if acl is not None:
            aclf = self.workdir / "acl"
            aclf.write_text(acl)
            os.chmod(aclf, 0o600)
            lines += [f"acl_file {aclf}"]
        if tls:
            lines += [f"cafile {self.certs['ca.crt']}", f"certfile {self.certs['server.crt']}",
                      f"keyfile {self.certs['server.key']}", "require_certificate false"]
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}"
        self.log = self.workdir / "mosquitto.log"

    def start(self) -> "Mosquitto":
        """Start and wait until the port accepts connections."""
        from coordinator.broker import start_mosquitto
        self.proc = start_mosquitto(self.conf, self.port, self.log)
        return self

    def stop(self) -> None:
        """Stop the broker (it saves its persistence file)."""
        from coordinator.broker import stop_process
        stop_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port."""
        self.stop()
        self.start()
