"""Coordinator state: SQLite (WAL, synchronous=FULL) for devices, rounds, updates and versions, a
content-addressed blob store (``blobs/<sha[:2]>/<sha>``) for adapters, and an append-only update log
(``updates/seg-*.log``) for accepted update payloads.

Ingest writes a batch of updates with one ``fdatasync`` and one SQLite commit (group commit): the
batch's payloads appended to the log, and, once the log holds more than a checkpoint would take, a
checkpoint of the streaming accumulator (``acc/ckpt-*.f64``, the running sum of every accepted,
unpublished update). After a restart the accumulator is the checkpoint plus the log entries written
since. Two generations are kept so that one damaged copy never loses an acknowledged update: the
previous checkpoint file, and the log entries of the updates the newest checkpoint added (``logref``);
older log segments are deleted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from edge_runtime import database
from edge_runtime.errors import StateError
from edge_runtime.protocol.adapter import AdapterMeta, adapter_from_bytes, adapter_to_bytes
from edge_runtime.protocol.messages import DeviceStatus

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, state TEXT, profile TEXT, base_fingerprint TEXT,
  adapter_version INTEGER, global_version INTEGER, last_seen REAL, accepted INTEGER DEFAULT 0, rejected INTEGER DEFAULT 0,
  info TEXT DEFAULT '{}');
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, mode TEXT, base_version INTEGER, opened_at REAL, deadline REAL,
  closed_at REAL, status TEXT, selected TEXT, target INTEGER, quorum INTEGER, result_version INTEGER, summary TEXT DEFAULT '{}');
CREATE TABLE IF NOT EXISTS updates (update_id TEXT PRIMARY KEY, device_id TEXT, round INTEGER, base_version INTEGER,
  num_examples INTEGER, status TEXT, reason TEXT, detail TEXT, received_at REAL, blob TEXT, bytes INTEGER, weight REAL,
  folded_into INTEGER, norm REAL, clip REAL, logref TEXT, ckpt TEXT);
CREATE TABLE IF NOT EXISTS versions (version INTEGER PRIMARY KEY, parent INTEGER, sha256 TEXT, created_at REAL, round INTEGER,
  strategy TEXT, num_updates INTEGER, num_examples INTEGER, metrics TEXT, status TEXT, note TEXT DEFAULT '');
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT);
CREATE INDEX IF NOT EXISTS updates_round ON updates(round, status);
"""


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


RECOVERY = (
    "Nothing was changed. Restore coordinator.sqlite (with its -wal file) from a backup, or keep {dir} aside for "
    "inspection (`mv {dir} {dir}.damaged`) and start a new state dir: the fleet then restarts from the bundle's adapter "
    "(v0); the stored adapters stay readable under blobs/ (safetensors files named by their sha256)."
)

CHECKPOINTED = "ckpt"  # updates.blob of an accepted update held only by the accumulator checkpoint


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


def _intact_update(data: bytes) -> None:
    """Raise unless ``data`` is an update message whose payload matches the hash in its header."""
    from edge_runtime.protocol.messages import decode_update_header

    header, payload = decode_update_header(data, max_bytes=len(data))
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise OSError("payload does not match its header's sha256")


class UpdateLog:
    """Append-only segment files holding accepted update payloads; a reference is ``seg:offset:length``.

    One damaged payload loses nothing: every group of payloads made durable together (one ingest batch)
    gets a parity record, the XOR of its payloads (zero-padded to the longest), appended to the
    segment's ``.par`` file, from which ``read`` rebuilds a payload that is missing, short or fails
    ``check`` (the other payloads of its group being intact). A batch of 16 updates costs one extra
    payload's worth of writes, not 16 (a full second copy of each segment halved the ingest rate).
    Appends are not synced one by one: ``sync`` writes the open group's parity and makes everything
    appended so far durable (called once per ingest batch, before the SQLite commit that records the
    references). A segment is rotated when its updates have been folded into a published version and
    is then deleted as a whole, with its parity."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._files: list = []  # [segment, parity] while a segment is open
        self._name = ""
        self._group: list[tuple[int, bytes]] = []  # (offset, payload) appended since the last parity record
        self._dirty = False
        self._new = False

    def append(self, data: bytes) -> str:
        """Append one payload; returns its reference (durable only after ``sync``)."""
        if not self._files:
            self._name = f"seg-{time.time_ns()}.log"
            self._files = [open(self.root / self._name, "ab"), open(self.root / (self._name[:-4] + ".par"), "ab")]
            self._new = True
        offset = self._files[0].tell()
        self._files[0].write(data)
        self._group.append((offset, data))
        self._dirty = True
        return f"{self._name}:{offset}:{len(data)}"

    @property
    def open_segment(self) -> str | None:
        """The segment being appended to, if any."""
        return self._name if self._files else None

    def _write_parity(self) -> None:
        import numpy as np

        if not self._group:
            return
        width = max(len(d) for _, d in self._group)
        par = np.zeros(width, np.uint8)
        for _, d in self._group:
            np.bitwise_xor(par[: len(d)], np.frombuffer(d, np.uint8), out=par[: len(d)])
        head = json.dumps(
            {"members": [[off, len(d)] for off, d in self._group], "width": width, "sha256": hashlib.sha256(par.data).hexdigest()}
        ).encode()
        self._files[1].write(len(head).to_bytes(4, "little") + head)
        self._files[1].write(par.data)
        self._group = []

    def sync(self) -> None:
        """Make every append so far durable with its parity (file data, and the directory entries of a
        new segment)."""
        if self._files and self._dirty:
            self._write_parity()
            for f in self._files:
                f.flush()
                os.fdatasync(f.fileno()) if hasattr(os, "fdatasync") else os.fsync(f.fileno())
            self._dirty = False
        if self._new:
            fsync_dir(self.root)
            self._new = False

    def rotate(self) -> None:
        """Start a new segment on the next append."""
        if self._files:
            self.sync()
            for f in self._files:
                f.close()
            self._files = []

    @staticmethod
    def is_ref(ref: str) -> bool:
        """Whether a stored blob reference points into the log (older state dirs used per-update blobs)."""
        return ref.startswith("seg-") and ref.count(":") == 2

    def read(self, ref: str, check=None) -> bytes:
        """The payload a reference points at, checked with ``check`` (a function of the bytes that raises
        on damage); when the segment's bytes are missing, short or fail it, rebuilt from the group's
        parity and its other payloads. OSError when neither gives an intact payload."""
        name, off_s, n_s = ref.split(":")
        if "/" in name or not name.endswith(".log"):
            raise OSError(f"bad update-log reference {ref!r}")
        off, n = int(off_s), int(n_s)
        for f in self._files:
            f.flush()
        try:
            data = self._read_at(name, off, n)
            if check is not None:
                check(data)
            return data
        except Exception as exc:  # noqa: BLE001 - damaged: rebuild from parity
            first = exc
        try:
            data = self._rebuild(name, off, n)
            if check is not None:
                check(data)
        except Exception as exc:  # noqa: BLE001
            raise OSError(
                f"update log {name} at {off}+{n}: damaged ({first}) and not rebuildable from its parity ({exc})"
            ) from None
        return data

    def _read_at(self, name: str, off: int, n: int) -> bytes:
        with open(self.root / name, "rb") as f:
            f.seek(off)
            data = f.read(n)
        if len(data) != n:
            raise OSError(f"{name} is short at {off}+{n}")
        return data

    def _rebuild(self, name: str, off: int, n: int) -> bytes:
        """XOR of the parity record whose group holds (off, n) with the group's other payloads."""
        import numpy as np

        with open(self.root / (name[:-4] + ".par"), "rb") as f:
            while True:
                size = f.read(4)
                if len(size) < 4:
                    raise OSError("no parity record covers it")
                head = json.loads(f.read(int.from_bytes(size, "little")))
                if [off, n] not in head["members"]:
                    f.seek(head["width"], os.SEEK_CUR)
                    continue
                par = bytearray(f.read(head["width"]))
                if len(par) != head["width"] or hashlib.sha256(par).hexdigest() != head["sha256"]:
                    raise OSError("its parity record is damaged too")
                acc = np.frombuffer(par, np.uint8).copy()
                for o, m in head["members"]:
                    if [o, m] != [off, n]:
                        other = np.frombuffer(self._read_at(name, o, m), np.uint8)
                        np.bitwise_xor(acc[:m], other, out=acc[:m])
                return acc[:n].tobytes()

    def segments(self) -> set[str]:
        """Names of the segments on disk (a parity file whose segment is gone counts: a crash between the
        two unlinks of ``delete`` leaves one, and pruning removes it)."""
        return {p.name for p in self.root.glob("seg-*.log")} | {p.stem + ".log" for p in self.root.glob("seg-*.par")}

    def delete(self, name: str) -> None:
        """Delete one segment and its parity."""
        (self.root / name).unlink(missing_ok=True)
        (self.root / (name[:-4] + ".par")).unlink(missing_ok=True)

    def delete_segments(self, refs: list[str]) -> None:
        """Delete the segments these references live in (rotating first if the open one is among them)."""
        names = {r.split(":")[0] for r in refs if self.is_ref(r)}
        if self._name in names:
            self.rotate()
        for name in names:
            self.delete(name)


class Checkpoints:
    """Accumulator checkpoints: raw little-endian float64 files, written once and fsynced; which one
    is current (with its sha256 and description) is recorded in SQLite by the same commit that
    marks the updates it covers."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, flat) -> dict:
        """Write a vector durably under a new name; returns {"file", "sha256", "nbytes"}."""
        import numpy as np

        data = np.ascontiguousarray(flat, dtype="<f8").data.cast("B")
        name = f"ckpt-{time.time_ns()}.f64"
        with open(self.root / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.root)
        return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data)}

    def read(self, rec: dict):
        """The vector a record points at (OSError if missing, short or corrupt)."""
        import numpy as np

        name = rec["file"]
        if "/" in name or not name.endswith(".f64"):
            raise OSError(f"bad checkpoint name {name!r}")
        data = (self.root / name).read_bytes()
        if len(data) != rec["nbytes"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise OSError(f"checkpoint {name} is damaged ({len(data)} bytes, {rec['nbytes']} expected, or hash differs)")
        return np.frombuffer(data, "<f8")

    def prune(self, keep: set[str]) -> None:
        """Delete every checkpoint file not in ``keep`` (superseded ones, or ones whose commit failed)."""
        for p in self.root.glob("ckpt-*.f64"):
            if p.name not in keep:
                p.unlink(missing_ok=True)


class State:
    """All durable coordinator state."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "coordinator.sqlite"
        stored_adapters = sum(1 for _ in (self.dir / "blobs").glob("*/*")) if (self.dir / "blobs").is_dir() else 0
        try:
            self.db = database.connect(path)
            # checked before anything writes: a damaged state is reported, never repaired over
            check = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            if stored_adapters:  # never start again at v0 over a fleet's history
                has = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='versions'").fetchone()
                if not has or not self.db.execute("SELECT COUNT(*) FROM versions").fetchone()[0]:
                    self.db.close()
                    raise StateError(
                        f"{path} records no versions, but {self.dir / 'blobs'} holds {stored_adapters} stored "
                        f"adapter(s): the database was truncated, replaced or deleted. {RECOVERY.format(dir=self.dir)}"
                    )
            database.prepare(self.db, SCHEMA)
        except sqlite3.DatabaseError as exc:
            if getattr(self, "db", None) is not None:
                self.db.close()
            raise StateError(f"{path} is damaged ({exc}). {RECOVERY.format(dir=self.dir)}") from None
        self.blobs = BlobStore(self.dir / "blobs")
        self.log = UpdateLog(self.dir / "updates")
        self.checkpoints = Checkpoints(self.dir / "acc")
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

    def read_update(self, ref: str | None) -> bytes:
        """Payload of a stored accepted update."""
        if not ref or ref == CHECKPOINTED:
            raise OSError(f"update has no stored payload ({ref!r})")
        return self.log.read(ref, check=_intact_update) if UpdateLog.is_ref(ref) else self.blobs.get(ref)

    def set_update_blob(self, update_id: str, ref: str) -> None:
        """Where an accepted update's payload is stored."""
        self._exec("UPDATE updates SET blob=? WHERE update_id=?", (ref, update_id))

    def save_checkpoint(self, flat, meta: dict) -> dict:
        """Inside an ingest transaction: write the accumulator (every accepted update not yet in a
        published version) and mark those updates as covered by it. Two generations are kept, so one
        damaged copy never loses an acknowledged update: the previous checkpoint stays, and the updates
        this one adds keep their payloads in the log (``logref``) until the next checkpoint; a damaged
        newest checkpoint is rebuilt from the previous one plus those payloads. The log is rotated;
        after the commit, ``prune_after_checkpoint`` drops what this supersedes."""
        rec = {**self.checkpoints.write(flat), **meta}
        prev = self.get("acc_checkpoint")
        if prev:
            self.put("acc_checkpoint_prev", prev)
        else:
            self._exec("DELETE FROM kv WHERE key='acc_checkpoint_prev'")
        self.put("acc_checkpoint", rec)
        pending = "status='accepted' AND folded_into IS NULL"
        self._exec(f"UPDATE updates SET logref=NULL WHERE {pending} AND blob=?", (CHECKPOINTED,))  # in both checkpoints now
        self._exec(
            f"UPDATE updates SET logref=blob, blob=?, ckpt=? WHERE {pending} AND blob IS NOT NULL AND blob<>?",
            (CHECKPOINTED, rec["file"], CHECKPOINTED),
        )
        self.log.rotate()
        return rec

    def prune_after_checkpoint(self) -> None:
        """After a checkpoint committed (or at start): checkpoint files other than the newest two and
        log segments no pending update (or its second copy) points into are superseded."""
        rec, prev = self.get("acc_checkpoint"), self.get("acc_checkpoint_prev")
        self.checkpoints.prune({r["file"] for r in (rec, prev) if r})
        live = {
            r[0].split(":")[0]
            for r in self._query(
                "SELECT blob FROM updates WHERE status='accepted' AND folded_into IS NULL "
                "AND blob LIKE 'seg-%' UNION SELECT logref FROM updates WHERE "
                "status='accepted' AND folded_into IS NULL AND logref LIKE 'seg-%'"
            )
        }
        for name in self.log.segments():
            if name not in live and name != self.log.open_segment:
                self.log.delete(name)

    def load_checkpoint(self, previous: bool = False):
        """(vector, record) of the current checkpoint (``previous``: of the one before it), None if
        there is none; OSError if its file is damaged."""
        rec = self.get("acc_checkpoint_prev" if previous else "acc_checkpoint")
        if not rec:
            return None
        return self.checkpoints.read(rec), rec

    def uncovered_log_bytes(self) -> int:
        """Payload bytes of pending accepted updates that no checkpoint covers yet."""
        return self._query(
            "SELECT COALESCE(SUM(bytes), 0) FROM updates WHERE status='accepted' AND folded_into IS NULL "
            "AND blob IS NOT NULL AND blob<>?",
            (CHECKPOINTED,),
        )[0][0]

    def added_by_checkpoint(self, file: str) -> list[tuple]:
        """(update id, payload copy, weight, clip) of the pending updates checkpoint ``file`` was the
        first to cover: what rebuilds it from the previous one."""
        return self._query(
            "SELECT update_id, logref, weight, clip FROM updates WHERE status='accepted' AND folded_into IS NULL "
            "AND blob=? AND ckpt=? ORDER BY received_at, rowid",
            (CHECKPOINTED, file),
        )

    def drop_checkpoint(self) -> None:
        """After a version is published: the checkpoints' updates are in it."""
        self._exec("DELETE FROM kv WHERE key IN ('acc_checkpoint', 'acc_checkpoint_prev')")
        self.checkpoints.prune(set())

    def delete_updates(self, refs: list[str]) -> None:
        """Drop stored payloads that are folded into a published version."""
        self.log.delete_segments(refs)
        for ref in refs:
            if ref and ref != CHECKPOINTED and not UpdateLog.is_ref(ref):
                self.blobs.delete(ref)

    def drop_unreadable(self, update_id: str | None = None) -> int:
        """Accepted updates whose stored payload is lost are rejected as ``corrupt_store``: the one named,
        or (None) every unfolded one only the damaged accumulator checkpoint held."""
        if update_id is not None:
            return self._exec("UPDATE updates SET status='rejected', reason='corrupt_store' WHERE update_id=?", (update_id,))
        return self._exec(
            "UPDATE updates SET status='rejected', reason='corrupt_store' WHERE status='accepted' AND "
            "folded_into IS NULL AND blob=?",
            (CHECKPOINTED,),
        )

    def folded_summary(self, update_ids: list[str]) -> list[tuple[int, int, str]]:
        """(claimed examples, bytes, device id) of these updates."""
        if not update_ids:
            return []
        return self._query(
            f"SELECT num_examples, bytes, device_id FROM updates WHERE update_id IN ({','.join('?' * len(update_ids))})",
            tuple(update_ids),
        )

    def release_payloads(self, update_ids: list[str]) -> list[str]:
        """After a version is stored: the payload references of these (folded) updates and of every
        excluded one, which are then no longer needed (excluded rows forget theirs); delete them with
        ``delete_updates``."""
        refs = (
            [
                b
                for row in self._query(
                    f"SELECT blob, logref FROM updates WHERE update_id IN ({','.join('?' * len(update_ids))})", tuple(update_ids)
                )
                for b in row
                if b
            ]
            if update_ids
            else []
        )
        refs += [b for (b,) in self._query("SELECT blob FROM updates WHERE status='excluded' AND blob IS NOT NULL")]
        self._exec("UPDATE updates SET blob=NULL WHERE status='excluded'")
        return refs

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run a query, return rows."""
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple = ()) -> int:
        """Run a statement, return rowcount."""
        with self.lock:
            return self.db.execute(sql, args).rowcount

    UPDATE_COLUMNS = (
        "update_id",
        "device_id",
        "round",
        "base_version",
        "num_examples",
        "status",
        "reason",
        "detail",
        "received_at",
        "blob",
        "bytes",
        "weight",
        "folded_into",
        "norm",
        "clip",
        "logref",
        "ckpt",
    )

    def update_records(self, device_id: str | None = None) -> list[dict]:
        """Every recorded update (of one device), oldest first, as the ledger holds it: status and reason,
        where its payload lies (``blob``: a log reference, or the checkpoint), its second copy (``logref``)."""
        where, args = ("WHERE device_id=?", (device_id,)) if device_id is not None else ("", ())
        rows = self._query(f"SELECT {','.join(self.UPDATE_COLUMNS)} FROM updates {where} ORDER BY received_at, rowid", args)
        return [dict(zip(self.UPDATE_COLUMNS, r)) for r in rows]

    def get(self, key: str, default=None):
        rows = self._query("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def put(self, key: str, value) -> None:
        self._exec("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    # -- devices --
    def seen_device(self, device_id: str, status: DeviceStatus) -> None:
        """Upsert a device from a status message (or the last will)."""
        msg = status.to_json()
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO devices (device_id, last_seen) VALUES (?, ?)", (device_id, time.time()))
            self.db.execute(
                "UPDATE devices SET state=?, profile=COALESCE(?, profile), base_fingerprint=COALESCE(?, base_fingerprint), "
                "adapter_version=COALESCE(?, adapter_version), global_version=COALESCE(?, global_version), "
                "last_seen=?, info=? WHERE device_id=?",
                (
                    msg.get("state"),
                    msg.get("profile"),
                    msg.get("base_fingerprint"),
                    msg.get("adapter_version"),
                    msg.get("global_version"),
                    time.time(),
                    json.dumps({k: msg.get(k) for k in ("adapter", "activity", "outbox")}),
                    device_id,
                ),
            )

    def count_device(self, device_id: str, accepted: bool) -> None:
        """Count an accepted or rejected update for a device."""
        col = "accepted" if accepted else "rejected"
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO devices (device_id, last_seen) VALUES (?, ?)", (device_id, time.time()))
            self.db.execute(f"UPDATE devices SET {col} = {col} + 1, last_seen=? WHERE device_id=?", (time.time(), device_id))

    def online_devices(self, within_s: float = 120.0) -> list[str]:
        """Devices whose last status said online, seen recently."""
        return [
            r[0]
            for r in self._query(
                "SELECT device_id FROM devices WHERE state='online' AND last_seen > ?", (time.time() - within_s,)
            )
        ]

    def devices(self) -> list[dict]:
        """Fleet registry rows."""
        cols = [
            "device_id",
            "state",
            "profile",
            "base_fingerprint",
            "adapter_version",
            "global_version",
            "last_seen",
            "accepted",
            "rejected",
            "info",
        ]
        return [
            dict(zip(cols, r)) | {"info": json.loads(r[-1] or "{}")}
            for r in self._query(f"SELECT {','.join(cols)} FROM devices ORDER BY device_id")
        ]

    # -- updates --
    def update_outcome(self, update_id: str) -> tuple[str, str | None, str | None] | None:
        """(status, reason, detail) recorded for an update id, None if never seen (dedupe)."""
        rows = self._query("SELECT status, reason, detail FROM updates WHERE update_id=?", (update_id,))
        return tuple(rows[0]) if rows else None

    def record_update(
        self,
        *,
        update_id: str,
        device_id: str,
        round_id: int | None,
        base_version: int,
        num_examples: int,
        status: str,
        reason: str | None,
        detail: str | None,
        blob: str | None,
        nbytes: int,
        weight: float | None,
        norm: float | None = None,
    ) -> bool:
        """Record an update once (False if the id was already recorded). An accepted update recorded
        with weight None is held: it is bounded and folded later (``set_update_bound``)."""
        return (
            self._exec(
                "INSERT OR IGNORE INTO updates VALUES (?,?,?,?,?,?,?,?,?,?,?,?,NULL,?,NULL,NULL,NULL)",
                (
                    update_id,
                    device_id,
                    round_id,
                    base_version,
                    num_examples,
                    status,
                    reason,
                    detail,
                    time.time(),
                    blob,
                    nbytes,
                    weight,
                    norm,
                ),
            )
            == 1
        )

    def set_update_bound(self, update_id: str, weight: float, clip: float) -> None:
        """The weight a held update is folded with and the norm it is clipped to (0: not clipped)."""
        self._exec("UPDATE updates SET weight=?, clip=? WHERE update_id=?", (weight, clip, update_id))

    def exclude_update(self, update_id: str, why: str) -> None:
        """A held update the direction check refused: it counts nothing (its receipt said accepted: it
        was durable and valid; the judgement comes with its batch)."""
        self._exec(
            "UPDATE updates SET status='excluded', reason='direction', detail=?, weight=0 WHERE update_id=?", (why, update_id)
        )

    def pending_accepted(self) -> list[tuple]:
        """(update id, device id, blob, weight, clip, num_examples, norm, base_version) of accepted
        updates not yet folded into a published version (replayed after a restart); weight None: held."""
        return self._query(
            "SELECT update_id, device_id, blob, weight, clip, num_examples, norm, base_version FROM updates "
            "WHERE status='accepted' AND folded_into IS NULL ORDER BY received_at, rowid"
        )

    def influence_reference(self, window: int) -> list[tuple[float, float]]:
        """(claimed examples, norm) of the newest ``window`` accepted, already bounded updates, oldest first."""
        rows = self._query(
            "SELECT num_examples, norm FROM updates WHERE status='accepted' AND norm IS NOT NULL AND weight IS NOT NULL "
            "ORDER BY received_at DESC, rowid DESC LIMIT ?",
            (window,),
        )
        return [(float(c), float(n)) for c, n in reversed(rows)]

    # -- versions --
    def current_version(self) -> int | None:
        """Newest published version, if any."""
        rows = self._query("SELECT MAX(version) FROM versions")
        return rows[0][0]

    def add_version(
        self,
        version: int,
        parent: int | None,
        sha: str,
        *,
        round_id=None,
        strategy="",
        num_updates=0,
        num_examples=0,
        metrics=None,
        note="",
        folded: list[str] | None = None,
    ) -> None:
        """Record a new global version and mark the updates folded into it, atomically."""
        with self.transaction():
            self.db.execute("UPDATE versions SET status='superseded' WHERE status='published'")
            self.db.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    version,
                    parent,
                    sha,
                    time.time(),
                    round_id,
                    strategy,
                    num_updates,
                    num_examples,
                    json.dumps(metrics or {}),
                    "published",
                    note,
                ),
            )
            for uid in folded or []:
                self.db.execute("UPDATE updates SET folded_into=? WHERE update_id=?", (version, uid))

    def store_version(
        self,
        version: int,
        parent: int | None,
        tensors: dict,
        meta: AdapterMeta,
        *,
        strategy: str,
        round_id: int | None = None,
        num_updates: int = 0,
        num_examples: int = 0,
        metrics: dict | None = None,
        note: str = "",
        folded: list[str] | None = None,
    ) -> str:
        """Store an adapter as global ``version`` (its blob, then its row: ``add_version``); its sha256."""
        meta = AdapterMeta(**{**meta.to_json(), "version": version, "parent_version": parent, "metrics": metrics or {}})
        sha = self.blobs.put(adapter_to_bytes(tensors, meta))
        self.add_version(
            version,
            parent,
            sha,
            round_id=round_id,
            strategy=strategy,
            num_updates=num_updates,
            num_examples=num_examples,
            metrics=metrics,
            note=note,
            folded=folded,
        )
        return sha

    def load_version(self, version: int) -> tuple[dict, AdapterMeta]:
        """The adapter stored as ``version`` (KeyError: no such version)."""
        return adapter_from_bytes(self.blobs.get(self.version_sha(version)))

    def epoch(self) -> str:
        """This state's lineage id (made once): pointers and rounds carry it, so a device on another
        lineage (an older state, a forged pointer from before signatures) takes this one's globals
        whatever their version."""
        epoch = self.get("epoch")
        if not epoch:
            import secrets

            epoch = secrets.token_hex(8)
            self.put("epoch", epoch)
        return str(epoch)

    def versions(self) -> list[dict]:
        """Version lineage, newest first."""
        cols = [
            "version",
            "parent",
            "sha256",
            "created_at",
            "round",
            "strategy",
            "num_updates",
            "num_examples",
            "metrics",
            "status",
            "note",
        ]
        return [
            dict(zip(cols, r)) | {"metrics": json.loads(r[8] or "{}")}
            for r in self._query(f"SELECT {','.join(cols)} FROM versions ORDER BY version DESC")
        ]

    def version_sha(self, version: int) -> str:
        rows = self._query("SELECT sha256 FROM versions WHERE version=?", (version,))
        if not rows:
            raise KeyError(version)
        return rows[0][0]

    def version_record(self, version: int) -> dict:
        """One version's parent, blob hash, round and metrics (KeyError if there is none)."""
        rows = self._query("SELECT parent, sha256, round, metrics FROM versions WHERE version=?", (version,))
        if not rows:
            raise KeyError(version)
        parent, sha, rnd, metrics = rows[0]
        return {"parent": parent, "sha256": sha, "round": rnd, "metrics": json.loads(metrics or "{}")}

    def mark_rolled_back(self, after: int, before: int) -> int:
        """Versions strictly between ``after`` and ``before`` are rolled back (a rollback to ``after``
        republished as ``before``)."""
        return self._exec("UPDATE versions SET status='rolled_back' WHERE version > ? AND version < ?", (after, before))

    # -- rounds --
    def open_round(self) -> tuple | None:
        """The newest round still open or extended: (round, base_version, opened_at, deadline, selected
        (decoded), target, quorum), or None."""
        rows = self._query(
            "SELECT round, base_version, opened_at, deadline, selected, target, quorum FROM rounds "
            "WHERE status IN ('open', 'extended') ORDER BY round DESC LIMIT 1"
        )
        if not rows:
            return None
        r = rows[0]
        return (r[0], r[1], r[2], r[3], json.loads(r[4] or "null"), r[5], r[6])

    def last_round(self) -> int:
        """The highest round number recorded (0 before the first)."""
        return self._query("SELECT MAX(round) FROM rounds")[0][0] or 0

    def record_round(
        self, rnd: int, mode: str, base_version: int, opened_at: float, deadline: float, selected, target: int, quorum: int
    ) -> None:
        """A round just opened."""
        self._exec(
            "INSERT INTO rounds (round, mode, base_version, opened_at, deadline, status, selected, target, quorum) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (rnd, mode, base_version, opened_at, deadline, "open", json.dumps(selected), target, quorum),
        )

    def extend_round(self, rnd: int, deadline: float) -> None:
        """A round below quorum at its deadline gets a new one."""
        self._exec("UPDATE rounds SET deadline=?, status='extended' WHERE round=?", (deadline, rnd))

    def close_round(self, rnd: int, version: int, summary: dict) -> None:
        """A round closed with a new version."""
        self._exec(
            "UPDATE rounds SET status='closed', closed_at=?, result_version=?, summary=? WHERE round=?",
            (time.time(), version, json.dumps(summary), rnd),
        )

    def closed_rounds(self) -> int:
        """How many rounds closed with a new version."""
        return self._query("SELECT COUNT(*) FROM rounds WHERE status='closed'")[0][0]

    def rounds(self) -> list[dict]:
        cols = [
            "round",
            "mode",
            "base_version",
            "opened_at",
            "deadline",
            "closed_at",
            "status",
            "selected",
            "target",
            "quorum",
            "result_version",
            "summary",
        ]
        return [
            dict(zip(cols, r)) | {"summary": json.loads(r[-1] or "{}"), "selected": json.loads(r[7] or "null")}
            for r in self._query(f"SELECT {','.join(cols)} FROM rounds ORDER BY round DESC")
        ]

    def updates_by_device(self) -> dict[str, dict[str, int]]:
        """Per device: updates recorded (any outcome) and accepted (counted)."""
        rows = self._query("SELECT device_id, COUNT(*), COALESCE(SUM(status='accepted'), 0) FROM updates GROUP BY device_id")
        return {d: {"recorded": n, "accepted": a} for d, n, a in rows}

    def update_counts(self) -> dict:
        """Accepted/excluded/rejected counts and rejection reasons (excluded: valid and durable, then
        judged by direction with its batch and counted for nothing)."""
        by = dict(self._query("SELECT status, COUNT(*) FROM updates GROUP BY status"))
        reasons = dict(self._query("SELECT reason, COUNT(*) FROM updates WHERE status='rejected' GROUP BY reason"))
        return {
            "accepted": by.get("accepted", 0),
            "excluded": by.get("excluded", 0),
            "rejected": by.get("rejected", 0),
            "reasons": reasons,
        }
