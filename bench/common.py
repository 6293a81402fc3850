"""Shared helpers for benchmarks: machine facts and appending results to BENCHMARKS.md."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """One line describing this machine."""
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of a process in MB."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def record(section: str, body: str, command: str) -> None:
    """Replace (or append) one section of BENCHMARKS.md with fresh results."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# edgefm benchmarks\n\nEach section is rewritten by the command shown in it.\n"
    header = f"## {section}"
    stamp = (f"{header}\n\n- machine: {machine()}\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
             f"- command: `{command}`\n\n{body.strip()}\n")
    parts = text.split("\n## ")
    kept = [parts[0]] + [p for p in parts[1:] if not p.startswith(section)]
    path.write_text("\n## ".join(kept).rstrip() + "\n\n" + stamp)
    print(stamp)


def run_json(cmd: list[str], timeout: float = 3600) -> dict:
    """Run a child benchmark process that prints one JSON line last; return it."""
    import json
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


PY = sys.executable


def graph_mb(path: Path) -> float:
    """Size of an ONNX graph with its external data file (bundles keep their weights in one), MB."""
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 1e6


def cached_bundle_ok(out: Path) -> bool:
    """Whether a bundle a bench exported earlier is there and readable by this version (a bundle of an
    older format is removed, so the bench exports it again instead of failing to load it)."""
    import shutil

    from devices.fleet import readable_bundle

    if (out / "manifest.json").is_file() and readable_bundle(out):
        return True
    shutil.rmtree(out, ignore_errors=True)
    return False
