"""Coordinator state: SQLite (WAL, synchronous=FULL) for devices, rounds, updates and versions, a
content-addressed blob store (``blobs/<sha[:2]>/<sha>``) for adapters, and an append-only update log
(``updates/seg-*.log``) for accepted update payloads.

Ingest writes a batch of updates with one ``fdatasync`` of the log and one SQLite commit (group
commit), instead of a file, an fsync and two commits per update."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, state TEXT, profile TEXT, base_fingerprint TEXT,
  adapter_version INTEGER, global_version INTEGER, last_seen REAL, accepted INTEGER DEFAULT 0, rejected INTEGER DEFAULT 0,
  info TEXT DEFAULT '{}');
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, mode TEXT, base_version INTEGER, opened_at REAL, deadline REAL,
  closed_at REAL, status TEXT, selected TEXT, target INTEGER, quorum INTEGER, result_version INTEGER, summary TEXT DEFAULT '{}');
CREATE TABLE IF NOT EXISTS updates (update_id TEXT PRIMARY KEY, device_id TEXT, round INTEGER, base_version INTEGER,
  num_examples INTEGER, status TEXT, reason TEXT, detail TEXT, received_at REAL, blob TEXT, bytes INTEGER, weight REAL,
  folded_into INTEGER);
CREATE TABLE IF NOT EXISTS versions (version INTEGER PRIMARY KEY, parent INTEGER, sha256 TEXT, created_at REAL, round INTEGER,
  strategy TEXT, num_updates INTEGER, num_examples INTEGER, metrics TEXT, status TEXT, note TEXT DEFAULT '');
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT);
CREATE INDEX IF NOT EXISTS updates_round ON updates(round, status);
"""


class BlobStore:
    """Content-addressed files: the name is the sha256 of the content."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        """Store bytes durably (fsync + rename); returns the key, the sha256 of the content."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.path(sha)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        return sha

    def path(self, sha: str) -> Path:
        """Where a blob lives."""
        return self.root / sha[:2] / sha

    def get(self, sha: str) -> bytes:
        """Read a blob and check its hash (``u-<id>`` blobs from older state dirs are checked by their
        own envelope hashes)."""
        data = self.path(sha).read_bytes()
        if len(sha) == 64 and not sha.startswith("u-") and hashlib.sha256(data).hexdigest() != sha:
            raise OSError(f"blob {sha} is corrupt")
        return data

    def delete(self, sha: str) -> None:
        """Remove a blob (missing is fine)."""
        self.path(sha).unlink(missing_ok=True)


class UpdateLog:
    """Append-only segment files holding accepted update payloads; a reference is ``seg:offset:length``.

    Appends are not synced one by one: ``sync`` makes everything appended so far durable (called once
    per ingest batch, before the SQLite commit that records the references). A segment is rotated when
    its updates have been folded into a published version and is then deleted as a whole."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._f = None
        self._name = ""
        self._dirty = False
        self._new = False

    def append(self, data: bytes) -> str:
        """Append one payload; returns its reference (durable only after ``sync``)."""
        if self._f is None:
            self._name = f"seg-{time.time_ns()}.log"
            self._f = open(self.root / self._name, "ab")
            self._new = True
        offset = self._f.tell()
        self._f.write(data)
        self._dirty = True
        return f"{self._name}:{offset}:{len(data)}"

    def sync(self) -> None:
        """Make every append so far durable (file data, and the directory entry of a new segment)."""
        if self._f is not None and self._dirty:
            self._f.flush()
            os.fdatasync(self._f.fileno()) if hasattr(os, "fdatasync") else os.fsync(self._f.fileno())
            self._dirty = False
        if self._new:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._new = False

    def rotate(self) -> None:
        """Start a new segment on the next append."""
        if self._f is not None:
            self.sync()
            self._f.close()
            self._f = None

    @staticmethod
    def is_ref(ref: str) -> bool:
        """Whether a stored blob reference points into the log (older state dirs used per-update blobs)."""
        return ref.startswith("seg-") and ref.count(":") == 2

    def read(self, ref: str) -> bytes:
        """The payload a reference points at (OSError if the log is missing or short)."""
        name, off, n = ref.split(":")
        if "/" in name or not name.endswith(".log"):
            raise OSError(f"bad update-log reference {ref!r}")
        off, n = int(off), int(n)
        if self._f is not None:
            self._f.flush()
        with open(self.root / name, "rb") as f:
            f.seek(off)
            data = f.read(n)
        if len(data) != n:
            raise OSError(f"update log {name} is short at {off}+{n}")
        return data

    def delete_segments(self, refs: list[str]) -> None:
        """Delete the segments these references live in (rotating first if the open one is among them)."""
        names = {r.split(":")[0] for r in refs if self.is_ref(r)}
        if self._name in names:
            self.rotate()
        for name in names:
            (self.root / name).unlink(missing_ok=True)


class State:
    """All durable coordinator state."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.dir / "coordinator.sqlite"), check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.blobs = BlobStore(self.dir / "blobs")
        self.log = UpdateLog(self.dir / "updates")
        self.lock = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def transaction(self):
        """One SQLite transaction (re-entrant: nested uses join the outer one). The update log is synced
        before the commit, so a committed row never points at payload bytes that are not on disk."""
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self.db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
                self.log.sync()
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    def read_update(self, ref: str) -> bytes:
        """Payload of a stored accepted update."""
        return self.log.read(ref) if UpdateLog.is_ref(ref) else self.blobs.get(ref)

    def delete_updates(self, refs: list[str]) -> None:
        """Drop stored payloads that are folded into a published version."""
        self.log.delete_segments(refs)
        for ref in refs:
            if ref and not UpdateLog.is_ref(ref):
                self.blobs.delete(ref)

    def q(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run a query, return rows."""
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def x(self, sql: str, args: tuple = ()) -> int:
        """Run a statement, return rowcount."""
        with self.lock:
            return self.db.execute(sql, args).rowcount

    def get(self, key: str, default=None):
        rows = self.q("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def put(self, key: str, value) -> None:
        self.x("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    # -- devices --
    def seen_device(self, device_id: str, msg: dict) -> None:
        """Upsert a device from a status message (or the last will)."""
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO devices (device_id, last_seen) VALUES (?, ?)", (device_id, time.time()))
            self.db.execute("UPDATE devices SET state=?, profile=COALESCE(?, profile), base_fingerprint=COALESCE(?, base_fingerprint), "
                            "adapter_version=COALESCE(?, adapter_version), global_version=COALESCE(?, global_version), "
                            "last_seen=?, info=? WHERE device_id=?",
                            (msg.get("state"), msg.get("profile"), msg.get("base_fingerprint"), msg.get("adapter_version"),
                             msg.get("global_version"), time.time(), json.dumps({k: msg.get(k) for k in ("adapter", "outbox")}),
                             device_id))

    def count_device(self, device_id: str, accepted: bool) -> None:
        """Count an accepted or rejected update for a device."""
        col = "accepted" if accepted else "rejected"
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO devices (device_id, last_seen) VALUES (?, ?)", (device_id, time.time()))
            self.db.execute(f"UPDATE devices SET {col} = {col} + 1, last_seen=? WHERE device_id=?", (time.time(), device_id))

    def online_devices(self, within_s: float = 120.0) -> list[str]:
        """Devices whose last status said online, seen recently."""
        return [r[0] for r in self.q("SELECT device_id FROM devices WHERE state='online' AND last_seen > ?", (time.time() - within_s,))]

    def devices(self) -> list[dict]:
        """Fleet registry rows."""
        cols = ["device_id", "state", "profile", "base_fingerprint", "adapter_version", "global_version", "last_seen",
                "accepted", "rejected", "info"]
        return [dict(zip(cols, r)) | {"info": json.loads(r[-1] or "{}")} for r in self.q(f"SELECT {','.join(cols)} FROM devices ORDER BY device_id")]

    # -- updates --
    def has_update(self, update_id: str) -> bool:
        """Whether this update id was seen (accepted or rejected): dedupe."""
        return bool(self.q("SELECT 1 FROM updates WHERE update_id=?", (update_id,)))

    def record_update(self, *, update_id: str, device_id: str, round_id: int | None, base_version: int, num_examples: int,
                      status: str, reason: str | None, detail: str | None, blob: str | None, nbytes: int, weight: float) -> bool:
        """Record an update once (False if the id was already recorded)."""
        return self.x("INSERT OR IGNORE INTO updates VALUES (?,?,?,?,?,?,?,?,?,?,?,?,NULL)",
                      (update_id, device_id, round_id, base_version, num_examples, status, reason, detail, time.time(), blob,
                       nbytes, weight)) == 1

    def pending_accepted(self) -> list[tuple[str, str, float]]:
        """Accepted updates not yet folded into a published version (replayed after a restart)."""
        return self.q("SELECT update_id, blob, weight FROM updates WHERE status='accepted' AND folded_into IS NULL ORDER BY received_at")

    # -- versions --
    def current_version(self) -> int | None:
        """Newest published version, if any."""
        rows = self.q("SELECT MAX(version) FROM versions")
        return rows[0][0]

    def add_version(self, version: int, parent: int | None, sha: str, *, round_id=None, strategy="", num_updates=0,
                    num_examples=0, metrics=None, note="", folded: list[str] | None = None) -> None:
        """Record a new global version and mark the updates folded into it, atomically."""
        with self.transaction():
            self.db.execute("UPDATE versions SET status='superseded' WHERE status='published'")
            self.db.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            (version, parent, sha, time.time(), round_id, strategy, num_updates, num_examples,
                             json.dumps(metrics or {}), "published", note))
            for uid in folded or []:
                self.db.execute("UPDATE updates SET folded_into=? WHERE update_id=?", (version, uid))

    def versions(self) -> list[dict]:
        """Version lineage, newest first."""
        cols = ["version", "parent", "sha256", "created_at", "round", "strategy", "num_updates", "num_examples", "metrics", "status", "note"]
        return [dict(zip(cols, r)) | {"metrics": json.loads(r[8] or "{}")} for r in self.q(f"SELECT {','.join(cols)} FROM versions ORDER BY version DESC")]

    def version_sha(self, version: int) -> str:
        rows = self.q("SELECT sha256 FROM versions WHERE version=?", (version,))
        if not rows:
            raise KeyError(version)
        return rows[0][0]

    # -- rounds --
    def rounds(self) -> list[dict]:
        cols = ["round", "mode", "base_version", "opened_at", "deadline", "closed_at", "status", "selected", "target", "quorum",
                "result_version", "summary"]
        return [dict(zip(cols, r)) | {"summary": json.loads(r[-1] or "{}"), "selected": json.loads(r[7] or "null")}
                for r in self.q(f"SELECT {','.join(cols)} FROM rounds ORDER BY round DESC")]

    def update_counts(self) -> dict:
        """Accepted/rejected counts and rejection reasons."""
        by = dict(self.q("SELECT status, COUNT(*) FROM updates GROUP BY status"))
        reasons = dict(self.q("SELECT reason, COUNT(*) FROM updates WHERE status='rejected' GROUP BY reason"))
        return {"accepted": by.get("accepted", 0), "rejected": by.get("rejected", 0), "reasons": reasons}
