"""Update validation that needs no coordinator state.

``validate_update`` is a pure function of the payload and fixed settings: envelope and header,
payload hash, signature, codec, finite values, base fingerprint, tensor names and shapes, L2 norm.
What needs state (duplicates, rounds, staleness) stays in the coordinator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from coordinator.aggregate import global_norm
from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol.messages import UpdateHeader, check_tensors_match, decode_update_body, decode_update_header


@dataclass(frozen=True)
class Limits:
    """The fixed settings validation depends on."""

    fingerprint: str
    shapes: dict[str, tuple[int, ...]]
    max_update_bytes: int
    max_update_norm: float
    sign_key: str | None = None
    device_keys: dict | None = None  # {device id: Ed25519 public key}: every update must be signed by its device


@dataclass
class Validated:
    """A structurally valid update: header, tensors (schema order), their global L2 norm, and all of
    them as one fp32 vector in schema order when the payload had them in that order (a view of it)."""

    header: UpdateHeader
    tensors: dict[str, np.ndarray]
    norm: float
    flat: np.ndarray | None


def validate_update(device_id: str, payload: bytes, limits: Limits) -> Validated:
    """Everything about an update that does not depend on coordinator state; raises ``ProtocolError``
    (with ``.header`` set once the header parsed)."""
    header = None
    try:
        header, body = decode_update_header(payload, max_bytes=limits.max_update_bytes)
        if header.device_id != device_id:
            raise ProtocolError(RejectReason.BAD_FIELD, f"header says device {header.device_id!r}, topic says {device_id!r}")
        device_key = None
        if limits.device_keys is not None:
            device_key = limits.device_keys.get(header.device_id)
            if device_key is None:
                raise ProtocolError(RejectReason.BAD_SIGNATURE, f"device {header.device_id!r} is not provisioned in this fleet")
        upd = decode_update_body(
            header,
            body,
            max_decoded_bytes=4 * limits.max_update_bytes,
            verify_key=limits.sign_key.encode() if limits.sign_key else None,
            device_public_key=device_key,
        )
        if header.base_fingerprint != limits.fingerprint:
            raise ProtocolError(RejectReason.FINGERPRINT_MISMATCH, "update trained on another base model")
        check_tensors_match(upd.tensors, limits.shapes)
        tensors = {k: upd.tensors[k] for k in limits.shapes}
        if list(upd.tensors) == list(tensors):  # the payload's order: reuse its flat view and sum of squares
            flat, norm = upd.tensors.flat, math.sqrt(upd.tensors.sumsq)
        else:
            flat, norm = None, global_norm(tensors)
        if norm > limits.max_update_norm:
            raise ProtocolError(RejectReason.NORM_BOUND, f"update norm {norm:.3g} > bound {limits.max_update_norm:.3g}")
        return Validated(header, tensors, norm, flat)
    except ProtocolError as exc:
        exc.header = header
        raise
