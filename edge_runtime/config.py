"""Every `edgefm-agent run` setting (AgentConfig), where each comes from (defaults < device profile <
config file < command-line flags) and the training defaults the benchmarks chose."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any

from edge_runtime.errors import ConfigError
from edge_runtime.protocol.codec import CodecSpec
from edge_runtime.protocol.messages import check_id

# Training defaults, chosen by bench/learning.py through real agents (see BENCHMARKS.md); the fleet and
# the benchmarks use these same values. 4e-3 (was 2e-3): the federated fleet learns more in every run
# measured (stdlib and sympy, seeds 0-1: +1% to +10% held-out gain, general text below the base model);
# a device training alone gains less (its gate refuses more sessions for forgetting, which is its job).
LEARNING_RATE = 4e-3
PROX_MU = 0.0


@dataclasses.dataclass
class AgentConfig:
    """Every `edgefm-agent run` setting (CLI flag or config-file key of the same name)."""

    bundle: str = ""
    data_dir: str = "./edgefm-agent-data"
    host: str = "127.0.0.1"
    api_token: str | None = None  # bearer token every API request must carry (required beyond loopback)
    api_tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # more tokens, by name: {app = "token"};
    #                                       examples a token sends count against that name's quota (max_source_share)
    port: int = 8080
    broker: str | None = None
    insecure: bool = False  # accept a broker beyond loopback without TLS and credentials
    fleet: str = "default"
    device_id: str = dataclasses.field(default_factory=lambda: socket.gethostname().split(".")[0][:64] or "device")
    profile: str | None = None
    threads_inference: int = 2
    threads_training: int = 1
    steps_per_round: int = 8  # a session's minimum steps; more when new data needs them (max_steps_per_session)
    max_steps_per_session: int = 64
    max_train_seconds: float = 120.0
    min_new_examples: int = 16
    learning_rate: float = LEARNING_RATE
    prox_mu: float = PROX_MU  # proximal pull towards the adapter a session started from (0: off)
    replay_fraction: float = 0.25  # share of each batch drawn from already-used examples while new ones remain
    general_replay_fraction: float = 0.25  # share of each batch from the base model's own general text (forgetting control)
    train_cooldown_s: float = 5.0
    train_window_hours: list[int] | None = None  # [start, end) local hours for automatic sessions, e.g. [0, 6]
    #                                       (rounds the coordinator asks for and train-now run at any hour)
    auto_train: bool = True
    keep_adapters: int = 5
    keep_refused: int = 3  # candidates the gate refused, kept for inspection or activation by hand
    gate_z: float = 1.645  # a candidate is "worse" when its held-out loss is this many standard errors worse
    max_forgetting: float = 0.05  # refuse candidates whose general-text perplexity rises more than this over the base
    gate_heldout_limit: int = 64  # held-out examples the gate scores
    min_heldout_examples: int = 4  # a small store holds back more than 10% until its gate has this many
    anchor_file: str | None = None  # general-text passages for the forgetting check (default: shipped set; "" = off)
    mqtt_keepalive_s: int = 15
    max_prompt_tokens: int = 2048
    max_request_bytes: int = 1 << 20
    max_adapter_bytes: int = 64 << 20  # POST /v1/adapters bodies (an adapter, base64)
    max_connections: int = 64  # API connections served at once; more get 503 + Retry-After
    http_idle_timeout_s: float = 30.0  # close API connections idle this long (half-open sockets held threads)
    max_examples: int = 100_000
    max_evictions_per_hour: int | None = None  # trained-on examples new ones may push out per hour (None: 10% of max_examples)
    max_source_share: float = 0.5  # each source's quota (an API token, the inbox) as a share of max_examples:
    #                                       a full store evicts a source's examples for another only above it
    retention_days: float = 30.0  # trained-on examples older than this are deleted (held-out slice kept)
    min_free_disk_mb: float = 50.0
    update_codec: str = "fp16"
    update_compression: str = "zstd"
    resend_after_s: float = 120.0  # resend a broker-acknowledged update that got no coordinator receipt
    inbox: str | None = None  # folder watched for *.jsonl files of examples
    sign_key: str | None = None  # fleet HMAC key for update signatures (runtime only, never saved)
    signing_key: str | None = None  # this device's Ed25519 key (provision): signs its updates
    coordinator_key: str | None = None  # the coordinator's public key (provision): only what it signed is accepted
    verify_bundle: bool = True
    train_nice: int = 10  # OS priority of the training thread (serving keeps the CPU when both want it)
    train_step_delay_s: float = 0.0  # simulation only (fleet --chaos): a slow device's extra time per step
    trainer_backend: str = "onnx"  # onnx | torch (extra [torch-train]; PEFT, optional 4-bit base on CUDA)
    torch_model: str | None = None  # the source checkpoint the torch backend loads
    torch_load_4bit: bool = False  # QLoRA: bitsandbytes NF4 base (CUDA only)

    def __post_init__(self):
        from edge_runtime.transport import is_loopback, require_secure_broker

        require_secure_broker(
            self.broker, self.insecure, "agent", [k for k in ("signing_key", "coordinator_key") if not getattr(self, k)]
        )
        tokens = {"api_token": self.api_token} if self.api_token is not None else {}
        if not isinstance(self.api_tokens, dict):
            raise ConfigError('api_tokens must be a table of names to tokens, e.g. api_tokens = {camera = "...", app = "..."}')
        for name, tok in self.api_tokens.items():
            check_id(name, "api_tokens name")
            tokens[f"api_tokens.{name}"] = tok
        for where, tok in tokens.items():
            if not isinstance(tok, str) or len(tok) < 16:
                raise ConfigError(
                    f"{where} must be a string of at least 16 characters (e.g. `python -c 'import secrets; "
                    f"print(secrets.token_urlsafe())'`)"
                )
        if len(set(tokens.values())) < len(tokens):
            raise ConfigError("api_token and api_tokens must all differ (a token names the source of the examples it sends)")
        if not is_loopback(self.host) and not tokens:
            raise ConfigError(
                f"binding the agent API to {self.host} exposes it beyond this device: set api_token (or the "
                f"EDGEFM_API_TOKEN environment variable) so every request must carry `Authorization: Bearer <token>`"
            )
        if not 0 < self.max_source_share <= 1:
            raise ConfigError("max_source_share must be in (0, 1]")
        check_id(self.device_id, "device_id")
        check_id(self.fleet, "fleet")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be >= 1")
        if not 0 < self.port < 65536:
            raise ConfigError("port must be 1-65535")
        if self.trainer_backend not in ("onnx", "torch"):
            raise ConfigError("trainer_backend must be 'onnx' or 'torch'")
        if self.trainer_backend == "torch" and not self.torch_model:
            raise ConfigError(
                "trainer_backend = 'torch' needs torch_model (the source checkpoint directory)"
                + (
                    f"; profile {self.profile!r} asks for it: set torch_model, or trainer_backend = 'onnx'"
                    if self.profile
                    else ""
                )
            )
        if self.keep_adapters < 1:
            raise ConfigError("keep_adapters must be >= 1")
        if not 0 <= self.replay_fraction < 1 or not 0 <= self.general_replay_fraction < 1:
            raise ConfigError("replay_fraction and general_replay_fraction must be in [0, 1)")
        if self.steps_per_round < 1 or self.max_steps_per_session < self.steps_per_round:
            raise ConfigError("steps_per_round must be >= 1 and max_steps_per_session >= steps_per_round")
        w = self.train_window_hours
        if w is not None and (
            not isinstance(w, (list, tuple))
            or len(w) != 2
            or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 23 for h in w)
        ):
            raise ConfigError(
                f"train_window_hours must be [start, end] local hours 0-23 (e.g. [0, 6]: midnight to six), got {w!r}"
            )
        if self.learning_rate <= 0 or self.prox_mu < 0 or self.max_forgetting < 0:
            raise ConfigError("learning_rate must be > 0, prox_mu and max_forgetting >= 0")
        CodecSpec(self.update_codec, self.update_compression)

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> "AgentConfig":
        """Defaults < profile < config file < command-line flags."""
        from edge_runtime.settings import merge_settings

        values = merge_settings(cls, config_file, overrides)
        if not values.get("api_token") and os.environ.get("EDGEFM_API_TOKEN"):
            values["api_token"] = os.environ["EDGEFM_API_TOKEN"]
        if values.get("profile"):
            values = merge_settings(cls, None, values, base=profile_defaults(values["profile"]))
        return cls(**values)


def profile_defaults(name: str) -> dict[str, Any]:
    """Agent settings implied by a device profile (devices/ is data; imported lazily)."""
    from devices.profiles import load_profile

    p = load_profile(name)
    t = p.training
    return {
        "threads_inference": p.threads_inference,
        "threads_training": p.threads_training,
        "steps_per_round": t.get("steps_per_round", 8),
        "max_train_seconds": t.get("max_seconds_per_round", 120),
        "min_new_examples": t.get("min_new_examples", 16),
        "learning_rate": t.get("learning_rate", LEARNING_RATE),
        "trainer_backend": t.get("backend", "onnx"),
        "profile": p.name,
    }
