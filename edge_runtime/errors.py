"""The one exception tree of edgefm, shared by the agent, the coordinator and the exporter.

    EdgefmError                  base: the CLIs catch only this and exit non-zero with one line
     ├── ProtocolError           a received message/file broke the wire contract (has .reason)
     ├── BundleError             a device bundle is missing, corrupt or does not match
     ├── ConfigError             a configuration value or command-line flag is wrong
     ├── ExportError             the exporter could not build a bundle
     └── TrainingError           the trainer could not run a step (e.g. non-finite loss)

Third-party errors (onnxruntime, paho, sqlite3, zstandard) are translated into these at the
boundary where they occur, so callers never need to know which library failed.
"""

from __future__ import annotations

from typing import Any

import enum


class RejectReason(str, enum.Enum):
    """Machine-readable reason why a received message or file was refused."""

    MALFORMED = "malformed"  # not parseable as the expected structure
    TRUNCATED = "truncated"  # shorter than its own headers say
    BAD_MAGIC = "bad_magic"  # not an edgefm envelope at all
    UNSUPPORTED_VERSION = "unsupported_version"  # protocol version we do not speak
    OVERSIZE = "oversize"  # over the configured size limit
    BAD_DTYPE = "bad_dtype"  # tensor dtype not allowed by the codec
    BAD_SHAPE = "bad_shape"  # tensor shape does not match the adapter schema
    NON_FINITE = "non_finite"  # NaN or Inf in a tensor or metric
    HASH_MISMATCH = "hash_mismatch"  # content does not match its stated sha256
    BAD_SIGNATURE = "bad_signature"  # HMAC signature missing or wrong
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"  # trained on another base model
    STALE = "stale"  # based on a version too old to use
    DUPLICATE = "duplicate"  # update id already counted
    NORM_BOUND = "norm_bound"  # update norm above the accepted bound
    BAD_FIELD = "bad_field"  # a header field has a wrong type or value
    UNKNOWN_CODEC = "unknown_codec"  # codec/compression name not known
    TOO_FREQUENT = "too_frequent"  # this device already has an update in the open aggregation


class EdgefmError(Exception):
    """Base of every error edgefm raises on purpose."""


class ProtocolError(EdgefmError):
    """A received message broke the wire contract; ``reason`` says how, for records and metrics."""

    def __init__(self, reason: RejectReason, message: str):
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.detail = message
        self.header: Any = None  # the update header, when it parsed before the fault (coordinator/validate.py)


class BundleError(EdgefmError):
    """A device bundle is missing, corrupt, or does not fit what was asked of it."""


class ConfigError(EdgefmError):
    """A configuration value or command-line flag is invalid; the message says how to fix it."""


class ExportError(EdgefmError):
    """The exporter could not produce a bundle."""


class StateError(EdgefmError):
    """Durable state is damaged; the message says what was found and how to recover."""


class TrainingError(EdgefmError):
    """The on-device trainer could not complete a step."""
