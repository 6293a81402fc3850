"""MQTT topic names and matching (pure logic, no I/O).

Namespace: ``edgefm/v1/<fleet>/...``. A device publishes only under ``device/<device_id>/`` so a broker
ACL pattern on the username (``pattern write edgefm/v1/+/device/%u/#``) can enforce it.
"""

from __future__ import annotations

import dataclasses

from edge_runtime.protocol.messages import check_id

ROOT = "edgefm"
NAMESPACE_VERSION = "v1"


@dataclasses.dataclass(frozen=True)
class Topics:
    """Topic builder for one fleet."""

    fleet: str = "default"

    def __post_init__(self):
        check_id(self.fleet, "fleet")

    @property
    def base(self) -> str:
        """Namespace prefix of this fleet."""
        return f"{ROOT}/{NAMESPACE_VERSION}/{self.fleet}"

    def device(self, device_id: str, kind: str) -> str:
        """Topic ``device/<id>/<kind>`` (kind: status, update, ack)."""
        check_id(device_id, "device_id")
        return f"{self.base}/device/{device_id}/{kind}"

    def status(self, device_id: str) -> str:
        """Presence/status of a device (retained; last will sets it offline)."""
        return self.device(device_id, "status")

    def update(self, device_id: str) -> str:
        """Adapter updates from a device (QoS 1)."""
        return self.device(device_id, "update")

    def ack(self, device_id: str) -> str:
        """Coordinator's receipts for a device's updates."""
        return self.device(device_id, "ack")

    def all_devices(self, kind: str) -> str:
        """Filter for one kind of message from every device."""
        return f"{self.base}/device/+/{kind}"

    def shared_updates(self, group: str = "coordinators") -> str:
        """MQTT v5 shared subscription for several coordinator workers."""
        return f"$share/{group}/{self.all_devices('update')}"

    @property
    def global_pointer(self) -> str:
        """Retained pointer to the current global adapter."""
        return f"{self.base}/global/pointer"

    def global_chunk(self, version: int, index: int) -> str:
        """One retained chunk of a global adapter version."""
        return f"{self.base}/global/{int(version)}/chunk/{int(index)}"

    def global_chunks(self, version: int) -> str:
        """Filter for every chunk of a version."""
        return f"{self.base}/global/{int(version)}/chunk/+"

    @property
    def round(self) -> str:
        """Retained announcement of the current round."""
        return f"{self.base}/round"

    @property
    def summary(self) -> str:
        """Per-round summaries published by the coordinator."""
        return f"{self.base}/summary"

    def parse_device_topic(self, topic: str) -> tuple[str, str] | None:
        """Return (device_id, kind) for a ``device/<id>/<kind>`` topic of this fleet, else None."""
        prefix = self.base + "/device/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            return None
        return parts[0], parts[1]

    def parse_chunk_topic(self, topic: str) -> tuple[int, int] | None:
        """Return (version, index) for a chunk topic of this fleet, else None."""
        prefix = self.base + "/global/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 3 or parts[1] != "chunk" or not parts[0].isdigit() or not parts[2].isdigit():
            return None
        return int(parts[0]), int(parts[2])


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT topic-filter matching with ``+`` and ``#``, ``$``-topics and shared subscriptions."""
    if filter_.startswith("$share/"):
        parts = filter_.split("/", 2)
        if len(parts) < 3 or not parts[1]:
            return False
        filter_ = parts[2]
    if not filter_ or not topic:
        return False
    fparts = filter_.split("/")
    tparts = topic.split("/")
    # Wildcards at the first level do not match topics starting with '$' (MQTT 4.7.2).
    if tparts[0].startswith("$") and fparts[0] in ("+", "#"):
        return False
    for i, f in enumerate(fparts):
        if f == "#":
            return i == len(fparts) - 1
        if i >= len(tparts):
            return False
        if f == "+":
            continue
        if "+" in f or "#" in f or f != tparts[i]:
            return False
    return len(fparts) == len(tparts)
