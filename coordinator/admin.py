"""Admin commands (publish, rollback) reach a running coordinator instead of going around it.

``serve`` holds an exclusive lock on ``STATE/serve.lock`` for as long as it runs. An admin command
that finds the lock held writes a request file into ``STATE/admin/`` and waits for the serving process
to execute it on its own loop and write the answer next to it; with no coordinator serving, the
command runs in the admin process itself, holding the same lock so that a ``serve`` started meanwhile
waits. So exactly one process writes the state at a time, and the spool is only as reachable as the
state directory's file permissions (no network surface)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from edge_runtime.errors import ConfigError

if TYPE_CHECKING:
    from coordinator.core import CoordinatorCore

LOCK = "serve.lock"
SPOOL = "admin"


@contextlib.contextmanager
def exclusive(state_dir: Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold the state dir's writer lock; yields False (holding nothing) when another process has it
    and ``wait`` is False."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def submit(state_dir: Path, request: dict, timeout: float = 60.0) -> dict:
    """Hand ``request`` to the serving coordinator and wait for its answer."""
    spool = Path(state_dir) / SPOOL
    spool.mkdir(parents=True, exist_ok=True)
    rid = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    tmp = spool / f"{rid}.tmp"
    tmp.write_text(json.dumps(request))
    tmp.replace(spool / f"{rid}.request.json")
    answer = spool / f"{rid}.answer.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if answer.is_file():
            out = json.loads(answer.read_text())
            answer.unlink(missing_ok=True)
            if "error" in out:
                raise ConfigError(out["error"])
            return out
        time.sleep(0.1)
    (spool / f"{rid}.request.json").unlink(missing_ok=True)
    raise ConfigError(f"the running coordinator did not answer within {timeout:.0f}s (is its loop stuck? see its log)")


def serve_requests(state_dir: Path, execute: Callable[[dict], dict]) -> int:
    """Execute each waiting request (oldest first) and write its answer; returns how many ran. Called
    by the serving coordinator's loop. A request that fails answers with its error, never raises."""
    spool = Path(state_dir) / SPOOL
    if not spool.is_dir():
        return 0
    done = 0
    for req in sorted(spool.glob("*.request.json")):
        rid = req.name[: -len(".request.json")]
        try:
            out = execute(json.loads(req.read_text()))
        except (ConfigError, ValueError, KeyError, TypeError) as exc:
            out = {"error": str(exc)}
        tmp = spool / f"{rid}.answer.tmp"
        tmp.write_text(json.dumps(out))
        tmp.replace(spool / f"{rid}.answer.json")
        req.unlink(missing_ok=True)
        done += 1
    return done


def execute(coordinator: CoordinatorCore, request: dict) -> dict:
    """Carry out one admin request on ``coordinator``: publish an adapter file, or roll back to a version."""
    from edge_runtime.protocol.adapter import load_adapter

    cmd = request.get("cmd")
    if cmd == "publish":
        tensors, _ = load_adapter(request["adapter"], expect_fingerprint=coordinator.fingerprint)
        note = f"published by hand from {request['adapter']}"
        return {"version": coordinator.publish_adapter(tensors, note), "note": note}
    if cmd == "rollback":
        return {"version": coordinator.rollback_to(int(request["to"])), "note": f"rollback to v{int(request['to'])}"}
    raise ConfigError(f"unknown admin command {cmd!r}")
