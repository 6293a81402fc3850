"""Where this device's training stands in the fleet's history, kept durable in the store.

- the **global** it trains from (version, tensors, file), and the coordinator lineage (``epoch``) that
  global belongs to: a pointer of another lineage is a fleet reset, whatever its version;
- this device's **adopted local result** on that global: the next session continues it while the
  global has not moved, else starts again from the global.

The delta lineage, explicitly: a session starts from ``training_start()`` and its update is
``result - start``, so sessions that continue a local result each send only their own progress and
the coordinator never counts one session twice (edge_runtime/session.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.errors import BundleError, EdgefmError
from edge_runtime.protocol.adapter import load_adapter
from edge_runtime.protocol.messages import GlobalPointer
from edge_runtime.store import Store

Tensors = dict[str, np.ndarray]


class Lineage:
    """The global this device trains from and its local result on it (restored from ``store``)."""

    def __init__(self, store: Store, fingerprint: str, bundle_tensors: Tensors, on_event: Callable[..., None]):
        self.store, self.fingerprint, self.on_event = store, fingerprint, on_event
        self.latest_local: tuple[int, Tensors] | None = None
        latest = store.get("latest_local")
        if latest:
            try:
                self.latest_local = (int(latest["base_version"]), load_adapter(latest["path"], expect_fingerprint=fingerprint)[0])
            except (OSError, EdgefmError, KeyError, TypeError) as exc:
                on_event("local_adapter_unreadable", error=str(exc))
        self.global_version = int(store.get("global_version", 0))
        self.fleet_epoch: str | None = store.get("fleet_epoch")
        self.global_tensors = bundle_tensors
        gpath = store.get("global_path")
        if gpath:
            try:
                want = store.get("global_sha256")
                if want and hashlib.sha256(Path(gpath).read_bytes()).hexdigest() != want:
                    # refetched from the broker: version 0 makes the retained pointer new again
                    raise BundleError(f"{gpath} differs from the sha256 recorded when it was saved")
                self.global_tensors, _ = load_adapter(gpath, expect_fingerprint=fingerprint)
            except (OSError, EdgefmError) as exc:
                on_event("global_adapter_unreadable", path=gpath, error=str(exc))
                self.global_version, self.global_tensors = 0, bundle_tensors

    def wants(self, pointer: GlobalPointer) -> bool:
        """Whether a verified pointer is news: a higher version of this device's lineage, or any version
        of another lineage (the coordinator's signed fleet reset: a new state, a restore from backup,
        recovery from a bad pointer published before signatures)."""
        if pointer.epoch and pointer.epoch != self.fleet_epoch:
            if pointer.version == 0 and self.global_version == 0 and self.fleet_epoch is None:
                self.fleet_epoch = pointer.epoch  # a new device meets its fleet: v0 is the bundle's adapter it has
                self.store.put("fleet_epoch", pointer.epoch)
                return False
            return True
        return pointer.version > self.global_version

    def training_start(self) -> Tensors:
        """Where the next continuing session starts: this device's adopted local result while it sits on
        the current global, else the global."""
        if self.latest_local and self.latest_local[0] == self.global_version:
            return self.latest_local[1]
        return self.global_tensors

    def record_local(self, base_version: int, tensors: Tensors, path: str) -> None:
        """A local result the gate adopted: later sessions on the same global continue it."""
        self.latest_local = (base_version, tensors)
        self.store.put("latest_local", {"base_version": base_version, "path": path})

    def adopt_global(self, pointer: GlobalPointer, tensors: Tensors, path: Path) -> None:
        """A received global becomes the base of further training (whether or not it serves: that is
        what the fleet agreed on; the device's status tells the coordinator which global it trains from).
        A pointer of another lineage resets what this device built on the old one."""
        if pointer.epoch and pointer.epoch != self.fleet_epoch:
            self.on_event(
                "fleet_epoch_changed",
                old=self.fleet_epoch,
                new=pointer.epoch,
                version=pointer.version,
                old_version=self.global_version,
            )
            # versions restart in the new lineage: local results and round sessions are keyed by version
            self.latest_local = None
            self.store.put("latest_local", None)
            self.store.put("round_sessions", [])
            self.fleet_epoch = pointer.epoch
            self.store.put("fleet_epoch", pointer.epoch)
        self.global_version, self.global_tensors = pointer.version, tensors
        self.store.put("global_path", str(path))
        self.store.put("global_sha256", hashlib.sha256(path.read_bytes()).hexdigest())
        self.store.put("global_version", pointer.version)

    def session_done(self, session_key: str) -> None:
        """Remember (durably) that the session for a round announcement ran."""
        self.store.put("round_sessions", (self.sessions_done() + [session_key])[-50:])

    def sessions_done(self) -> list[str]:
        """Round announcements (session keys) this device already answered with a session."""
        return list(self.store.get("round_sessions", []))

    def files_in_use(self) -> set:
        """Adapter files needed whatever the history keeps: the latest local result and the newest global."""
        return {(self.store.get("latest_local") or {}).get("path"), self.store.get("global_path")}
