"""LoRA adapter contract: named A/B tensors + metadata, stored as safetensors.

Tensor names: ``layers.<i>.<module>.lora_A`` with shape ``[rank, in_features]`` and
``layers.<i>.<module>.lora_B`` with shape ``[out_features, rank]``. The effective weight change of a
module is ``(alpha / rank) * B @ A``. Metadata rides in the safetensors ``__metadata__`` under
``edgefm.adapter`` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol.tensors import decode_tensors, encode_tensors

META_KEY = "edgefm.adapter"


@dataclasses.dataclass
class AdapterMeta:
    """What an adapter is for and where it comes from (saved with it)."""

    base_fingerprint: str
    target_modules: list[str]
    rank: int
    alpha: float
    shapes: dict[str, list[int]]
    version: int = 0
    parent_version: int | None = None
    dtype: str = "float32"
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def scale(self) -> float:
        """LoRA scaling alpha / rank."""
        return self.alpha / self.rank

    def to_json(self) -> dict:
        """Plain JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> "AdapterMeta":
        """Validate and build from JSON."""
        if not isinstance(obj, dict):
            raise ProtocolError(RejectReason.MALFORMED, "adapter metadata must be an object")
        try:
            meta = cls(
                base_fingerprint=str(obj["base_fingerprint"]),
                target_modules=[str(t) for t in obj["target_modules"]],
                rank=int(obj["rank"]),
                alpha=float(obj["alpha"]),
                shapes={str(k): [int(d) for d in v] for k, v in obj["shapes"].items()},
                version=int(obj.get("version", 0)),
                parent_version=None if obj.get("parent_version") is None else int(obj["parent_version"]),
                dtype=str(obj.get("dtype", "float32")),
                metrics=dict(obj.get("metrics") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(RejectReason.BAD_FIELD, f"adapter metadata incomplete or mistyped: {exc}") from None
        if meta.rank < 1:
            raise ProtocolError(RejectReason.BAD_FIELD, "adapter rank must be >= 1")
        return meta


def lora_names(layer: int, module: str) -> tuple[str, str]:
    """Names of the A and B tensors of one module of one layer (an adapter file's tensors)."""
    return f"layers.{layer}.{module}.lora_A", f"layers.{layer}.{module}.lora_B"


def stacked_names(module: str) -> tuple[str, str]:
    """Names of one module's A and B stacked over layers (the training graph's and stacked-layout inputs)."""
    return f"lora_A.{module}", f"lora_B.{module}"


def is_lora_a(name: str) -> bool:
    """Whether a per-layer or stacked tensor name is an A factor."""
    return name.endswith(".lora_A") or name.startswith("lora_A.")


def partner_b(a_name: str) -> str:
    """The B factor paired with a per-layer A name."""
    return a_name[: -len("lora_A")] + "lora_B"


def stack_adapter(tensors: dict[str, np.ndarray], targets: list[str], layers: int) -> dict[str, np.ndarray]:
    """Per-layer adapter tensors -> stacked ``lora_A.<m>`` [L, r, in] / ``lora_B.<m>`` [L, out, r]."""
    out = {}
    for t in targets:
        sa, sb = stacked_names(t)
        out[sa] = np.ascontiguousarray(np.stack([tensors[lora_names(i, t)[0]] for i in range(layers)]).astype(np.float32))
        out[sb] = np.ascontiguousarray(np.stack([tensors[lora_names(i, t)[1]] for i in range(layers)]).astype(np.float32))
    return out


def unstack_adapter(stacked: dict[str, np.ndarray], targets: list[str]) -> dict[str, np.ndarray]:
    """Inverse of ``stack_adapter``."""
    out = {}
    for t in targets:
        sa, sb = stacked_names(t)
        for i in range(stacked[sa].shape[0]):
            na, nb = lora_names(i, t)
            out[na], out[nb] = np.array(stacked[sa][i]), np.array(stacked[sb][i])
    return out


def adapter_to_bytes(tensors: dict[str, np.ndarray], meta: AdapterMeta) -> bytes:
    """Serialize an adapter (fp32 tensors + metadata) to safetensors bytes."""
    check_adapter(tensors, meta)
    return encode_tensors(
        {k: np.asarray(v, np.float32) for k, v in tensors.items()}, {META_KEY: json.dumps(meta.to_json(), sort_keys=True)}
    )


def adapter_from_bytes(
    data: bytes, *, expect_fingerprint: str | None = None, expect_shapes: dict[str, list[int]] | None = None
) -> tuple[dict[str, np.ndarray], AdapterMeta]:
    """Parse and validate adapter bytes (hash checks are the caller's, against a pointer/manifest)."""
    tensors, metadata = decode_tensors(data, allowed_dtypes=frozenset({"F32"}))
    if META_KEY not in metadata:
        raise ProtocolError(RejectReason.MALFORMED, f"not an edgefm adapter (no {META_KEY!r} metadata)")
    try:
        meta = AdapterMeta.from_json(json.loads(metadata[META_KEY]))
    except ValueError as exc:
        raise ProtocolError(RejectReason.MALFORMED, f"adapter metadata is not JSON: {exc}") from None
    check_adapter(tensors, meta)
    check_fits(meta, fingerprint=expect_fingerprint, shapes=expect_shapes)
    return tensors, meta


def check_fits(
    meta: AdapterMeta, *, fingerprint: str | None = None, shapes: dict[str, list[int]] | None = None, alpha: float | None = None
) -> None:
    """Whether an adapter fits a bundle (its base fingerprint, LoRA slots and alpha; None: not checked).
    The one place these faults are raised, wherever the adapter came from: ProtocolError with the reason."""
    if fingerprint is not None and meta.base_fingerprint != fingerprint:
        raise ProtocolError(
            RejectReason.FINGERPRINT_MISMATCH,
            f"adapter is for base {meta.base_fingerprint[:12]}, this model is {fingerprint[:12]}",
        )
    if shapes is not None and {k: list(v) for k, v in shapes.items()} != meta.shapes:
        raise ProtocolError(RejectReason.BAD_SHAPE, "adapter tensor shapes differ from this bundle's LoRA slots")
    if alpha is not None and abs(meta.alpha - float(alpha)) > 1e-6 * max(1.0, abs(meta.alpha)):
        raise ProtocolError(
            RejectReason.BAD_FIELD,
            f"adapter alpha {meta.alpha:g} differs from this bundle's {alpha:g} (the graph applies the bundle's "
            f"alpha/r); convert PEFT adapters with 'edgefm-export adapter from-peft', which rescales them",
        )


def check_adapter(tensors: dict[str, np.ndarray], meta: AdapterMeta) -> None:
    """Require names/shapes to match the metadata and every value to be finite."""
    if set(tensors) != set(meta.shapes):
        raise ProtocolError(RejectReason.BAD_SHAPE, "adapter tensors differ from the names its metadata lists")
    for k, v in tensors.items():
        if list(v.shape) != list(meta.shapes[k]):
            raise ProtocolError(RejectReason.BAD_SHAPE, f"adapter tensor {k!r}: shape {list(v.shape)} != {meta.shapes[k]}")
        if not np.all(np.isfinite(v)):
            raise ProtocolError(RejectReason.NON_FINITE, f"adapter tensor {k!r} has NaN or Inf")


def save_adapter(path: str | Path, tensors: dict[str, np.ndarray], meta: AdapterMeta) -> None:
    """Write an adapter file atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(adapter_to_bytes(tensors, meta))
    tmp.replace(path)


def load_adapter(path: str | Path, **expect) -> tuple[dict[str, np.ndarray], AdapterMeta]:
    """Read and validate an adapter file."""
    return adapter_from_bytes(Path(path).read_bytes(), **expect)
