"""The optional native kernels (edge_runtime/data/kernels.c): built on this machine, checked against
numpy, and the same numbers as the graph's standard-operator form (torch-free)."""
from __future__ import annotations

import subprocess

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


def test_q4_matmul_by_hand():
    # one block of 32 inputs, all 1: int8 values 127 at scale 1/127, block sum 32.
    # column 0: q = 9 (weight 1 x scale 0.5) -> 32 * 0.5 = 16; column 1: q = 8 (weight 0) plus offset 0.25 x 32 = 8;
    # column 2: q = 0 (weight -8 x 0.125) -> -32; the other 13 columns: zero
    q = np.full((16, 1, 32), 8, np.uint8)
    q[0], q[2] = 9, 0
    s = np.zeros((1, 16), np.float16)
    s[0, :3] = [0.5, 1.0, 0.125]
    c = np.zeros((1, 16), np.float16)
    c[0, 1] = 0.25
    x = np.ones((1, 32), np.float32)
    want = np.zeros((1, 16), np.float32)
    want[0, :3] = [16.0, 8.0, -32.0]
    np.testing.assert_allclose(native.q4_matmul(x, native.q4_pack(q), s, c), want, rtol=1e-6)
    want[0, 1] = 0.0
    np.testing.assert_allclose(native.q4_matmul(x, native.q4_pack(q), s), want, rtol=1e-6)


def q4_case(rng, rows, nb, groups):
    q = rng.integers(0, 16, (16 * groups, nb, 32)).astype(np.uint8)
    s = (rng.random((nb, 16 * groups)) / 16).astype(np.float16)
    c = (rng.standard_normal((nb, 16 * groups)) / 32).astype(np.float16)
    x = (rng.standard_normal((rows, 32 * nb)) * np.exp(rng.standard_normal(32 * nb))).astype(np.float32)  # outlier inputs
    if rows and nb > 1:
        x[0, 32:64] = 0.0  # an all-zero block: scale 0
    return x, q, s, c


@settings(max_examples=40, deadline=None)
@given(rows=st.one_of(st.integers(0, 20), st.integers(60, 140)), nb=st.integers(1, 50), groups=st.integers(1, 10),
       offsets=st.booleans(), seed=st.integers(0, 2**16))
def test_q4_matmul_matches_numpy(rows, nb, groups, offsets, seed):
    # rows cross the register tiles (8 / 4) and the 64-row tasks; groups of 16 columns cross the 4-group tasks
    x, q, s, c = q4_case(np.random.default_rng(seed), rows, nb, groups)
    c = c if offsets else None
    want = native.q4_reference(x, q, s, c)
    np.testing.assert_allclose(native.q4_matmul(x, native.q4_pack(q), s, c), want, rtol=1e-5, atol=1e-5 * (np.abs(want).max(initial=0) + 1))


def test_q8_linear_by_hand():
    # one block of 32 inputs, all 1 (int8 127 at scale 1/127): column 0 bytes 129 (weight 1 x scale 0.5) -> 16;
    # column 1 bytes 0 (weight -128 x 2^-7) -> -32; column 2 bytes 128 (weight 0) -> 0
    b = np.full((16, 1, 32), 128, np.uint8)
    b[0], b[1] = 129, 0
    s = np.zeros((1, 16), np.float16)
    s[0, :2] = [0.5, 2.0**-7]
    want = np.zeros((1, 16), np.float32)
    want[0, :2] = [16.0, -32.0]
    np.testing.assert_allclose(native.q8_linear(np.ones((1, 32), np.float32), native.q8_pack(b), s), want, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(rows=st.one_of(st.integers(0, 20), st.integers(60, 140)), nb=st.integers(1, 30), groups=st.integers(1, 10),
       seed=st.integers(0, 2**16))
def test_q8_linear_matches_numpy(rows, nb, groups, seed):
    rng = np.random.default_rng(seed)
    x, _, s, _ = q4_case(rng, rows, nb, groups)
    b = rng.integers(0, 256, (16 * groups, nb, 32)).astype(np.uint8)   # 0 and 255: the extremes of the bytes
    want = native.q8_linear_reference(x, b, s)
    got = native.q8_linear(x, native.q8_pack(b), s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * (np.abs(want).max(initial=0) + 1))


def test_q4_reference_is_the_dequantized_matmul_up_to_int8_inputs():
    # the numpy model of the kernel against plain float arithmetic: w = s (q - 8) + c, x rounded to 8 bits a block
    x, q, s, c = q4_case(np.random.default_rng(3), 5, 6, 2)
    w = (s.T[:, :, None].astype(np.float32) * (q.astype(np.float32) - 8) + c.T[:, :, None].astype(np.float32)).reshape(32, -1)
    exact = x @ w.T
    err = np.abs(native.q4_reference(x, q, s, c) - exact).max() / np.abs(exact).max()
    assert 0 < err < 0.02


@pytest.mark.skipif(not native.x86_avx2(), reason="the AVX2 build needs an x86 machine with AVX2")
@pytest.mark.parametrize("flags", [["-mavx2", "-mfma", "-mf16c"], []], ids=["avx2", "plain-c"])
def test_every_q4_code_path_computes_the_same(tmp_path, flags):
    # the machine's own build runs its widest path (AVX-512 VNNI here); the AVX2 path (x86 without VNNI) and the plain C
    # one (the loop every other machine compiles) are built here and checked against the same numpy model
    lib = tmp_path / "lib.so"
    subprocess.run([native.compiler(), *native.CFLAGS, *flags, "-shared", "-fPIC", "-o", str(lib), str(native.SOURCE)], check=True)
    assert native.q4_vector(lib) == bool(flags)
    for rows, nb, groups, seed in [(1, 18, 3, 0), (13, 2, 5, 1), (70, 48, 2, 2)]:
        x, q, s, c = q4_case(np.random.default_rng(seed), rows, nb, groups)
        want = native.q4_reference(x, q, s, c)
        got = native.q4_matmul(x, native.q4_pack(q), s, c, lib=lib)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        b = np.random.default_rng(seed).integers(0, 256, q.shape).astype(np.uint8)
        want = native.q8_linear_reference(x, b, s)
        got = native.q8_linear(x, native.q8_pack(b), s, lib=lib)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # and through onnxruntime: the build passes the check a device runs (the plain one leaves the Q4 functions to
    # onnxruntime, whose MatMulNBits may compute in float where it has no int8 kernel, as on a Raspberry Pi 4)
    native.self_check(lib)


def test_q4_shapes_the_kernel_does_not_take_are_refused():
    with pytest.raises(ValueError, match="does not match"):   # K = 40: not whole blocks of 32
        native.q4_matmul(np.zeros((1, 40), np.float32), np.zeros((1, 1, 4, 16, 4), np.uint8), np.zeros((1, 16), np.float16))
    with pytest.raises(ValueError, match="does not match"):   # scales for another N
        native.q4_matmul(np.zeros((1, 32), np.float32), np.zeros((1, 1, 4, 16, 4), np.uint8), np.zeros((1, 32), np.float16))


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


def test_the_library_is_built_again_for_another_instruction_set():
    # a home directory copied between machines (an SD card image, a moved VM) must not load a -march=native
    # build made for other vector units
    key = native.library_key(b"src", "gcc 12", "x86_64", "fpu sse2 avx2 avx512f")
    assert key == native.library_key(b"src", "gcc 12", "x86_64", "fpu sse2 avx2 avx512f")
    assert key != native.library_key(b"src", "gcc 12", "x86_64", "fpu sse2 avx2")
    assert key != native.library_key(b"src2", "gcc 12", "x86_64", "fpu sse2 avx2 avx512f")
    assert key != native.library_key(b"src", "gcc 13", "x86_64", "fpu sse2 avx2 avx512f")


def _attention_model(heads, groups, dim, cap, positions):
    """One edgefm.native:Attention call with the exporter's function (export/quantize.py:attention_function:
    GroupQueryAttention on packed q/k/v with rotary as its body), the cache as inputs and outputs."""
    import onnx
    from onnx import TensorProto, helper

    from export.quantize import attention_function

    fn = attention_function()
    call = helper.make_node("Attention", ["qkv", "past_k", "past_v", "seqlens", "total", "cos", "sin"],
                            ["y", "present_k", "present_v"], domain=native.DOMAIN, num_heads=heads, kv_num_heads=groups,
                            scale=0.3, do_rotary=1, rotary_interleaved=0)
    f = TensorProto.FLOAT
    graph = helper.make_graph([call], "attention", [
        helper.make_tensor_value_info("qkv", f, [1, "s", (heads + 2 * groups) * dim]),
        helper.make_tensor_value_info("past_k", f, [1, groups, cap, dim]),
        helper.make_tensor_value_info("past_v", f, [1, groups, cap, dim]),
        helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", f, [positions, dim // 2]),
        helper.make_tensor_value_info("sin", f, [positions, dim // 2]),
    ], [helper.make_tensor_value_info(n, f, None) for n in ("y", "present_k", "present_v")])
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(native.DOMAIN, 1)]
    return onnx.helper.make_model(graph, opset_imports=ops, functions=[fn], ir_version=9).SerializeToString()


def test_attention_decode_step_matches_group_query_attention(tmp_path):
    """The native Attention runs a one-token step itself (rotary on q and k, k and v appended in place, softmax
    attention per query head over its key/value head) and gives onnxruntime's GroupQueryAttention's outputs and
    cache; the prompt before it goes through GroupQueryAttention (InvokeOp) in both sessions."""
    import json

    import onnxruntime as ort
    pytest.importorskip("onnx", reason="the graph is built with onnx, absent from the torch-free install; the full suite runs it")
    heads, groups, dim, cap, positions = 6, 2, 16, 12, 32
    model = _attention_model(heads, groups, dim, cap, positions)
    rng = np.random.default_rng(3)
    angles = np.arange(positions)[:, None] / 10000 ** (np.arange(dim // 2) / (dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    steps = [rng.standard_normal((1, n, (heads + 2 * groups) * dim)).astype(np.float32) for n in (5, 1, 1, 1, 1)]
    results = {}
    for mode in ("native", "onnxruntime"):
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp_path / mode)
        if mode == "native":
            assert native.register(so)
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        k = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, groups, cap, dim), np.float32))
        v = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, groups, cap, dim), np.float32))
        outs, total = [], 0
        for qkv in steps:
            total += qkv.shape[1]
            b = sess.io_binding()
            b.bind_cpu_input("qkv", qkv)
            b.bind_ortvalue_input("past_k", k)
            b.bind_ortvalue_input("past_v", v)
            b.bind_cpu_input("seqlens", np.array([total - 1], np.int32))
            b.bind_cpu_input("total", np.array(total, np.int32))
            b.bind_cpu_input("cos", cos)
            b.bind_cpu_input("sin", sin)
            b.bind_output("y", "cpu")
            b.bind_ortvalue_output("present_k", k)  # the cache appended in place, as the engine's decode loop does
            b.bind_ortvalue_output("present_v", v)
            sess.run_with_iobinding(b)
            outs.append(b.get_outputs()[0].numpy().copy())
        ran = {e.get("args", {}).get("op_name") for e in json.loads(open(sess.end_profiling()).read())}
        results[mode] = (outs, k.numpy().copy(), v.numpy().copy(), ran)
    (got, gk, gv, ran_native), (want, wk, wv, ran_plain) = results["native"], results["onnxruntime"]
    assert "Attention" in ran_native and "Attention" not in ran_plain    # the kernel ran; the other session inlined
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gk, wk, rtol=1e-5, atol=1e-5)             # rotated keys at positions 0..8
    np.testing.assert_allclose(gv, wv, rtol=1e-5, atol=1e-5)
    assert np.abs(gk[:, :, 9:]).max() == 0                                # nothing past the last position
