"""What the coordinator tells the fleet: global adapters (retained chunks + signed pointer), round
announcements, per-update receipts and round summaries. Every JSON message is signed with the
coordinator's Ed25519 key when it has one (agents with its public key accept nothing else).

The link may be absent (an offline coordinator, admin commands on a state folder): then nothing is
sent and every method returns quietly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from coordinator.ingest import Accepted, Outcome
from coordinator.rounds import RoundPlan
from coordinator.state import State
from edge_runtime.protocol.messages import Receipt, RoundAnnouncement, RoundMode, dump_json_message, make_pointer
from edge_runtime.protocol.topics import Topics

if TYPE_CHECKING:
    from edge_runtime.transport import Link

log = logging.getLogger("edgefm.coordinator")


class Publisher:
    """Publishes to one fleet's topics over ``link`` (set once connected)."""

    def __init__(
        self,
        topics: Topics,
        state: State,
        *,
        fingerprint: str,
        epoch: str,
        signer: Any = None,
        chunk_size: int,
        keep_versions: int,
    ):
        self.topics, self.state, self.fingerprint, self.epoch, self.signer = topics, state, fingerprint, epoch, signer
        self.chunk_size, self.keep_versions = chunk_size, keep_versions
        self.link: Link | None = None

    def message(self, obj: dict) -> bytes:
        """A JSON message for the fleet, signed when the coordinator has a key."""
        return dump_json_message(obj, self.signer)

    def global_version(self, version: int) -> None:
        """Retained chunks first, then the retained pointer; the chunk sets of versions older than
        ``keep_versions`` are cleared (an empty retained message deletes a retained chunk)."""
        if not self.link:
            return
        rec = self.state.version_record(version)
        blob = self.state.blobs.get(rec["sha256"])
        ptr, chunks = make_pointer(
            version,
            rec["parent"],
            self.fingerprint,
            blob,
            chunk_size=self.chunk_size,
            round=rec["round"],
            metrics={k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float))},
            epoch=self.epoch,
        )
        for i, c in enumerate(chunks):
            self.link.publish(self.topics.global_chunk(version, i), c, qos=1, retain=True)
        self.link.publish(self.topics.global_pointer, self.message(ptr.to_json()), qos=1, retain=True)
        old = version - self.keep_versions
        if old < 0:
            return
        try:
            prev = self.state.version_sha(old)
        except KeyError:
            return
        for i in range(-(-len(self.state.blobs.get(prev)) // self.chunk_size)):
            self.link.publish(self.topics.global_chunk(old, i), b"", qos=1, retain=True)

    def round(self, *, mode: str, base_version: int, train_a: bool, plan: RoundPlan | None) -> None:
        """Announce (retained) the open sync round, or (``plan`` None) that async updates on
        ``base_version`` are welcome."""
        if plan is not None:
            msg = RoundAnnouncement(
                RoundMode(mode),
                plan.round,
                base_version,
                None if plan.selected is None else tuple(plan.selected),
                plan.deadline,
                train_a,
                self.epoch,
            )
        else:
            msg = RoundAnnouncement(RoundMode(mode), base_version, base_version, None, None, train_a, self.epoch)
        if self.link:
            self.link.publish(self.topics.round, self.message(msg.to_json()), qos=1, retain=True)

    def receipts(self, receipts: list[tuple[str, Outcome]], version: int) -> None:
        """After the commit: tell each device its update is recorded, so it can drop it from its outbox.
        Updates without a readable id get none (they resend until ``resend_after_s`` and are refused again)."""
        if not self.link:
            return
        for device_id, res in receipts:
            if res.update_id.startswith("unparsed-"):
                continue
            reason = None if isinstance(res, Accepted) else res.reason.value
            receipt = Receipt(res.update_id, res.receipt, reason, version, device_id)
            self.link.publish(self.topics.ack(device_id), self.message(receipt.to_json()), qos=1)

    def summary(self, round_id: int | None, version: int, participants: list[str], metrics: dict) -> None:
        """What a new version was made of (not retained)."""
        if self.link:
            self.link.publish(
                self.topics.summary,
                self.message({"kind": "summary", "round": round_id, "version": version, "participants": participants, **metrics}),
                qos=1,
            )
