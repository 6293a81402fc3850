"""The adapters a device has served or been offered: which one serves now, the history it can roll
back to, refused candidates kept for inspection, and their files (each checked against the sha256
recorded when it was saved before it serves again)."""
from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Callable

from edge_runtime.engine import Engine
from edge_runtime.errors import BundleError, ConfigError, EdgefmError
from edge_runtime.metrics import Metrics
from edge_runtime.protocol.adapter import AdapterMeta, load_adapter, save_adapter
from edge_runtime.store import Store


class AdapterHistory:
    """The serving adapter (``active_id``) and its history, in ``store`` with files under ``folder``;
    at most ``keep`` served adapters and ``keep_refused`` refused candidates are kept."""

    def __init__(self, engine: Engine, store: Store, folder: Path, *, keep: int, keep_refused: int, metrics: Metrics,
                 on_event: Callable[..., None], in_use: Callable[[], set]):
        self.engine, self.store, self.folder = engine, store, folder
        self.keep, self.keep_refused, self.metrics, self.on_event, self.in_use = keep, keep_refused, metrics, on_event, in_use
        self.fingerprint = engine.manifest.base_fingerprint
        self.swap_lock = threading.Lock()
        self.active_id = "bundle"
        folder.mkdir(parents=True, exist_ok=True)

    def restore(self) -> str:
        """After a restart (or crash): serve the adapter that was serving, else the newest intact one of
        the history (refused candidates were never served: they are not fallbacks), else the bundle's.
        A file whose bytes changed since it was recorded is forgotten with an ``adapter_damaged`` event."""
        active_id = self.store.get("active_adapter")
        history = [e for e in self.store.adapters() if e["kind"] != "refused" or e["id"] == active_id]
        history.sort(key=lambda e: e["id"] != active_id)
        for entry in history:
            try:
                if entry["sha256"] and hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest() != entry["sha256"]:
                    self.on_event("adapter_damaged", id=entry["id"], path=entry["path"],
                                  detail="file differs from the sha256 recorded when it was saved")
                    self.store.forget_adapter(entry["id"])
                    continue
                tensors, meta = load_adapter(entry["path"], expect_fingerprint=self.fingerprint)
                self.engine.set_adapter(self.engine.make_active(tensors, meta))
                self.active_id = entry["id"]
                if entry["id"] != active_id:
                    self.store.put("active_adapter", entry["id"])
                    self.on_event("adapter_fallback", frm=active_id, to=entry["id"])
                return self.active_id
            except (OSError, EdgefmError) as exc:
                self.on_event("adapter_unreadable", id=entry["id"], error=str(exc))
                self.store.forget_adapter(entry["id"])
        self.active_id = "bundle"
        path = self.folder / "bundle.safetensors"
        if not path.exists():
            shutil.copyfile(self.engine.dir / "adapter.safetensors", path)
        self.store.record_adapter("bundle", 0, "bundle", str(path), {})
        self.store.put("active_adapter", "bundle")
        return self.active_id

    def activate(self, adapter_id: str, tensors: dict, meta: AdapterMeta, kind: str, metrics: dict, note: str = "") -> None:
        """Persist an adapter file, record it, and swap it in atomically (between requests)."""
        path = self.folder / f"{adapter_id}.safetensors"
        active = self.engine.make_active(tensors, meta)  # validates before anything changes
        save_adapter(path, tensors, meta)
        with self.swap_lock:
            self.store.record_adapter(adapter_id, meta.version, kind, str(path), metrics, note)
            self.store.put("active_adapter", adapter_id)
            self.engine.set_adapter(active)
            self.active_id = adapter_id
        self.metrics.set("edgefm_adapter_version", meta.version, help="version of the serving adapter")
        self.prune()

    def keep_as_refused(self, adapter_id: str, tensors: dict, meta: AdapterMeta, metrics: dict, reason: str) -> str:
        """Save a candidate the gate refused (bounded), so it can be inspected or activated by hand."""
        path = self.folder / f"{adapter_id}.safetensors"
        save_adapter(path, tensors, meta)
        self.store.record_adapter(adapter_id, meta.version, "refused", str(path), metrics, f"refused by the gate: {reason}")
        self.prune()
        return str(path)

    def prune(self) -> None:
        """Keep the newest ``keep`` served adapters and ``keep_refused`` refused candidates (never the
        serving one; files the agent still needs, ``in_use()``, stay on disk)."""
        entries = self.store.adapters()
        served = [e for e in entries if e["kind"] not in ("bundle", "refused")]
        refused = [e for e in entries if e["kind"] == "refused"]
        in_use = self.in_use()
        for e in served[self.keep:] + refused[self.keep_refused:]:
            if e["id"] == self.active_id:
                continue
            self.store.forget_adapter(e["id"])
            if e["path"] not in in_use:
                Path(e["path"]).unlink(missing_ok=True)

    def rollback(self, to: str | None = None) -> dict:
        """Serve an earlier adapter: ``to`` an id from the history, else the one before the current."""
        entries = self.store.adapters()
        if to is None:  # refused candidates are activated only by name
            entries = [e for e in entries if e["kind"] != "refused" or e["id"] == self.active_id]
        ids = [e["id"] for e in entries]
        if to is None:
            if self.active_id not in ids or ids.index(self.active_id) + 1 >= len(ids):
                raise ConfigError("no earlier adapter to roll back to")
            target = entries[ids.index(self.active_id) + 1]
        else:
            if to not in ids:
                raise ConfigError(f"unknown adapter {to!r}; see `edgefm-agent adapters`")
            target = entries[ids.index(to)]
        try:
            tensors, meta = load_adapter(target["path"], expect_fingerprint=self.fingerprint)
        except OSError as exc:
            raise BundleError(f"adapter {target['id']} cannot be read: {exc}") from None
        active = self.engine.make_active(tensors, meta)
        with self.swap_lock:
            previous = self.active_id
            self.engine.set_adapter(active)
            self.active_id = target["id"]
            self.store.put("active_adapter", target["id"])
            # Move it to the front of the history so a second rollback goes further back, not forward.
            self.store.record_adapter(target["id"], target["version"], target["kind"], target["path"], target["metrics"],
                                      f"rolled back from {previous}")
        self.on_event("rollback", frm=previous, to=target["id"])
        return {"active": target["id"], "previous": previous}
