"""The agent's durable state in SQLite (WAL, synchronous=FULL): examples, the update outbox, adapter history."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import threading
import time
from pathlib import Path

from edge_runtime import database
from edge_runtime.errors import ConfigError, EdgefmError

SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
  id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL, prompt TEXT, label INTEGER,
  split TEXT NOT NULL, source TEXT, sha TEXT UNIQUE, created_at REAL NOT NULL,
  trained INTEGER NOT NULL DEFAULT 0);  -- trained: how many optimizer steps have used this example
CREATE TABLE IF NOT EXISTS decisions (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, candidate TEXT NOT NULL,
  adopted INTEGER NOT NULL, reason TEXT NOT NULL, numbers TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
  update_id TEXT PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, created_at REAL NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, base_version INTEGER, delivered_at REAL);
CREATE TABLE IF NOT EXISTS sent (update_id TEXT PRIMARY KEY, acked_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (update_id TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT, received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
  id TEXT PRIMARY KEY, version INTEGER NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, created_at REAL NOT NULL,
  metrics TEXT NOT NULL DEFAULT '{}', note TEXT NOT NULL DEFAULT '', sha256 TEXT);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def choose_split(sha: str, *, heldout_fraction: float, n_train: int, n_heldout: int, min_heldout: int = 0) -> str:
    """Where a new example goes: held out when its content hash falls in ``heldout_fraction`` (stable across
    restarts and re-sends), or while the held-out slice is below ``min_heldout`` and the training split
    already has four examples per held-out one (so a small store still gives the gate something to judge)."""
    if int(sha[:8], 16) / 0xFFFFFFFF < heldout_fraction:
        return "heldout"
    if n_heldout < min_heldout and n_train >= 4 * (n_heldout + 1):
        return "heldout"
    return "train"


class DiskGuard:
    """Free disk in the data dir: below ``min_free_mb`` data intake and training pause (``reason``
    says why, for status); inference continues."""

    def __init__(self, folder: Path, min_free_mb: float, metrics=None):
        self.folder, self.min_free_mb, self.metrics = folder, min_free_mb, metrics
        self.reason: str | None = None

    def ok(self) -> bool:
        free_mb = shutil.disk_usage(self.folder).free / 2**20
        if self.metrics is not None:
            self.metrics.set("edgefm_disk_free_mb", free_mb, help="free disk space in the data dir")
        if free_mb < self.min_free_mb:
            self.reason = f"disk nearly full: {free_mb:.0f} MB free < {self.min_free_mb:.0f} MB; training and data intake paused"
            return False
        self.reason = None
        return True


class StoreFull(EdgefmError):
    """The data quota or the disk is full: intake pauses (inference continues)."""


class Store:
    """Thread-safe wrapper over one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        max_examples: int = 100_000,
        heldout_fraction: float = 0.1,
        min_heldout: int = 0,
        max_evictions_per_hour: int | None = None,
        max_source_share: float = 1.0,
        seed: int = 0,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = database.prepare(database.connect(self.path), SCHEMA)
        self.lock = threading.RLock()
        self.max_examples = max_examples
        # a flood of junk may rotate out at most this many trained-on examples per hour (default 10% of the store)
        self.max_evictions_per_hour = max(0, max_examples // 10) if max_evictions_per_hour is None else max_evictions_per_hour
        # each source's quota (an API token's name, the inbox): a full store evicts a source's examples for
        # another source only while it holds more than this (max_source_share of max_examples)
        self.source_quota = max(1, int(max_examples * max_source_share))
        self.heldout_fraction = heldout_fraction
        self.min_heldout = min_heldout
        self._rng = random.Random(seed)

    # -- key/value --
    def get(self, key: str, default=None):
        """Read a JSON value."""
        with self.lock:
            row = self.db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, key: str, value) -> None:
        """Write a JSON value."""
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    # -- examples --
    def add_examples(self, items: list[dict], source: str = "api") -> dict:
        """Store examples ({text} or {prompt, completion} or {text, label}) from ``source``; duplicates are skipped.

        Every ~1/heldout_fraction-th example goes to the held-out split (chosen by content hash, so the
        split is stable across restarts), and more while the slice is below ``min_heldout`` (see
        ``choose_split``); the result says how many went to each split. Room is made only from
        training examples *already trained on*, oldest first, at most ``max_evictions_per_hour`` of
        them per rolling hour; a source over its quota (``max_source_share`` of ``max_examples``)
        makes room from its own examples only, and no source's examples under its quota are evicted
        for another (see ``_make_room``). A request that needs more is refused whole (``StoreFull``,
        nothing stored), so junk sent to the API can never wash out the data a device has (unused
        examples and the held-out slice are never evicted)."""
        added = dup = 0
        to_split = {"train": 0, "heldout": 0}
        now = time.time()
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                counts = dict(self.db.execute("SELECT split, COUNT(*) FROM examples GROUP BY split").fetchall())
                n_train, n_heldout = counts.get("train", 0), counts.get("heldout", 0)
                for it in items:
                    text, prompt, label = it.get("text"), it.get("prompt"), it.get("label")
                    if prompt is not None:
                        text = str(prompt) + str(it.get("completion", ""))
                    if not isinstance(text, str) or not text.strip():
                        raise ConfigError("each example needs a non-empty 'text' (or 'prompt' + 'completion')")
                    if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
                        raise ConfigError("'label' must be a non-negative integer")
                    sha = hashlib.sha256(json.dumps([text, prompt, label]).encode()).hexdigest()
                    split = choose_split(
                        sha,
                        heldout_fraction=self.heldout_fraction,
                        n_train=n_train,
                        n_heldout=n_heldout,
                        min_heldout=self.min_heldout,
                    )
                    cur = self.db.execute(
                        "INSERT OR IGNORE INTO examples (text, prompt, label, split, source, sha, created_at) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (text, prompt, label, split, source, sha, now),
                    )
                    added += cur.rowcount
                    dup += 1 - cur.rowcount
                    to_split[split] += cur.rowcount
                    n_train, n_heldout = (
                        n_train + (split == "train") * cur.rowcount,
                        n_heldout + (split == "heldout") * cur.rowcount,
                    )
                evicted = self._make_room(source, added, now)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return {
            "added": added,
            "duplicates": dup,
            "evicted": evicted,
            "train": to_split["train"],
            "heldout": to_split["heldout"],
            "source": source,
        }

    def _make_room(self, source: str, added: int, now: float) -> int:
        """Evict what a full store needs for ``added`` new examples of ``source`` (inside add_examples'
        transaction), or raise StoreFull. Only training examples already trained on go, oldest first,
        within the hourly budget: from ``source`` itself while it holds more than its quota, else from
        other sources over their quota, never below it (a source's data under its quota is protected)."""
        q = self.db.execute
        total = q("SELECT COUNT(*) FROM examples").fetchone()[0]
        need = min(added, total - self.max_examples)
        if need <= 0:
            return 0
        counts = dict(q("SELECT COALESCE(source, ''), COUNT(*) FROM examples GROUP BY 1").fetchall())
        recent = [
            e for e in json.loads((q("SELECT value FROM kv WHERE key='evictions'").fetchone() or ["[]"])[0]) if e[0] > now - 3600
        ]
        budget = max(0, self.max_evictions_per_hour - sum(c for _, c in recent))
        if self.source_quota >= self.max_examples:  # no quotas: anyone's trained-on examples
            from_sources = dict(counts)
        elif counts.get(source, 0) > self.source_quota:
            from_sources = {source: counts[source] - self.source_quota}
        else:
            from_sources = {s: c - self.source_quota for s, c in counts.items() if s != source and c > self.source_quota}
        ids: list[tuple[int, str]] = []
        for s, room in from_sources.items():
            ids += q(
                "SELECT id, COALESCE(source, '') FROM examples WHERE split='train' AND trained>0 AND created_at < ? "
                "AND COALESCE(source, '')=? ORDER BY id LIMIT ?",
                (now, s, min(room, need)),
            ).fetchall()
        ids.sort()
        if need > min(budget, len(ids)):
            if self.source_quota >= self.max_examples:
                whose = "any source's examples"
            elif source in from_sources:
                whose = f"source {source!r} holds more than its quota ({self.source_quota}: max_source_share of max_examples), so only its own"
            else:
                whose = f"examples of other sources under their quota ({self.source_quota}) are protected, so only theirs over it"
            raise StoreFull(
                f"example store full ({total - added} of max_examples {self.max_examples}): these {added} new examples "
                f"would need {need} older ones evicted; {whose} may make room, and only ones already trained on, at most "
                f"{self.max_evictions_per_hour} per hour ({min(budget, len(ids))} now). Nothing was stored; send fewer, "
                f"retry after the next training session or in an hour, or raise max_examples"
            )
        gone = [i for i, _ in ids[:need]]
        evicted = q(f"DELETE FROM examples WHERE id IN ({','.join('?' * len(gone))})", gone).rowcount
        q("INSERT OR REPLACE INTO kv VALUES ('evictions', ?)", (json.dumps(recent + [[now, evicted]]),))
        return evicted

    def count_examples(self) -> dict:
        """Counts by split, training examples not yet trained on, and examples by source (each source's
        quota is ``source_quota``)."""
        with self.lock:
            rows = dict(self.db.execute("SELECT split, COUNT(*) FROM examples GROUP BY split").fetchall())
            new = self.db.execute("SELECT COUNT(*) FROM examples WHERE split='train' AND trained=0").fetchone()[0]
            sources = dict(self.db.execute("SELECT COALESCE(source, ''), COUNT(*) FROM examples GROUP BY 1").fetchall())
        return {
            "train": rows.get("train", 0),
            "heldout": rows.get("heldout", 0),
            "new": new,
            "by_source": sources,
            "source_quota": self.source_quota,
        }

    def training_batch(self, n: int, replay_fraction: float = 0.25) -> list[dict]:
        """``n`` distinct training examples: never-used ones first (oldest first) until each has been seen,
        with a ``replay_fraction`` of already-used ones mixed in so new data does not erase older skills;
        once every example has been used, epochs over the whole set (least-used first, random among ties)."""
        cols = "id, text, prompt, label"
        with self.lock:
            any_used = self.db.execute("SELECT 1 FROM examples WHERE split='train' AND trained>0 LIMIT 1").fetchone()
            n_replay = int(round(n * replay_fraction)) if any_used else 0
            rows = self.db.execute(
                f"SELECT {cols} FROM examples WHERE split='train' AND trained=0 ORDER BY id LIMIT ?", (n - n_replay,)
            ).fetchall()
            taken = [r[0] for r in rows]
            marks = ",".join("?" * len(taken))
            rows += self.db.execute(
                f"SELECT {cols} FROM examples WHERE split='train' AND id NOT IN ({marks}) ORDER BY trained, RANDOM() LIMIT ?",
                (*taken, n - len(rows)),
            ).fetchall()
        return [{"id": r[0], "text": r[1], "prompt": r[2], "label": r[3]} for r in rows]

    def mark_trained(self, ids: list[int]) -> None:
        """Count one use of each of these examples (called after every optimizer step)."""
        with self.lock:
            self.db.executemany("UPDATE examples SET trained=trained+1 WHERE id=?", [(i,) for i in ids])

    def training_coverage(self) -> dict:
        """How often the training split has been used: examples never used, least and most uses."""
        with self.lock:
            r = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(trained=0),0), MIN(trained), MAX(trained) FROM examples WHERE split='train'"
            ).fetchone()
        return {"examples": r[0], "never_used": r[1], "min_uses": r[2] or 0, "max_uses": r[3] or 0}

    def heldout(self, limit: int = 64) -> list[dict]:
        """The held-out slice for local evaluation (stable order)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT id, text, prompt, label FROM examples WHERE split='heldout' ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [{"id": r[0], "text": r[1], "prompt": r[2], "label": r[3]} for r in rows]

    def apply_retention(self, max_age_s: float) -> int:
        """Delete training examples older than ``max_age_s`` that were already trained on."""
        with self.lock:
            return self.db.execute(
                "DELETE FROM examples WHERE split='train' AND trained>0 AND created_at < ?", (time.time() - max_age_s,)
            ).rowcount

    def heldout_split(self) -> list[dict]:
        """Every held-out example (what was held back from training for the gate)."""
        return self.heldout(limit=-1)

    # -- gate decisions --
    def record_decision(self, kind: str, candidate: str, adopted: bool, reason: str, numbers: dict) -> None:
        """Remember one gate decision with the numbers it was made on."""
        with self.lock:
            self.db.execute(
                "INSERT INTO decisions (ts, kind, candidate, adopted, reason, numbers) VALUES (?,?,?,?,?,?)",
                (time.time(), kind, candidate, int(adopted), reason, json.dumps(numbers)),
            )
            self.db.execute("DELETE FROM decisions WHERE id <= (SELECT MAX(id) FROM decisions) - 1000")

    def decisions(self, limit: int = 50) -> list[dict]:
        """Gate decisions, newest first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT ts, kind, candidate, adopted, reason, numbers FROM decisions ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [
            {"ts": r[0], "kind": r[1], "candidate": r[2], "adopted": bool(r[3]), "reason": r[4], "numbers": json.loads(r[5])}
            for r in rows
        ]

    # -- outbox --
    def enqueue_update(self, update_id: str, topic: str, payload: bytes, base_version: int) -> None:
        """Persist an update before any attempt to send it."""
        with self.lock:
            self.db.execute(
                "INSERT OR IGNORE INTO outbox VALUES (?,?,?,?,0,?,NULL)", (update_id, topic, payload, time.time(), base_version)
            )

    def pending_updates(self, resend_after_s: float | None = None) -> list[tuple[str, str, bytes]]:
        """Updates to send, oldest first: never acknowledged by the broker, or acknowledged more than
        ``resend_after_s`` ago without a receipt from the coordinator (None: never resend those)."""
        with self.lock:
            if resend_after_s is None:
                return self.db.execute(
                    "SELECT update_id, topic, payload FROM outbox WHERE delivered_at IS NULL ORDER BY created_at"
                ).fetchall()
            return self.db.execute(
                "SELECT update_id, topic, payload FROM outbox WHERE delivered_at IS NULL OR delivered_at < ? ORDER BY created_at",
                (time.time() - resend_after_s,),
            ).fetchall()

    def mark_attempt(self, update_id: str) -> None:
        """Count a send attempt."""
        with self.lock:
            self.db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE update_id=?", (update_id,))

    def ack_update(self, update_id: str) -> None:
        """The broker acknowledged (PUBACK): remember it was delivered; the update stays in the outbox
        until the coordinator's receipt (a broker may drop a message nobody had subscribed to yet)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE outbox SET delivered_at=? WHERE update_id=?", (time.time(), update_id))
            self.db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?)", (update_id, time.time()))
            self.db.execute("COMMIT")

    def receipt(self, update_id: str, status: str, reason: str | None) -> bool:
        """The coordinator recorded this update (accepted, rejected or duplicate): it leaves the outbox.
        Returns False for an update this device does not know."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            known = (
                self.db.execute("DELETE FROM outbox WHERE update_id=?", (update_id,)).rowcount == 1
                or self.db.execute("SELECT 1 FROM sent WHERE update_id=?", (update_id,)).fetchone() is not None
            )
            if known:
                self.db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?)", (update_id, time.time()))
                # a "duplicate" receipt (the same update arrived twice) never overwrites what the first one said
                verb = "INSERT OR IGNORE" if status == "duplicate" else "INSERT OR REPLACE"
                self.db.execute(f"{verb} INTO receipts VALUES (?,?,?,?)", (update_id, status, reason, time.time()))
            self.db.execute("COMMIT")
            return known

    def outbox_stats(self) -> dict:
        """queued: not yet acknowledged by the broker; awaiting_receipt: acknowledged, not yet confirmed
        by the coordinator; acknowledged: ever acknowledged; receipts: confirmed by the coordinator."""
        with self.lock:
            q = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)),0) FROM outbox WHERE delivered_at IS NULL"
            ).fetchone()
            w = self.db.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NOT NULL").fetchone()[0]
            s = self.db.execute("SELECT COUNT(*) FROM sent").fetchone()[0]
            r = dict(self.db.execute("SELECT status, COUNT(*) FROM receipts GROUP BY status").fetchall())
        return {"queued": q[0], "queued_bytes": q[1], "awaiting_receipt": w, "acknowledged": s, "receipts": r}

    # -- adapter history --
    def record_adapter(self, adapter_id: str, version: int, kind: str, path: str, metrics: dict, note: str = "") -> None:
        """Remember an adapter file the agent may serve or roll back to, with the sha256 of its bytes now
        (checked before the file is served again)."""
        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        with self.lock:
            self.db.execute(
                "INSERT OR REPLACE INTO adapters VALUES (?,?,?,?,?,?,?,?)",
                (adapter_id, version, kind, path, time.time(), json.dumps(metrics), note, sha),
            )

    def adapters(self) -> list[dict]:
        """Adapter history, newest first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT id, version, kind, path, created_at, metrics, note, sha256 FROM adapters "
                "ORDER BY created_at DESC, rowid DESC"
            ).fetchall()
        return [
            {
                "id": r[0],
                "version": r[1],
                "kind": r[2],
                "path": r[3],
                "created_at": r[4],
                "metrics": json.loads(r[5]),
                "note": r[6],
                "sha256": r[7],
            }
            for r in rows
        ]

    def forget_adapter(self, adapter_id: str) -> None:
        """Drop one adapter from the history."""
        with self.lock:
            self.db.execute("DELETE FROM adapters WHERE id=?", (adapter_id,))
