"""Optional native kernels: ``edge_runtime/data/kernels.c``, compiled on the device itself.

The exported graphs hold every computation in standard ONNX, some of it as model-local functions of the
``edgefm.native`` domain: ``BlockOffsetAdd`` (the asym int4 offset term of inference graphs: one graph node
per linear instead of six, fp16 offsets read at kernel speed) and ``Q8MatMul`` / ``Q8MatMulTransB`` (the
training graph's frozen 8-bit base, one copy of each weight read by the forward and the backward).
Where this module can build the C library for the machine (a C compiler is on it), the engine and the
trainer register it with onnxruntime, which then runs the kernels for those functions instead of
inlining their bodies. Where it cannot (no compiler, a failed build or self-check, ``EDGEFM_NATIVE=0``), the
same bundle runs its pure-onnxruntime form: the library is a speed-up, never a requirement.

Built once per source, compiler and machine into ``$EDGEFM_CACHE/native`` (default
``~/.cache/edgefm/native``) with ``-O3 -march=native`` (the device's own instruction set), and checked
in a child process against numpy before first use, so a broken build can never take the agent down."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "data" / "kernels.c"
CFLAGS = ["-O3", "-fno-math-errno"]  # -fno-math-errno: lrintf is one instruction, not a libm call
DOMAIN = "edgefm.native"  # the ONNX domain of the functions this library has kernels for
OPS = ("BlockOffsetAdd", "Q8MatMul", "Q8MatMulTransB", "Attention", "Q4MatMul", "Q4MatMulOffset", "Q8Linear")  # their names
VECTOR_OPS = ("Q4MatMul", "Q4MatMulOffset", "Q8Linear")  # registered only where the library has a vector path for them
DISABLE_ENV = "EDGEFM_NATIVE"  # "0" / "off": never build or register the library


def cache_dir() -> Path:
    """Where built libraries are kept."""
    root = os.environ.get("EDGEFM_CACHE") or str(Path.home() / ".cache" / "edgefm")
    return Path(root) / "native"


def compiler() -> str | None:
    """The C compiler to build with ($CC, else cc / gcc / clang on PATH)."""
    for name in [os.environ.get("CC", ""), "cc", "gcc", "clang"]:
        if name and shutil.which(name):
            return name
    return None


def library_key(source: bytes, compiler_version: str, machine: str, cpu_features: str) -> str:
    """The built library's name in the cache: what the build depends on. ``-march=native`` builds for the
    instruction set the CPU reports, so a home directory copied to a machine with another one (an SD card
    image moved between boards, a VM moved between hosts) gets its own build instead of one that faults."""
    parts = [source, " ".join(CFLAGS).encode(), compiler_version.encode(), machine.encode(), cpu_features.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _cpu_features() -> str:
    """The CPU's instruction-set flags (x86 ``flags``, ARM ``Features``), "" where the system does not say."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() in ("flags", "Features")), "")


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, out: Path) -> str | None:
    """Compile the library to ``out``; returns an error text or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    errors = []
    # -march=native first (the device's vector units); plain CFLAGS where the compiler does not know it
    for arch in (["-march=native"], ["-mcpu=native"], []):
        cmd = [cc, *CFLAGS, *arch, "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-lm"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        if r.returncode == 0:
            os.replace(tmp, out)  # atomic: agents starting together never load a half-written file
            return None
        errors.append(r.stderr.strip()[-400:])
    Path(tmp).unlink(missing_ok=True)
    return "; ".join(errors) or "the compiler failed"


CHECK_MODEL = Path(__file__).parent / "data" / "native_check.onnx"  # export.quantize.native_check_model()
CHECK_SHAPE = (96, 1100, 32)  # K, N, block of its BlockOffsetAdd node; its C is check_offsets()
Q8_CHECK_SHAPE = (40, 96, 32)  # R, C, block of its Q8MatMul / Q8MatMulTransB nodes; check_q8_weight()
Q4_CHECK_SHAPE = (96, 48)  # K, N of its Q4MatMul / Q4MatMulOffset / Q8Linear nodes; check_q4_weight(), check_q8_linear()
Q4_BLOCK = 32  # the Q4 kernels' block along K


def check_offsets() -> np.ndarray:
    """The C [K/block, N] (fp16) inside CHECK_MODEL."""
    k, n, block = CHECK_SHAPE
    return (np.arange(k // block * n, dtype=np.float32).reshape(k // block, n) % 7 - 3).astype(np.float16) / 4


def check_q8_weight() -> tuple[np.ndarray, np.ndarray]:
    """The Q [R, C] (int8) and S [R, C/block] inside CHECK_MODEL (every int8 value but -128 occurs)."""
    r, c, block = Q8_CHECK_SHAPE
    q = ((np.arange(r * c).reshape(r, c) * 37) % 255 - 127).astype(np.int8)
    s = (np.arange(r * c // block, dtype=np.float32).reshape(r, c // block) % 5 + 1) / 64
    return q, s


def check_q4_weight() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 4-bit values q [N, K/32, 32], scales S and offsets C [K/32, N] (fp16) inside CHECK_MODEL."""
    k, n = Q4_CHECK_SHAPE
    q = ((np.arange(n * k).reshape(n, k // Q4_BLOCK, Q4_BLOCK) * 7) % 16).astype(np.uint8)
    s = ((np.arange(k // Q4_BLOCK * n).reshape(k // Q4_BLOCK, n) % 9 + 1) / 128).astype(np.float16)
    c = ((np.arange(k // Q4_BLOCK * n).reshape(k // Q4_BLOCK, n) % 5 - 2) / 64).astype(np.float16)
    return q, s, c


def check_q8_linear() -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit bytes B [N, K/32, 32] (every value 0..255 occurs) and scales S [K/32, N] (fp16) of the
    check graph's Q8Linear node."""
    k, n = Q4_CHECK_SHAPE
    b = ((np.arange(n * k).reshape(n, k // Q4_BLOCK, Q4_BLOCK) * 37) % 256).astype(np.uint8)
    s = ((np.arange(k // Q4_BLOCK * n).reshape(k // Q4_BLOCK, n) % 7 + 1) / 512).astype(np.float16)
    return b, s


def q8_pack(b: np.ndarray) -> np.ndarray:
    """MatMulNBits' 8-bit bytes B [N, K/32, 32] as the Q8Linear kernel reads them: P [N/16, K/32, 8, 16, 4]
    (for 16 neighbouring columns and one block, chunk t holds bytes 4t..4t+3 of each column)."""
    n, nb, _ = b.shape
    return np.ascontiguousarray(b.reshape(n // 16, 16, nb, 8, 4).transpose(0, 2, 3, 1, 4))


def q8_linear_reference(x: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """What the Q8Linear kernel computes, in numpy: x [M, K] quantized as for ``q4_reference``, an exact
    integer dot product with B - 128 [N, K/32, 32], times s [K/32, N] and the block's scale."""
    m, k = x.shape
    xb = x.astype(np.float32).reshape(m, k // Q4_BLOCK, Q4_BLOCK)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qx = np.rint(xb * inv[..., None]).astype(np.int64)
    dot = np.einsum("mbi,nbi->mnb", qx, b.astype(np.int64) - 128)
    return (dot * (s.astype(np.float32).T[None] * (amax / np.float32(127))[:, None, :])).sum(-1).astype(np.float32)


def q4_pack(q: np.ndarray) -> np.ndarray:
    """4-bit values q [N, K/32, 32] (0..15) as the Q4 kernels read them: MatMulNBits' bytes (element 2i
    in the low nibble of byte i of a block) regrouped to P [N/16, K/32, 4, 16, 4], so that for 16
    neighbouring columns and one block chunk j holds bytes 4j..4j+3 of each column."""
    n, nb, _ = q.shape
    b = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(b.reshape(n // 16, 16, nb, 4, 4).transpose(0, 2, 3, 1, 4))


def q4_reference(x: np.ndarray, q: np.ndarray, s: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """What the Q4 kernels compute, in numpy: x [M, K] quantized per block of 32 to int8 (scale absmax / 127,
    round half to even), an exact integer dot product with q - 8 [N, K/32, 32], times s [K/32, N] and the
    block's scale; plus the block sums of x times c [K/32, N] where given."""
    m, k = x.shape
    nb = k // Q4_BLOCK
    xb = x.astype(np.float32).reshape(m, nb, Q4_BLOCK)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qx = np.rint(xb * inv[..., None]).astype(np.int64)
    dot = np.einsum("mbi,nbi->mnb", qx, q.astype(np.int64) - 8)
    y = (dot * (s.astype(np.float32).T[None] * (amax / np.float32(127))[:, None, :])).sum(-1)
    if c is not None:
        y = y + xb.sum(-1) @ c.astype(np.float32)
    return y.astype(np.float32)


def q8_dequantize(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """D [R, C] = Q * S, one scale per block of C (the reference the Q8 kernels are checked against)."""
    r, c = q.shape
    return (q.reshape(r, s.shape[1], -1).astype(np.float32) * s[:, :, None]).reshape(r, c)


def self_check(path: str | Path) -> None:
    """Run the kernels through onnxruntime and numpy on small cases (raises AssertionError on a mismatch).
    Called in a child process by ``library``: a crash there costs only the check. The graph is shipped
    (data/native_check.onnx): a device has onnxruntime but not the onnx package."""
    import json

    import onnxruntime as ort

    k, n, block = CHECK_SHAPE
    c = check_offsets().astype(np.float32)
    d = q8_dequantize(*check_q8_weight())
    r8, c8, _ = Q8_CHECK_SHAPE
    k4, _ = Q4_CHECK_SHAPE
    q4, s4, c4 = check_q4_weight()
    b8, s8 = check_q8_linear()
    vector = q4_vector(path)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(path))
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"edgefm-native-check-{os.getpid()}")
    sess = ort.InferenceSession(str(CHECK_MODEL), so, providers=["CPUExecutionProvider"])
    try:
        rng = np.random.default_rng(0)
        for rows in (1, 3, 70):  # one token, a short prompt, a prompt split into tasks on onnxruntime's pool
            feeds = {
                "y": rng.standard_normal((1, rows, n)).astype(np.float32),
                "x": rng.standard_normal((1, rows, k)).astype(np.float32),
                "x_t": rng.standard_normal((1, rows, c8)).astype(np.float32),
                "x_n": rng.standard_normal((1, rows, r8)).astype(np.float32),
                "x_4": rng.standard_normal((1, rows, k4)).astype(np.float32),
            }
            want = {
                "out": feeds["y"] + feeds["x"].reshape(1, rows, k // block, block).sum(-1) @ c,
                "y_t": feeds["x_t"] @ d.T,
                "y_n": feeds["x_n"] @ d,
            }
            if vector:  # else onnxruntime runs the Q4 functions' bodies (its MatMulNBits, which may compute in float)
                want["y_4"] = q4_reference(feeds["x_4"][0], q4, s4)[None]
                want["y_4c"] = q4_reference(feeds["x_4"][0], q4, s4, c4)[None]
                want["y_8"] = q8_linear_reference(feeds["x_4"][0], b8, s8)[None]
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            for name, w in want.items():
                assert np.allclose(got[name], w, atol=1e-4), f"{name}, rows {rows}: max error {np.abs(got[name] - w).max()}"
    finally:  # the profile file goes, whether the check passed or not
        trace = Path(sess.end_profiling())
        text = trace.read_text() if trace.is_file() else "[]"
        trace.unlink(missing_ok=True)
    ops = {e.get("args", {}).get("op_name") for e in json.loads(text)}
    # Attention is not in the check model: its decode step is compared with GroupQueryAttention by the tests
    expected = (set(OPS) if vector else set(OPS) - set(VECTOR_OPS)) - {"Attention"}
    missing = expected - ops
    assert not missing, f"onnxruntime inlined the functions instead of running the kernels of {sorted(missing)}"


@functools.lru_cache(maxsize=1)
def library() -> Path | None:
    """The built and checked kernel library for this machine, or None (the reason is logged once)."""
    if os.environ.get(DISABLE_ENV, "").lower() in ("0", "off", "false", "no"):
        log.info("native kernels off (%s=%s)", DISABLE_ENV, os.environ[DISABLE_ENV])
        return None
    cc = compiler()
    if cc is None:
        log.warning("native kernels off: no C compiler (cc, gcc or clang) on PATH; running the pure-onnxruntime graphs")
        return None
    key = library_key(SOURCE.read_bytes(), _compiler_version(cc), platform.machine(), _cpu_features())
    path = cache_dir() / f"libedgefm_native-{key}.so"
    if path.is_file() and path.with_suffix(".ok").is_file():
        return path
    try:
        return _build_and_check(cc, path)
    except (OSError, subprocess.SubprocessError) as exc:  # an unwritable cache, a hung check: run without
        log.warning("native kernels off: %s", exc)
        return None


def _build_and_check(cc: str, path: Path) -> Path | None:
    """Build the library to ``path`` and check it in a child process; marks it checked (``.ok``)."""
    err = _build(cc, path)
    if err:
        log.warning("native kernels off: building %s failed (%s)", SOURCE.name, err)
        return None
    pythonpath = os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
    check = subprocess.run(
        [sys.executable, "-c", f"from edge_runtime.native import self_check; self_check({str(path)!r})"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    if check.returncode != 0:
        path.unlink(missing_ok=True)
        log.warning("native kernels off: the built library failed its check (%s)", (check.stderr or "").strip()[-400:])
        return None
    path.with_suffix(".ok").write_text("checked\n")
    log.info("native kernels on: %s", path)
    return path


def q4_vector(path: str | Path) -> bool:
    """Whether the library at ``path`` has a vector kernel for the Q4 functions (AVX-512 VNNI or AVX2 here;
    it registers them only then: elsewhere onnxruntime's MatMulNBits, in their bodies, is the faster)."""
    return bool(ctypes.CDLL(str(path)).edgefm_q4_vector())


def x86_avx2() -> bool:
    """Whether this is an x86 machine with AVX2, FMA and F16C (what the Q4 kernels' AVX2 path needs)."""
    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= set(_cpu_features().split())


def register(so) -> bool:
    """Register the kernel library with onnxruntime session options ``so``; False where there is none."""
    path = library()
    if path is None:
        return False
    so.register_custom_ops_library(str(path))  # the kernels run on the session's own intra-op threads
    return True


def _entry(name: str, path: Path | None = None):
    """A C entry point of the built library (or of the one at ``path``), an int status, for calling the
    kernels directly."""
    path = path or library()
    if path is None:
        raise RuntimeError("the native library is not available on this machine")
    f = getattr(ctypes.CDLL(str(path)), name)
    f.restype = ctypes.c_int
    return f


def block_offset_add(y: np.ndarray, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The kernel called directly, on this thread (tests): y + S(x) @ C over rows of y [.., N], x [.., K],
    C [K/block, N] fp16."""
    f = _entry("edgefm_block_offset_add")
    y = np.ascontiguousarray(y, np.float32)
    x = np.ascontiguousarray(x, np.float32)
    c = np.ascontiguousarray(c, np.float16)
    out = np.empty_like(y)
    rows, k, nb, n = x.size // x.shape[-1], x.shape[-1], c.shape[0], c.shape[1]
    ptr = ctypes.c_void_p
    rc = f(
        ptr(y.ctypes.data),
        ptr(x.ctypes.data),
        ptr(c.ctypes.data),
        ptr(out.ctypes.data),
        *(ctypes.c_size_t(v) for v in (rows, k, nb, n)),
    )
    if rc != 0:
        raise ValueError(f"shapes the kernel does not take: K={k} with {nb} blocks")
    return out


def q8_matmul(x: np.ndarray, q: np.ndarray, s: np.ndarray, *, trans_b: bool) -> np.ndarray:
    """The Q8 kernels called directly, on this thread (tests): x @ D^T (``trans_b``, x [.., C]) or x @ D
    (x [.., R]), D = Q [R, C] int8 * S [R, C/block]."""
    f = _entry("edgefm_q8_matmul")
    x = np.ascontiguousarray(x, np.float32)
    q = np.ascontiguousarray(q, np.int8)
    s = np.ascontiguousarray(s, np.float32)
    r, c = q.shape
    out = np.empty((*x.shape[:-1], r if trans_b else c), np.float32)
    ptr = ctypes.c_void_p
    if x.shape[-1] != (c if trans_b else r) or s.shape[0] != r:
        raise ValueError(f"x {x.shape} does not match Q {q.shape} and S {s.shape}")
    rc = f(
        ptr(x.ctypes.data),
        ptr(q.ctypes.data),
        ptr(s.ctypes.data),
        ptr(out.ctypes.data),
        *(ctypes.c_size_t(v) for v in (x.size // x.shape[-1], r, c, s.shape[1])),
        ctypes.c_int(int(trans_b)),
    )
    if rc != 0:
        raise ValueError(f"shapes the kernel does not take: C={c} with {s.shape[1]} blocks (blocks must be multiples of 16)")
    return out


def q4_matmul(x: np.ndarray, p: np.ndarray, s: np.ndarray, c: np.ndarray | None = None, *, lib: Path | None = None) -> np.ndarray:
    """The Q4 kernel called directly, on this thread (tests): x [.., K] by the packed 4-bit weight p
    (``q4_pack``) with fp16 scales s [K/32, N] and, where given, fp16 offsets c [K/32, N]. ``lib``: a
    library other than this machine's build (tests of its other code paths)."""
    return _q4_call(x, p, s, c, 4, lib)


def q8_linear(x: np.ndarray, p: np.ndarray, s: np.ndarray, *, lib: Path | None = None) -> np.ndarray:
    """The Q8Linear kernel called directly, on this thread (tests): x [.., K] by the packed 8-bit weight p
    (``q8_pack``) with fp16 scales s [K/32, N]."""
    return _q4_call(x, p, s, None, 8, lib)


def _q4_call(x: np.ndarray, p: np.ndarray, s: np.ndarray, c: np.ndarray | None, bits: int, lib: Path | None) -> np.ndarray:
    f = _entry("edgefm_q4_matmul", lib)
    x = np.ascontiguousarray(x, np.float32)
    p = np.ascontiguousarray(p, np.uint8)
    s = np.ascontiguousarray(s, np.float16)
    k, n = x.shape[-1], p.shape[0] * 16
    if (
        p.ndim != 5
        or p.shape[2] != bits
        or p.shape[1] * Q4_BLOCK != k
        or s.shape != (k // Q4_BLOCK, n)
        or (c is not None and c.shape != s.shape)
    ):
        raise ValueError(f"x {x.shape} does not match P {p.shape}, S {s.shape}")
    c16 = None if c is None else np.ascontiguousarray(c, np.float16)
    out = np.empty((*x.shape[:-1], n), np.float32)
    ptr = ctypes.c_void_p
    rc = f(
        ptr(x.ctypes.data),
        ptr(p.ctypes.data),
        ptr(s.ctypes.data),
        None if c16 is None else ptr(c16.ctypes.data),
        ptr(out.ctypes.data),
        *(ctypes.c_size_t(v) for v in (x.size // k, k, n)),
        ctypes.c_int(bits),
    )
    if rc != 0:
        raise ValueError(f"shapes the kernel does not take: K={k}, N={n} (K a multiple of 32, N of 16)")
    return out
