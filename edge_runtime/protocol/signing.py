"""Ed25519 signatures on the messages that change a fleet's state (``cryptography`` does the math).

Devices sign their updates (header and payload) with their own key; the coordinator checks each against
the key registered for the device id the update claims (``fleet.json`` from ``provision``). The
coordinator signs global pointers, round announcements, receipts and summaries; agents holding the
coordinator's public key accept only those that verify. A JSON message's signature covers its
canonical form (sorted keys, no whitespace, without the ``signature`` field); an update's covers the
canonical header without ``signature`` followed by the payload bytes. Signatures travel as
``"ed25519:<base64>"``."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, ProtocolError, RejectReason

PREFIX = "ed25519:"


def _lib():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("signatures need the cryptography package (pip install cryptography)") from None
    return serialization, ed25519, InvalidSignature


def load_private_key(path: str | Path):
    serialization, ed25519, _ = _lib()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(pem: str | bytes | Path):
    """A public key from PEM text or a PEM file's path."""
    serialization, ed25519, _ = _lib()
    data = pem.encode() if isinstance(pem, str) and pem.lstrip().startswith("-----") else pem
    if not isinstance(data, bytes):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the public key {pem!s}: {exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError("not an Ed25519 public key")
    return key


def device_keys(path: str | Path) -> dict[str, Any]:
    """{device id: public key} from a provisioning folder's fleet.json."""
    try:
        reg = json.loads(Path(path).read_text())
        return {d: load_public_key(v["public_key"]) for d, v in reg["devices"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a fleet.json from `edgefm-coordinator provision` ({exc})") from None


def canonical(obj: dict) -> bytes:
    return json.dumps(
        {k: v for k, v in obj.items() if k != "signature"}, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def signature(data: bytes, key) -> str:
    return PREFIX + base64.b64encode(key.sign(data)).decode()


def check(data: bytes, sig: Any, public_key, what: str) -> None:
    """Raise ProtocolError(BAD_SIGNATURE) unless ``sig`` is ``public_key``'s signature of ``data``."""
    _, _, invalid = _lib()
    if not isinstance(sig, str) or not sig.startswith(PREFIX):
        raise ProtocolError(RejectReason.BAD_SIGNATURE, f"{what} carries no Ed25519 signature")
    try:
        public_key.verify(base64.b64decode(sig[len(PREFIX) :], validate=True), data)
    except (invalid, ValueError):
        raise ProtocolError(RejectReason.BAD_SIGNATURE, f"{what}: signature does not verify") from None


def sign_message(obj: dict, key) -> dict:
    """``obj`` with its signature added."""
    return {**obj, "signature": signature(canonical(obj), key)}


def verify_message(obj: dict, public_key, what: str) -> None:
    check(canonical(obj), obj.get("signature"), public_key, what)
