"""The optional native kernels (edge_runtime/data/kernels.c): built on this machine, checked against
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


def test_q8_matmuls_by_hand():
    # D = Q * S with one block of 16 per row: row 0 = 0.5 * (1, -2, 0...), row 1 = 2 * (0, 1, 3, 0...)
    q = np.zeros((2, 16), np.int8)
    q[0, :2] = [1, -2]
    q[1, 1:3] = [1, 3]
    s = np.array([[0.5], [2.0]], np.float32)
    x = np.zeros((1, 16), np.float32)
    x[0, :3] = [4.0, 1.0, 1.0]
    np.testing.assert_array_equal(native.q8_matmul(x, q, s, trans_b=True), [[0.5 * (4 - 2), 2.0 * (1 + 3)]])
    dy = np.array([[1.0, -1.0]], np.float32)   # dy @ D: row 0 minus row 1
    want = np.zeros((1, 16), np.float32)
    want[0, :3] = [0.5, -1.0 - 2.0, -6.0]
    np.testing.assert_array_equal(native.q8_matmul(dy, q, s, trans_b=False), want)


@settings(max_examples=40, deadline=None)
@given(rows=st.one_of(st.integers(0, 40), st.integers(250, 530)), r=st.integers(1, 70), nb=st.integers(1, 40), block=st.sampled_from([16, 32, 64]),
       trans_b=st.booleans(), seed=st.integers(0, 2**16))
def test_q8_matmuls_match_numpy(rows, r, nb, block, trans_b, seed):
    # rows cross the register tiles (12/6/3, 4, 1) and the 256-row blocks; R crosses partial 16-column panels and groups of
    # panels; C = nb * block crosses the 512-deep chunks the panels are built in
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (r, nb * block)).astype(np.int8)
    s = rng.random((r, nb)).astype(np.float32) / 64
    d = native.q8_dequantize(q, s)
    x = rng.standard_normal((rows, nb * block if trans_b else r)).astype(np.float32)
    want = x @ d.T if trans_b else x @ d
    np.testing.assert_allclose(native.q8_matmul(x, q, s, trans_b=trans_b), want, rtol=1e-4, atol=1e-4)


def test_q8_shapes_the_kernels_do_not_take_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):   # blocks of 8
        native.q8_matmul(np.zeros((1, 32), np.float32), np.zeros((3, 32), np.int8), np.ones((3, 4), np.float32), trans_b=True)
    with pytest.raises(ValueError, match="does not match"):
        native.q8_matmul(np.zeros((1, 5), np.float32), np.zeros((3, 32), np.int8), np.ones((3, 2), np.float32), trans_b=True)


def test_the_shipped_check_graph_runs_the_kernels_through_onnxruntime():
    # what library() runs in a child process before first use; here in-process, on the built library
    # (prompts of 70 rows run the kernels as tasks on onnxruntime's pool)
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
