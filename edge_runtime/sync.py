"""Federated sync of one device: outbox-first updates (QoS 1), status + last will, global adapters by chunks.

Offline-first: nothing here blocks serving. Updates are written to the SQLite outbox before any
send. The broker's PUBACK marks one delivered; it leaves the outbox only on the coordinator's receipt
(``device/<id>/ack``: accepted, rejected or duplicate), because a broker drops a message that no
session had subscribed to yet (a coordinator that never connected). Undelivered updates are sent
again after a reconnect or a restart, delivered ones without a receipt after ``resend_after_s``;
the coordinator deduplicates by update id.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol.messages import (
    ChunkAssembler,
    DeviceStatus,
    GlobalPointer,
    Receipt,
    ReceiptStatus,
    RoundAnnouncement,
    dump_json_message,
    parse_json_message,
)
from edge_runtime.protocol.topics import Topics
from edge_runtime.store import Store
from edge_runtime.transport import MqttLink

log = logging.getLogger(__name__)


class FederatedSync:
    """MQTT side of the agent."""

    def __init__(
        self,
        url: str,
        fleet: str,
        device_id: str,
        store: Store,
        chunk_dir: Path,
        *,
        base_fingerprint: str,
        wants_global: Callable[[GlobalPointer], bool],
        on_global: Callable[[GlobalPointer, bytes], None],
        on_round: Callable[[RoundAnnouncement], None] | None = None,
        status: Callable[[], dict] | None = None,
        metrics=None,
        status_interval_s: float = 10.0,
        resend_after_s: float = 120.0,
        keepalive_s: int = 15,
        coordinator_key: str | None = None,
    ):
        self.topics = Topics(fleet)
        self.device_id = device_id
        self.store = store
        self.chunk_dir = Path(chunk_dir)
        self.base_fingerprint = base_fingerprint
        self.wants_global = wants_global  # whether a (verified) pointer is newer than what the device has
        self.on_global, self.on_round, self.status = on_global, on_round, status or (lambda: {})
        self.metrics = metrics
        from edge_runtime.protocol import signing

        # pinned coordinator key: pointers, rounds and receipts that do not verify are refused
        self.coordinator_key = signing.load_public_key(Path(coordinator_key)) if coordinator_key else None
        self.status_interval_s = status_interval_s
        self.resend_after_s = resend_after_s
        self._inflight: dict[int, str] = {}
        self._lock = threading.Lock()
        self._assembler: ChunkAssembler | None = None
        self._stop = threading.Event()
        self.rejected: list[dict] = []
        will = (
            self.topics.status(device_id),
            dump_json_message(DeviceStatus(state="offline", device_id=device_id).to_json()),
            1,
            True,
        )
        self.link = MqttLink(
            url,
            f"edgefm-{fleet}-{device_id}",
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_published=self._on_published,
            will=will,
            keepalive=keepalive_s,
        )
        self.link.subscribe(self.topics.global_pointer, 1)
        self.link.subscribe(self.topics.round, 1)
        self.link.subscribe(self.topics.ack(device_id), 1)
        self._thread = threading.Thread(target=self._loop, name="edgefm-sync", daemon=True)

    def start(self) -> None:
        """Connect in the background and start the flush/status loop."""
        self.link.start()
        self._thread.start()

    def close(self) -> None:
        """Publish offline status and disconnect."""
        self._stop.set()
        if self.link.connected.is_set():
            self.link.publish(self.topics.status(self.device_id), self._status_payload("offline"), qos=1, retain=True)
            time.sleep(0.1)
        self.link.close()

    @property
    def disconnects(self) -> int:
        """Connections to the broker lost since start."""
        return self.link.disconnects

    @property
    def connected(self) -> bool:
        """Whether the broker is reachable right now."""
        return self.link.connected.is_set()

    # -- outgoing --
    def _status_payload(self, state: str) -> bytes:
        # presence ("online"/"offline") is what the coordinator selects devices by: the agent's own
        # details must not overwrite it
        return dump_json_message(
            DeviceStatus(
                **{
                    **self.status(),
                    "state": state,
                    "device_id": self.device_id,
                    "ts": time.time(),
                    "base_fingerprint": self.base_fingerprint,
                }
            ).to_json()
        )

    def publish_status(self) -> None:
        """Retained presence/status message."""
        self.link.publish(self.topics.status(self.device_id), self._status_payload("online"), qos=1, retain=True)

    def flush(self) -> int:
        """Send every queued update not already in flight; returns how many were handed to paho."""
        if not self.connected:
            return 0
        sent = 0
        for update_id, topic, payload in self.store.pending_updates(self.resend_after_s):
            with self._lock:
                if update_id in self._inflight.values():
                    continue
            mid = self.link.publish(topic, bytes(payload), qos=1)
            if mid is None:
                break
            with self._lock:
                self._inflight[mid] = update_id
            self.store.mark_attempt(update_id)
            sent += 1
        return sent

    def _on_published(self, mid: int) -> None:
        with self._lock:
            update_id = self._inflight.pop(mid, None)
        if update_id:
            self.store.ack_update(update_id)
            if self.metrics:
                self.metrics.inc("edgefm_updates_acknowledged_total", help="updates acknowledged by the broker")

    def _on_connect(self) -> None:
        with self._lock:
            self._inflight.clear()  # resend whatever was unacknowledged before the disconnect
        self.publish_status()
        self.flush()

    def _loop(self) -> None:
        last_status = 0.0
        while not self._stop.wait(0.5):
            if not self.connected:
                continue
            self.flush()
            if time.time() - last_status > self.status_interval_s:
                self.publish_status()
                last_status = time.time()

    # -- incoming --
    def _reject(self, what: str, exc: ProtocolError) -> None:
        log.warning("refused %s: %s", what, exc)
        self.rejected.append({"what": what, "reason": exc.reason.value, "detail": exc.detail, "ts": time.time()})
        del self.rejected[:-50]
        if self.metrics:
            self.metrics.inc("edgefm_rejected_messages_total", labels={"reason": exc.reason.value}, help="refused messages")

    def _verified(self, payload: bytes, what: str) -> dict:
        """A coordinator message, parsed, and checked against the pinned coordinator key when there is one."""
        msg = parse_json_message(payload)
        if self.coordinator_key is not None:
            from edge_runtime.protocol import signing

            signing.verify_message(msg, self.coordinator_key, what)
        return msg

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.topics.global_pointer:
            if not payload:
                return
            try:
                self._verified(payload, "global pointer")
                ptr = GlobalPointer.from_bytes(payload)
            except ProtocolError as exc:
                self._reject("global pointer", exc)
                return
            self._start_fetch(ptr)
        elif topic == self.topics.round:
            if not payload or not self.on_round:
                return
            try:
                self.on_round(RoundAnnouncement.from_json(self._verified(payload, "round announcement")))
            except ProtocolError as exc:
                self._reject("round announcement", exc)
        elif topic == self.topics.ack(self.device_id):
            self._on_receipt(payload)
        else:
            parsed = self.topics.parse_chunk_topic(topic)
            if parsed:
                self._on_chunk(*parsed, payload)

    def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt = Receipt.from_json(self._verified(payload, "receipt"))
            if self.coordinator_key is not None and receipt.device_id != self.device_id:
                raise ProtocolError(RejectReason.BAD_FIELD, "a receipt for another device")
        except ProtocolError as exc:
            self._reject("receipt", exc)
            return
        if not self.store.receipt(receipt.update_id, receipt.status.value, receipt.reason):
            log.info("receipt for unknown update %s ignored", receipt.update_id)
            return
        if receipt.status == ReceiptStatus.REJECTED:
            log.warning("coordinator rejected update %s: %s", receipt.update_id, receipt.reason)
        if self.metrics:
            self.metrics.inc(
                "edgefm_update_receipts_total", labels={"status": receipt.status.value}, help="coordinator receipts by status"
            )

    def _start_fetch(self, ptr: GlobalPointer) -> None:
        if not self.wants_global(ptr):
            return
        if ptr.base_fingerprint != self.base_fingerprint:
            self._reject(
                f"global v{ptr.version}",
                ProtocolError(RejectReason.FINGERPRINT_MISMATCH, "global adapter is for another base model"),
            )
            return
        with self._lock:
            if self._assembler and self._assembler.pointer.epoch == ptr.epoch and self._assembler.pointer.version >= ptr.version:
                return
            # Resume: chunks already verified and saved on disk from an earlier attempt count.
            vdir = self.chunk_dir / f"v{ptr.version}"
            have = {}
            if vdir.is_dir():
                for f in vdir.glob("*.chunk"):
                    have[int(f.stem)] = f.read_bytes()
            try:
                self._assembler = ChunkAssembler(ptr, {})
                for i, c in have.items():
                    try:
                        self._assembler.add(i, c)
                    except ProtocolError:
                        (vdir / f"{i}.chunk").unlink(missing_ok=True)
            except ProtocolError as exc:
                self._reject(f"global v{ptr.version}", exc)
                return
            old = [a for a in self.link.subscriptions() if "/chunk/" in a]
        for topic_filter in old:
            self.link.unsubscribe(topic_filter)
        if self._assembler.complete:
            self._finish()
        else:
            self.link.subscribe(self.topics.global_chunks(ptr.version), 1)

    def _on_chunk(self, version: int, index: int, data: bytes) -> None:
        with self._lock:
            asm = self._assembler
            if asm is None or asm.pointer.version != version or index in asm.chunks:
                return
            try:
                asm.add(index, data)
            except ProtocolError as exc:
                self._reject(f"chunk {index} of v{version}", exc)
                return
            vdir = self.chunk_dir / f"v{version}"
            vdir.mkdir(parents=True, exist_ok=True)
            (vdir / f"{index}.chunk").write_bytes(data)
            done = asm.complete
        if done:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            asm, self._assembler = self._assembler, None
        if asm is None:
            return
        self.link.unsubscribe(self.topics.global_chunks(asm.pointer.version))
        try:
            blob = asm.assemble()
        except ProtocolError as exc:
            self._reject(f"global v{asm.pointer.version}", exc)
            return
        try:
            self.on_global(asm.pointer, blob)
        finally:
            import shutil

            shutil.rmtree(self.chunk_dir / f"v{asm.pointer.version}", ignore_errors=True)
