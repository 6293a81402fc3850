"""Global adapter version lineage (shared by the coordinator and what devices report)."""
from __future__ import annotations

import dataclasses
import enum


class VersionStatus(str, enum.Enum):
    """Lifecycle of a global adapter version."""

    PUBLISHED = "published"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"


@dataclasses.dataclass
class AdapterVersion:
    """One global adapter version: content hash, parent, how it was made, how it did."""

    version: int
    parent: int | None
    sha256: str
    created_at: float
    round: int | None = None
    strategy: str = ""
    num_updates: int = 0
    num_examples: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    status: VersionStatus = VersionStatus.PUBLISHED


def ancestry(versions: dict[int, AdapterVersion], version: int) -> list[int]:
    """Versions from ``version`` back to the root, following parents (cycle-safe)."""
    out: list[int] = []
    seen: set[int] = set()
    cur: int | None = version
    while cur is not None and cur in versions and cur not in seen:
        out.append(cur)
        seen.add(cur)
        cur = versions[cur].parent
    return out
