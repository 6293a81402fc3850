"""MQTT link (paho-mqtt 2.x): broker URLs, TLS/credentials, persistent MQTT v5 sessions, reconnects.

The one place that touches paho; agent and coordinator use this narrow interface so unit tests can
swap in an in-memory fake, while integration tests run it against a real Mosquitto.

Broker URL: ``mqtt://[user:password@]host[:port]`` or ``mqtts://...`` with optional query parameters
``ca=PATH``, ``cert=PATH``, ``key=PATH``, ``insecure=1`` (skip hostname check, tests only).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
import urllib.parse
from typing import Any, Callable, Protocol, Sequence

from edge_runtime.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        """Parse ``mqtt://`` / ``mqtts://`` URLs; raise ConfigError with an example otherwise."""
        u = urllib.parse.urlparse(url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
            raise ConfigError(f"broker URL {redact(url)!r} not understood; use mqtt://host:1883 or mqtts://host:8883?ca=ca.crt")
        tls = u.scheme in ("mqtts", "ssl")
        q = dict(urllib.parse.parse_qsl(u.query))
        try:
            port = u.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"broker URL {redact(url)!r} has a bad port") from None
        return cls(
            u.hostname,
            port,
            tls,
            urllib.parse.unquote(u.username) if u.username else None,
            urllib.parse.unquote(u.password) if u.password else None,
            q.get("ca"),
            q.get("cert"),
            q.get("key"),
            q.get("insecure") in ("1", "true"),
        )


def redact(url: str | None) -> str | None:
    """A broker URL fit for logs and errors: the password replaced by ``***`` (key paths are not secrets)."""
    if not url:
        return url
    try:
        u = urllib.parse.urlparse(url)
        if u.password is None:
            return url
        host = u.netloc.rsplit("@", 1)[1]
        return urllib.parse.urlunparse(u._replace(netloc=f"{u.username}:***@{host}"))
    except ValueError:
        return "<unparseable broker URL>"


def is_loopback(host: str) -> bool:
    """Whether a broker host name stays on this machine."""
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def insecure_reasons(url: str) -> list[str]:
    """Why a broker URL is unsafe for a fleet: a broker beyond loopback needs TLS with its host name
    checked, and credentials (a client certificate or a user name). Empty: nothing to object to."""
    a = BrokerAddress.parse(url)
    if is_loopback(a.host):
        return []
    reasons = []
    if not a.tls:
        reasons.append("plain TCP (anyone on the path reads and forges fleet traffic; use mqtts://)")
    elif a.insecure:
        reasons.append("insecure=1 (the broker certificate's host name is not checked)")
    if not (a.cert or a.username):
        reasons.append("no credentials (add cert=...&key=... or user:password@)")
    return reasons


def require_secure_broker(url: str | None, allow_insecure: bool, who: str, missing_keys: Sequence[str] = ()) -> None:
    """Refuse (ConfigError) a broker beyond loopback without TLS and credentials, or without the
    signing keys named in ``missing_keys`` (settings the caller lacks: beyond loopback, messages that
    change state must be signed), unless the user said ``insecure``; then only warn. Secrets never
    appear in the message."""
    if not url:
        return
    reasons = insecure_reasons(url)
    if missing_keys and not is_loopback(BrokerAddress.parse(url).host):
        reasons += [f"no {k}" for k in missing_keys]
    if not reasons:
        return
    what = f"{who}: broker {redact(url)} is beyond loopback with " + "; ".join(reasons)
    if not allow_insecure:
        raise ConfigError(
            f"{what}. Provision the fleet (`edgefm-coordinator provision`, docs/security.md) and use the "
            f"configs it writes, or pass --insecure (insecure = true) to accept this on a network you trust"
        )
    log.warning("%s (allowed by --insecure)", what)


# (topic, payload, retained) or, with manual_ack, (topic, payload, retained, ack): call ack() once the message is safe
MessageHandler = Callable[..., None]


class Link(Protocol):
    """What the coordinator and the sync layer need of a message link: MqttLink over a broker, or an
    in-memory fake in unit tests (tests/helpers.py: MemoryLink)."""

    connected: threading.Event

    def start(self) -> Any: ...

    def wait_connected(self, timeout: float) -> bool: ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None: ...

    def close(self) -> None: ...


class MqttLink:
    """A paho client with a persistent session that resubscribes and calls back on every (re)connect."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[], None] | None = None,
        on_published: Callable[[int], None] | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        clean_start: bool = False,
        session_expiry_s: int = 7 * 24 * 3600,
        keepalive: int = 15,
        manual_ack: bool = False,
    ):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.addr = BrokerAddress.parse(url)
        self._mqtt = mqtt
        # manual_ack: the PUBACK for a QoS 1 message is sent only when the handler calls ack(),
        # so a consumer can persist on another thread and still acknowledge only what is durable.
        self.manual_ack = manual_ack
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
            manual_ack=manual_ack,
        )
        self.client.max_inflight_messages_set(50)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        if self.addr.username:
            self.client.username_pw_set(self.addr.username, self.addr.password)
        if self.addr.tls:
            ctx = ssl.create_default_context(cafile=self.addr.ca)
            if self.addr.cert:
                ctx.load_cert_chain(self.addr.cert, self.addr.key)
            if self.addr.insecure:
                ctx.check_hostname = False
            self.client.tls_set_context(ctx)
        if will:
            self.client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        self._props = Properties(PacketTypes.CONNECT)
        self._props.SessionExpiryInterval = session_expiry_s
        self._clean_start = clean_start
        self._keepalive = keepalive
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.disconnects = 0  # connections lost since start (a missed keep-alive shows up here)
        self.last_error: str | None = None
        self._on_message, self._on_connect, self._on_published = on_message, on_connect, on_published
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_publish = self._handle_publish

    # -- paho callbacks (network thread) --
    def _handle_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.warning("%s", self.last_error)
            return
        with self._lock:
            subs = list(self._subs.items())
        for f, qos in subs:  # subscribe first, so "connected" implies the subscriptions are on their way
            client.subscribe(f, qos=qos)
        self.connected.set()
        if self._on_connect:
            try:
                self._on_connect()
            except Exception:  # a handler bug must not kill paho's network thread
                log.exception("on_connect handler failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.connected.is_set():
            self.disconnects += 1
        self.connected.clear()
        self.last_error = f"disconnected: {reason_code}"

    def _handle_message(self, client, userdata, msg):
        if self._on_message:
            try:
                if self.manual_ack:
                    mid, qos = msg.mid, msg.qos
                    self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain), lambda: client.ack(mid, qos))
                else:
                    self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:
                log.exception("message handler failed for %s", msg.topic)

    def _handle_publish(self, client, userdata, mid, reason_code, properties):
        if self._on_published and not (reason_code is not None and reason_code.is_failure):
            try:
                self._on_published(mid)
            except Exception:
                log.exception("on_published handler failed")

    # -- API --
    def start(self) -> "MqttLink":
        """Connect in the background; reconnects forever. Returns at once (see ``connected``)."""
        self.client.connect_async(
            self.addr.host, self.addr.port, keepalive=self._keepalive, clean_start=self._clean_start, properties=self._props
        )
        self.client.loop_start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or timeout."""
        return self.connected.wait(timeout)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        with self._lock:
            self._subs[topic_filter] = qos
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos=qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription."""
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self.connected.is_set():
            self.client.unsubscribe(topic_filter)

    def subscriptions(self) -> list[str]:
        """The topic filters subscribed (restored after every reconnect)."""
        with self._lock:
            return list(self._subs)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Publish; returns the message id, or None when not connected (caller keeps it queued)."""
        if not self.connected.is_set():
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
