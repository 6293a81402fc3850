"""Wire messages shared by agent and coordinator, validated once at the boundary.

Binary update envelope (device -> coordinator)::

    b"EFMU" | u32 LE header length | header JSON (UTF-8) | payload (codec output)

JSON messages (status, global pointer, round announcement, ack) are UTF-8 JSON objects with a
``"protocol"`` field. ``docs/protocol.md`` is the user-facing description; keep it in step.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import math
import re
import struct
import time
from typing import Any, NoReturn

import numpy as np

from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol.codec import CodecSpec, DecodedTensors, decode_payload, encode_payload

PROTOCOL_VERSION = 1
UPDATE_MAGIC = b"EFMU"
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
EPOCH_RE = re.compile(r"^[0-9a-f-]{1,64}$")


def _fail(reason: RejectReason, msg: str) -> NoReturn:
    raise ProtocolError(reason, msg)


def check_id(value: Any, what: str) -> str:
    """Validate an identifier (device id, update id, fleet): 1-64 of [A-Za-z0-9_.-]."""
    if not isinstance(value, str) or not ID_RE.match(value):
        _fail(RejectReason.BAD_FIELD, f"{what} must be 1-64 characters of [A-Za-z0-9_.-], got {value!r}")
    return value


MAX_INT = 2**53  # integers every JSON reader and SQLite keep exactly


def _opt_int(obj: dict, key: str, *, minimum: int = 0) -> int | None:
    return None if obj.get(key) is None else _int(obj, key, minimum=minimum)


def _int(obj: dict, key: str, *, minimum: int = 0) -> int:
    v = obj.get(key)
    if type(v) is not int or not minimum <= v <= MAX_INT:
        _fail(RejectReason.BAD_FIELD, f"field {key!r} must be an integer from {minimum} to 2**53, got {v!r}"[:300])
    return v


def _opt_str(obj: dict, key: str, *, max_len: int = 256) -> str | None:
    return None if obj.get(key) is None else _str(obj, key, max_len=max_len)


def _str(obj: dict, key: str, *, max_len: int = 256) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or len(v) > max_len:
        _fail(RejectReason.BAD_FIELD, f"field {key!r} must be a string of at most {max_len} chars, got {v!r}")
    return v


def _metrics(obj: Any) -> dict[str, float]:
    if obj is None:
        return {}
    if not isinstance(obj, dict) or len(obj) > 64:
        _fail(RejectReason.BAD_FIELD, "metrics must be an object of at most 64 entries")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or len(k) > 64 or isinstance(v, bool) or not isinstance(v, (int, float)):
            _fail(RejectReason.BAD_FIELD, f"metric {k!r} must be a number")
        if not math.isfinite(v):
            _fail(RejectReason.NON_FINITE, f"metric {k!r} is not finite")
        out[k] = float(v)
    return out


class RoundMode(str, enum.Enum):
    """Synchronous rounds (selected devices train from one base version) or asynchronous versions."""

    SYNC = "sync"
    ASYNC = "async"


@dataclasses.dataclass(frozen=True)
class RoundAnnouncement:
    """The coordinator's retained ``round`` message: which round is open (sync: ``round``, its
    ``base_version``, the ``selected`` devices or None for all, the ``deadline``) or, async, which
    version updates are welcome on (``round`` = ``base_version``); ``train_a`` False for frozen-A
    strategies; ``epoch``: the coordinator's lineage."""

    mode: RoundMode = RoundMode.SYNC
    round: int | None = None
    base_version: int | None = None
    selected: tuple[str, ...] | None = None
    deadline: float | None = None
    train_a: bool = True
    epoch: str | None = None

    @property
    def session_key(self) -> str:
        """What makes a session unique: a re-delivered announcement (same lineage, round and base)
        must not start a second one."""
        return f"{self.mode.value}:{self.epoch}:{self.round}:{self.base_version}"

    def to_json(self) -> dict:
        """Plain-JSON form (what goes on the wire)."""
        return {
            "kind": "round",
            "mode": self.mode.value,
            "round": self.round,
            "base_version": self.base_version,
            "selected": None if self.selected is None else list(self.selected),
            "deadline": self.deadline,
            "train_a": self.train_a,
            "epoch": self.epoch,
        }

    @classmethod
    def from_json(cls, msg: dict) -> "RoundAnnouncement":
        """Validate a decoded announcement."""
        if msg.get("kind") != "round":
            _fail(RejectReason.BAD_FIELD, "kind must be 'round'")
        if msg.get("mode", "sync") not in ("sync", "async"):
            _fail(RejectReason.BAD_FIELD, "mode must be 'sync' or 'async'")
        selected = msg.get("selected")
        if selected is not None and (
            not isinstance(selected, list) or len(selected) > 100_000 or not all(isinstance(d, str) for d in selected)
        ):
            _fail(RejectReason.BAD_FIELD, "selected must be null or a list of device ids")
        deadline = msg.get("deadline")
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline)
        ):
            _fail(RejectReason.BAD_FIELD, "deadline must be a finite number of unix seconds")
        train_a = msg.get("train_a", True)
        if not isinstance(train_a, bool):
            _fail(RejectReason.BAD_FIELD, "train_a must be true or false")
        return cls(
            mode=RoundMode(msg.get("mode", "sync")),
            round=_opt_int(msg, "round"),
            base_version=_opt_int(msg, "base_version"),
            selected=None if selected is None else tuple(selected),
            deadline=None if deadline is None else float(deadline),
            train_a=train_a,
            epoch=_epoch(msg.get("epoch")),
        )


class ReceiptStatus(str, enum.Enum):
    """What the coordinator did with an update: counted, refused (with a reason), or already counted."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


@dataclasses.dataclass(frozen=True)
class Receipt:
    """The coordinator's answer to one update (on ``device/<id>/ack``), sent once it is durable."""

    update_id: str
    status: ReceiptStatus
    reason: str | None = None
    version: int | None = None
    device_id: str | None = None

    def to_json(self) -> dict:
        """Plain-JSON form (what goes on the wire)."""
        return {
            "kind": "receipt",
            "update_id": self.update_id,
            "status": self.status.value,
            "reason": self.reason,
            "version": self.version,
            "device_id": self.device_id,
        }

    @classmethod
    def from_json(cls, msg: dict) -> "Receipt":
        """Validate a decoded receipt."""
        if not isinstance(msg.get("update_id"), str) or msg.get("status") not in [s.value for s in ReceiptStatus]:
            _fail(RejectReason.BAD_FIELD, "a receipt needs update_id and status accepted|rejected|duplicate")
        if msg.get("reason") is not None and not isinstance(msg.get("reason"), str):
            _fail(RejectReason.BAD_FIELD, "reason must be a string or null")
        device_id = msg.get("device_id")
        return cls(
            update_id=msg["update_id"],
            status=ReceiptStatus(msg["status"]),
            reason=msg.get("reason"),
            version=_opt_int(msg, "version"),
            device_id=None if device_id is None else check_id(device_id, "device_id"),
        )


@dataclasses.dataclass(frozen=True)
class DeviceStatus:
    """A device's retained ``status`` message (and last will): ``state`` is its presence as the
    coordinator selects by ("online"/"offline"); the rest describes what it serves and its outbox."""

    state: str | None = None
    device_id: str | None = None
    profile: str | None = None
    adapter: str | None = None
    activity: str | None = None
    base_fingerprint: str | None = None
    adapter_version: int | None = None
    global_version: int | None = None
    outbox: dict | None = None
    ts: float | None = None

    def to_json(self) -> dict:
        """Plain-JSON form (what goes on the wire)."""
        return {"kind": "status", **{k: v for k, v in dataclasses.asdict(self).items() if v is not None}}

    @classmethod
    def from_json(cls, msg: dict) -> "DeviceStatus":
        """Validate a decoded status message (what the coordinator records)."""
        strs = {key: _opt_str(msg, key, max_len=256) for key in ("state", "profile", "adapter", "activity")}
        outbox = msg.get("outbox")
        if outbox is not None and not isinstance(outbox, dict):
            _fail(RejectReason.BAD_FIELD, "outbox must be an object")
        ts = msg.get("ts")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts)):
            _fail(RejectReason.BAD_FIELD, "ts must be a finite number of unix seconds")
        device_id = msg.get("device_id")
        return cls(
            **strs,
            device_id=None if device_id is None else check_id(device_id, "device_id"),
            base_fingerprint=_opt_str(msg, "base_fingerprint", max_len=128),
            adapter_version=_opt_int(msg, "adapter_version"),
            global_version=_opt_int(msg, "global_version"),
            outbox=outbox,
            ts=None if ts is None else float(ts),
        )


def parse_json_message(data: bytes, max_bytes: int = 1 << 20) -> dict:
    """Parse a JSON message and check its protocol version."""
    if len(data) > max_bytes:
        _fail(RejectReason.OVERSIZE, f"JSON message of {len(data)} bytes over {max_bytes}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        _fail(RejectReason.MALFORMED, f"not UTF-8 JSON: {exc}")
    if not isinstance(obj, dict):
        _fail(RejectReason.MALFORMED, "message must be a JSON object")
    version = obj.get("protocol")
    if version != PROTOCOL_VERSION:
        _fail(RejectReason.UNSUPPORTED_VERSION, f"protocol {version!r} not supported (this side speaks {PROTOCOL_VERSION})")
    return obj


def dump_json_message(obj: dict, signer=None) -> bytes:
    """Serialize a JSON message with the protocol version; ``signer`` (Ed25519 key) adds a signature over
    everything else (``protocol.signing``)."""
    msg = {"protocol": PROTOCOL_VERSION, **obj}
    if signer is not None:
        from edge_runtime.protocol import signing

        msg = signing.sign_message(msg, signer)
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()


@dataclasses.dataclass
class UpdateHeader:
    """Header of one adapter update sent by a device."""

    device_id: str
    update_id: str
    base_version: int
    num_examples: int
    base_fingerprint: str
    round: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    codec: CodecSpec = dataclasses.field(default_factory=CodecSpec)
    created_at: float = dataclasses.field(default_factory=time.time)
    payload_sha256: str = ""
    payload_size: int = 0
    signature: str | None = None

    def to_json(self) -> dict:
        """Plain-JSON form (signature included when set)."""
        d = dataclasses.asdict(self)
        d["codec"] = self.codec.to_json()
        d["protocol"] = PROTOCOL_VERSION
        d["kind"] = "update"
        return d

    @classmethod
    def from_json(cls, obj: Any) -> "UpdateHeader":
        """Validate a decoded header object."""
        if not isinstance(obj, dict):
            _fail(RejectReason.MALFORMED, "update header must be a JSON object")
        if obj.get("protocol") != PROTOCOL_VERSION:
            _fail(RejectReason.UNSUPPORTED_VERSION, f"protocol {obj.get('protocol')!r} not supported (want {PROTOCOL_VERSION})")
        if obj.get("kind") != "update":
            _fail(RejectReason.BAD_FIELD, f"kind must be 'update', got {obj.get('kind')!r}")
        codec = obj.get("codec")
        if (
            not isinstance(codec, dict)
            or not isinstance(codec.get("dtype"), str)
            or not isinstance(codec.get("compression"), str)
        ):
            _fail(RejectReason.BAD_FIELD, "codec must be {dtype, compression}")
        created = obj.get("created_at")
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
            _fail(RejectReason.BAD_FIELD, "created_at must be a finite number")
        sha = _str(obj, "payload_sha256")
        if not SHA_RE.match(sha):
            _fail(RejectReason.BAD_FIELD, "payload_sha256 must be 64 lowercase hex digits")
        sig = _opt_str(obj, "signature")
        return cls(
            device_id=check_id(obj.get("device_id"), "device_id"),
            update_id=check_id(obj.get("update_id"), "update_id"),
            base_version=_int(obj, "base_version"),
            num_examples=_int(obj, "num_examples", minimum=1),
            base_fingerprint=_str(obj, "base_fingerprint"),
            round=_opt_int(obj, "round"),
            metrics=_metrics(obj.get("metrics")),
            codec=CodecSpec(codec["dtype"], codec["compression"]),
            created_at=float(created),
            payload_sha256=sha,
            payload_size=_int(obj, "payload_size"),
            signature=sig,
        )


@dataclasses.dataclass
class Update:
    """A decoded, validated update: header and fp32 delta tensors."""

    header: UpdateHeader
    tensors: DecodedTensors  # a dict, with the flat vector and its sum of squares


def _sign(header_json: dict, payload: bytes, key: bytes) -> str:
    unsigned = {k: v for k, v in header_json.items() if k != "signature"}
    msg = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode() + payload
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def encode_update(
    header: UpdateHeader,
    tensors: dict[str, np.ndarray] | None,
    *,
    sign_key: bytes | None = None,
    signer=None,
    payload: bytes | None = None,
) -> bytes:
    """Build the binary update message; fills in payload hash/size and the signature: the device's
    Ed25519 key (``signer``, see ``protocol.signing``) or the optional fleet-wide HMAC key. ``payload``:
    the tensors already encoded with ``header.codec`` (``encode_payload``), to send one body under
    several headers (a resend under a new update id, a load test)."""
    if payload is None:
        if tensors is None:
            raise ValueError("encode_update needs the tensors or their encoded payload")
        payload = encode_payload(tensors, header.codec)
    header.payload_sha256 = hashlib.sha256(payload).hexdigest()
    header.payload_size = len(payload)
    header.signature = None
    hj = header.to_json()
    if signer is not None:
        from edge_runtime.protocol import signing

        header.signature = hj["signature"] = signing.signature(signing.canonical(hj) + payload, signer)
    elif sign_key is not None:
        header.signature = hj["signature"] = _sign(hj, payload, sign_key)
    hbytes = json.dumps(hj, separators=(",", ":"), allow_nan=False).encode()
    return UPDATE_MAGIC + struct.pack("<I", len(hbytes)) + hbytes + payload


def decode_update_header(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[UpdateHeader, memoryview]:
    """Validate the envelope and header only (cheap: used for dedupe before decoding tensors)."""
    mv = memoryview(data)
    if len(mv) > max_bytes:
        _fail(RejectReason.OVERSIZE, f"update of {len(mv)} bytes over the {max_bytes}-byte limit")
    if len(mv) < 8:
        _fail(RejectReason.TRUNCATED, f"update of {len(mv)} bytes is shorter than its envelope")
    if bytes(mv[:4]) != UPDATE_MAGIC:
        _fail(RejectReason.BAD_MAGIC, "not an edgefm update (magic bytes differ)")
    (hlen,) = struct.unpack("<I", mv[4:8])
    if hlen > MAX_HEADER_BYTES:
        _fail(RejectReason.MALFORMED, f"header of {hlen} bytes over {MAX_HEADER_BYTES}")
    if 8 + hlen > len(mv):
        _fail(RejectReason.TRUNCATED, f"header claims {hlen} bytes, {len(mv) - 8} present")
    try:
        hobj = json.loads(bytes(mv[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        _fail(RejectReason.MALFORMED, f"header is not UTF-8 JSON: {exc}")
    header = UpdateHeader.from_json(hobj)
    payload = mv[8 + hlen :]
    if len(payload) != header.payload_size:
        _fail(
            RejectReason.TRUNCATED if len(payload) < header.payload_size else RejectReason.MALFORMED,
            f"payload is {len(payload)} bytes, header says {header.payload_size}",
        )
    return header, payload


def decode_update(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_decoded_bytes: int | None = None,
    verify_key: bytes | None = None,
) -> Update:
    """Validate and decode an update message, or raise ``ProtocolError`` with the reason."""
    header, payload = decode_update_header(data, max_bytes=max_bytes)
    return decode_update_body(header, payload, max_decoded_bytes=max_decoded_bytes or 4 * max_bytes, verify_key=verify_key)


def decode_update_body(
    header: UpdateHeader, payload: memoryview, *, max_decoded_bytes: int, verify_key: bytes | None = None, device_public_key=None
) -> Update:
    """Second half of ``decode_update`` for a header already validated (the coordinator dedupes in between);
    ``device_public_key``: the Ed25519 key registered for the device the header names."""
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        _fail(RejectReason.HASH_MISMATCH, "payload does not match payload_sha256")
    if device_public_key is not None:
        from edge_runtime.protocol import signing

        signing.check(
            signing.canonical(header.to_json()) + bytes(payload),
            header.signature,
            device_public_key,
            f"update from {header.device_id}",
        )
    if verify_key is not None:
        want = _sign(header.to_json(), bytes(payload), verify_key)
        if not header.signature or not hmac.compare_digest(want, header.signature):
            _fail(RejectReason.BAD_SIGNATURE, "signature missing or wrong for this fleet key")
    tensors = decode_payload(payload, header.codec, max_decoded_bytes=max_decoded_bytes)  # views, no copy
    return Update(header, tensors)


def check_tensors_match(tensors: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> None:
    """Require exactly the schema's tensor names with the schema's shapes (raises ProtocolError)."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        _fail(
            RejectReason.BAD_SHAPE, f"tensor names differ from the adapter schema: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != tuple(shape):
            _fail(RejectReason.BAD_SHAPE, f"tensor {k!r} has shape {tuple(tensors[k].shape)}, schema says {tuple(shape)}")


@dataclasses.dataclass
class GlobalPointer:
    """Retained description of the current global adapter; its bytes travel as chunks."""

    version: int
    parent: int | None
    base_fingerprint: str
    sha256: str
    size: int
    chunk_size: int
    chunk_sha256: list[str]
    round: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    epoch: str | None = None  # the coordinator's lineage: a new one outranks any version of the old (fleet reset)

    def to_json(self) -> dict:
        return {"kind": "global", **dataclasses.asdict(self)}

    def to_bytes(self) -> bytes:
        """Serialize as a JSON message."""
        return dump_json_message(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = 1 << 30) -> "GlobalPointer":
        """Parse and validate a pointer message."""
        obj = parse_json_message(data)
        if obj.get("kind") != "global":
            _fail(RejectReason.BAD_FIELD, "kind must be 'global'")
        sha = _str(obj, "sha256")
        chunks = obj.get("chunk_sha256")
        size = _int(obj, "size", minimum=1)
        csize = _int(obj, "chunk_size", minimum=1)
        if not SHA_RE.match(sha):
            _fail(RejectReason.BAD_FIELD, "sha256 must be 64 lowercase hex digits")
        if size > max_size:
            _fail(RejectReason.OVERSIZE, f"global adapter of {size} bytes over {max_size}")
        if (
            not isinstance(chunks, list)
            or len(chunks) != -(-size // csize)
            or not all(isinstance(c, str) and SHA_RE.match(c) for c in chunks)
        ):
            _fail(RejectReason.BAD_FIELD, "chunk_sha256 must list one sha256 per chunk")
        return cls(
            version=_int(obj, "version", minimum=0),
            parent=_opt_int(obj, "parent"),  # v0: the bundle's adapter
            base_fingerprint=_str(obj, "base_fingerprint"),
            sha256=sha,
            size=size,
            chunk_size=csize,
            chunk_sha256=chunks,
            round=_opt_int(obj, "round"),
            metrics=_metrics(obj.get("metrics")),
            epoch=_epoch(obj.get("epoch")),
        )


def _epoch(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not EPOCH_RE.match(value):
        _fail(RejectReason.BAD_FIELD, "epoch must be 1-64 characters of [0-9a-f-]")
    return value


def make_pointer(
    version: int,
    parent: int | None,
    base_fingerprint: str,
    blob: bytes,
    *,
    chunk_size: int = 256 * 1024,
    round: int | None = None,
    metrics: dict[str, float] | None = None,
    epoch: str | None = None,
) -> tuple[GlobalPointer, list[bytes]]:
    """Split an adapter file into chunks and describe them in a pointer."""
    chunks = [blob[i : i + chunk_size] for i in range(0, len(blob), chunk_size)] or [b""]
    ptr = GlobalPointer(
        version,
        parent,
        base_fingerprint,
        hashlib.sha256(blob).hexdigest(),
        len(blob),
        chunk_size,
        [hashlib.sha256(c).hexdigest() for c in chunks],
        round,
        dict(metrics or {}),
        epoch,
    )
    return ptr, chunks


class ChunkAssembler:
    """Collects the chunks of one global adapter in any order, verifying each; pure and resumable."""

    def __init__(self, pointer: GlobalPointer, have: dict[int, bytes] | None = None):
        self.pointer = pointer
        self.chunks: dict[int, bytes] = {}
        for i, c in (have or {}).items():
            self.add(i, c)

    def add(self, index: int, data: bytes) -> bool:
        """Add chunk ``index``; return True when all chunks are in. Raises ProtocolError on a bad chunk."""
        n = len(self.pointer.chunk_sha256)
        if not 0 <= index < n:
            _fail(RejectReason.BAD_FIELD, f"chunk index {index} outside 0..{n - 1}")
        if hashlib.sha256(data).hexdigest() != self.pointer.chunk_sha256[index]:
            _fail(RejectReason.HASH_MISMATCH, f"chunk {index} does not match its sha256")
        self.chunks[index] = bytes(data)
        return self.complete

    @property
    def complete(self) -> bool:
        """Whether every chunk is present."""
        return len(self.chunks) == len(self.pointer.chunk_sha256)

    def assemble(self) -> bytes:
        """Join the chunks and check the whole-object hash."""
        blob = b"".join(self.chunks[i] for i in range(len(self.pointer.chunk_sha256)))
        if len(blob) != self.pointer.size or hashlib.sha256(blob).hexdigest() != self.pointer.sha256:
            _fail(RejectReason.HASH_MISMATCH, "assembled adapter does not match the pointer's sha256")
        return blob
