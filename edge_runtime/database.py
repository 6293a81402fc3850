"""SQLite as both the agent's store and the coordinator's ledger open it: one connection shared by
threads (callers hold their own lock), autocommit with explicit transactions, write-ahead log with
full sync (a committed row survives power loss), and the schema created when missing."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: Path) -> sqlite3.Connection:
    """A connection to ``path`` (created if missing); nothing written yet."""
    return sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)


def prepare(db: sqlite3.Connection, schema: str) -> sqlite3.Connection:
    """WAL + full sync, and ``schema`` (``CREATE ... IF NOT EXISTS`` statements) applied."""
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db
