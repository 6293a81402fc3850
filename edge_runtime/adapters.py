"""The adapters a device has served or been offered: which one serves now, the history it can roll
back to, refused candidates kept for inspection, and their files (each checked against the sha256
recorded when it was saved before it serves again).

Every candidate (a local session's result, a global from the fleet, one loaded by hand) comes in
through ``offer``: checked against this bundle, judged by the gate, then served or kept as refused.
Bytes from outside are validated in one place, ``parse``."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.engine import Engine
from edge_runtime.errors import BundleError, ConfigError, EdgefmError, ProtocolError
from edge_runtime.evaluation import Evaluator
from edge_runtime.gate import GateDecision
from edge_runtime.metrics import Metrics
from edge_runtime.protocol.adapter import AdapterMeta, adapter_from_bytes, load_adapter, save_adapter
from edge_runtime.store import Store


class AdapterHistory:
    """The serving adapter (``active_id``) and its history, in ``store`` with files under ``folder``;
    at most ``keep`` served adapters and ``keep_refused`` refused candidates are kept."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        folder: Path,
        evaluator: Evaluator,
        *,
        keep: int,
        keep_refused: int,
        metrics: Metrics,
        on_event: Callable[..., None],
        in_use: Callable[[], set],
    ):
        self.engine, self.store, self.folder, self.evaluator = engine, store, folder, evaluator
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
                    self.on_event(
                        "adapter_damaged",
                        id=entry["id"],
                        path=entry["path"],
                        detail="file differs from the sha256 recorded when it was saved",
                    )
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

    def path_of(self, adapter_id: str) -> Path:
        """Where an adapter's file lies."""
        return self.folder / f"{adapter_id}.safetensors"

    def parse(self, blob: bytes) -> tuple[dict[str, np.ndarray], AdapterMeta]:
        """An adapter received from outside, checked against this bundle (fingerprint, tensor names and
        shapes); raises ProtocolError with the reason."""
        manifest = self.engine.manifest
        return adapter_from_bytes(blob, expect_fingerprint=manifest.base_fingerprint, expect_shapes=manifest.adapter.shapes)

    def offer(
        self,
        kind: str,
        adapter_id: str,
        tensors: dict[str, np.ndarray],
        meta: AdapterMeta,
        metrics: dict | None = None,
        note: str = "",
    ) -> tuple[GateDecision, dict]:
        """Judge a candidate against the serving adapter and the base model (edge_runtime/evaluation.py;
        the decision is recorded), then serve it or keep it as refused. Returns the decision and the
        numbers recorded with the adapter."""
        candidate = self.engine.make_active(tensors, meta)  # shapes, alpha, finite values
        gate = self.evaluator.judge(kind, adapter_id, candidate, serving_id=self.active_id, serving=self.engine.adapter)
        metrics = {
            **(metrics or {}),
            "heldout_loss": gate.numbers.get("heldout_candidate"),
            "heldout_loss_before": gate.numbers.get("heldout_current"),
            "gate": gate.reason.value,
        }
        if gate.adopted:
            self.activate(adapter_id, tensors, meta, kind, metrics, note)
        else:
            self.keep_as_refused(adapter_id, tensors, meta, metrics, gate.reason.value)
        return gate, metrics

    def offer_global(self, version: int, blob: bytes) -> tuple[dict[str, np.ndarray], Path] | None:
        """A global adapter from the fleet, offered as ``global-VERSION``; its tensors and file (kept
        whatever the gate says: it is the base of further training), or None when it fails its checks."""
        try:
            tensors, meta = self.parse(blob)
        except ProtocolError as exc:
            self.on_event("global_refused", version=version, reason=exc.reason.value, detail=exc.detail)
            self.metrics.inc("edgefm_global_refused_total", labels={"reason": exc.reason.value}, help="global adapters refused")
            return None
        meta.version = version
        adapter_id = f"global-{version}"
        path = self.path_of(adapter_id)
        save_adapter(path, tensors, meta)
        gate, metrics = self.offer("global", adapter_id, tensors, meta)
        self.on_event(
            "global_adopted" if gate.adopted else "global_not_served",
            version=version,
            **({} if gate.adopted else {"reason": gate.reason.value}),
            **metrics,
        )
        return tensors, path

    def load_external(
        self,
        *,
        version: int,
        adapter: bytes | None = None,
        peft_config: dict | None = None,
        peft_weights: bytes | None = None,
        name: str | None = None,
    ) -> dict:
        """An adapter from outside (edgefm safetensors bytes, or a PEFT LoRA's config and tensors),
        offered like any candidate as ``version``. Returns the id, the decision and its numbers."""
        from edge_runtime.protocol.peft import adapter_from_peft
        from edge_runtime.protocol.tensors import decode_tensors

        try:
            if adapter is not None:
                tensors, meta = self.parse(adapter)
                raw = adapter
            else:
                weights, _ = decode_tensors(peft_weights or b"")
                tensors, meta = adapter_from_peft(peft_config or {}, weights, self.engine.manifest)
                raw = peft_weights or b""
        except ProtocolError as exc:
            raise ConfigError(f"adapter refused: {exc.reason.value}: {exc.detail}") from None
        meta.version = version
        adapter_id = f"loaded-{name or hashlib.sha256(raw).hexdigest()[:12]}"
        try:
            gate, _ = self.offer("loaded", adapter_id, tensors, meta, note="loaded by hand")
        except ProtocolError as exc:  # does not fit this bundle (e.g. another alpha)
            raise ConfigError(f"adapter refused: {exc.reason.value}: {exc.detail}") from None
        self.on_event("adapter_loaded", id=adapter_id, adopted=gate.adopted, reason=gate.reason.value)
        return {
            "id": adapter_id,
            "adopted": gate.adopted,
            "reason": gate.reason.value,
            "numbers": gate.numbers,
            "active": self.active_id,
        }

    def activate(self, adapter_id: str, tensors: dict, meta: AdapterMeta, kind: str, metrics: dict, note: str = "") -> None:
        """Persist an adapter file, record it, and swap it in atomically (between requests)."""
        path = self.path_of(adapter_id)
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
        path = self.path_of(adapter_id)
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
        for e in served[self.keep :] + refused[self.keep_refused :]:
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
            self.store.record_adapter(
                target["id"], target["version"], target["kind"], target["path"], target["metrics"], f"rolled back from {previous}"
            )
        self.on_event("rollback", frm=previous, to=target["id"])
        return {"active": target["id"], "previous": previous}
