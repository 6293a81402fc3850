"""The optional native kernel (edge_runtime/data/blockoffset.c): built on this machine, checked against
numpy, and the same numbers as the graph's standard-operator form (torch-free)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime import native

pytestmark = pytest.mark.device


def reference(y, x, c):
    nb = c.shape[0]
    sums = x.reshape(*x.shape[:-1], nb, x.shape[-1] // nb).sum(-1)
    return y + sums @ c.astype(np.float32)


def test_the_library_builds_on_this_machine():
    # the test machines have a C compiler (as the README's bootstrap installs one): no silent fallback here
    assert native.compiler() is not None
    path = native.library()
    assert path is not None and path.is_file()


def test_block_offset_add_by_hand():
    # two blocks of 2 inputs: sums of x per block are (1+2, 3+4) = (3, 7)
    y = np.array([[10.0, 20.0, 30.0]], np.float32)
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    c = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -1.0]], np.float16)
    out = native.block_offset_add(y, x, c)
    np.testing.assert_array_equal(out, [[10 + 3, 20 + 7, 30 + 1.5 - 7]])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 90), nb=st.integers(1, 20), block=st.sampled_from([1, 16, 32]), n=st.integers(1, 1100),
       seed=st.integers(0, 2**16))
def test_block_offset_add_matches_numpy(rows, nb, block, n, seed):
    # row counts cross the 4-row tasks and the one-task steps (< 8 rows); n crosses the 16- and 8-wide vectors
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((rows, n)).astype(np.float32)
    x = rng.standard_normal((rows, nb * block)).astype(np.float32)
    c = rng.standard_normal((nb, n)).astype(np.float16)
    np.testing.assert_allclose(native.block_offset_add(y, x, c), reference(y, x, c), rtol=1e-5, atol=1e-4)


def test_half_precision_offsets_are_decoded_exactly():
    # subnormal, tiny, negative and large fp16 values: the kernel's half-to-float decode is exact
    c = np.array([[6e-8, -6e-5, 1.0 / 3, -2.5, 65504.0, 0.0, 1e-3, -7.0, 0.1]], np.float16)
    y = np.zeros((1, c.shape[1]), np.float32)
    x = np.ones((1, 1), np.float32)
    np.testing.assert_array_equal(native.block_offset_add(y, x, c), c.astype(np.float32))


def test_shapes_the_kernel_does_not_take_are_refused():
    with pytest.raises(ValueError, match="blocks"):
        native.block_offset_add(np.zeros((1, 4), np.float32), np.zeros((1, 10), np.float32), np.zeros((3, 4), np.float16))


def test_the_shipped_check_graph_runs_the_kernel_through_onnxruntime():
    # what library() runs in a child process before first use; here in-process, on the built library
    native.self_check(native.library())


def test_a_cache_that_cannot_be_written_leaves_the_engine_on_onnxruntime_alone(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory would go")
    monkeypatch.setenv("EDGEFM_CACHE", str(blocked))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "native kernels off" in caplog.text
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
