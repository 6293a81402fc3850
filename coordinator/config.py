"""Coordinator configuration (TOML file and/or flags), validated on load."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from edge_runtime.errors import ConfigError


@dataclasses.dataclass
class CoordinatorConfig:
    """Every coordinator setting; a TOML file uses the same keys."""

    bundle: str = ""  # the bundle (or just its manifest + adapter) devices run: initial adapter v0
    state_dir: str = "./edgefm-coordinator"
    broker: str | None = None  # None: start an embedded broker (mosquitto child process)
    insecure: bool = False  # accept a broker beyond loopback without TLS and credentials
    fleet: str = "default"
    mode: Literal["sync", "async"] = "sync"
    strategy: str = "fedavg"
    server_lr: float | None = None  # None: the strategy's own default (see coordinator/strategies.py)
    server_optimizer: str | None = None  # fedavg|fedavgm|fedadam|fedyogi after any averaging rule (None: the strategy's)
    devices_per_round: int = 0  # 0: every online device
    over_selection: float = 0.3
    min_updates: int = 1  # quorum to close a round at its deadline
    round_timeout_s: float = 120.0
    max_rounds: int = 0  # 0: run forever
    buffer_size: int = 4  # async: publish a version every N updates
    max_staleness: int = 4
    staleness_exponent: float = 0.5
    clip_norm: float = 0.0  # 0: off; else clip each update to this L2 norm before folding
    # bounded influence (coordinator/influence.py): against the fleet's recent accepted updates
    max_examples_per_update: int = 100_000  # hard cap on the examples one update may claim
    examples_multiple: float = 1.0  # an update counts at most this multiple of the median claim (0: off)
    norm_multiple: float = 1.5  # clip each update to this multiple of the median norm (0: off)
    influence_window: int = 64  # recent accepted updates the medians are taken over
    judge_batch: int = 16  # updates are held and judged together in batches this large (or when a version is due)
    direction_share: float = 0.25  # exclude an update whose cosine with the batch's median direction is below
    # this share of the batch's median cosine (0: off)
    max_update_norm: float = 1e4  # reject updates above this L2 norm
    max_update_bytes: int = 64 * 1024 * 1024
    ingest_batch: int = 16  # updates made durable together (one log sync + one commit), then acked
    trim: int = 1  # trimmed_mean
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    keep_versions: int = 10  # retained chunk sets on the broker
    chunk_size: int = 256 * 1024
    sign_key: str | None = None  # require HMAC-signed updates (runtime only)
    signing_key: str | None = None  # Ed25519 key (provision: coordinator/signing.key): signs globals, rounds, receipts
    device_keys: str | None = None  # fleet.json (provision): only updates signed by their registered device count
    keep_large_buffers: bool = True  # glibc: reuse multi-MB message buffers (edge_runtime.memory), ~4x cheaper receive
    seed: int = 0

    def __post_init__(self):
        from coordinator.strategies import STRATEGIES
        from edge_runtime.transport import require_secure_broker

        require_secure_broker(
            self.broker, self.insecure, "coordinator", [k for k in ("signing_key", "device_keys") if not getattr(self, k)]
        )
        if self.mode not in ("sync", "async"):
            raise ConfigError("mode must be 'sync' or 'async'")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {sorted(STRATEGIES)}")
        if self.min_updates < 1 or self.buffer_size < 1 or self.round_timeout_s <= 0:
            raise ConfigError("min_updates and buffer_size must be >= 1 and round_timeout_s > 0")
        if self.strategy == "dp_fedavg" and self.dp_noise_multiplier <= 0:
            raise ConfigError("dp_fedavg needs dp_noise_multiplier > 0 (e.g. 1.0)")
        if self.ingest_batch < 1:
            raise ConfigError("ingest_batch must be >= 1")
        if self.server_lr is not None and not self.server_lr > 0:
            raise ConfigError("server_lr must be > 0 (or left out for the strategy's default)")
        try:
            self.influence_policy()
        except ValueError as exc:
            raise ConfigError(f"bounded influence: {exc}") from None
        if self.server_optimizer is not None:
            from coordinator.aggregate import SERVER_OPTIMIZERS

            if self.server_optimizer not in SERVER_OPTIMIZERS:
                raise ConfigError(
                    f"unknown server_optimizer {self.server_optimizer!r}; choose one of {sorted(SERVER_OPTIMIZERS)}"
                )
            if self.strategy in ("svd", "frozen_a", "dp_fedavg"):
                raise ConfigError(f"the {self.strategy} strategy applies its own update; leave server_optimizer out")
        if self.chunk_size < 1024:
            raise ConfigError("chunk_size must be at least 1024 bytes")

    def make_strategy(self, rank: int):
        """The aggregation strategy this config names, with its settings (coordinator/strategies.py)."""
        from coordinator.strategies import StrategyConfig, make_strategy

        settings = StrategyConfig(
            server_lr=self.server_lr,
            server_opt=self.server_optimizer,
            rank=rank,
            trim=self.trim,
            dp_noise_multiplier=self.dp_noise_multiplier,
            dp_clip=self.dp_clip,
            dp_delta=self.dp_delta,
            seed=self.seed,
        )
        return make_strategy(self.strategy, settings)

    def limits(self, fingerprint: str, shapes: dict[str, tuple[int, ...]]):
        """What every update is validated against (coordinator/validate.py): this bundle's base and LoRA
        slots, the size and norm bounds, the HMAC key and the devices' signing keys."""
        from coordinator.validate import Limits
        from edge_runtime.protocol import signing

        keys = signing.device_keys(self.device_keys) if self.device_keys else None
        return Limits(fingerprint, shapes, self.max_update_bytes, self.max_update_norm, self.sign_key, keys)

    def influence_policy(self):
        """The bounds every accepted update is held to."""
        from coordinator.influence import InfluencePolicy

        return InfluencePolicy(
            self.max_examples_per_update,
            self.examples_multiple,
            self.norm_multiple,
            self.influence_window,
            self.judge_batch,
            self.direction_share,
        )

    @classmethod
    def from_sources(cls, path: str | None, overrides: dict[str, Any]) -> "CoordinatorConfig":
        """Defaults < TOML file < flags."""
        from edge_runtime.settings import merge_settings

        values = merge_settings(cls, path, overrides)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
