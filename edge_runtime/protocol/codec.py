"""Tensor codecs for adapter updates: fp32 / fp16 / int8-with-scales, optionally zstd-compressed.

Each codec is a small class in a registry (no if/elif chains). ``encode`` turns named fp32 arrays into
safetensors bytes; ``decode`` turns them back into fp32 arrays. Stated error bounds (tested):

- ``fp32``: exact.
- ``fp16``: relative error <= 2**-11 for |x| in fp16's normal range; |x| > 65504 is refused at encode.
- ``int8``: symmetric per row (axis 0) with an fp32 scale per row; |x - x'| <= scale / 2 where
  scale = max|row| / 127.
- ``int4``: symmetric per block of 256 values (each tensor flattened, all tensors in one stream), two
  values per byte, an fp16 scale per block; |x - x'| <= s / 2 where s is the stored scale
  (max|block| / 7, rounded up to fp16).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol.tensors import decode_tensors, encode_tensors, flatten, span_view

SCALE_SUFFIX = ".__scale"
FP16_MAX = 65504.0


class TensorCodec:
    """Base of the dtype codecs."""

    name: str = ""
    wire_dtypes: frozenset[str] = frozenset()

    def encode(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the arrays to put on the wire."""
        raise NotImplementedError

    def decode(self, wire: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return fp32 arrays from wire arrays; raise ProtocolError if they do not fit this codec."""
        raise NotImplementedError


class Fp32Codec(TensorCodec):
    name = "fp32"
    wire_dtypes = frozenset({"F32"})

    def encode(self, tensors):
        return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}

    def decode(self, wire):
        return {k: v.astype(np.float32, copy=False) for k, v in wire.items()}


class Fp16Codec(TensorCodec):
    name = "fp16"
    wire_dtypes = frozenset({"F16"})

    def encode(self, tensors):
        out = {}
        for k, v in tensors.items():
            v = np.asarray(v, dtype=np.float32)
            if v.size and float(np.max(np.abs(v))) > FP16_MAX:
                raise ValueError(f"tensor {k!r} exceeds the fp16 range (|x| > {FP16_MAX}); use fp32 or int8")
            out[k] = v.astype(np.float16)
        return out

    def decode(self, wire):
        return {k: v.astype(np.float32) for k, v in wire.items()}


class Int8Codec(TensorCodec):
    name = "int8"
    wire_dtypes = frozenset({"I8", "F32"})

    def encode(self, tensors):
        out = {}
        for k, v in tensors.items():
            v = np.asarray(v, dtype=np.float32)
            rows = v.reshape(v.shape[0], -1) if v.ndim >= 1 and v.shape[0] > 0 else v.reshape(1, -1)
            scale = np.max(np.abs(rows), axis=1) / 127.0 if rows.size else np.zeros(rows.shape[0], np.float32)
            safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
            out[k] = q.reshape(v.shape)
            out[k + SCALE_SUFFIX] = scale.astype(np.float32)
        return out

    def decode(self, wire):
        out = {}
        for k, v in wire.items():
            if k.endswith(SCALE_SUFFIX):
                if k[: -len(SCALE_SUFFIX)] not in wire:
                    raise ProtocolError(RejectReason.MALFORMED, f"scale {k!r} has no tensor")
                continue
            scale = wire.get(k + SCALE_SUFFIX)
            if v.dtype != np.int8 or scale is None or scale.dtype != np.float32:
                raise ProtocolError(RejectReason.BAD_DTYPE, f"int8 codec: {k!r} needs an I8 tensor and an F32 scale")
            rows = v.reshape(v.shape[0], -1) if v.ndim >= 1 and v.shape[0] > 0 else v.reshape(1, -1)
            if scale.shape != (rows.shape[0],):
                raise ProtocolError(
                    RejectReason.BAD_SHAPE, f"int8 codec: scale of {k!r} has shape {scale.shape}, want ({rows.shape[0]},)"
                )
            out[k] = (rows.astype(np.float32) * scale[:, None]).reshape(v.shape)
        return out


class Int4Codec(TensorCodec):
    """4-bit blockwise codec over one packed stream: ~8x smaller than fp32 before compression (updates
    are noise-tolerant: the server averages many of them).

    Wire arrays: ``int4.index`` (U8, UTF-8 JSON ``[[name, shape], ...]`` in stream order),
    ``int4.data`` (U8, two values per byte, low nibble first; each tensor starts on a block boundary)
    and ``int4.scales`` (F16, one per block of 256). One stream instead of three entries per tensor
    keeps the header small: per-tensor entries cost ~12% of a rank-8 adapter's int4 payload."""

    name = "int4"
    wire_dtypes = frozenset({"U8", "F16"})
    block = 256
    max_index_bytes = 1 << 20

    def encode(self, tensors):
        names = sorted(tensors)
        flats = [np.asarray(tensors[k], dtype=np.float32).ravel() for k in names]
        nbs = [-(-f.size // self.block) for f in flats]
        blocks = np.zeros((sum(nbs), self.block), np.float32)
        row = 0
        for f, nb in zip(flats, nbs):
            blocks[row : row + nb].ravel()[: f.size] = f
            row += nb
        amax = np.abs(blocks).max(axis=1) if blocks.size else np.zeros(0, np.float32)
        # fp16 scale rounded up, so |x| / scale <= 7 and the rounding bound holds with the stored scale
        scale = (amax / 7.0).astype(np.float16)
        scale = np.where(scale.astype(np.float32) * 7.0 < amax, np.nextafter(scale, np.float16(np.inf)), scale).astype(np.float16)
        s32 = scale.astype(np.float32)
        q = np.clip(np.rint(blocks / np.where(s32 > 0, s32, 1.0)[:, None]), -7, 7).astype(np.int8).ravel()
        nib = (q + 8).astype(np.uint8)
        index = json.dumps([[k, list(np.shape(tensors[k]))] for k in names], separators=(",", ":")).encode()
        return {
            "int4.index": np.frombuffer(index, np.uint8),
            "int4.data": (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8),
            "int4.scales": scale,
        }

    def _index(self, wire) -> list[tuple[str, list[int]]]:
        raw = wire.get("int4.index")
        if raw is None or raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > self.max_index_bytes:
            raise ProtocolError(RejectReason.MALFORMED, "int4 codec: missing or oversized int4.index")
        try:
            index = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(RejectReason.MALFORMED, f"int4 codec: int4.index is not JSON: {exc}") from None
        if not isinstance(index, list) or not all(
            isinstance(e, list)
            and len(e) == 2
            and isinstance(e[0], str)
            and isinstance(e[1], list)
            and len(e[1]) <= 8
            and all(type(d) is int and 0 <= d < 1 << 31 for d in e[1])
            for e in index
        ):
            raise ProtocolError(RejectReason.MALFORMED, "int4 codec: int4.index must be a list of [name, shape]")
        if len({e[0] for e in index}) != len(index):
            raise ProtocolError(RejectReason.MALFORMED, "int4 codec: duplicate tensor names in int4.index")
        return index

    def decode(self, wire):
        extra = set(wire) - {"int4.index", "int4.data", "int4.scales"}
        if extra:
            raise ProtocolError(RejectReason.MALFORMED, f"int4 codec: unexpected arrays {sorted(extra)[:3]}")
        index = self._index(wire)
        data, scale = wire.get("int4.data"), wire.get("int4.scales")
        if (
            data is None
            or data.dtype != np.uint8
            or data.ndim != 1
            or scale is None
            or scale.dtype != np.float16
            or scale.ndim != 1
        ):
            raise ProtocolError(RejectReason.BAD_DTYPE, "int4 codec: needs U8 int4.data and F16 int4.scales")
        sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in index]
        nbs = [-(-n // self.block) for n in sizes]
        total = sum(nbs)
        if total > 1 << 28 or data.size != total * self.block // 2 or scale.size != total:
            raise ProtocolError(RejectReason.BAD_SHAPE, "int4 codec: data / scales sizes do not match int4.index")
        q = np.empty(data.size * 2, np.int8)
        q[0::2] = (data & 0x0F).astype(np.int8) - 8
        q[1::2] = (data >> 4).astype(np.int8) - 8
        vals = q.reshape(total, self.block).astype(np.float32) * scale.astype(np.float32)[:, None]
        out, row = {}, 0
        for (name, shape), n, nb in zip(index, sizes, nbs):
            out[name] = vals[row : row + nb].ravel()[:n].reshape(shape).copy()
            row += nb
        return out


class Compression:
    """Byte-level compression applied after the tensor codec."""

    name = "none"

    def compress(self, data: bytes) -> bytes:
        """Compress bytes."""
        return data

    def decompress(self, data: bytes, max_size: int) -> bytes:
        """Decompress bytes, refusing output over ``max_size``."""
        if len(data) > max_size:
            raise ProtocolError(RejectReason.OVERSIZE, f"payload of {len(data)} bytes over the {max_size} limit")
        return data


class ZstdCompression(Compression):
    name = "zstd"
    small = 4 << 20  # payloads up to this size get the strongest level (~0.1 s for a 0.25 MB update on x86)

    def compress(self, data):
        import zstandard

        return zstandard.ZstdCompressor(level=19 if len(data) <= self.small else 3).compress(data)

    def decompress(self, data, max_size):
        import zstandard

        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise ProtocolError(RejectReason.MALFORMED, f"not a zstd frame: {exc}") from None
        if params.content_size > max_size and params.content_size != zstandard.CONTENTSIZE_UNKNOWN:
            raise ProtocolError(RejectReason.OVERSIZE, f"zstd frame expands to {params.content_size} bytes, limit {max_size}")
        try:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_size)
        except zstandard.ZstdError as exc:
            raise ProtocolError(RejectReason.MALFORMED, f"zstd payload does not decompress: {exc}") from None
        if len(out) > max_size:
            raise ProtocolError(RejectReason.OVERSIZE, f"payload expands past {max_size} bytes")
        return out


CODECS: dict[str, TensorCodec] = {c.name: c for c in (Fp32Codec(), Fp16Codec(), Int8Codec(), Int4Codec())}
COMPRESSIONS: dict[str, Compression] = {c.name: c for c in (Compression(), ZstdCompression())}


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """Which tensor codec and compression a payload uses."""

    dtype: str = "fp32"
    compression: str = "none"

    def __post_init__(self):
        if self.dtype not in CODECS:
            raise ProtocolError(RejectReason.UNKNOWN_CODEC, f"unknown codec dtype {self.dtype!r}; known: {sorted(CODECS)}")
        if self.compression not in COMPRESSIONS:
            raise ProtocolError(
                RejectReason.UNKNOWN_CODEC, f"unknown compression {self.compression!r}; known: {sorted(COMPRESSIONS)}"
            )

    def to_json(self) -> dict:
        """Plain-JSON form for headers."""
        return {"dtype": self.dtype, "compression": self.compression}


def encode_payload(tensors: dict[str, np.ndarray], spec: CodecSpec) -> bytes:
    """Encode fp32 tensors with ``spec`` into payload bytes."""
    for k, v in tensors.items():
        if SCALE_SUFFIX in k:
            raise ValueError(f"tensor name {k!r} uses the reserved suffix {SCALE_SUFFIX!r}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"tensor {k!r} has NaN or Inf; refusing to encode it")
    raw = encode_tensors(CODECS[spec.dtype].encode(tensors))
    return COMPRESSIONS[spec.compression].compress(raw)


class DecodedTensors(dict):
    """Decoded tensors (name -> fp32 array), plus ``flat``: all of them as one fp32 vector in this
    dict's order (a view of the payload for the fp32 codec, else a copy), for one-pass consumers."""

    flat: np.ndarray
    sumsq: float  # sum of squares of ``flat`` (float32 accumulation; inf if huge)


def decode_payload(payload, spec: CodecSpec, *, max_decoded_bytes: int) -> DecodedTensors:
    """Decode payload bytes (any buffer) into finite fp32 tensors, or raise ``ProtocolError``."""
    raw = COMPRESSIONS[spec.compression].decompress(payload, max_decoded_bytes)
    codec = CODECS[spec.dtype]
    # no per-tensor copies: the arrays are read-only views of ``raw`` (or new arrays from a codec)
    wire, _ = decode_tensors(raw, allowed_dtypes=codec.wire_dtypes, copy=False)
    tensors = DecodedTensors(codec.decode(wire))
    names = list(tensors)
    same = all(tensors[k] is wire.get(k) for k in names)  # the codec passed the wire arrays through (fp32)
    flat = span_view(wire, names) if same else None
    tensors.flat = flat if flat is not None else flatten(list(tensors.values()))
    # one BLAS pass: a sum of squares is finite iff every value is (or the values are huge: then look
    # closer, and leave those to the norm bound)
    with np.errstate(over="ignore", invalid="ignore"):
        tensors.sumsq = float(np.dot(tensors.flat, tensors.flat))
    if not np.isfinite(tensors.sumsq) and not np.isfinite(tensors.flat).all():
        bad = next(k for k, v in tensors.items() if not np.isfinite(v).all())
        raise ProtocolError(RejectReason.NON_FINITE, f"tensor {bad!r} contains NaN or Inf")
    return tensors
