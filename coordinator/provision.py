"""Fleet provisioning: every identity, key and broker rule a fleet needs, written once to a folder.

Layout of ``OUT`` (``edgefm-coordinator provision --fleet F --devices a b -o OUT``)::

    ca/ca.crt, ca/ca.key, ca/crl.pem, ca/serials.json      the fleet CA (keep ca.key offline)
    broker/server.crt, server.key, mosquitto.conf, acl       TLS 1.2+ with client certificates only
    coordinator/client.crt, client.key, signing.key, coordinator.toml
    devices/<id>/client.crt, client.key, signing.key, agent.toml
    fleet.json                                               device ids and their Ed25519 public keys
    coordinator.pub                                          the coordinator's Ed25519 public key

Transport identities are X.509 (ECDSA P-256) client certificates issued by the fleet CA; Mosquitto
takes the certificate's common name as the user name, and the ACL lets each identity write and read
only its own topics. Signing keys are Ed25519, one per device and one for the coordinator. All the
cryptography is the ``cryptography`` library's; nothing here implements a primitive."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError
from edge_runtime.protocol.messages import check_id
from edge_runtime.protocol.topics import Topics

COORDINATOR = "coordinator"
VALID_DAYS = 825


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError("provisioning needs the cryptography package (pip install cryptography)") from None
    return x509, hashes, serialization, ec, ed25519, NameOID, ExtendedKeyUsageOID


def _write(path: Path, data: bytes | str, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


def _pem_key(key) -> bytes:
    _, _, serialization, *_ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_public(key) -> bytes:
    _, _, serialization, *_ = _crypto()
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class FleetCA:
    """The fleet's certificate authority in ``OUT/ca`` (created on first use)."""

    def __init__(self, out: Path, fleet: str):
        x509, hashes, serialization, ec, _, NameOID, _ = _crypto()
        self.out, self.fleet = Path(out), fleet
        d = self.out / "ca"
        if (d / "ca.key").is_file():
            self.key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
            self.cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgefm fleet {fleet} CA")])
            now = datetime.datetime.now(datetime.timezone.utc)
            self.cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(self.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .sign(self.key, hashes.SHA256())
            )
            _write(d / "ca.key", _pem_key(self.key), secret=True)
            _write(d / "ca.crt", self.cert.public_bytes(serialization.Encoding.PEM))
        self.serials_path = d / "serials.json"
        self.serials = json.loads(self.serials_path.read_text()) if self.serials_path.is_file() else {"issued": {}, "revoked": []}

    def issue(self, cn: str, *, server_names: list[str] | None = None) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for ``cn``: a server certificate with ``server_names`` as SANs, else a
        client certificate."""
        import ipaddress

        x509, hashes, serialization, ec, _, NameOID, EKU = _crypto()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        serial = x509.random_serial_number()
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server_names:
            sans = []
            for n in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False).add_extension(
                x509.ExtendedKeyUsage([EKU.SERVER_AUTH]), critical=False
            )
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([EKU.CLIENT_AUTH]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        self.serials["issued"].setdefault(cn, []).append(serial)
        self._save_serials()
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def revoke(self, cn: str) -> int:
        """Revoke every certificate issued to ``cn``; returns how many."""
        serials = self.serials["issued"].get(cn, [])
        new = [s for s in serials if s not in self.serials["revoked"]]
        self.serials["revoked"].extend(new)
        self._save_serials()
        return len(new)

    def write_crl(self) -> Path:
        """The certificate revocation list the broker checks (``crlfile``)."""
        x509, hashes, serialization, *_ = _crypto()
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now)
            .next_update(now + datetime.timedelta(days=VALID_DAYS))
        )
        for s in self.serials["revoked"]:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
        path = self.out / "ca" / "crl.pem"
        _write(path, b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path

    def _save_serials(self) -> None:
        _write(self.serials_path, json.dumps(self.serials, indent=1))


def signing_key(path: Path) -> bytes:
    """Create an Ed25519 signing key at ``path`` (kept if it exists); returns its public key PEM."""
    _, _, serialization, _, ed25519, *_ = _crypto()
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        _write(path, _pem_key(key), secret=True)
    return _pem_public(key)


def acl(fleet: str) -> str:
    """Mosquitto ACL: the coordinator owns the fleet's global, round, summary and receipt topics; a device
    writes only its own status and update and reads only its own receipts, the globals and the round.
    (Identities are certificate common names, taken as user names by ``use_identity_as_username``.)"""
    t = Topics(fleet)
    dev = f"{t.base}/device/%u"
    return "\n".join(
        [
            f"# edgefm fleet {fleet}: generated by edgefm-coordinator provision",
            f"user {COORDINATOR}",
            f"topic readwrite {t.base}/#",
            "",
            f"pattern write {dev}/status",
            f"pattern write {dev}/update",
            f"pattern read {dev}/ack",
            f"pattern read {t.base}/global/#",
            f"pattern read {t.base}/round",
            f"pattern read {t.base}/summary",
            "",
        ]
    )


def mosquitto_conf(out: Path, port: int, auth: str = "cert") -> str:
    b = out / "broker"
    common = [
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {b / 'acl'}",
        f"listener {port}",
        f"cafile {out / 'ca' / 'ca.crt'}",
        f"certfile {b / 'server.crt'}",
        f"keyfile {b / 'server.key'}",
    ]
    if auth == "password":
        return "\n".join(
            [
                "# edgefm: TLS (server certificate) with per-identity user names and passwords",
                *common,
                f"password_file {b / 'passwd'}",
                "tls_version tlsv1.2",
                "",
            ]
        )
    return "\n".join(
        [
            "# edgefm: TLS with client certificates only; identities are certificate common names",
            *common,
            "require_certificate true",
            "use_identity_as_username true",
            f"crlfile {out / 'ca' / 'crl.pem'}",
            "tls_version tlsv1.2",
            "",
        ]
    )


def set_password(passwd: Path, user: str, password: str | None) -> None:
    """Add (or with None, delete) a user in Mosquitto's password file, hashed by its own mosquitto_passwd."""
    import shutil
    import subprocess

    tool = shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if Path("/usr/bin/mosquitto_passwd").exists() else None
    )
    if tool is None:
        raise ConfigError("--auth password needs mosquitto_passwd (apt-get install mosquitto) to hash the passwords")
    passwd.parent.mkdir(parents=True, exist_ok=True)
    if not passwd.exists():
        _write(passwd, "", secret=True)
    args = [tool, "-D", str(passwd), user] if password is None else [tool, "-b", str(passwd), user, password]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise ConfigError(f"mosquitto_passwd failed for {user}: {r.stderr.strip() or r.stdout.strip()}")


def provision(
    out_dir: str | Path,
    fleet: str,
    devices: list[str],
    *,
    broker_host: str | None = None,
    port: int | None = None,
    revoke: list[str] | None = None,
    auth: str | None = None,
    log=print,
) -> dict:
    """Create (or extend) a fleet's provisioning folder; ``revoke`` removes devices. ``auth``: ``cert``
    (client certificates, the default) or ``password`` (a user name and random password per identity,
    over TLS); fixed when the folder is made. Returns fleet.json's content."""
    out = Path(out_dir).resolve()
    check_id(fleet, "fleet")
    for dev_id in devices + (revoke or []):
        check_id(dev_id, "device id")
        if dev_id == COORDINATOR:
            raise ConfigError(f"{COORDINATOR!r} is the coordinator's identity; choose another device id")
    reg_path = out / "fleet.json"
    registry: dict[str, Any] = (
        json.loads(reg_path.read_text()) if reg_path.is_file() else {"fleet": fleet, "devices": {}, "revoked": []}
    )
    if registry["fleet"] != fleet:
        raise ConfigError(f"{out} provisions fleet {registry['fleet']!r}, not {fleet!r}")
    mode = registry.setdefault("auth", auth or "cert")
    if auth is not None and auth != mode:
        raise ConfigError(f"{out} was provisioned with --auth {mode}; a folder keeps its mode (provision a new one)")
    # the broker's address is fixed with the folder too: every config and certificate written names it
    for field, given, default in (("broker_host", broker_host, "localhost"), ("port", port, 8883)):
        kept = registry.setdefault(field, given if given is not None else default)
        if given is not None and given != kept:
            raise ConfigError(
                f"{out} was provisioned for {field} {kept!r}, not {given!r}: the configs and certificates "
                f"in it name that address (provision a new folder for another broker)"
            )
    host: str = registry["broker_host"]
    tls_port: int = registry["port"]
    if mode not in ("cert", "password"):
        raise ConfigError("--auth is cert or password")
    ca = FleetCA(out, fleet)
    ca_path = out / "ca" / "ca.crt"
    passwd = out / "broker" / "passwd"

    def url(who: str) -> str:
        if mode == "password":  # the user name is the identity; the password is made once and kept in the (0600) TOML
            import secrets
            import urllib.parse

            name = who.rsplit("/", 1)[-1]
            password = secrets.token_urlsafe(24)
            set_password(passwd, name, password)
            return f"mqtts://{name}:{urllib.parse.quote(password, safe='')}@{host}:{tls_port}?ca={ca_path}"
        return f"mqtts://{host}:{tls_port}?ca={ca_path}&cert={out / who / 'client.crt'}&key={out / who / 'client.key'}"

    if not (out / "broker" / "server.crt").is_file():
        crt, key = ca.issue(host, server_names=sorted({host, "localhost", "127.0.0.1"}))
        _write(out / "broker" / "server.crt", crt)
        _write(out / "broker" / "server.key", key, secret=True)
    new_coordinator = not (out / COORDINATOR / "client.crt").is_file()
    if new_coordinator:
        crt, key = ca.issue(COORDINATOR)
        _write(out / COORDINATOR / "client.crt", crt)
        _write(out / COORDINATOR / "client.key", key, secret=True)
    coord_pub = signing_key(out / COORDINATOR / "signing.key")
    _write(out / "coordinator.pub", coord_pub)
    # (password mode: written once, since each write makes a new password)
    if mode == "cert" or new_coordinator or not (out / COORDINATOR / "coordinator.toml").is_file():
        _write(
            out / COORDINATOR / "coordinator.toml",
            "\n".join(
                [
                    f"fleet = {json.dumps(fleet)}",
                    f"broker = {json.dumps(url(COORDINATOR))}",
                    f"signing_key = {json.dumps(str(out / COORDINATOR / 'signing.key'))}",
                    f"device_keys = {json.dumps(str(reg_path))}",
                    "",
                ]
            ),
            secret=mode == "password",
        )
    for dev in devices:
        if dev in registry["devices"]:
            log(f"{dev}: already provisioned (kept)")
            continue
        d = out / "devices" / dev
        crt, key = ca.issue(dev)
        _write(d / "client.crt", crt)
        _write(d / "client.key", key, secret=True)
        pub = signing_key(d / "signing.key")
        registry["devices"][dev] = {"public_key": pub.decode()}
        _write(
            d / "agent.toml",
            "\n".join(
                [
                    f"device_id = {json.dumps(dev)}",
                    f"fleet = {json.dumps(fleet)}",
                    f"broker = {json.dumps(url('devices/' + dev))}",
                    f"signing_key = {json.dumps(str(d / 'signing.key'))}",
                    f"coordinator_key = {json.dumps(str(out / 'coordinator.pub'))}",
                    "",
                ]
            ),
            secret=mode == "password",
        )
        registry["revoked"] = [r for r in registry["revoked"] if r != dev]
        log(f"{dev}: certificate, signing key and agent.toml in {d}")
    for dev in revoke or []:
        if dev not in registry["devices"]:
            raise ConfigError(f"{dev} is not provisioned in {out}")
        n = ca.revoke(dev)
        if mode == "password":
            set_password(passwd, dev, None)
        del registry["devices"][dev]
        registry["revoked"].append(dev)
        import shutil

        shutil.rmtree(out / "devices" / dev, ignore_errors=True)
        log(f"{dev}: revoked ({n} certificate(s) on the CRL, signing key removed from fleet.json)")
    ca.write_crl()
    _write(out / "broker" / "acl", acl(fleet))
    _write(out / "broker" / "mosquitto.conf", mosquitto_conf(out, tls_port, mode))
    _write(reg_path, json.dumps(registry, indent=1))
    log(
        f"fleet {fleet}: {len(registry['devices'])} device(s); broker: mosquitto -c {out / 'broker' / 'mosquitto.conf'} "
        f"(reload it after a revocation: kill -HUP)"
    )
    return registry
