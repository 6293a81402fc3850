"""Process memory settings for daemons that move large messages.

paho-mqtt copies every received message a few times (``bytearray`` growth, ``struct.unpack`` slices).
With glibc's default settings each multi-megabyte copy is a fresh ``mmap`` whose pages fault in one
by one and go back to the kernel on free (``munmap`` / ``madvise``): for a 1.8 MB update that is
~3 ms of CPU per message, most of what receiving costs. Raising glibc's mmap and trim thresholds
keeps such buffers in the heap and reuses them (~0.9 ms per message, measured in bench/ingest.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def _glibc_function(name: str):
    """``name`` from the C library where it is glibc's (Linux), else None (musl, macOS: nothing done)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # musl (Alpine) and others have no mallopt / malloc_trim
        return None


def keep_large_buffers(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Ask glibc to serve allocations below ``mmap_threshold`` from the heap and to keep up to
    ``trim_threshold`` bytes of freed heap for reuse. Process-wide; returns False (and changes
    nothing) where the C library is not glibc."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if ok:
        log.debug("glibc: mmap threshold %d MiB, trim threshold %d MiB", mmap_threshold >> 20, trim_threshold >> 20)
    return ok


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc ``malloc_trim``), e.g. before the agent
    creates its training session: decoding and evaluation leave memory free but held in the heaps of
    the threads that served them, which would otherwise add to the training session's peak (measured
    ~20 MB off the SmolLM2 agent's). False (nothing done) where the C library is not glibc."""
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
