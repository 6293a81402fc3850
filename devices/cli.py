"""`edgefm-fleet`: simulate a fleet (`run`) or run the one-command demo (`demo`); list device `profiles`."""

from __future__ import annotations

import argparse
import json
import sys

from edge_runtime.errors import EdgefmError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefm-fleet",
        description="Run a simulated fleet: a broker, a coordinator and N edge "
        "agents as separate processes, each learning from its own (non-IID) data, with a report.",
    )
    p.add_argument("--debug", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="simulate a fleet and write report.json + report.html")
    r.add_argument("--devices", type=int, default=3)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--model", default="tiny", help="'tiny' (random tiny model), a bundle dir, or a model for edgefm-export")
    r.add_argument("--broker", default=None, help="MQTT URL; default: embedded mosquitto")
    r.add_argument(
        "--insecure",
        action="store_true",
        help="accept a broker beyond loopback without TLS and credentials (a network you trust)",
    )
    r.add_argument("--mode", choices=["sync", "async"], default="sync")
    r.add_argument("--strategy", default="fedavg")
    r.add_argument("--chaos", action="store_true", help="kill/restart an agent and restart the broker mid-run")
    r.add_argument("--out", default="./fleet-out")
    r.add_argument("--profile", default="rpi5")
    r.add_argument(
        "--data",
        default="synthetic",
        help="synthetic | stdlib | DIR: your own data, one NAME.jsonl file or NAME/ "
        "folder (*.jsonl, *.txt) per device; a share is held back for evaluation and written to OUT/heldout/",
    )
    r.add_argument("--timeout", type=float, default=900.0)
    d = sub.add_parser("demo", help="real SmolLM2-135M, rpi5 profile, 4 agents on Python-docs text")
    d.add_argument("--out", default="./demo-out")
    d.add_argument("--devices", type=int, default=4)
    d.add_argument("--rounds", type=int, default=3)
    sub.add_parser("profiles", help="list device profiles")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from devices.fleet import Fleet, FleetOptions

    try:
        if args.cmd == "profiles":
            from devices.profiles import detect_profile, list_profiles, load_profile

            for n in list_profiles():
                pr = load_profile(n)
                print(
                    f"{n:18} {pr.ram_mb:>6} MB  {pr.export['quant']:5} rank {pr.export['lora_rank']:<3} {pr.training['backend']:5}  {pr.description}"
                )
            print(f"this machine: {detect_profile()}")
            return 0
        if args.cmd == "run":
            opts = FleetOptions(
                devices=args.devices,
                rounds=args.rounds,
                model=args.model,
                broker=args.broker,
                mode=args.mode,
                strategy=args.strategy,
                chaos=args.chaos,
                out=args.out,
                profile=args.profile,
                data=args.data,
                timeout_s=args.timeout,
                insecure=args.insecure,
            )
        else:
            opts = FleetOptions(
                devices=args.devices,
                rounds=args.rounds,
                model="smollm2",
                out=args.out,
                profile="rpi5",
                data="stdlib",
                steps_per_round=4,
                examples_per_device=32,
                heldout_per_domain=4,
                round_timeout_s=300,
                timeout_s=1500,
            )
        report = Fleet(opts).run()
        print(
            json.dumps(
                {k: report[k] for k in ("rounds_completed", "final_version", "nothing_lost", "inference_latency_ms")}, indent=2
            )
        )
        print(f"open {opts.out}/report.html in a browser")
        return 0 if report["rounds_completed"] >= opts.rounds else 1
    except EdgefmError as exc:
        if args.debug:
            raise
        print(f"edgefm-fleet: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
