"""Device profiles: what each class of hardware gets (quantization, LoRA, thread and training budgets)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from edge_runtime.errors import BundleError, ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclasses.dataclass
class Profile:
    """One hardware class."""

    name: str
    description: str
    ram_mb: int
    memory_budget_fraction: float
    threads_inference: int
    threads_training: int
    accelerator: str
    export: dict[str, Any]
    training: dict[str, Any]

    def __post_init__(self):
        if self.ram_mb < 256 or not 0 < self.memory_budget_fraction <= 1:
            raise ConfigError(f"profile {self.name}: ram_mb must be >= 256 and memory_budget_fraction in (0, 1]")
        if self.training.get("backend", "onnx") not in ("onnx", "torch"):
            raise ConfigError(f"profile {self.name}: training.backend must be 'onnx' or 'torch'")

    @property
    def memory_budget_bytes(self) -> int:
        """Bytes the agent may use on this device."""
        return int(self.ram_mb * self.memory_budget_fraction * 1024 * 1024)

    def export_defaults(self) -> dict[str, Any]:
        """Defaults for `edgefm-export build --profile`."""
        return dict(self.export)

    def check_bundle_fits(self, bundle: Path) -> dict[str, int]:
        """Refuse a bundle whose estimated working set exceeds the budget; returns the estimate."""
        from edge_runtime.protocol.manifest import Manifest

        m = Manifest.load(bundle)

        def graph_bytes(name: str) -> int:  # the graph and its external data file
            return sum(m.files.get(f, {}).get("size", 0) for f in (name, f"{name}.data"))

        infer, train = graph_bytes("model.onnx"), graph_bytes("train.onnx")
        # ORT holds weights once per session plus arenas; 1.3x graph size + 64 MB runtime is our measured rule of thumb.
        need = int(1.3 * (infer + train)) + 64 * 1024 * 1024
        if need > self.memory_budget_bytes:
            raise BundleError(
                f"bundle needs about {need / 2**20:.0f} MB (inference {infer / 2**20:.0f} MB + training "
                f"{train / 2**20:.0f} MB graphs, with overhead) but profile {self.name} allows "
                f"{self.memory_budget_bytes / 2**20:.0f} MB ({self.memory_budget_fraction:.0%} of {self.ram_mb} MB); "
                "export with a smaller quantization or use a bigger profile"
            )
        return {"estimated_bytes": need, "budget_bytes": self.memory_budget_bytes}


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name: str) -> Profile:
    """Load a profile by name, by path to a TOML file, or 'auto' (detect this machine)."""
    if name == "auto":
        name = detect_profile()
    path = Path(name) if name.endswith(".toml") else PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown device profile {name!r}; available: {', '.join(list_profiles())}")
    from edge_runtime.settings import read_toml

    data = read_toml(path)
    fields = {f.name for f in dataclasses.fields(Profile)}
    unknown = set(data) - fields
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    try:
        return Profile(**data)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def detect_profile() -> str:
    """Pick the profile that matches this machine (Jetson, Raspberry Pi model, else by RAM)."""
    model = ""
    for f in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            model = Path(f).read_text(errors="ignore").lower()
            break
        except OSError:
            pass
    if os.path.exists("/etc/nv_tegra_release") or "jetson" in model:
        return "jetson-orin-nano"
    ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    if "raspberry pi 5" in model:
        return "rpi5"
    if "raspberry pi" in model:
        return "rpi4" if ram_mb > 1536 else "tiny"
    if ram_mb <= 1536:
        return "tiny"
    return "x86-gateway" if ram_mb >= 12 * 1024 else "rpi5"
