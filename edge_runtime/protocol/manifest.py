"""Device bundle manifest (``manifest.json``) and its verification."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from edge_runtime.errors import BundleError

FORMAT = "edgefm-bundle"
# The one number for the bundle layout: written by the exporter, checked at load, part of the keys of
# exported-bundle caches (so an upgrade re-exports once). Raised whenever the layout changes (2: typed
# io/adapter/quant/training sections, per-layer low-rank LoRA inputs in fused decoder graphs).
FORMAT_VERSION = 2


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class LoraLayout(str, enum.Enum):
    """How an adapter reaches the inference graph."""

    STACKED = "stacked"  # one lora_A/lora_B input per target, stacked over layers (protocol/adapter.py:stack_adapter)
    LOWRANK = "lowrank"  # per-layer low-rank inputs packed once per adapter (edge_runtime/lowrank.py)


class KvCache(str, enum.Enum):
    """How the inference graph treats its KV cache."""

    SEPARATE = "separate"  # past and present are different buffers (the cache is copied each step)
    SHARED = "shared"  # GroupQueryAttention appends in place when past and present are one buffer


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _spec(cls, obj: Any, what: str):
    """A spec dataclass from its JSON object (unknown keys are ignored: newer writers may add some)."""
    if not isinstance(obj, dict):
        raise BundleError(f"manifest {what!r} must be a JSON object, not {type(obj).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in obj.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise BundleError(f"manifest {what!r} is incomplete or wrong: {exc}") from None


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The LoRA slots of a bundle: every adapter for it has exactly these tensors (names: lora.py)."""

    rank: int
    alpha: float
    targets: list[str]
    shapes: dict[str, list[int]]  # per-layer name -> shape
    stacked_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _need(_int(self.rank) and self.rank >= 1, f"rank must be a positive integer, not {self.rank!r}")
        _need(
            isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool),
            f"alpha must be a number, not {self.alpha!r}",
        )
        _need(isinstance(self.targets, list) and all(isinstance(t, str) for t in self.targets), "targets must be module names")
        for field in ("shapes", "stacked_shapes"):
            shapes = getattr(self, field)
            _need(
                isinstance(shapes, dict)
                and all(
                    isinstance(k, str) and isinstance(v, list) and all(_int(d) and d >= 0 for d in v) for k, v in shapes.items()
                ),
                f"{field} must map tensor names to lists of sizes",
            )

    @property
    def scale(self) -> float:
        """alpha / rank: what the graphs multiply the LoRA product by."""
        return float(self.alpha) / int(self.rank)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the base weights were quantized (export/quantize.py:QuantRecipe, as recorded)."""

    scheme: str  # fp32 | int8 | int4 | nf4
    block_size: int | None = None
    accuracy_level: int | None = None
    head: str | None = None
    algo: str | None = None
    sensitive_8bit: list[str] = dataclasses.field(default_factory=list)
    train_base: str | None = None
    applied: dict[str, str] = dataclasses.field(default_factory=dict)  # graph -> scheme actually applied

    def __post_init__(self):
        _need(isinstance(self.scheme, str), f"scheme must be a name, not {self.scheme!r}")
        _need(self.block_size is None or (_int(self.block_size) and self.block_size > 0), "block_size must be a positive integer")


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """The training graph, if any: examples per optimizer step (``batch``) x sequence, and the rows the
    graph itself takes (``microbatch``; None: the whole batch), so a step may run it several times."""

    graph: str | None = None
    batch: int = 8
    seq: int = 128
    microbatch: int | None = None

    def __post_init__(self):
        _need(self.graph is None or isinstance(self.graph, str), "graph must be a file name")
        _need(
            _int(self.batch) and self.batch >= 1 and _int(self.seq) and self.seq >= 2, "batch and seq must be positive integers"
        )
        _need(
            self.microbatch is None or (_int(self.microbatch) and 1 <= self.microbatch and self.batch % self.microbatch == 0),
            "microbatch must be a positive divisor of batch",
        )

    @property
    def graph_batch(self) -> int:
        """Rows of one call of the training graph."""
        return self.microbatch or self.batch


@dataclasses.dataclass(frozen=True)
class IoSpec:
    """The inference graph's inputs and outputs, how it takes an adapter, and how it keeps its KV cache."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    lora_layout: LoraLayout = LoraLayout.STACKED
    kv_cache: KvCache = KvCache.SEPARATE
    lowrank: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # slots (edge_runtime/lowrank.py:Slot)

    def __post_init__(self):
        for field in ("inputs", "outputs"):
            _need(
                isinstance(getattr(self, field), list) and all(isinstance(n, str) for n in getattr(self, field)),
                f"{field} must be names",
            )
        _need(
            isinstance(self.lowrank, list) and all(isinstance(sl, dict) for sl in self.lowrank), "lowrank must be a list of slots"
        )
        object.__setattr__(self, "lora_layout", LoraLayout(self.lora_layout))
        object.__setattr__(self, "kv_cache", KvCache(self.kv_cache))


@dataclasses.dataclass
class Manifest:
    """What a bundle holds and how it was made."""

    task: str  # causal-lm | classification | embedding
    architecture: str  # llama | bert
    model: dict[str, Any]  # dims: layers, hidden, heads, kv_heads, head_dim, vocab, ...
    quant: QuantSpec
    adapter: AdapterSpec
    files: dict[str, dict[str, Any]]  # name -> {sha256, size}
    base_fingerprint: str
    io: IoSpec = dataclasses.field(default_factory=IoSpec)
    training: TrainingSpec = dataclasses.field(default_factory=TrainingSpec)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # of the tools that wrote it
    opset: int = 17
    source: str = ""
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe_fingerprint: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        """Plain JSON form."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=lambda e: e.value))

    @classmethod
    def from_json(cls, obj: Any, where: str = "manifest.json") -> "Manifest":
        """A manifest from its JSON object; BundleError says what is wrong."""
        if not isinstance(obj, dict):
            raise BundleError(f"{where}: a manifest is a JSON object, this file holds {type(obj).__name__}")
        if obj.get("format") != FORMAT or obj.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{where}: format {obj.get('format')!r} v{obj.get('format_version')!r}; this edgefm reads "
                f"{FORMAT} v{FORMAT_VERSION} (re-export the model with this version's `edgefm-export build`)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in obj.items() if k in names}
        for key, spec in (("quant", QuantSpec), ("adapter", AdapterSpec), ("io", IoSpec), ("training", TrainingSpec)):
            if key in fields:
                fields[key] = _spec(spec, fields[key], key)
        try:
            return cls(**fields)
        except TypeError as exc:
            raise BundleError(f"{where}: incomplete manifest ({exc})") from None

    @classmethod
    def load(cls, bundle: Path) -> "Manifest":
        """Read ``manifest.json`` of a bundle directory."""
        path = Path(bundle) / "manifest.json"
        if not path.is_file():
            raise BundleError(f"{bundle}: no manifest.json; is this an edgefm bundle? (build one with `edgefm-export build`)")
        try:
            obj = json.loads(path.read_text())
        except ValueError as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_json(obj, str(path))

    def save(self, bundle: Path) -> None:
        """Write ``manifest.json``."""
        (Path(bundle) / "manifest.json").write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))


def hash_files(bundle: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each named file of a bundle."""
    return {n: {"sha256": sha256_file(Path(bundle) / n), "size": (Path(bundle) / n).stat().st_size} for n in names}


def verify_files(bundle: Path, manifest: Manifest | None = None) -> Manifest:
    """Check every file's sha256 against the manifest; raise BundleError naming the first bad file."""
    bundle = Path(bundle)
    manifest = manifest or Manifest.load(bundle)
    for name, info in manifest.files.items():
        p = bundle / name
        if not p.is_file():
            raise BundleError(f"{bundle}: file {name} listed in the manifest is missing")
        if p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            raise BundleError(f"{bundle}: file {name} does not match its sha256 in manifest.json (corrupt or modified)")
    return manifest


def open_bundle(path: str | Path, extract_to: Path | None = None) -> Path:
    """Return a bundle directory; a ``.tar`` archive is extracted (safely) first."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.is_file() and tarfile.is_tarfile(path):
        dest = extract_to or path.with_suffix("")
        if not (dest / "manifest.json").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(path) as tar:
                tar.extractall(dest, filter="data")
        return dest
    raise BundleError(f"{path}: not a bundle directory or .tar archive")
