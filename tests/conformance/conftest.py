"""Real packaged models for the conformance suite, built with the commands README.md documents, and a
runner for those commands (the documented text itself is what runs, with local paths substituted)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from documented import MINILM_BUILD, SMOLLM2_BUILD, argv, run_documented


@pytest.fixture(scope="session")
def smollm2_source():
    """SmolLM2-135M-Instruct as the transformers checkpoint the exporter reads (the reference side)."""
    pytest.importorskip("transformers")
    from export.source import convert_gguf, find_packaged_model
    return convert_gguf(find_packaged_model("smollm2"), log=lambda *_: None)


@pytest.fixture(scope="session")
def smollm2_bundle():
    """README's `bundles/smollm2-int4`, built by its documented command with every export check on
    (minutes). Kept under EDGEFM_CACHE/conformance for later local runs; a fresh machine (CI) builds it."""
    pytest.importorskip("torch")
    from edge_runtime.protocol.manifest import FORMAT_VERSION
    from export.source import cache_root
    out = cache_root() / "conformance" / f"f{FORMAT_VERSION}" / "smollm2-int4"
    from devices.fleet import readable_bundle
    if not (out / "manifest.json").is_file() or not readable_bundle(out):
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        r = run_documented(SMOLLM2_BUILD, {"bundles/smollm2-int4": str(out)})
        assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def minilm_source():
    from export.source import find_packaged_model
    return find_packaged_model("minilm")


@pytest.fixture(scope="session")
def minilm_bundles(tmp_path_factory):
    """all-MiniLM-L6-v2 embedding bundles: the documented int8 command, and the same with --quant fp32."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("minilm")
    r = run_documented(MINILM_BUILD, {"out-emb": str(root / "int8")})
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(argv(MINILM_BUILD, {"out-emb": str(root / "fp32"), "int8": "fp32"}), capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"int8": root / "int8", "fp32": root / "fp32"}
