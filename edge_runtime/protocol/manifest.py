"""Device bundle manifest (``manifest.json``) and its verification."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from edge_runtime.errors import BundleError

FORMAT = "edgefm-bundle"
FORMAT_VERSION = 1


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class Manifest:
    """What a bundle holds and how it was made."""

    task: str                         # causal-lm | classification | embedding
    architecture: str                 # llama | bert
    model: dict[str, Any]             # dims: layers, hidden, heads, kv_heads, head_dim, vocab, ...
    quant: dict[str, Any]             # scheme, block_size, accuracy_level, head
    adapter: dict[str, Any]           # rank, alpha, targets, shapes {name: [..]}
    files: dict[str, dict[str, Any]]  # name -> {sha256, size}
    base_fingerprint: str
    io: dict[str, Any] = dataclasses.field(default_factory=dict)       # graph input/output names
    training: dict[str, Any] = dataclasses.field(default_factory=dict)  # batch/seq the train graph was built for
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    opset: int = 17
    source: str = ""
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe_fingerprint: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        """Plain JSON form."""
        return dataclasses.asdict(self)

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
        if not isinstance(obj, dict):
            raise BundleError(f"{path}: a manifest is a JSON object, this file holds {type(obj).__name__}")
        if obj.get("format") != FORMAT or obj.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: format {obj.get('format')!r} v{obj.get('format_version')!r}; this edgefm reads {FORMAT} v{FORMAT_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in obj.items() if k in names})
        except TypeError as exc:
            raise BundleError(f"{path}: incomplete manifest ({exc})") from None

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
