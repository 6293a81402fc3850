"""Tensor container: the safetensors file layout, read with strict validation.

Layout (little-endian): u64 header length N, N bytes of JSON header
``{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer. Files we write load with the ``safetensors`` library and vice versa; we parse
it ourselves so that every malformed input becomes a ``ProtocolError`` with a reason, never another
exception, and never an allocation bigger than the input.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from edge_runtime.errors import ProtocolError, RejectReason

DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I8": np.dtype("i1"),
          "F64": np.dtype("<f8"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "U8": np.dtype("u1")}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 1 << 22
MAX_TENSORS = 10_000


def encode_tensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize named arrays (+ string metadata) to safetensors bytes, in sorted name order."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dt not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {arr.dtype} is not supported")
        raw = arr.astype(dt, copy=False).tobytes()
        header[name] = {"dtype": _NAMES[dt], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # align the data buffer to 8 bytes
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(blobs)


def decode_tensors(data: bytes, *, allowed_dtypes: frozenset[str] | None = None,
                   copy: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes; raise ``ProtocolError`` for anything that is not well formed."""
    mv = memoryview(data)
    if len(mv) < 8:
        raise ProtocolError(RejectReason.TRUNCATED, f"tensor container of {len(mv)} bytes has no header")
    (hlen,) = struct.unpack("<Q", mv[:8])
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(RejectReason.MALFORMED, f"tensor header claims {hlen} bytes (max {MAX_HEADER_BYTES})")
    if 8 + hlen > len(mv):
        raise ProtocolError(RejectReason.TRUNCATED, f"tensor header claims {hlen} bytes, only {len(mv) - 8} present")
    try:
        header = json.loads(bytes(mv[8:8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(RejectReason.MALFORMED, f"tensor header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(RejectReason.MALFORMED, "tensor header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ProtocolError(RejectReason.MALFORMED, "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise ProtocolError(RejectReason.MALFORMED, f"{len(header)} tensors (max {MAX_TENSORS})")
    body = mv[8 + hlen:]
    out: dict[str, np.ndarray] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(RejectReason.MALFORMED, f"tensor {name!r}: entry needs exactly dtype, shape, data_offsets")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype_name not in DTYPES or (allowed_dtypes is not None and dtype_name not in allowed_dtypes):
            raise ProtocolError(RejectReason.BAD_DTYPE, f"tensor {name!r}: dtype {dtype_name!r} not allowed")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise ProtocolError(RejectReason.BAD_SHAPE, f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise ProtocolError(RejectReason.MALFORMED, f"tensor {name!r}: bad data_offsets {offsets!r}")
        dt = DTYPES[dtype_name]
        count = 1
        for d in shape:
            count *= d
        if count * dt.itemsize != offsets[1] - offsets[0]:
            raise ProtocolError(RejectReason.BAD_SHAPE,
                                f"tensor {name!r}: shape {shape} needs {count * dt.itemsize} bytes, offsets span {offsets[1] - offsets[0]}")
        if offsets[1] > len(body):
            raise ProtocolError(RejectReason.TRUNCATED, f"tensor {name!r}: data ends at {offsets[1]}, buffer has {len(body)}")
        spans.append((offsets[0], offsets[1], name))
        arr = np.frombuffer(body[offsets[0]:offsets[1]], dtype=dt).reshape(shape)
        out[name] = arr.copy() if copy else arr
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise ProtocolError(RejectReason.MALFORMED, f"tensors {a!r} and {b!r} overlap")
    return out, metadata
