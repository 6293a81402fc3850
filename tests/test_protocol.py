"""Wire contracts: codecs, update envelope, adapters, pointers/chunks, topics. Pure, torch-free."""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from edge_runtime.errors import ProtocolError, RejectReason
from edge_runtime.protocol import (AdapterMeta, ChunkAssembler, CodecSpec, GlobalPointer, Topics, UpdateHeader,
                                   adapter_from_bytes, adapter_to_bytes, check_tensors_match, decode_payload,
                                   decode_update, encode_payload, encode_update, make_pointer, topic_matches)
from edge_runtime.protocol.codec import CODECS
from edge_runtime.protocol.tensors import decode_tensors, encode_tensors

pytestmark = pytest.mark.device


def header(**kw):
    base = dict(device_id="dev-1", update_id="u1", base_version=0, num_examples=10, base_fingerprint="f" * 64)
    base.update(kw)
    return UpdateHeader(**base)


def tensors():
    return {"layers.0.q_proj.lora_A": np.arange(8, dtype=np.float32).reshape(2, 4) / 7,
            "layers.0.q_proj.lora_B": -np.ones((4, 2), np.float32) * 0.25}


# --- tensor container -------------------------------------------------------------------------------------

def test_tensor_container_reads_what_safetensors_writes():
    # Prepare: the reference library writes a file
    from safetensors.numpy import save
    data = save({"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.int8)}, metadata={"k": "v"})
    # Execute
    out, meta = decode_tensors(data)
    # Assert
    assert meta == {"k": "v"} and out["a"].shape == (2, 3) and out["b"].tolist() == [0, 1, 2, 3]


def test_safetensors_reads_what_we_write():
    from safetensors.numpy import load
    blob = encode_tensors(tensors(), {"x": "y"})
    back = load(blob)
    for k, v in tensors().items():
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b[:5], RejectReason.TRUNCATED),
    (lambda b: b[:-3], RejectReason.TRUNCATED),
    (lambda b: struct.pack("<Q", 1 << 40) + b[8:], RejectReason.MALFORMED),
    (lambda b: struct.pack("<Q", 2) + b"{]" + b[10:], RejectReason.MALFORMED),
])
def test_tensor_container_rejects_damage(mutate, reason):
    blob = encode_tensors(tensors())
    with pytest.raises(ProtocolError) as e:
        decode_tensors(mutate(blob))
    assert e.value.reason == reason


def test_tensor_container_rejects_inconsistent_shape_and_overlap():
    hdr = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    raw = json.dumps(hdr).encode()
    with pytest.raises(ProtocolError) as e:
        decode_tensors(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    assert e.value.reason == RejectReason.BAD_SHAPE
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(hdr).encode()
    with pytest.raises(ProtocolError) as e:
        decode_tensors(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    assert e.value.reason == RejectReason.MALFORMED


# --- codecs -----------------------------------------------------------------------------------------------

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=finite)


@settings(max_examples=60, deadline=None)
@given(arr=arrays, dtype=st.sampled_from(["fp32", "fp16", "int8", "int4"]), comp=st.sampled_from(["none", "zstd"]))
def test_every_codec_round_trips_within_its_stated_error(arr, dtype, comp):
    spec = CodecSpec(dtype, comp)
    out = decode_payload(encode_payload({"t": arr}, spec), spec, max_decoded_bytes=1 << 20)["t"]
    assert out.shape == arr.shape and out.dtype == np.float32
    if dtype == "fp32":
        np.testing.assert_array_equal(out, arr)
    elif dtype == "fp16":
        # fp16 normal range: relative 2^-11; below 2^-14 absolute error of the subnormal step 2^-25
        assert np.all(np.abs(out - arr) <= np.maximum(np.abs(arr) * 2.0 ** -11, 2.0 ** -24))
    elif dtype == "int8":
        rows = arr.reshape(arr.shape[0], -1)
        scale = np.abs(rows).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(out.reshape(rows.shape) - rows) <= scale / 2 * (1 + 1e-5) + 1e-30)
    else:  # int4: blocks of flattened values, bound s/2 with s = max|block|/7 rounded up to fp16 (<= 2^-10 up)
        b = CODECS["int4"].block
        flat = np.zeros(-(-arr.size // b) * b, np.float32)
        flat[:arr.size] = arr.ravel()
        s = np.abs(flat.reshape(-1, b)).max(axis=1) / 7 * (1 + 2.0 ** -9)
        err = np.zeros_like(flat)
        err[:arr.size] = np.abs(out.ravel() - arr.ravel())
        assert np.all(err.reshape(-1, b) <= s[:, None] / 2 + 6e-8)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512), dtype=st.sampled_from(["fp32", "fp16", "int8", "int4"]), comp=st.sampled_from(["none", "zstd"]))
def test_decoding_arbitrary_bytes_only_raises_protocol_error(data, dtype, comp):
    try:
        decode_payload(data, CodecSpec(dtype, comp), max_decoded_bytes=1 << 16)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1024))
def test_decoding_arbitrary_update_bytes_only_raises_protocol_error(data):
    with pytest.raises(ProtocolError):
        decode_update(b"EFMU" + data if data[:1] == b"\x00" else data)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, 400), flip=st.integers(0, 400))
def test_damaged_updates_only_raise_protocol_error(cut, flip):
    msg = bytearray(encode_update(header(), tensors()))
    flip %= len(msg)
    msg[flip] ^= 0x5A
    for candidate in (bytes(msg), bytes(msg[:cut])):
        try:
            decode_update(candidate)
        except ProtocolError:
            pass


def test_codec_refuses_nan_on_encode_and_on_decode():
    with pytest.raises(ValueError):
        encode_payload({"t": np.array([np.nan], np.float32)}, CodecSpec())
    raw = encode_tensors({"t": np.array([1.0, np.inf], np.float32)})
    with pytest.raises(ProtocolError) as e:
        decode_payload(raw, CodecSpec(), max_decoded_bytes=1 << 10)
    assert e.value.reason == RejectReason.NON_FINITE



def test_flat_view_spans_back_to_back_tensors_without_copying():
    from edge_runtime.protocol.tensors import flat_view, flatten
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(6, 10, dtype=np.float32)}
    dec, _ = decode_tensors(encode_tensors(t), copy=False)
    v = flat_view([dec["a"], dec["b"]])
    assert v is not None and not v.flags.owndata
    np.testing.assert_array_equal(v, np.arange(10, dtype=np.float32))
    assert flat_view([dec["b"], dec["a"]]) is None                     # not in buffer order
    assert flat_view([dec["a"]]) is not None and flat_view([dec["b"]]).size == 4
    assert flat_view([t["a"], t["b"]]) is None                         # separate allocations
    assert flat_view([dec["a"].T]) is None                             # not C-contiguous
    assert flat_view([dec["a"]], dtype=np.float64) is None
    np.testing.assert_array_equal(flatten([dec["b"], dec["a"]]), [6, 7, 8, 9, 0, 1, 2, 3, 4, 5])   # falls back to a copy
    from edge_runtime.protocol.tensors import span_view
    assert span_view(dec, ["a", "b"]) is not None and span_view(dec, ["b", "a"]) is None
    assert span_view(dec, ["a", "b"], np.float64) is None
    assert span_view(decode_tensors(encode_tensors(t))[0], ["a", "b"]) is None      # copies: no shared buffer
    out = decode_payload(encode_tensors(t), CodecSpec(), max_decoded_bytes=1 << 10)
    assert not out.flat.flags.owndata
    np.testing.assert_array_equal(out.flat, np.arange(10, dtype=np.float32))
    assert out.sumsq == float(np.sum(np.arange(10) ** 2))


def test_huge_finite_values_are_not_called_non_finite():
    """The one-pass check squares the values: a float32 overflow there must not be reported as NaN/Inf
    (the norm bound is what rejects such an update)."""
    big = encode_tensors({"t": np.array([3e38, 1.0], np.float32)})
    out = decode_payload(big, CodecSpec(), max_decoded_bytes=1 << 10)
    assert out["t"][0] == np.float32(3e38) and not np.isfinite(out.sumsq)
    nan = encode_tensors({"a": np.array([3e38], np.float32), "b": np.array([np.nan], np.float32)})
    with pytest.raises(ProtocolError) as e:
        decode_payload(nan, CodecSpec(), max_decoded_bytes=1 << 10)
    assert e.value.reason == RejectReason.NON_FINITE and "'b'" in str(e.value)

def test_codec_refuses_wrong_dtype_and_zip_bomb():
    raw = encode_tensors({"t": np.ones(4, np.float64)})
    with pytest.raises(ProtocolError) as e:
        decode_payload(raw, CodecSpec(), max_decoded_bytes=1 << 10)
    assert e.value.reason == RejectReason.BAD_DTYPE
    bomb = encode_payload({"t": np.zeros(1 << 20, np.float32)}, CodecSpec("fp32", "zstd"))
    assert len(bomb) < 10_000
    with pytest.raises(ProtocolError) as e:
        decode_payload(bomb, CodecSpec("fp32", "zstd"), max_decoded_bytes=1 << 16)
    assert e.value.reason == RejectReason.OVERSIZE


def test_int4_codec_is_about_8x_smaller_and_rejects_inconsistent_sizes():
    rng = np.random.default_rng(0)
    t = {"a": rng.standard_normal((576, 64)).astype(np.float32), "b": rng.standard_normal((64, 576)).astype(np.float32),
         "odd": rng.standard_normal((3, 5)).astype(np.float32)}
    fp32 = len(encode_payload(t, CodecSpec("fp32")))
    int4 = len(encode_payload(t, CodecSpec("int4")))
    assert fp32 / int4 > 7.8  # 4 bits + an fp16 scale per 256 values = 7.88x at most before compression
    back = decode_payload(encode_payload(t, CodecSpec("int4")), CodecSpec("int4"), max_decoded_bytes=1 << 24)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in t.items()}
    wire = CODECS["int4"].encode(t)
    bad_shape = dict(wire, **{"int4.index": np.frombuffer(b'[["a",[577,64]],["b",[64,576]],["odd",[3,5]]]', np.uint8)})
    dup = dict(wire, **{"int4.index": np.frombuffer(b'[["a",[576,64]],["a",[64,576]],["odd",[3,5]]]', np.uint8)})
    not_json = dict(wire, **{"int4.index": np.frombuffer(b'[["a",', np.uint8)})
    negative = dict(wire, **{"int4.index": np.frombuffer(b'[["a",[-1,64]]]', np.uint8)})
    short = dict(wire, **{"int4.data": wire["int4.data"][:-1]})
    extra = dict(wire, **{"a.__scale": np.ones(3, np.float16)})
    for bad, reason in ((bad_shape, RejectReason.BAD_SHAPE), (short, RejectReason.BAD_SHAPE), (dup, RejectReason.MALFORMED),
                        (not_json, RejectReason.MALFORMED), (negative, RejectReason.MALFORMED), (extra, RejectReason.MALFORMED)):
        with pytest.raises(ProtocolError) as e:
            decode_payload(encode_tensors(bad), CodecSpec("int4"), max_decoded_bytes=1 << 24)
        assert e.value.reason == reason


def test_unknown_codec_is_refused():
    with pytest.raises(ProtocolError) as e:
        CodecSpec("bf17")
    assert e.value.reason == RejectReason.UNKNOWN_CODEC


# --- update envelope --------------------------------------------------------------------------------------

def test_update_round_trip_with_signature():
    msg = encode_update(header(metrics={"loss": 1.5}, codec=CodecSpec("int8", "zstd")), tensors(), sign_key=b"k")
    upd = decode_update(msg, verify_key=b"k")
    assert upd.header.update_id == "u1" and upd.header.metrics == {"loss": 1.5}
    np.testing.assert_allclose(upd.tensors["layers.0.q_proj.lora_B"], -0.25, atol=1e-6)
    with pytest.raises(ProtocolError) as e:
        decode_update(msg, verify_key=b"other")
    assert e.value.reason == RejectReason.BAD_SIGNATURE


def _rewrite_header(msg: bytes, **changes) -> bytes:
    (hlen,) = struct.unpack("<I", msg[4:8])
    hobj = json.loads(msg[8:8 + hlen])
    hobj.update(changes)
    hb = json.dumps(hobj).encode()
    return msg[:4] + struct.pack("<I", len(hb)) + hb + msg[8 + hlen:]


@pytest.mark.parametrize("changes, reason", [
    ({"protocol": 2}, RejectReason.UNSUPPORTED_VERSION),
    ({"num_examples": 0}, RejectReason.BAD_FIELD),
    ({"device_id": "a/b/#"}, RejectReason.BAD_FIELD),
    ({"metrics": {"loss": "NaN"}}, RejectReason.BAD_FIELD),
    ({"codec": {"dtype": "bf17", "compression": "none"}}, RejectReason.UNKNOWN_CODEC),
    ({"payload_sha256": "0" * 64}, RejectReason.HASH_MISMATCH),
    ({"payload_size": 3}, RejectReason.MALFORMED),
])
def test_bad_update_headers_rejected_with_reason(changes, reason):
    msg = _rewrite_header(encode_update(header(), tensors()), **changes)
    with pytest.raises(ProtocolError) as e:
        decode_update(msg)
    assert e.value.reason == reason


def test_nan_metric_in_raw_json_rejected():
    msg = encode_update(header(), tensors())
    (hlen,) = struct.unpack("<I", msg[4:8])
    hb = msg[8:8 + hlen].replace(b'"metrics":{}', b'"metrics":{"loss":NaN}')
    msg = msg[:4] + struct.pack("<I", len(hb)) + hb + msg[8 + hlen:]
    with pytest.raises(ProtocolError) as e:
        decode_update(msg)
    assert e.value.reason == RejectReason.NON_FINITE


def test_oversize_truncated_and_magic():
    msg = encode_update(header(), tensors())
    for data, reason in ((msg, RejectReason.OVERSIZE), (msg[:-1], RejectReason.TRUNCATED), (b"XXXX" + msg[4:], RejectReason.BAD_MAGIC)):
        with pytest.raises(ProtocolError) as e:
            decode_update(data, max_bytes=len(msg) - 1 if reason == RejectReason.OVERSIZE else 1 << 20)
        assert e.value.reason == reason


def test_shape_check_against_schema():
    t = tensors()
    check_tensors_match(t, {k: v.shape for k, v in t.items()})
    with pytest.raises(ProtocolError) as e:
        check_tensors_match(t, {"layers.0.q_proj.lora_A": (2, 4), "layers.0.q_proj.lora_B": (4, 3)})
    assert e.value.reason == RejectReason.BAD_SHAPE


# --- adapters, pointers, chunks ---------------------------------------------------------------------------

def meta_for(t, fp="f" * 64):
    return AdapterMeta(base_fingerprint=fp, target_modules=["q_proj"], rank=2, alpha=4.0,
                       shapes={k: list(v.shape) for k, v in t.items()}, version=3, parent_version=2)


def test_adapter_round_trip_and_fingerprint_check():
    t = tensors()
    blob = adapter_to_bytes(t, meta_for(t))
    back, meta = adapter_from_bytes(blob, expect_fingerprint="f" * 64)
    assert meta.version == 3 and meta.scale == 2.0
    np.testing.assert_array_equal(back["layers.0.q_proj.lora_A"], t["layers.0.q_proj.lora_A"])
    with pytest.raises(ProtocolError) as e:
        adapter_from_bytes(blob, expect_fingerprint="0" * 64)
    assert e.value.reason == RejectReason.FINGERPRINT_MISMATCH


def test_chunked_pointer_resumes_in_any_order_and_rejects_bad_chunks():
    blob = bytes(range(256)) * 40
    ptr, chunks = make_pointer(5, 4, "f" * 64, blob, chunk_size=1000)
    ptr2 = GlobalPointer.from_bytes(ptr.to_bytes())
    assert ptr2 == ptr and len(chunks) == 11
    asm = ChunkAssembler(ptr2, have={3: chunks[3]})  # resumed with one chunk already on disk
    with pytest.raises(ProtocolError) as e:
        asm.add(0, chunks[1])
    assert e.value.reason == RejectReason.HASH_MISMATCH
    for i in reversed(range(11)):
        asm.add(i, chunks[i])
    assert asm.complete and asm.assemble() == blob
    assert hashlib.sha256(asm.assemble()).hexdigest() == ptr.sha256


# --- topics -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("filt, topic, expected", [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "a/b", True),
    ("+", "$SYS", False), ("#", "$SYS/x", False), ("$SYS/#", "$SYS/x", True), ("a/+/c", "a//c", True),
    ("a/b/#", "a/bc", False), ("a/b#", "a/b#", False), ("$share/g/a/+", "a/x", True), ("$share//a", "a", False),
    ("a", "a/b", False), ("", "a", False),
])
def test_topic_matcher_table(filt, topic, expected):
    assert topic_matches(filt, topic) is expected


def test_topics_builder_and_parser():
    t = Topics("fleet-1")
    assert t.update("dev-1") == "edgefm/v1/fleet-1/device/dev-1/update"
    assert t.parse_device_topic(t.status("dev-2")) == ("dev-2", "status")
    assert t.parse_chunk_topic(t.global_chunk(7, 3)) == (7, 3)
    assert topic_matches(t.all_devices("update"), t.update("x")) and not topic_matches(t.all_devices("update"), t.status("x"))
    with pytest.raises(ProtocolError):
        t.update("bad/id")


@settings(max_examples=200, deadline=None)
@given(levels=st.lists(st.text(alphabet="ab$", min_size=0, max_size=3), min_size=1, max_size=4))
def test_topic_matches_itself_and_hash(levels):
    topic = "/".join(levels)
    if not topic or "+" in topic or "#" in topic:
        return
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic) == (not topic.startswith("$"))


def test_pointer_to_version_zero_is_valid():
    """v0 is the bundle's adapter: the coordinator announces it before any round, devices take it as "nothing new"."""
    from edge_runtime.protocol.messages import GlobalPointer, make_pointer
    ptr, _ = make_pointer(0, None, "f" * 64, b"adapter bytes")
    assert GlobalPointer.from_bytes(ptr.to_bytes()).version == 0


def test_manifest_sections_are_checked_once_with_the_section_named(tmp_path):
    """A hand-edited or damaged manifest is refused at load with what is wrong, not deep in the engine."""
    import json

    from edge_runtime.errors import BundleError
    from edge_runtime.protocol.manifest import FORMAT, FORMAT_VERSION, AdapterSpec, Manifest, QuantSpec

    good = Manifest(task="causal-lm", architecture="llama", model={"layers": 1}, quant=QuantSpec("int4", 32),
                    adapter=AdapterSpec(8, 16.0, ["q_proj"], {"layers.0.q_proj.lora_A": [8, 4]}), files={},
                    base_fingerprint="f" * 64).to_json()
    assert good["format"] == FORMAT and good["format_version"] == FORMAT_VERSION and good["io"]["lora_layout"] == "stacked"
    m = Manifest.from_json(good)
    assert m.adapter.scale == 2.0 and m.io.kv_cache == "separate" and m.training.batch == 8
    for section, value, words in (("adapter", {**good["adapter"], "rank": "8"}, "'adapter'.*rank"),
                                  ("adapter", {**good["adapter"], "shapes": {"x": ["a"]}}, "shapes"),
                                  ("io", {**good["io"], "lora_layout": "diagonal"}, "'io'"),
                                  ("training", {"batch": 0}, "'training'.*batch"),
                                  ("quant", ["int4"], "'quant' must be a JSON object"),
                                  ("format_version", 1, "re-export")):
        (tmp_path / "manifest.json").write_text(json.dumps({**good, section: value}))
        with pytest.raises(BundleError, match=words):
            Manifest.load(tmp_path)
