"""Real packaged models for the conformance suite (built once per test session; the SmolLM2 bundle is
the one the demo and benchmarks use, cached under EDGEFM_CACHE)."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def smollm2_source():
    """SmolLM2-135M-Instruct as the transformers checkpoint the exporter reads (the reference side)."""
    pytest.importorskip("transformers")
    from export.source import convert_gguf, find_packaged_model
    return convert_gguf(find_packaged_model("smollm2"), log=lambda *_: None)


@pytest.fixture(scope="session")
def smollm2_bundle():
    """The rpi5-profile SmolLM2 bundle (exported once, minutes; cached)."""
    pytest.importorskip("torch")
    from devices.fleet import cached_bundle
    return cached_bundle("smollm2", "rpi5", quiet=True, log=lambda *_: None)


@pytest.fixture(scope="session")
def minilm_source():
    from export.source import find_packaged_model
    return find_packaged_model("minilm")


def export_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``edgefm-export`` as a user does (the installed console script's module)."""
    return subprocess.run([sys.executable, "-m", "export.cli", *args], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="session")
def minilm_bundles(tmp_path_factory):
    """all-MiniLM-L6-v2 embedding bundles built with the documented command, fp32 and int8."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("minilm")
    out = {}
    for quant in ("fp32", "int8"):
        r = export_cli("build", "minilm", "-o", str(root / quant), "--task", "embedding", "--quant", quant)
        assert r.returncode == 0, r.stderr[-3000:]
        out[quant] = root / quant
    return out
