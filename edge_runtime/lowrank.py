"""LoRA feeds for fused decoder graphs: one low-rank path per layer and module group (no torch).

A fused inference graph (``io.lora_layout == "lowrank"``) adds to each group of linears that share an
input (q/k/v, gate/up) and hold LoRA targets one low-rank term ``(x @ L) @ R``, with ``L`` [in, W] and
``R`` [W, out] graph inputs per layer. Their columns/rows are, in order:

- a *prefix* that belongs to the frozen base (the asymmetric 4-bit recipe puts its per-block offsets
  here: ``L`` sums x over each block, ``R`` holds the offsets), stored in the bundle's
  ``lowrank.safetensors`` and empty for other schemes;
- then r columns of ``L`` per target (its A transposed) and r rows of ``R`` per target (its B
  transposed, times alpha/r, in that target's output columns; zeros elsewhere).

So a decode step runs one matmul pair per group for the base offsets and every LoRA target together,
and the packing happens once per adapter here instead of once per token inside the graph (which made
the LoRA paths ~14% of a SmolLM2 int4 decode step). The adapter's own format (per-layer A/B tensors)
does not change; only how it is fed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from edge_runtime.errors import BundleError
from edge_runtime.protocol.adapter import lora_names
from edge_runtime.protocol.manifest import LoraLayout

BASE_FILE = "lowrank.safetensors"


@dataclasses.dataclass(frozen=True)
class Slot:
    """One low-rank input pair: layer, graph input names, and where each target sits in it."""

    layer: int
    L: str
    R: str
    in_features: int
    out_features: int
    prefix: int  # base columns of L / rows of R before the LoRA part
    targets: tuple[tuple[str, int, int], ...]  # (module, first output column, output width)

    @classmethod
    def from_json(cls, d: dict) -> "Slot":
        return cls(
            int(d["layer"]),
            str(d["L"]),
            str(d["R"]),
            int(d["in"]),
            int(d["out"]),
            int(d.get("prefix", 0)),
            tuple((str(m), int(o), int(n)) for m, o, n in d["targets"]),
        )


def pack_slot(
    slot: Slot,
    tensors: dict[str, np.ndarray],
    rank: int,
    scale: float,
    base_L: np.ndarray | None = None,
    base_R: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The (L, R) feeds of one slot from per-layer adapter tensors (A [r, in], B [out, r])."""
    width = slot.prefix + rank * len(slot.targets)
    L = np.zeros((slot.in_features, width), np.float32)
    R = np.zeros((width, slot.out_features), np.float32)
    if slot.prefix:
        if (
            base_L is None
            or base_R is None
            or base_L.shape != (slot.in_features, slot.prefix)
            or base_R.shape != (slot.prefix, slot.out_features)
        ):
            raise BundleError(f"{BASE_FILE} lacks the base part of {slot.L}/{slot.R} (or it has the wrong shape)")
        L[:, : slot.prefix] = base_L
        R[: slot.prefix] = base_R
    for j, (module, col, n) in enumerate(slot.targets):
        a_name, b_name = lora_names(slot.layer, module)
        a, b = tensors[a_name], tensors[b_name]
        c = slot.prefix + j * rank
        L[:, c : c + rank] = a.T
        R[c : c + rank, col : col + n] = scale * b.T
    return L, R


class LowRankLayout:
    """The low-rank slots of a bundle and their base parts; ``feeds`` turns an adapter into graph inputs."""

    def __init__(self, slots: list[Slot], rank: int, scale: float, base: dict[str, np.ndarray]):
        self.slots, self.rank, self.scale, self.base = slots, rank, scale, base

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest) -> "LowRankLayout | None":
        """None for bundles that feed stacked ``lora_A.<m>``/``lora_B.<m>`` inputs (torch-exported graphs)."""
        if manifest.io.lora_layout is not LoraLayout.LOWRANK:
            return None
        slots = [Slot.from_json(d) for d in manifest.io.lowrank]
        base: dict[str, np.ndarray] = {}
        if any(s.prefix for s in slots):
            path = Path(bundle_dir) / BASE_FILE
            if not path.is_file():
                raise BundleError(f"{bundle_dir}: {BASE_FILE} is missing (the base part of the low-rank inputs)")
            from safetensors.numpy import load_file

            try:
                base = load_file(str(path))
            except Exception as exc:  # the format library's own errors, translated at the boundary
                raise BundleError(f"{path}: unreadable ({exc}); re-export the bundle") from None
        rank = int(manifest.adapter.rank)
        return cls(slots, rank, float(manifest.adapter.alpha) / rank, base)

    def feeds(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph inputs for an adapter (per-layer A/B tensors)."""
        out = {}
        for s in self.slots:
            out[s.L], out[s.R] = pack_slot(s, tensors, self.rank, self.scale, self.base.get(s.L), self.base.get(s.R))
        return out
