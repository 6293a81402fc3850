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

DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
    "F64": np.dtype("<f8"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
}
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
        header[name] = {"dtype": _NAMES[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # align the data buffer to 8 bytes
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(blobs)


class TensorMap(dict):
    """``decode_tensors``' result: name -> array, plus where each one's bytes lie in ``buffer`` (the
    data section), for views spanning several tensors (``span_view``)."""

    buffer: memoryview | None  # None when the arrays are copies
    spans: dict[str, tuple[int, int]]


def span_view(m: TensorMap, names: list[str], dtype=np.float32) -> np.ndarray | None:
    """One 1-D ``dtype`` view of ``m.buffer`` covering the named tensors if they lie back to back in
    this order (as an encoder writes them); else None."""
    if not names or m.buffer is None:
        return None
    first, end = m.spans[names[0]]
    for k in names[1:]:
        b, e = m.spans[k]
        if b != end:
            return None
        end = e
    if any(m[k].dtype != dtype for k in names):
        return None
    return np.frombuffer(m.buffer, dtype=dtype, count=(end - first) // np.dtype(dtype).itemsize, offset=first)


def decode_tensors(
    data: bytes, *, allowed_dtypes: frozenset[str] | None = None, copy: bool = True
) -> tuple[TensorMap, dict[str, str]]:
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
        header = json.loads(bytes(mv[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(RejectReason.MALFORMED, f"tensor header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(RejectReason.MALFORMED, "tensor header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ProtocolError(RejectReason.MALFORMED, "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise ProtocolError(RejectReason.MALFORMED, f"{len(header)} tensors (max {MAX_TENSORS})")
    body = mv[8 + hlen :]
    out = TensorMap()
    out.buffer, out.spans = body, {}
    spans = []
    nbody = len(body)
    for name, info in header.items():
        if type(info) is not dict or len(info) != 3 or "dtype" not in info or "shape" not in info or "data_offsets" not in info:
            raise ProtocolError(RejectReason.MALFORMED, f"tensor {name!r}: entry needs exactly dtype, shape, data_offsets")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        dt = DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dt is None or (allowed_dtypes is not None and dtype_name not in allowed_dtypes):
            raise ProtocolError(RejectReason.BAD_DTYPE, f"tensor {name!r}: dtype {dtype_name!r} not allowed")
        count = 1
        if type(shape) is not list or len(shape) > 8:
            count = -1
        else:
            for d in shape:
                if type(d) is not int or not 0 <= d < 1 << 40:
                    count = -1
                    break
                count *= d
        if count < 0:
            raise ProtocolError(RejectReason.BAD_SHAPE, f"tensor {name!r}: bad shape {shape!r}")
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ProtocolError(RejectReason.MALFORMED, f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if count * dt.itemsize != end - begin:
            raise ProtocolError(
                RejectReason.BAD_SHAPE,
                f"tensor {name!r}: shape {shape} needs {count * dt.itemsize} bytes, offsets span {end - begin}",
            )
        if end > nbody:
            raise ProtocolError(RejectReason.TRUNCATED, f"tensor {name!r}: data ends at {end}, buffer has {nbody}")
        spans.append((begin, end, name))
        out.spans[name] = (begin, end)
        arr = np.frombuffer(body, dtype=dt, count=count, offset=begin).reshape(shape)
        out[name] = arr.copy() if copy else arr
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise ProtocolError(RejectReason.MALFORMED, f"tensors {a!r} and {b!r} overlap")
    if copy:
        out.buffer = None  # copies do not keep the input alive
    return out, metadata


def _root(a: np.ndarray):
    """The object that owns an array's memory (bytes, bytearray, mmap, or an array)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def flat_view(arrays: list[np.ndarray], dtype=np.float32) -> np.ndarray | None:
    """One 1-D view over ``arrays`` if they are C-contiguous ``dtype`` arrays lying back to back, in
    this order, in one buffer (as decoded fp32 tensors do); else None. Saves a concatenation (a copy)
    per pass over an update. The view is of the buffer owning the first array, bounds-checked, so
    it is valid whoever owns the arrays after it."""
    if not arrays:
        return None
    dt = np.dtype(dtype)
    start: int | None = None
    end = 0
    for a in arrays:
        if a.dtype != dt or not a.flags.c_contiguous:
            return None
        ptr = a.__array_interface__["data"][0]
        if start is None:
            start = ptr
        elif ptr != end:
            return None
        end = ptr + a.nbytes
    try:
        base = np.frombuffer(_root(arrays[0]), np.uint8)
    except (TypeError, ValueError):
        return None
    assert start is not None
    off = start - base.__array_interface__["data"][0]
    if off < 0 or off + (end - start) > base.nbytes:
        return None
    return base[off : off + (end - start)].view(dt)


def flatten(arrays: list[np.ndarray], dtype=np.float32) -> np.ndarray:
    """``arrays`` as one 1-D ``dtype`` vector: a view when ``flat_view`` finds one, else a copy."""
    v = flat_view(arrays, dtype)
    if v is not None:
        return v
    return np.concatenate([np.asarray(a, dtype).ravel() for a in arrays]) if arrays else np.zeros(0, dtype)
