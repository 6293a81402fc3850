"""Shared contracts of edgefm: the one module agent and coordinator both import.

Nothing here imports onnxruntime, torch or paho; it is plain data and validation.
"""

from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol.adapter import (
    AdapterMeta,
    adapter_from_bytes,
    adapter_to_bytes,
    load_adapter,
    lora_names,
    save_adapter,
)
from edge_runtime.protocol.codec import CodecSpec, decode_payload, encode_payload
from edge_runtime.protocol.manifest import Manifest, verify_files
from edge_runtime.protocol.messages import (
    ChunkAssembler,
    DeviceStatus,
    GlobalPointer,
    Receipt,
    ReceiptStatus,
    RoundAnnouncement,
    RoundMode,
    Update,
    UpdateHeader,
    check_tensors_match,
    decode_update,
    decode_update_header,
    dump_json_message,
    encode_update,
    make_pointer,
    parse_json_message,
)
from edge_runtime.protocol.topics import Topics, topic_matches

__all__ = [
    "ProtocolError",
    "RejectReason",
    "AdapterMeta",
    "adapter_from_bytes",
    "adapter_to_bytes",
    "load_adapter",
    "lora_names",
    "save_adapter",
    "CodecSpec",
    "decode_payload",
    "encode_payload",
    "Manifest",
    "verify_files",
    "ChunkAssembler",
    "DeviceStatus",
    "GlobalPointer",
    "Receipt",
    "ReceiptStatus",
    "RoundAnnouncement",
    "RoundMode",
    "Update",
    "UpdateHeader",
    "check_tensors_match",
    "decode_update",
    "decode_update_header",
    "dump_json_message",
    "encode_update",
    "make_pointer",
    "parse_json_message",
    "Topics",
    "topic_matches",
]
