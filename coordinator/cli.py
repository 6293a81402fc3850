"""`edgefm-coordinator`: run federated rounds, inspect and manage the fleet's global adapters."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from edge_runtime.errors import ConfigError, EdgefmError

EPILOG = """examples:
  edgefm-coordinator serve --bundle bundles/smollm2-int4                   # embedded broker (mosquitto) on loopback
  edgefm-coordinator serve --bundle B --broker mqtts://broker:8883?ca=ca.crt --config fleet.toml
  edgefm-coordinator status | devices | rounds | adapters [--json]         # read the state dir (works offline)
  edgefm-coordinator publish adapter.safetensors --broker URL              # push an adapter as the next version
  edgefm-coordinator rollback --to 3 --broker URL                          # republish v3's content as a new version
  edgefm-coordinator export --version 5 --format peft -o out/              # needs the [export] extra for peft
  edgefm-coordinator provision --fleet plant --devices pi-1 pi-2 -o fleet-keys/   # CA, broker TLS + ACL, device identities
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefm-coordinator",
        description="Lightweight federated-learning coordinator: "
        "collects LoRA adapter updates over MQTT, aggregates them (FedAvg, LoRA-aware, robust, DP), "
        "and publishes versioned global adapters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true")
    p.add_argument("--state-dir", default=None, help="state directory (default ./edgefm-coordinator)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the coordinator")
    s.add_argument("--bundle", help="the device bundle (manifest.json + adapter.safetensors are read)")
    s.add_argument("--broker", help="mqtt(s)://... ; omit to start an embedded mosquitto on loopback")
    s.add_argument("--config", help="TOML file with coordinator settings")
    s.add_argument("--fleet")
    s.add_argument("--mode", choices=["sync", "async"])
    s.add_argument("--strategy", help="fedavg, fedavgm, fedadam, fedyogi, frozen_a, svd, median, trimmed_mean, dp_fedavg")
    s.add_argument("--rounds", dest="max_rounds", type=int, help="stop after this many rounds (default: run forever)")
    s.add_argument("--min-updates", dest="min_updates", type=int)
    s.add_argument("--round-timeout", dest="round_timeout_s", type=float)
    s.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        default=None,
        help="accept a broker beyond loopback without TLS and credentials (a network you trust)",
    )
    for name in ("status", "devices", "rounds", "adapters"):
        x = sub.add_parser(name, help=f"show {name}")
        x.add_argument("--json", action="store_true")
    pub = sub.add_parser("publish", help="publish an adapter file as the next global version")
    pub.add_argument("adapter")
    pub.add_argument("--broker", required=True)
    pub.add_argument("--bundle", required=True)
    pub.add_argument("--fleet", default="default")
    pub.add_argument(
        "--insecure",
        action="store_true",
        help="accept a broker beyond loopback without TLS and credentials (a network you trust)",
    )
    rb = sub.add_parser("rollback", help="republish an earlier version's adapter as the next version")
    rb.add_argument("--to", type=int, required=True)
    rb.add_argument("--broker", required=True)
    rb.add_argument("--bundle", required=True)
    rb.add_argument("--fleet", default="default")
    rb.add_argument(
        "--insecure",
        action="store_true",
        help="accept a broker beyond loopback without TLS and credentials (a network you trust)",
    )
    pv = sub.add_parser(
        "provision",
        help="create a fleet's CA, broker TLS config + ACL, and per-device certificates, "
        "signing keys and agent configs (run again to add or revoke devices)",
    )
    pv.add_argument("--fleet", required=True)
    pv.add_argument("--devices", nargs="*", default=[], metavar="ID", help="device ids to provision (new ones are added)")
    pv.add_argument("--revoke", nargs="*", default=[], metavar="ID", help="device ids to revoke")
    pv.add_argument(
        "--broker-host",
        default=None,
        help="the broker's host name as devices reach it (certificate SAN; default localhost, kept in fleet.json)",
    )
    pv.add_argument("--port", type=int, default=None, help="the broker's TLS port (default 8883, kept in fleet.json)")
    pv.add_argument(
        "--auth",
        choices=["cert", "password"],
        default=None,
        help="how identities log in to the broker: client certificates (default) or a user name and password each",
    )
    pv.add_argument("-o", "--output", required=True, help="the provisioning folder (keep ca/ca.key offline)")
    ex = sub.add_parser("export", help="write a global adapter as our format, PEFT, or .onnx_adapter")
    ex.add_argument("--version", type=int, default=None, help="default: newest")
    ex.add_argument("--format", choices=["edgefm", "peft", "onnx_adapter"], default="edgefm")
    ex.add_argument("--bundle", help="needed for peft/onnx_adapter")
    ex.add_argument("-o", "--output", required=True)
    return p


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(fmt(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _state(args):
    from coordinator.state import State

    d = Path(args.state_dir or "./edgefm-coordinator")
    if not (d / "coordinator.sqlite").is_file():
        raise ConfigError(f"no coordinator state in {d}; pass --state-dir or run `edgefm-coordinator serve` first")
    return State(d)


def serve(args) -> int:
    from coordinator import admin
    from coordinator.config import CoordinatorConfig

    keys = ("bundle", "broker", "fleet", "mode", "strategy", "max_rounds", "min_updates", "round_timeout_s", "insecure")
    overrides = {k: getattr(args, k) for k in keys}
    overrides["state_dir"] = args.state_dir
    cfg = CoordinatorConfig.from_sources(args.config, overrides)
    if not cfg.bundle:
        raise ConfigError("no bundle: pass --bundle PATH (the bundle the devices run)")
    with admin.exclusive(Path(cfg.state_dir)) as mine:
        if not mine:
            holder = (Path(cfg.state_dir) / admin.LOCK).read_text().strip() or "?"
            raise ConfigError(
                f"another process (pid {holder}) is serving or administering {cfg.state_dir}; one coordinator per state dir"
            )
        return _serve_locked(cfg)


def _serve_locked(cfg) -> int:
    from coordinator.broker import EmbeddedBroker
    from edge_runtime.transport import redact
    from coordinator.service import Coordinator

    embedded = None
    if not cfg.broker:
        embedded = EmbeddedBroker(Path(cfg.state_dir) / "broker").start()
        cfg.broker = embedded.url
        print(f"embedded broker on {embedded.url}", flush=True)
    coord = Coordinator(cfg)
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *a: stop.update(flag=True))
    signal.signal(signal.SIGINT, lambda *a: stop.update(flag=True))
    coord.start()
    print(
        f"edgefm-coordinator: fleet {cfg.fleet}, {cfg.mode} rounds, strategy {cfg.strategy}, global v{coord.version}, "
        f"broker {redact(cfg.broker)}" + (f", resumed with {coord.replayed} pending updates" if coord.replayed else ""),
        flush=True,
    )
    try:
        while not stop["flag"] and not coord.done.is_set():
            time.sleep(0.2)
    finally:
        coord.stop()
        if embedded:
            embedded.stop()
    return 0


def admin_command(args) -> int:
    """publish / rollback: executed by the running coordinator when one serves this state dir (see
    coordinator.admin), else here, holding the state dir's lock."""
    from coordinator import admin
    from edge_runtime.transport import require_secure_broker

    require_secure_broker(args.broker, args.insecure, "coordinator")
    state_dir = Path(args.state_dir or "./edgefm-coordinator")
    if args.cmd == "publish":
        request = {"cmd": "publish", "adapter": str(Path(args.adapter).resolve())}
    else:
        request = {"cmd": "rollback", "to": args.to}
    with admin.exclusive(state_dir) as mine:
        if not mine:
            print("a coordinator is serving this state dir: handing it the command", flush=True)
            out = admin.submit(state_dir, request)
        else:
            from coordinator.config import CoordinatorConfig
            from coordinator.core import CoordinatorCore
            from edge_runtime.transport import MqttLink, redact

            if not (state_dir / "coordinator.sqlite").is_file():
                raise ConfigError(
                    f"no coordinator state in {state_dir}; pass --state-dir or run `edgefm-coordinator serve` first"
                )
            coord = CoordinatorCore(  # no coordinator serves this state: the command runs the core itself
                CoordinatorConfig(
                    bundle=args.bundle, broker=args.broker, fleet=args.fleet, state_dir=str(state_dir), insecure=args.insecure
                )
            )
            link = MqttLink(args.broker, f"edgefm-coordinator-admin-{time.time_ns()}", clean_start=True)
            coord.attach(link)
            link.start()
            try:
                if not link.wait_connected(10):
                    raise ConfigError(f"cannot reach broker {redact(args.broker)}")
                out = admin.execute(coord, request)
                time.sleep(0.5)
            finally:
                link.close()
    print(f"published v{out['version']} ({out['note']})")
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.cmd == "serve":
            return serve(args)
        if args.cmd in ("status", "devices", "rounds", "adapters"):
            st = _state(args)
            if args.cmd == "status":
                from coordinator.state import CHECKPOINTED

                pending = st.pending_accepted()
                held = sum(1 for r in pending if r[2] == CHECKPOINTED)
                data = {
                    "version": st.current_version(),
                    "epoch": st.get("epoch"),
                    "devices": len(st.devices()),
                    "online": len(st.online_devices()),
                    "rounds": len(st.rounds()),
                    "updates": st.update_counts(),
                    "pending": {"updates": len(pending), "in_checkpoint": held, "in_log": len(pending) - held},
                }
                print(json.dumps(data, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in data.items()))
            elif args.cmd == "devices":
                rows = st.devices()
                print(
                    json.dumps(rows, indent=2)
                    if args.json
                    else _table(
                        rows,
                        [
                            "device_id",
                            "state",
                            "profile",
                            "global_version",
                            "adapter_version",
                            "accepted",
                            "rejected",
                            "last_seen",
                        ],
                    )
                )
            elif args.cmd == "rounds":
                rows = st.rounds()
                for r in rows:
                    r["participants"] = len(r["summary"].get("participants", []))
                print(
                    json.dumps(rows, indent=2)
                    if args.json
                    else _table(rows, ["round", "status", "base_version", "result_version", "participants", "target", "quorum"])
                )
            else:
                rows = st.versions()
                print(
                    json.dumps(rows, indent=2)
                    if args.json
                    else _table(rows, ["version", "parent", "status", "round", "strategy", "num_updates", "num_examples", "note"])
                )
            return 0
        if args.cmd == "provision":
            from coordinator.provision import provision

            if not args.devices and not args.revoke:
                raise ConfigError("nothing to do: pass --devices ID... and/or --revoke ID...")
            provision(
                args.output,
                args.fleet,
                args.devices,
                broker_host=args.broker_host,
                port=args.port,
                revoke=args.revoke,
                auth=args.auth,
            )
            return 0
        if args.cmd in ("publish", "rollback"):
            return admin_command(args)
        if args.cmd == "export":
            st = _state(args)
            version = args.version if args.version is not None else st.current_version()
            blob = st.blobs.get(st.version_sha(version))
            out = Path(args.output)
            if args.format == "edgefm":
                out.write_bytes(blob)
            else:
                if not args.bundle:
                    raise ConfigError("--bundle is needed to convert to peft / onnx_adapter")
                tmp = out.with_suffix(".edgefm.safetensors") if args.format == "onnx_adapter" else out / "edgefm.safetensors"
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(blob)
                from export import interop

                (interop.to_peft if args.format == "peft" else interop.to_onnx_adapter)(tmp, Path(args.bundle), out)
                tmp.unlink()
            print(f"v{version} -> {out}")
            return 0
    except EdgefmError as exc:
        if args.debug:
            raise
        print(f"edgefm-coordinator: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
