"""Tensor codecs for adapter updates: fp32 / fp16 / int8-with-scales, optionally zstd-compressed.

Each codec is a small class in a registry (no if/elif chains). ``encode`` turns named fp32 arrays into
safetensors bytes; ``decode`` turns them back into fp32 arrays. Stated error bounds (tested):

- ``fp32``: exact.
- ``fp16``: relative error <= 2**-11 for |x| in fp16's normal range; |x| > 65504 is refused at encode.
- ``int8``: symmetric per row (axis 0) with an fp32 scale per row; |x - x'| <= scale / 2 where
  scale = max|row| / 127.
- ``int4``: symmetric per block of 128 values (flattened), two values per byte, an fp16 scale per
  block; |x - x'| <= s / 2 where s is the stored scale (max|block| / 7, rounded up to fp16).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol.tensors import decode_tensors, encode_tensors

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
                raise ProtocolError(RejectReason.BAD_SHAPE, f"int8 codec: scale of {k!r} has shape {scale.shape}, want ({rows.shape[0]},)")
            out[k] = (rows.astype(np.float32) * scale[:, None]).reshape(v.shape)
        return out


class Int4Codec(TensorCodec):
    """4-bit blockwise codec: ~8x smaller than fp32 before compression (updates are noise-tolerant:
    the server averages many of them)."""

    name = "int4"
    wire_dtypes = frozenset({"U8", "F16", "I64"})
    block = 128

    def encode(self, tensors):
        out = {}
        for k, v in tensors.items():
            flat = np.asarray(v, dtype=np.float32).ravel()
            n = flat.size
            nb = -(-n // self.block)
            padded = np.zeros(nb * self.block, np.float32)
            padded[:n] = flat
            blocks = padded.reshape(nb, self.block)
            # fp16 scale rounded up, so |x| / scale <= 7 and the rounding bound holds with the stored scale
            scale = (np.abs(blocks).max(axis=1) / 7.0).astype(np.float16)
            scale = np.where(scale.astype(np.float32) * 7.0 < np.abs(blocks).max(axis=1),
                             np.nextafter(scale, np.float16(np.inf)), scale).astype(np.float16)
            s32 = scale.astype(np.float32)
            q = np.clip(np.rint(blocks / np.where(s32 > 0, s32, 1.0)[:, None]), -7, 7).astype(np.int8).ravel()
            nib = (q + 8).astype(np.uint8)
            if nib.size % 2:
                nib = np.append(nib, np.uint8(8))
            out[k] = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
            out[k + SCALE_SUFFIX] = scale
            out[k + ".__shape"] = np.array(v.shape, np.int64)
        return out

    def decode(self, wire):
        out = {}
        for k, v in wire.items():
            if k.endswith(SCALE_SUFFIX) or k.endswith(".__shape"):
                base = k[: -len(SCALE_SUFFIX)] if k.endswith(SCALE_SUFFIX) else k[: -len(".__shape")]
                if base not in wire:
                    raise ProtocolError(RejectReason.MALFORMED, f"{k!r} has no tensor")
                continue
            scale, shape = wire.get(k + SCALE_SUFFIX), wire.get(k + ".__shape")
            if v.dtype != np.uint8 or v.ndim != 1 or scale is None or scale.dtype != np.float16 or shape is None \
                    or shape.dtype != np.int64 or shape.ndim != 1 or shape.size > 8 or np.any(shape < 0):
                raise ProtocolError(RejectReason.BAD_DTYPE, f"int4 codec: {k!r} needs U8 data, an F16 scale and an I64 shape")
            n = 1
            for d in shape.tolist():
                n *= d
                if n > 1 << 34:
                    raise ProtocolError(RejectReason.BAD_SHAPE, f"int4 codec: shape of {k!r} too large")
            nb = -(-n // self.block)
            if v.size != -(-nb * self.block // 2) or scale.shape != (nb,):
                raise ProtocolError(RejectReason.BAD_SHAPE, f"int4 codec: sizes of {k!r} do not match its shape")
            q = np.empty(v.size * 2, np.int8)
            q[0::2] = (v & 0x0F).astype(np.int8) - 8
            q[1::2] = (v >> 4).astype(np.int8) - 8
            vals = q[: nb * self.block].reshape(nb, self.block).astype(np.float32) * scale.astype(np.float32)[:, None]
            out[k] = vals.ravel()[:n].reshape(shape.tolist())
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

    def compress(self, data):
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(data)

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
            raise ProtocolError(RejectReason.UNKNOWN_CODEC,
                                f"unknown compression {self.compression!r}; known: {sorted(COMPRESSIONS)}")

    def to_json(self) -> dict:
        """Plain-JSON form for headers."""
        return {"dtype": self.dtype, "compression": self.compression}


def encode_payload(tensors: dict[str, np.ndarray], spec: CodecSpec) -> bytes:
    """Encode fp32 tensors with ``spec`` into payload bytes."""
    for k, v in tensors.items():
        if SCALE_SUFFIX in k or k.endswith(".__shape"):
            raise ValueError(f"tensor name {k!r} uses a reserved suffix ({SCALE_SUFFIX!r}, '.__shape')")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"tensor {k!r} has NaN or Inf; refusing to encode it")
    raw = encode_tensors(CODECS[spec.dtype].encode(tensors))
    return COMPRESSIONS[spec.compression].compress(raw)


def decode_payload(payload: bytes, spec: CodecSpec, *, max_decoded_bytes: int) -> dict[str, np.ndarray]:
    """Decode payload bytes into finite fp32 tensors, or raise ``ProtocolError``."""
    raw = COMPRESSIONS[spec.compression].decompress(payload, max_decoded_bytes)
    codec = CODECS[spec.dtype]
    wire, _ = decode_tensors(raw, allowed_dtypes=codec.wire_dtypes)
    tensors = codec.decode(wire)
    for k, v in tensors.items():
        if not np.all(np.isfinite(v)):
            raise ProtocolError(RejectReason.NON_FINITE, f"tensor {k!r} contains NaN or Inf")
    return tensors
