"""`edgefm-agent`: run the device daemon, or talk to a running one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, EdgefmError

EPILOG = """examples:
  edgefm-agent run --bundle bundles/smollm2-int4 --broker mqtt://gateway:1883 --device-id kitchen-pi --profile rpi5
  edgefm-agent run --config agent.toml            # every flag can be a key in the TOML file
  edgefm-agent status                             # from the same machine, talks to http://127.0.0.1:8080
  edgefm-agent rollback [--to ADAPTER_ID]
  curl http://127.0.0.1:8080/v1/chat/completions -d '{"messages":[{"role":"user","content":"hi"}]}'
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefm-agent",
        description="The edgefm device daemon: local OpenAI-compatible "
        "inference, continual LoRA training on local data, federated sync over MQTT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--bundle", help="device bundle directory or .tar (from edgefm-export)")
    r.add_argument("--config", help="agent.toml with any of the settings below")
    r.add_argument("--profile", help="device profile (devices/profiles) or 'auto'")
    r.add_argument("--host", help="API bind address (default 127.0.0.1: local apps only)")
    r.add_argument("--port", type=int, help="API port (default 8080)")
    r.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT?ca=ca.crt; omit to run offline")
    r.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        default=None,
        help="accept a broker beyond loopback without TLS and credentials (a network you trust)",
    )
    r.add_argument("--fleet", help="fleet name (MQTT namespace)")
    r.add_argument("--device-id", dest="device_id", help="this device's id (default: hostname)")
    r.add_argument("--data-dir", dest="data_dir", help="where examples, adapters and the outbox live")
    r.add_argument("--inbox", help="folder watched for *.jsonl example files")
    r.add_argument("--no-auto-train", dest="auto_train", action="store_const", const=False, help="train only on request or round")
    for name in ("status", "adapters", "train-now"):
        s = sub.add_parser(
            name,
            help={
                "status": "show a running agent's status",
                "adapters": "list adapter versions, or `adapters load FILE|PEFT_DIR` one from outside",
                "train-now": "start a training session now",
            }[name],
        )
        s.add_argument("--url", default="http://127.0.0.1:8080")
        s.add_argument("--token", default=None, help="the agent's api_token (default: $EDGEFM_API_TOKEN)")
        if name == "adapters":
            s.add_argument("action", nargs="?", choices=["list", "load"], default="list")
            s.add_argument("path", nargs="?", help="load: an edgefm .safetensors adapter or a PEFT LoRA directory")
            s.add_argument("--name", help="load: id suffix for the adapter (default: its hash)")
    rb = sub.add_parser("rollback", help="serve the previous (or a given) adapter")
    rb.add_argument("--url", default="http://127.0.0.1:8080")
    rb.add_argument("--token", default=None, help="the agent's api_token (default: $EDGEFM_API_TOKEN)")
    rb.add_argument("--to", default=None, help="adapter id from `edgefm-agent adapters`")
    return p


def _call(url: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
    token = token or os.environ.get("EDGEFM_API_TOKEN")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read())["error"]["message"]
        except Exception:
            msg = str(exc)
        raise ConfigError(f"agent answered {exc.code}: {msg}") from None
    except urllib.error.URLError as exc:
        raise ConfigError(f"no agent at {url} ({exc.reason}); is `edgefm-agent run` running?") from None


def load_request(path: str | None, name: str | None) -> dict:
    """The POST /v1/adapters body for a file (edgefm adapter) or a directory (PEFT LoRA)."""
    import base64

    if not path:
        raise ConfigError("adapters load needs a path: an edgefm .safetensors file or a PEFT directory")
    p = Path(path)
    b64 = lambda f: base64.b64encode(f.read_bytes()).decode()  # noqa: E731
    if p.is_dir():
        cfg, weights = p / "adapter_config.json", p / "adapter_model.safetensors"
        if not cfg.is_file() or not weights.is_file():
            raise ConfigError(f"{p} is not a PEFT LoRA directory (needs adapter_config.json and adapter_model.safetensors)")
        body: dict[str, Any] = {"peft": {"adapter_config": json.loads(cfg.read_text()), "adapter_model": b64(weights)}}
    elif p.is_file():
        body = {"adapter": b64(p)}
    else:
        raise ConfigError(f"{p} does not exist")
    return {**body, **({"name": name} if name else {})}


def run_daemon(args) -> int:
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from edge_runtime.server import make_server
    from edge_runtime.transport import redact

    keys = ("bundle", "profile", "host", "port", "broker", "insecure", "fleet", "device_id", "data_dir", "inbox", "auto_train")
    cfg = AgentConfig.from_sources(args.config, {k: getattr(args, k) for k in keys})
    if not cfg.bundle:
        raise ConfigError("no bundle: pass --bundle PATH (or `bundle = ...` in the config file)")
    agent = Agent(cfg)
    srv = make_server(agent.api, cfg.host, cfg.port)
    agent.start()
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"edgefm-agent {cfg.device_id}: serving {agent.manifest.task} on http://{cfg.host}:{srv.server_address[1]} "
        f"(adapter {agent.active_id}, broker {redact(cfg.broker) or 'none: offline'})",
        flush=True,
    )
    try:
        srv.serve_forever()
    finally:
        agent.stop()
        srv.server_close()
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.cmd == "run":
            return run_daemon(args)
        if args.cmd == "status":
            print(json.dumps(_call(args.url, "/v1/status", token=args.token), indent=2))
        elif args.cmd == "adapters" and args.action == "load":
            res = _call(args.url, "/v1/adapters", load_request(args.path, args.name), token=args.token)
            print(json.dumps(res, indent=2))
            return 0 if res["adopted"] else 3
        elif args.cmd == "adapters":
            res = _call(args.url, "/v1/adapters", token=args.token)
            print(f"{'':2}{'id':24} {'version':>7} {'kind':8} note")
            for a in res["adapters"]:
                print(f"{'*' if a['id'] == res['active'] else ' ':2}{a['id']:24} {a['version']:>7} {a['kind']:8} {a['note']}")
        elif args.cmd == "rollback":
            print(json.dumps(_call(args.url, "/v1/adapters/rollback", {"to": args.to}, token=args.token)))
        elif args.cmd == "train-now":
            print(json.dumps(_call(args.url, "/v1/train", {"wait": True}, token=args.token), indent=2))
        return 0
    except EdgefmError as exc:
        if args.debug:
            raise
        print(f"edgefm-agent: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
