"""The commands README.md and docs/ document, and how to run them here: the documented text itself,
with local paths, ports and brokers substituted, programs run as modules of this checkout."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = {"edgefm-export": "export.cli", "edgefm-agent": "edge_runtime.cli", "edgefm-coordinator": "coordinator.cli",
            "edgefm-fleet": "devices.cli"}
SMOLLM2_BUILD = "edgefm-export build smollm2 -o bundles/smollm2-int4 --quant int4"
MINILM_BUILD = "edgefm-export build minilm -o out-emb --task embedding --quant int8"


def documented_commands() -> list[str]:
    """Every command line in README.md's and docs/*.md's shell blocks (comments stripped)."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.S):
            for line in block.splitlines():
                line = re.split(r"\s#\s", line, maxsplit=1)[0].strip()
                if line and not line.startswith("#"):
                    out.append(line)
    return out


def argv(line: str, subs: dict[str, str] | None = None) -> list[str]:
    """A documented line as the argv that runs it here: local paths substituted, programs run as modules
    of this checkout's interpreter (what the console scripts call)."""
    for old, new in (subs or {}).items():
        line = line.replace(old, new)
    words = shlex.split(line)
    if words[0] in PROGRAMS:
        return [sys.executable, "-m", PROGRAMS[words[0]], *words[1:]]
    return words


def run_documented(line: str, subs: dict[str, str] | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    assert line in documented_commands(), f"not a documented command: {line}"
    return subprocess.run(argv(line, subs), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
