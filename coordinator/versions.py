"""The published lineage of global adapters: the current version and its tensors. Version 0 is the
bundle's own adapter; every later one (an aggregate, a manual publish, a rollback) is the next number,
stored in the ledger before anything is sent, so the lineage only moves forward."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from coordinator.aggregation import AggregateResult
from coordinator.publisher import Publisher
from coordinator.state import State
from edge_runtime.errors import BundleError, ConfigError, StateError
from edge_runtime.protocol.adapter import adapter_from_bytes


class Versions:
    """The current global (``current``, ``tensors``, ``meta``) of one coordinator's state."""

    def __init__(self, state: State, publisher: Publisher, bundle: Path, fingerprint: str, strategy: str):
        self.state, self.publisher, self.strategy = state, publisher, strategy
        if state.current_version() is None:
            path = Path(bundle) / "adapter.safetensors"
            if not path.is_file():
                raise BundleError(f"{bundle}: the coordinator needs the bundle's adapter.safetensors")
            tensors, meta = adapter_from_bytes(path.read_bytes(), expect_fingerprint=fingerprint)
            state.store_version(0, None, tensors, meta, strategy=strategy, note="initial adapter from the bundle")
        current = state.current_version()
        if current is None:  # stored just above when missing
            raise StateError(f"{state.dir}: no version recorded")
        self.current: int = current
        self.tensors, self.meta = state.load_version(current)

    def add(
        self,
        tensors: dict[str, np.ndarray],
        *,
        note: str = "",
        round_id: int | None = None,
        result: AggregateResult | None = None,
        save_extra: Callable[[int], str | None] | None = None,
    ) -> int:
        """Store ``tensors`` as the next version (an aggregate's ``result`` records what it folded; ``save_extra``
        stores what belongs with it in the same transaction, e.g. the server optimizer state, and returns a
        blob it supersedes); it becomes current. Not yet sent: ``publish``."""
        version = self.current + 1
        with self.state.transaction():
            self.state.store_version(
                version,
                self.current,
                tensors,
                self.meta,
                strategy=self.strategy,
                round_id=round_id,
                num_updates=len(result.folded_ids) if result else 0,
                num_examples=result.metrics["num_examples"] if result else 0,
                metrics=result.metrics if result else None,
                note=note,
                folded=result.folded_ids if result else None,
            )
            superseded = save_extra(version) if save_extra else None
        if superseded:
            self.state.blobs.delete(superseded)
        self.current, self.tensors = version, tensors
        return version

    def load(self, version: int) -> dict[str, np.ndarray]:
        """The tensors of a stored version (ConfigError names the command that lists them)."""
        try:
            return self.state.load_version(version)[0]
        except KeyError:
            raise ConfigError(f"no version {version}; see `edgefm-coordinator adapters`") from None

    def publish(self, version: int | None = None) -> None:
        """Send a stored version (default: the current) to the fleet: retained chunks, then the signed pointer."""
        self.publisher.global_version(self.current if version is None else version)
