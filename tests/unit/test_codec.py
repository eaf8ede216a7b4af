"""clients.codec: round trips, both array encodings, ModalityConfig markers, and refusal of hostile input."""

from __future__ import annotations

import io
import json
import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clients import (
    ActionConfig,
    ActionFormat,
    ActionRepresentation,
    ActionType,
    CodecError,
    ModalityConfig,
    packb,
    unpackb,
)
from clients.codec import encode_ndarray

pytestmark = pytest.mark.timeout(60)

DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3), (2, 1, 4, 5, 3)]


def _sample(dtype, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _n17(arr: np.ndarray, str_keys: bool = False) -> dict:
    """An array exactly as msgpack-numpy (GR00T N1.7) writes it: bytes keys, C-order raw data."""
    out = {b"nd": True, b"type": arr.dtype.str, b"kind": b"", b"shape": list(arr.shape), b"data": arr.tobytes()}
    return {k.decode(): v for k, v in out.items()} if str_keys else out


def _wrap(value) -> bytes:
    """A get_action request carrying `value` at data.observation.video.ego_view."""
    body = {"endpoint": "get_action", "data": {"observation": {"video": {"ego_view": value}}, "options": None}}
    return msgpack.packb(body, use_bin_type=True)


def _unwrap(obj):
    return obj["data"]["observation"]["video"]["ego_view"]


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert isinstance(b, np.ndarray)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()  # exact, NaN-safe


# ---------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_every_dtype_and_shape(dtype, shape):
    arr = _sample(dtype, shape)
    out = unpackb(packb({"x": arr}))["x"]
    _same(arr, out)
    assert not out.flags.writeable  # documented: read-only zero-copy views


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[:, ::2],  # non-contiguous
        lambda a: np.asfortranarray(a),  # Fortran order
        lambda a: a.T,  # Fortran-contiguous by transposition
        lambda a: a.astype(a.dtype.newbyteorder(">")),  # big-endian
        lambda a: a[::-1, 1:],
    ],
    ids=["strided", "fortran", "transposed", "big-endian", "reversed"],
)
def test_roundtrip_layouts(make):
    arr = make(_sample(np.float32, (4, 6, 3)))
    out = unpackb(packb({"x": arr}))["x"]
    _same(arr, out)
    assert out.dtype == arr.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "layout", ["c", "fortran", "strided", "0d", "empty"]
)
def test_n16_encoding_is_exactly_np_save(dtype, layout):
    base = _sample(dtype, (3, 4, 5))
    arr = {
        "c": base,
        "fortran": np.asfortranarray(base),
        "strided": base[:, ::2, 1:],
        "0d": np.array(base[0, 0, 0]),
        "empty": base[:, :0],
    }[layout]
    encoded = msgpack.unpackb(packb({"x": arr}), raw=False)["x"]
    assert encoded == {"__ndarray_class__": True, "as_npy": _npy(arr)}
    # What an upstream client does with it:
    _same(arr, np.load(io.BytesIO(encoded["as_npy"]), allow_pickle=False))


def test_image_decode_is_zero_copy_view():
    img = _sample(np.uint8, (1, 1, 256, 256, 3))
    out = _unwrap(unpackb(_wrap({"__ndarray_class__": True, "as_npy": _npy(img)})))
    _same(img, out)
    assert out.base is not None and not out.flags.owndata  # a view over the received bytes
    out17 = _unwrap(unpackb(_wrap(_n17(img))))
    _same(img, out17)
    assert not out17.flags.owndata


@pytest.mark.parametrize("str_keys", [False, True], ids=["bytes-keys", "str-keys"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_n17_msgpack_numpy_arrays_decode(dtype, str_keys):
    for shape in [(), (0,), (2, 1, 8, 8, 3)]:
        arr = _sample(dtype, shape)
        _same(arr, _unwrap(unpackb(_wrap(_n17(arr, str_keys)))))


def test_n17_variants():
    arr = _sample(np.float32, (2, 3))
    # Old msgpack-numpy packed with use_bin_type=False: every str became raw bytes, dtype included.
    old = {b"nd": True, b"type": b"<f4", b"kind": b"", b"shape": [2, 3], b"data": arr.tobytes()}
    _same(arr, unpackb(msgpack.packb({"x": old}, use_bin_type=True))["x"])
    no_kind = {b"nd": True, b"type": "<f4", b"shape": [2, 3], b"data": arr.tobytes()}
    _same(arr, unpackb(msgpack.packb({"x": no_kind}, use_bin_type=True))["x"])
    scalar = {b"nd": False, b"type": "<f8", b"data": np.float64(2.5).tobytes()}
    assert unpackb(msgpack.packb({"x": scalar}, use_bin_type=True))["x"] == 2.5


def test_numpy_scalars_and_tuples_encode_as_plain_values():
    out = unpackb(packb({"f": np.float32(1.5), "i": np.int64(-3), "u": np.uint64(2**64 - 1), "b": np.bool_(True),
                         "t": (1, (2, 3)), "h": np.float16(0.5)}))
    assert out == {"f": 1.5, "i": -3, "u": 2**64 - 1, "b": True, "t": [1, [2, 3]], "h": 0.5}
    assert type(out["f"]) is float and type(out["i"]) is int and type(out["b"]) is bool
    c = unpackb(packb({"c": np.complex64(1 + 2j), "p": 3 - 1j}))
    assert c["c"] == np.complex64(1 + 2j) and c["p"] == 3 - 1j


def test_plain_values_and_bytes_keys_survive():
    msg = {"a": [1, -2, 3.5, None, True, "é", b"\x00\xff"], "nested": {"x": {"y": []}}, 7: "int key"}
    assert unpackb(packb(msg)) == msg
    assert unpackb(msgpack.packb({b"raw": 1}, use_bin_type=True)) == {b"raw": 1}


# ---------------------------------------------------------------------------------------------------------
# ModalityConfig


def _config() -> ModalityConfig:
    return ModalityConfig(
        delta_indices=list(range(16)),
        modality_keys=["left_arm", "right_hand"],
        mean_std_embedding_keys=["left_arm"],
        action_configs=[
            ActionConfig(ActionRepresentation.RELATIVE, ActionType.NON_EEF, ActionFormat.DEFAULT, "left_arm"),
            ActionConfig(ActionRepresentation.ABSOLUTE, ActionType.EEF, ActionFormat.XYZ_ROT6D, None),
        ],
    )


def test_modality_config_roundtrip_and_wire_form():
    cfg = _config()
    msg = packb({"action": cfg, "video": ModalityConfig([0], ["ego_view"])})
    raw = msgpack.unpackb(msg, raw=False)
    assert raw["action"] == {"__ModalityConfig_class__": True, "as_json": cfg.to_json()}
    assert raw["action"]["as_json"]["action_configs"][1] == {
        "rep": "ABSOLUTE", "type": "EEF", "format": "XYZ_ROT6D", "state_key": None}
    out = unpackb(msg)
    assert out["action"] == cfg and out["video"] == ModalityConfig([0], ["ego_view"])


@pytest.mark.parametrize("marker", ["__ModalityConfig_class__", "__ModalityConfig__"])
@pytest.mark.parametrize("as_string", [False, True], ids=["map", "n15-json-string"])
def test_every_modality_marker_decodes(marker, as_string):
    cfg = _config()
    as_json = json.dumps(cfg.to_json()) if as_string else cfg.to_json()
    out = unpackb(msgpack.packb({"state": {marker: True, "as_json": as_json}}, use_bin_type=True))
    assert out["state"] == cfg
    assert out["state"].action_configs[0].rep is ActionRepresentation.RELATIVE


def test_bad_modality_config_names_its_field():
    bad = {"__ModalityConfig_class__": True, "as_json": {"delta_indices": ["x"], "modality_keys": []}}
    with pytest.raises(CodecError, match=r"^action\.delta_indices: expected a list of ints"):
        unpackb(msgpack.packb({"action": bad}, use_bin_type=True))
    with pytest.raises(CodecError, match=r"^state\.action_configs\[0\]\.rep: expected one of"):
        cfg = _config().to_json()
        cfg["action_configs"][0]["rep"] = "SIDEWAYS"
        unpackb(msgpack.packb({"state": {"__ModalityConfig__": True, "as_json": cfg}}, use_bin_type=True))
    with pytest.raises(CodecError, match=r"^video: as_json is not valid JSON"):
        unpackb(msgpack.packb({"video": {"__ModalityConfig__": True, "as_json": "{nope"}}, use_bin_type=True))


# ---------------------------------------------------------------------------------------------------------
# refusals: every one a CodecError naming the field

PATH = r"^data\.observation\.video\.ego_view: "


def _refused(value, pattern: str, **limits) -> CodecError:
    with pytest.raises(CodecError, match=PATH + ".*" + pattern) as info:
        unpackb(_wrap(value), **limits)
    return info.value


def test_pickled_object_array_is_refused_and_never_unpickled(monkeypatch):
    hostile = _npy(np.array([{"a": 1}, "x", None], dtype=object), allow_pickle=True)

    def boom(*args, **kwargs):
        raise AssertionError("the decoder unpickled something")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    err = _refused({"__ndarray_class__": True, "as_npy": hostile}, r"dtype '\|O' refused")
    assert err.path == "data.observation.video.ego_view"
    _refused({b"nd": True, b"type": "|O", b"kind": b"", b"shape": [1], b"data": pickle.dumps(1)}, "dtype '|O' refused")


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros(3, dtype="V4"),
        np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),
        np.array(["ab", "c"]),
        np.array([b"ab"]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
    ],
    ids=["void", "structured", "unicode", "bytes", "datetime"],
)
def test_non_numeric_npy_dtypes_are_refused(arr):
    _refused({"__ndarray_class__": True, "as_npy": _npy(arr)}, "(dtype .* refused|expected a numeric dtype)")


def test_non_numeric_n17_dtypes_are_refused():
    base = {b"nd": True, b"kind": b"", b"shape": [2], b"data": b"\x00" * 8}
    for descr in ["|V4", "<U1", "|S4", "<M8[D]", "O", "f4,i4", "(2,)f4", "<f3", "float32", ["<f4"], 4]:
        _refused({**base, b"type": descr}, "(dtype .* refused|expected a numeric dtype)")
    _refused({**base, b"type": [["a", "<f4"]], b"kind": b"V"}, "array kind b'V' refused")


def test_shape_and_data_must_agree():
    arr = np.arange(6, dtype=np.float32)
    _refused({b"nd": True, b"type": "<f4", b"shape": [2, 4], b"data": arr.tobytes()}, r"shape \(2, 4\) of <f4 needs 32 bytes of data, got 24")
    _refused({b"nd": True, b"type": "<f4", b"shape": [6], b"data": arr.tobytes()[:-1]}, "needs 24 bytes of data, got 23")
    npy = _npy(arr)
    _refused({"__ndarray_class__": True, "as_npy": npy[:-1]}, "needs 24 bytes of data, got 23")
    _refused({"__ndarray_class__": True, "as_npy": npy + b"\x00"}, "needs 24 bytes of data, got 25")
    _refused({"__ndarray_class__": True, "as_npy": npy[:20]}, "truncated inside its header")
    _refused({"__ndarray_class__": True, "as_npy": b"PK\x03\x04" + npy}, r"not a \.npy payload")
    _refused({"__ndarray_class__": True, "as_npy": "text"}, "expected .npy bytes, got str")
    _refused({"__ndarray_class__": True}, "expected .npy bytes, got null")


def test_huge_negative_and_deep_shapes_are_refused():
    n17 = {b"nd": True, b"type": "|u1", b"kind": b""}
    _refused({**n17, b"shape": [2**40, 2**40], b"data": b""}, "dimension 1099511627776 .* is absurd")
    _refused({**n17, b"shape": [100_000, 100_000, 3], b"data": b"x"}, "array of 30000000000 bytes exceeds the limit")
    _refused({**n17, b"shape": [0, 2**40], b"data": b""}, "is absurd")
    _refused({**n17, b"shape": [-1, 3], b"data": b"\x00" * 3}, "negative dimension")
    _refused({**n17, b"shape": [1] * 9, b"data": b"\x00"}, "9 dimensions, at most 8")
    _refused({**n17, b"shape": [2.0], b"data": b"\x00\x00"}, "expected the shape as a list of non-negative ints")
    _refused({**n17, b"shape": [True], b"data": b"\x00"}, "expected the shape")
    _refused({**n17, b"shape": "2", b"data": b"\x00\x00"}, "expected the shape")
    # The same through a hand-written .npy header:
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (-5, 2), }".ljust(117) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    _refused({"__ndarray_class__": True, "as_npy": npy}, "negative dimension")
    evil = "{'descr': '<f4', 'fortran_order': False, 'shape': __import__('os').getpid(), }\n"
    npy = b"\x93NUMPY\x01\x00" + len(evil).to_bytes(2, "little") + evil.encode()
    _refused({"__ndarray_class__": True, "as_npy": npy}, r"unreadable \.npy header")


def test_array_size_cap_is_configurable():
    img = _sample(np.uint8, (1, 1, 64, 64, 3))  # 12288 bytes
    for form in ({"__ndarray_class__": True, "as_npy": _npy(img)}, _n17(img)):
        # The bytes themselves are over the cap: msgpack refuses them before allocating anything.
        with pytest.raises(CodecError, match="size limit"):
            unpackb(_wrap(form), max_array_bytes=1000)
        _same(img, _unwrap(unpackb(_wrap(form), max_array_bytes=12288)))
    # Few bytes, a large declared shape: refused by the shape check, with the field path.
    _refused({b"nd": True, b"type": "<f4", b"shape": [64, 64], b"data": b"\x00" * 16},
             "array of 16384 bytes exceeds the limit of 1000", max_array_bytes=1000)


def test_truncated_msgpack_is_refused():
    msg = packb({"endpoint": "get_action", "data": {"observation": {"state": {"arm": np.ones((1, 1, 7), np.float32)}}}})
    for cut in range(len(msg)):
        with pytest.raises(CodecError):
            unpackb(msg[:cut])
    with pytest.raises(CodecError, match="^<message>: truncated message"):
        unpackb(msg[:-3])
    with pytest.raises(CodecError, match="^<message>: trailing bytes"):
        unpackb(msg + b"\x00")


def test_non_utf8_strings_are_refused_with_their_path():
    body = msgpack.packb({"data": {"observation": {"language": {"task": [["pick", "PLACEHOLDER"]]}}}})
    bad = body.replace(b"\xabPLACEHOLDER", b"\xab" + b"\xff\xfe" + b"x" * 9)
    with pytest.raises(CodecError, match=r"^data\.observation\.language\.task\[0\]\[1\]: string is not valid UTF-8"):
        unpackb(bad)
    bad_key = msgpack.packb({"data": {"KEY": 1}}).replace(b"\xa3KEY", b"\xa3K\xc3\x28")
    with pytest.raises(CodecError, match=r"^data\.<key 'K\\udcc3\('>: string is not valid UTF-8"):
        unpackb(bad_key)
    with pytest.raises(CodecError, match=r"^endpoint: string is not valid UTF-8"):
        unpackb(b"\x81\xa8endpoint\xa2\xc0\x80")


def test_other_hostile_shapes_of_message():
    with pytest.raises(CodecError, match="^<message>: empty message"):
        unpackb(b"")
    with pytest.raises(CodecError, match=r"^data\.t: msgpack Timestamp values are not accepted"):
        unpackb(msgpack.packb({"data": {"t": msgpack.Timestamp(1, 0)}}))
    with pytest.raises(CodecError, match=r"^data\[0\]: msgpack ExtType values are not accepted"):
        unpackb(msgpack.packb({"data": [msgpack.ExtType(7, b"x")]}))
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(CodecError, match="nesting deeper than 32 levels"):
        unpackb(msgpack.packb({"data": deep}))
    with pytest.raises(CodecError, match="nesting too deep"):
        unpackb(b"\x91" * 5000 + b"\xc0")
    with pytest.raises(CodecError, match="size limit"):
        unpackb(b"\xdd\xff\xff\xff\xff")  # a 4-billion-element array header, nothing behind it
    with pytest.raises(CodecError, match="size limit"):
        unpackb(msgpack.packb(list(range(11))), max_container_len=10)
    with pytest.raises(CodecError, match="size limit"):
        unpackb(msgpack.packb({"s": "x" * 101}), max_str_len=100)
    with pytest.raises(CodecError, match="exceeds the limit of 10"):
        unpackb(msgpack.packb({"s": "x" * 20}), max_message_bytes=10)
    with pytest.raises(CodecError):
        unpackb(b"\x81\x91\x01\x02")  # a map keyed by an array


def test_encoding_errors_name_the_field():
    with pytest.raises(CodecError, match=r"^observation\.video\.cam: cannot send an array of dtype <U3"):
        packb({"observation": {"video": {"cam": np.array(["abc"])}}})
    with pytest.raises(CodecError, match=r"^options\.hook\[1\]: cannot encode a object"):
        packb({"options": {"hook": [1, object()]}})
    with pytest.raises(CodecError, match=r"^x: cannot send an array of dtype object"):
        packb({"x": np.array([None], dtype=object)})
    assert unpackb(packb({"ok": np.zeros(2)}))["ok"].shape == (2,)  # the packer recovered


def test_encode_ndarray_matches_np_save_beyond_the_header_cache():
    for shape in [(3,), (4, 5), (3,), (1, 2, 3, 4, 5, 6)]:
        arr = _sample(np.int16, shape)
        assert encode_ndarray(arr) == _npy(arr)


# ---------------------------------------------------------------------------------------------------------
# property-based

_MARKER_KEYS = st.sampled_from([
    "__ndarray_class__", "as_npy", b"nd", b"type", b"kind", b"shape", b"data", "nd", "type", "shape", "data",
    "__ModalityConfig_class__", "__ModalityConfig__", "as_json", "delta_indices", "modality_keys",
])
_LEAVES = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.binary(max_size=24)
    | st.sampled_from(["<f4", "|u1", "|O", "|V4", "<U2", b"\x93NUMPY\x01\x00\x10\x00{'descr': '|u1'}"])
)
_GARBAGE = st.recursive(
    _LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(_MARKER_KEYS | st.text(max_size=6) | st.binary(max_size=4) | st.integers(-5, 5),
                      children, max_size=4),
    max_leaves=24,
)
_HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_HYP
@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_codec_error(data):
    try:
        unpackb(data)
    except CodecError:
        pass


@_HYP
@given(_GARBAGE)
def test_arbitrary_msgpack_garbage_decodes_or_raises_codec_error(obj):
    try:
        unpackb(msgpack.packb(obj, use_bin_type=True))
    except CodecError:
        pass


_ARRAYS = hnp.arrays(
    dtype=st.sampled_from(DTYPES).map(np.dtype) | st.sampled_from([">f4", ">i8", ">c16"]).map(np.dtype),
    shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4),
)


@settings(max_examples=100, deadline=None)
@given(_ARRAYS, st.sampled_from(["c", "fortran", "strided"]))
def test_random_arrays_roundtrip_exactly(arr, layout):
    if layout == "fortran":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim:
        arr = arr[::2]
    _same(arr, unpackb(packb({"a": arr}))["a"])
    _same(np.ascontiguousarray(arr), _unwrap(unpackb(_wrap(_n17(np.ascontiguousarray(arr))))))
    assert encode_ndarray(arr) == _npy(arr)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_corrupted_array_messages_decode_or_raise_codec_error(data):
    arr = data.draw(_ARRAYS)
    msg = bytearray(packb({"a": arr}) if data.draw(st.booleans()) else _wrap(_n17(arr)))
    for _ in range(data.draw(st.integers(1, 4))):
        msg[data.draw(st.integers(0, len(msg) - 1))] = data.draw(st.integers(0, 255))
    try:
        unpackb(bytes(msg))
    except CodecError:
        pass
