"""Device data for the fleet: text domains and non-IID partitions (Dirichlet over domains). Pure, seeded."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import random
from pathlib import Path

import numpy as np

SYNTHETIC_DOMAINS = {
    "factory": ["pump {n} pressure {v} bar at line {m}", "conveyor {n} speed set to {v} m/s", "valve {n} closed after alarm {m}"],
    "weather": [
        "station {n} temperature {v} degrees wind {m} km/h",
        "rain gauge {n} measured {v} mm",
        "humidity at site {n} is {v} percent",
    ],
    "retail": [
        "order {n} shipped {v} items to store {m}",
        "customer {n} returned item {v}",
        "shelf {n} restocked with {v} boxes",
    ],
    "health": ["patient {n} heart rate {v} bpm at {m}", "dose {n} given at {v} mg", "room {n} cleaned at {m} o'clock"],
}


def synthetic_domain_texts(domain: str, n: int, seed: int) -> list[str]:
    """Short templated sentences of one domain (tiny-model runs)."""
    rng = random.Random(f"{domain}-{seed}")
    tpl = SYNTHETIC_DOMAINS[domain]
    return [rng.choice(tpl).format(n=rng.randint(1, 99), v=rng.randint(1, 999), m=rng.randint(1, 24)) for _ in range(n)]


STDLIB_FAMILIES = {
    "text": ["string", "textwrap", "difflib", "re", "unicodedata", "html", "email", "json", "csv"],
    "files": ["os", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "zipfile", "tarfile", "io"],
    "net": ["socket", "ssl", "http", "urllib", "smtplib", "ftplib", "ipaddress", "selectors", "socketserver"],
    "concurrency": ["threading", "multiprocessing", "concurrent", "asyncio", "queue", "sched", "subprocess", "signal"],
    "data": ["collections", "heapq", "bisect", "array", "enum", "dataclasses", "statistics", "decimal", "fractions"],
}


# A second real-text corpus from a package every full install has (sympy comes with torch): one family per area.
SYMPY_FAMILIES = {
    "calculus": ["sympy.integrals", "sympy.series", "sympy.calculus"],
    "algebra": ["sympy.polys", "sympy.solvers", "sympy.matrices"],
    "discrete": ["sympy.combinatorics", "sympy.ntheory", "sympy.logic", "sympy.sets"],
    "physics": ["sympy.physics", "sympy.geometry", "sympy.stats"],
}


def stdlib_docstrings(family: str, max_chars: int = 600) -> list[str]:
    """Docstrings of the Python standard library modules of one family (present on every machine)."""
    return module_docstrings(STDLIB_FAMILIES[family], max_chars)


def module_docstrings(modnames: list[str], max_chars: int = 600) -> list[str]:
    """Docstrings (over 80 characters, whitespace folded) of these modules, their public members and submodules."""
    out: list[str] = []
    for modname in modnames:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
        if hasattr(mod, "__path__"):
            for info in pkgutil.iter_modules(mod.__path__):
                try:
                    objs.append(importlib.import_module(f"{modname}.{info.name}"))
                except Exception:
                    continue
        for o in objs:
            doc = (
                inspect.getdoc(o)
                if (inspect.ismodule(o) or inspect.isclass(o) or inspect.isfunction(o) or inspect.isbuiltin(o))
                else None
            )
            if doc and len(doc) > 80:
                out.append(" ".join(doc.split())[:max_chars])
    return sorted(set(out))


def dirichlet_partition(domains: list[str], devices: int, alpha: float, seed: int) -> list[dict[str, float]]:
    """Per device, a mixture over domains drawn from Dirichlet(alpha): small alpha = very non-IID."""
    rng = np.random.default_rng(seed)
    return [dict(zip(domains, rng.dirichlet([alpha] * len(domains)).tolist())) for _ in range(devices)]


def device_datasets(
    texts_by_domain: dict[str, list[str]], mixtures: list[dict[str, float]], per_device: int, heldout_per_domain: int, seed: int
) -> tuple[list[list[dict]], dict[str, list[str]]]:
    """Split each domain into held-out (shared for evaluation) and a training pool, then draw each device's
    examples from the pool by its mixture. Returns (per-device examples, held-out texts per domain)."""
    rng = random.Random(seed)
    heldout, pools = {}, {}
    for d, texts in texts_by_domain.items():
        t = list(texts)
        rng.shuffle(t)
        heldout[d], pools[d] = t[:heldout_per_domain], t[heldout_per_domain:]
    out = []
    for mix in mixtures:
        counts = {d: int(round(w * per_device)) for d, w in mix.items()}
        ex = []
        for d, c in counts.items():
            if pools[d]:
                ex += [{"text": rng.choice(pools[d]), "domain": d} for _ in range(c)]
        rng.shuffle(ex)
        out.append(ex or [{"text": rng.choice(pools[next(iter(pools))]), "domain": next(iter(pools))}])
    return out, heldout


def _read_examples(path: Path) -> list[dict]:
    """Examples of one file: JSONL ({text} or {prompt, completion} per line) or plain text (one example per paragraph)."""
    import json
    from edge_runtime.errors import ConfigError

    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{i}: not JSON ({exc})") from None
            if not isinstance(obj, dict) or not (isinstance(obj.get("text"), str) or isinstance(obj.get("prompt"), str)):
                raise ConfigError(f"{path}:{i}: each line must be an object with 'text' (or 'prompt' + 'completion')")
            out.append({k: obj[k] for k in ("text", "prompt", "completion", "label") if k in obj})
        return out
    return [{"text": " ".join(p.split())} for p in path.read_text(errors="replace").split("\n\n") if p.strip()]


def load_user_data(root: str | Path) -> dict[str, list[dict]]:
    """A user's own data, one device per entry of ``root``: a ``NAME.jsonl`` file, or a folder ``NAME/`` of
    ``*.jsonl`` / ``*.txt`` files. Returns {device name: examples} in name order."""
    from edge_runtime.errors import ConfigError

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--data {root}: not a folder (expected one NAME.jsonl file or NAME/ folder per device)")
    out: dict[str, list[dict]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix == ".jsonl":
            out[entry.stem] = _read_examples(entry)
        elif entry.is_dir():
            files = sorted(f for f in entry.rglob("*") if f.is_file() and f.suffix in (".jsonl", ".txt"))
            out[entry.name] = [ex for f in files for ex in _read_examples(f)]
    if not out:
        raise ConfigError(f"--data {root}: no NAME.jsonl files or NAME/ folders found (one per device)")
    empty = [n for n, ex in out.items() if not ex]
    if empty:
        raise ConfigError(f"--data {root}: no examples for {', '.join(empty)}")
    return out


def example_text(ex: dict) -> str:
    """The full text of an example (prompt + completion for instruction pairs)."""
    return ex["prompt"] + ex.get("completion", "") if ex.get("prompt") is not None else ex["text"]


def split_user_data(
    data: dict[str, list[dict]], heldout_fraction: float, seed: int
) -> tuple[list[list[dict]], dict[str, list[str]]]:
    """Per device: examples to send, and a held-out share (at least one, if the device has two or more) that
    only the simulator's evaluation sees. Returns (per-device examples, held-out texts per device)."""
    rng = random.Random(seed)
    per_dev, heldout = [], {}
    for name, examples in data.items():
        ex = list(examples)
        rng.shuffle(ex)
        k = max(1, int(round(len(ex) * heldout_fraction))) if len(ex) > 1 else 0
        heldout[name] = [example_text(e) for e in ex[:k]]
        per_dev.append(ex[k:])
    return per_dev, heldout
