"""Hostile requests: what a buggy, outdated or malicious robot may send to a GR00T policy server.

One generator feeds the fuzz and security tests (tests/test_fuzz.py, tests/test_security.py) and the bench
scenarios that send hostile traffic at a served app (`python -m bench.hostile`, `python -m bench.soak`). It is
test data, so it lives with the tests; the scenarios import it from here (they run from a checkout anyway).
Every message it makes must be answered `{"error": ...}`; `Hostile.expect` says what that error must name
where it can be predicted (the faulty field, the kind of fault), so a reply like "internal error" or a
message that names the wrong field is caught too.

    gen = HostileGenerator(info["embodiments"]["gr1"], seed=0, served_tags=["gr1", "unitree_g1"])
    msg = gen.next()          # Hostile(category, payload: bytes, expect)
    msg.check(reply)          # None when the reply is a fitting error, else what is wrong with it

numpy and msgpack only. Nothing here ever unpickles; the "pickled .npy" payloads are built by hand (a
.npy header declaring an object dtype followed by pickle bytes of harmless builtins) so that this module
has no reason to call numpy's pickle path at all.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np

from clients.codec import packb
from clients.protocol import ERROR_KINDS, ErrorKind

__all__ = ["Hostile", "HostileGenerator", "CATEGORIES", "check_error_reply"]

# An expectation: every group must match the error text (case-insensitively); a group is one substring or a
# tuple of alternatives. An empty expectation accepts any error.
Expect = tuple[Any, ...]


@dataclass(frozen=True)
class Hostile:
    category: str
    payload: bytes
    expect: Expect = ()

    def check(self, reply: Any) -> str | None:
        return check_error_reply(reply, self.expect)


def check_error_reply(reply: Any, expect: Expect) -> str | None:
    """None when `reply` is `{"error": text, "kind": kind}` (kind optional: upstream servers send none) and `text`
    matches `expect`; otherwise what is wrong."""
    if not isinstance(reply, dict) or "error" not in reply:
        return f"expected an error reply, got {type(reply).__name__} {str(reply)[:120]}"
    text = reply["error"]
    if not isinstance(text, str) or not text:
        return f"expected an error message, got {text!r:.80}"
    kind = reply.get("kind")
    if kind is not None and kind not in ERROR_KINDS:
        return f"unknown error kind {kind!r:.40}; expected one of {', '.join(ERROR_KINDS)}"
    low = text.lower()
    if kind == ErrorKind.INTERNAL.value or low.startswith("internal error"):
        return f"the server failed internally instead of naming the fault: {text[:200]}"
    for group in expect:
        options = group if isinstance(group, tuple) else (group,)
        if not any(o.lower() in low for o in options):
            return f"error does not mention {' or '.join(map(repr, options))}: {text[:200]}"
    return None


# ---------------------------------------------------------------------------------------------------------
# raw building blocks


def _npy_bytes(descr: str, shape: tuple, body: bytes, *, fortran: bool = False, version: int = 1) -> bytes:
    """A .npy file with an arbitrary header (np.save's layout), so headers can lie about the body."""
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode("latin-1")
    pre = 10 if version == 1 else 12
    pad = (64 - (pre + len(header) + 1) % 64) % 64
    header = header + b" " * pad + b"\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + body


def pickled_object_npy(values: list[Any]) -> bytes:
    """What `np.save` writes for an object array (descr '|O', then a pickle): built by hand, never loaded."""
    # np.save pickles the array itself; a pickle of a plain list under an object header is the same attack
    # surface for the reader (the reader must refuse the descr before ever looking at the body).
    return _npy_bytes("|O", (len(values),), pickle.dumps(list(values), protocol=4))


def _n17(arr: np.ndarray) -> dict:
    arr = np.ascontiguousarray(arr)
    return {b"nd": True, b"type": arr.dtype.str, b"kind": b"", b"shape": list(arr.shape), b"data": arr.tobytes()}


def _n16(npy: bytes) -> dict:
    return {"__ndarray_class__": True, "as_npy": npy}


_BAD_UTF8 = (b"\xff\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28", b"abc\xed\xa0\x80", b"\x80")
_MARK = "\u2603BAD_UTF8\u2603"  # non-ASCII so it cannot collide with an honest ASCII field


def _with_bad_utf8(obj: Any, bad: bytes) -> bytes:
    """packb(obj) with every occurrence of _MARK replaced by a msgpack str holding invalid UTF-8 `bad`."""
    packed = packb(obj)
    mark = packb(_MARK)
    raw = (bytes([0xA0 | len(bad)]) if len(bad) < 32 else b"\xd9" + bytes([len(bad)])) + bad
    assert mark in packed
    return packed.replace(mark, raw)


def _wrong_values(rng: np.random.Generator) -> list[Any]:
    """Values of every msgpack type; callers pick one that is wrong where it is put."""
    return [
        0, -1, 2**63 - 1, 1.5, float("nan"), True, None, "text", b"\x00bytes", [], [1, "a"], {}, {"k": 1},
        msgpack.ExtType(7, b"ext"), rng.integers(0, 255, size=3, dtype=np.uint8),
    ]


# ---------------------------------------------------------------------------------------------------------
# the generator


@dataclass
class _Ctx:
    emb: dict[str, Any]
    tag: str | None
    served: list[str]
    max_batch: int
    rng: np.random.Generator
    image: tuple[int, int]

    @property
    def cams(self) -> list[str]:
        return list(self.emb["video_keys"])

    @property
    def states(self) -> dict[str, int]:
        return dict(self.emb["state_dims"])

    @property
    def langs(self) -> list[str]:
        return list(self.emb["modality_config"]["language"]["modality_keys"])

    def t(self, modality: str) -> int:
        return len(self.emb["modality_config"][modality]["delta_indices"])

    def obs(self, b: int = 1) -> dict[str, Any]:
        h, w = self.image
        r = self.rng
        return {
            "video": {c: r.integers(0, 256, size=(b, self.t("video"), h, w, 3), dtype=np.uint8) for c in self.cams},
            "state": {k: r.uniform(-1, 1, size=(b, self.t("state"), d)).astype(np.float32) for k, d in self.states.items()},
            "language": {k: [["pick the pear"]] * b for k in self.langs},
        }

    def request(self, obs: Any = None, options: Any = None, **extra: Any) -> dict[str, Any]:
        msg = {"endpoint": "get_action", "data": {"observation": self.obs() if obs is None else obs, "options": options}}
        if self.tag is not None:
            msg["embodiment_tag"] = self.tag
        msg.update(extra)
        return msg

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]


Maker = Callable[[_Ctx], tuple[bytes | dict | list | Any, Expect]]


def _random_bytes(c: _Ctx):
    n = int(c.rng.integers(1, 300))
    data = c.rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
    if data[0] in range(0x80, 0x90) or data[0] in (0xDE, 0xDF):  # keep it from starting as a map: always an error
        data = b"\xc1" + data[1:]  # 0xc1 is "never used" in msgpack
    return data, ()


def _empty(c: _Ctx):
    return b"", ("empty",)


def _truncated(c: _Ctx):
    full = packb(c.request())
    return full[: int(c.rng.integers(1, len(full)))], ("truncated",)


def _trailing(c: _Ctx):
    return packb(c.request()) + c.rng.integers(0, 256, size=int(c.rng.integers(1, 20)), dtype=np.uint8).tobytes(), (
        "trailing",)


def _not_a_map(c: _Ctx):
    value = c.pick([[1, 2], 7, "get_action", None, b"\x01", 2.5, True, [{"endpoint": "ping"}]])
    return packb(value), ("expected a msgpack map",)


def _endpoint_type(c: _Ctx):
    value = c.pick([0, 1.5, ["ping"], {"name": "ping"}, b"ping", None, True])
    return {"endpoint": value}, ("endpoint",)


def _unknown_endpoint(c: _Ctx):
    name = c.pick(["shutdown", "get_actions", "PING", "__init__", "eval", "", "get_action ", "x" * 200, "../kill"])
    return {"endpoint": name, "data": {}}, ("endpoint", "unknown")


def _kill(c: _Ctx):
    return {"endpoint": "kill"}, ("kill", "refused")


def _data_type(c: _Ctx):
    value = c.pick([[1, 2], 3, "obs", b"obs", 1.0, True])
    return {"endpoint": "get_action", "data": value}, ("data",)


def _missing_observation(c: _Ctx):
    data = c.pick([{}, {"options": None}, {"obs": c.obs()}, {"Observation": {}}])
    return {"endpoint": "get_action", "data": data}, ("data",)


def _token_type(c: _Ctx):
    return c.request(api_token=c.pick([123, ["t"], {"t": 1}, b"tok", 1.5])), ("api_token",)


def _tag_type(c: _Ctx):
    msg = c.request()
    msg["embodiment_tag"] = c.pick([5, ["gr1"], {"tag": "gr1"}, b"gr1", 0.0])
    return msg, ("embodiment_tag",)


def _bad_tag(c: _Ctx):
    msg = c.request()
    # Not "" (means: the port's default) nor "gr1 " (tags are stripped and case-folded: that IS gr1).
    name = c.pick(["franka", "unknown_robot", "EmbodimentTag.NOPE", "gr1\x00", "gr2", "x" * 100])
    msg["embodiment_tag"] = name if name not in c.served else "franka"
    return msg, ("not served",)


def _options_type(c: _Ctx):
    return c.request(options=c.pick([[1], 3, "fast", b"o", 2.0, True])), ("options",)


def _reset_options_type(c: _Ctx):
    msg = {"endpoint": "reset", "data": {"options": c.pick([[1], 3, "fast", 2.0])}}
    if c.tag:
        msg["embodiment_tag"] = c.tag
    return msg, ("options",)


def _seed_type(c: _Ctx):
    return c.request(options={"seed": c.pick(["7", 1.5, [1], {"s": 1}])}), ("seed",)


def _deadline_type(c: _Ctx):
    return c.request(options={"deadline_ms": c.pick(["soon", -5, 0, True, [100], {"ms": 1}, None])}), (
        "deadline_ms",)


def _observation_type(c: _Ctx):
    return c.request(obs=c.pick([[1, 2], 3, "image", b"raw", 1.5, True])), ("observation",)


def _modality_type(c: _Ctx):
    obs = c.obs()
    modality = c.pick(["video", "state", "language"])
    obs[modality] = c.pick([[1, 2], 3, "x", b"raw", 1.5])
    return c.request(obs=obs), (modality,)


def _missing_modality(c: _Ctx):
    obs = c.obs()
    modality = c.pick(["video", "state", "language"])
    del obs[modality]
    return c.request(obs=obs), (modality, "missing")


def _missing_key(c: _Ctx):
    obs = c.obs()
    modality = c.pick(["video", "state", "language"])
    key = c.pick(list(obs[modality]))
    del obs[modality][key]
    return c.request(obs=obs), (f"{modality}.{key}", "missing")


def _extra_key(c: _Ctx):
    obs = c.obs()
    modality = c.pick(["video", "state", "language", None])
    if modality is None:
        obs["proprio"] = {"x": np.zeros((1, 1, 1), np.float32)}
        return c.request(obs=obs), ("proprio",)
    obs[modality]["not_a_key"] = obs[modality][next(iter(obs[modality]))]
    return c.request(obs=obs), ("not_a_key",)


def _state_dtype(c: _Ctx):
    obs = c.obs()
    key = c.pick(list(c.states))
    obs["state"][key] = obs["state"][key].astype(c.pick([np.float64, np.int32, np.float16, np.bool_, np.complex64]))
    return c.request(obs=obs), (f"state.{key}",)


def _video_dtype(c: _Ctx):
    obs = c.obs()
    cam = c.pick(c.cams)
    obs["video"][cam] = obs["video"][cam].astype(c.pick([np.float32, np.int64, np.uint16, np.bool_]))
    return c.request(obs=obs), (f"video.{cam}",)


def _wrong_ndim(c: _Ctx):
    obs = c.obs()
    if c.rng.random() < 0.5:
        key = c.pick(list(c.states))
        arr = obs["state"][key]
        obs["state"][key] = c.pick([arr[0], arr[..., None], arr.reshape(-1), np.float32(1.0)])
        return c.request(obs=obs), (f"state.{key}",)
    cam = c.pick(c.cams)
    arr = obs["video"][cam]
    obs["video"][cam] = c.pick([arr[0], arr[..., :1], arr[..., None], arr.reshape(arr.shape[0], -1)])
    return c.request(obs=obs), (f"video.{cam}",)


def _wrong_dims(c: _Ctx):
    obs = c.obs()
    key = c.pick(list(c.states))
    d = c.states[key]
    t = c.t("state")
    shape = c.pick([(1, t, d + 1), (1, t + 1, d), (1, t, max(d - 1, 0)), (1, 0, d)])
    obs["state"][key] = np.zeros(shape, np.float32)
    return c.request(obs=obs), (f"state.{key}",)


def _value_not_array(c: _Ctx):
    obs = c.obs()
    if c.rng.random() < 0.5:
        key = c.pick(list(c.states))
        obs["state"][key] = c.pick([[[0.1, 0.2]], 0.5, "0.5", None, {"x": 1}])
        return c.request(obs=obs), (f"state.{key}",)
    cam = c.pick(c.cams)
    obs["video"][cam] = c.pick([[[1, 2, 3]], 7, "frame.png", b"\x89PNG", None])
    return c.request(obs=obs), (f"video.{cam}",)


def _language_type(c: _Ctx):
    obs = c.obs()
    key = c.pick(c.langs)
    obs["language"][key] = c.pick([[[1]], [[b"bytes"]], 5, [["a", "b"]], [None], [[["deep"]]], {"t": "x"}])
    return c.request(obs=obs), (f"language.{key}",)


def _non_finite_state(c: _Ctx):
    obs = c.obs()
    key = c.pick(list(c.states))
    arr = obs["state"][key].copy()
    idx = tuple(int(c.rng.integers(s)) for s in arr.shape)
    arr[idx] = c.pick([np.nan, np.inf, -np.inf])
    obs["state"][key] = arr
    return c.request(obs=obs), (f"state.{key}", "finite")


def _batch_disagree(c: _Ctx):
    obs = c.obs(2)
    modality = c.pick(["video", "state", "language"])
    key = c.pick(list(obs[modality]))
    value = obs[modality][key]
    obs[modality][key] = value[:1] if not isinstance(value, list) else value[:1]
    return c.request(obs=obs), ("batch", "B=")


def _batch_over_cap(c: _Ctx):
    b = c.max_batch + int(c.rng.integers(1, 9))
    h, w = 2, 2
    r = c.rng
    obs = {
        "video": {cam: r.integers(0, 256, size=(b, c.t("video"), h, w, 3), dtype=np.uint8) for cam in c.cams},
        "state": {k: np.zeros((b, c.t("state"), d), np.float32) for k, d in c.states.items()},
        "language": {k: [["x"]] * b for k in c.langs},
    }
    return c.request(obs=obs), ("B", str(b))


def _batch_zero(c: _Ctx):
    obs = c.obs()
    obs["video"] = {cam: np.zeros((0,) + a.shape[1:], np.uint8) for cam, a in obs["video"].items()}
    obs["state"] = {k: np.zeros((0,) + a.shape[1:], np.float32) for k, a in obs["state"].items()}
    obs["language"] = {k: [] for k in obs["language"]}
    return c.request(obs=obs), ("B", "0")


def _array_target(c: _Ctx) -> tuple[dict, str, str]:
    """An observation and the (modality, key) whose array the caller replaces with a hostile one."""
    obs = c.obs()
    if c.rng.random() < 0.5:
        return obs, "state", c.pick(list(c.states))
    return obs, "video", c.pick(c.cams)


def _huge_shape(c: _Ctx):
    obs, modality, key = _array_target(c)
    shape = c.pick([[1 << 20, 1 << 20, 1 << 20], [2**40, 3], [1, 2**62], [10**12], [1 << 16] * 8, [1] * 9, [-1, 4]])
    if c.rng.random() < 0.5:
        obs[modality][key] = {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": shape, b"data": b"\x00" * 16}
    else:
        obs[modality][key] = _n16(_npy_bytes("<f4", tuple(shape), b"\x00" * 16))
    return c.request(obs=obs), (f"{modality}.{key}", ("exceeds", "absurd", "dimensions", "negative", "limit"))


def _shape_data_mismatch(c: _Ctx):
    obs, modality, key = _array_target(c)
    arr = obs[modality][key]
    cut = int(c.rng.integers(1, max(2, arr.nbytes)))
    if c.rng.random() < 0.5:
        wire = _n17(arr)
        wire[b"data"] = wire[b"data"][:-cut] if c.rng.random() < 0.7 else wire[b"data"] + b"\x00" * cut
        obs[modality][key] = wire
    else:
        body = np.ascontiguousarray(arr).tobytes()
        obs[modality][key] = _n16(_npy_bytes(arr.dtype.str, arr.shape, body[:-cut] if c.rng.random() < 0.7 else body + b"\x01" * cut))
    return c.request(obs=obs), (f"{modality}.{key}", "bytes")


def _object_dtype(c: _Ctx):
    obs, modality, key = _array_target(c)
    which = int(c.rng.integers(4))
    if which == 0:  # what np.save(allow_pickle=True) writes for an object array
        obs[modality][key] = _n16(pickled_object_npy(["a", 1, None]))
    elif which == 1:
        obs[modality][key] = {b"nd": True, b"type": "|O", b"kind": b"", b"shape": [1], b"data": pickle.dumps(["x"])}
    elif which == 2:
        obs[modality][key] = {b"nd": True, b"type": "<f4", b"kind": b"V", b"shape": [1], b"data": b"\x00" * 4}
    else:
        obs[modality][key] = _n16(_npy_bytes("O", (2,), pickle.dumps([1, 2], protocol=2)))
    return c.request(obs=obs), (f"{modality}.{key}", ("refused", "dtype", "structured"))


def _bad_dtype(c: _Ctx):
    obs, modality, key = _array_target(c)
    descr = c.pick(["<U4", "|S8", "|V8", "<M8[s]", "<m8", "<f4,<f4", "(2,)f4", "float32", "<f3", "", "<f4\x00", "O"])
    if c.rng.random() < 0.5:
        obs[modality][key] = {b"nd": True, b"type": descr, b"kind": b"", b"shape": [1], b"data": b"\x00" * 8}
    else:
        obs[modality][key] = _n16(_npy_bytes(descr, (1,), b"\x00" * 8))
    return c.request(obs=obs), (f"{modality}.{key}", ("refused", "dtype"))


def _bad_npy(c: _Ctx):
    obs, modality, key = _array_target(c)
    good = _npy_bytes("<f4", (2,), b"\x00" * 8)
    raw = c.pick([
        b"NOTNUMPY" + good[8:],  # bad magic
        good[:6] + b"\x09\x00" + good[8:],  # unknown version
        good[:8] + struct.pack("<H", 60000) + good[10:],  # header longer than the payload / the cap
        good[:8] + struct.pack("<H", 200) + good[10:40],  # truncated inside the header
        b"\x93NUMPY\x01\x00" + struct.pack("<H", 20) + b"__import__('os')  \n",  # code, not a literal
        b"\x93NUMPY\x01\x00" + struct.pack("<H", 16) + b"{'descr': 1}   \n",  # wrong keys
        b"\x93NUMPY",  # too short
        "not bytes",
        12345,
    ])
    obs[modality][key] = {"__ndarray_class__": True, "as_npy": raw}
    return c.request(obs=obs), (f"{modality}.{key}",)


def _non_utf8(c: _Ctx):
    bad = c.pick(_BAD_UTF8)
    where = int(c.rng.integers(4))
    if where == 0:
        return _with_bad_utf8({"endpoint": _MARK}, bad), ("endpoint", "utf-8")
    if where == 1:
        obs = c.obs()
        key = c.pick(c.langs)
        obs["language"][key] = [[_MARK]]
        return _with_bad_utf8(c.request(obs=obs), bad), (f"language.{key}", "utf-8")
    if where == 2:
        obs = c.obs()
        obs["state"][_MARK] = np.zeros((1, 1, 1), np.float32)
        return _with_bad_utf8(c.request(obs=obs), bad), ("state", "utf-8")
    msg = c.request()
    msg["embodiment_tag"] = _MARK
    return _with_bad_utf8(msg, bad), ("embodiment_tag", "utf-8")


def _ext_type(c: _Ctx):
    obs = c.obs()
    where = int(c.rng.integers(3))
    ext = c.pick([
        msgpack.ExtType(int(c.rng.integers(0, 128)), b"\x00" * int(c.rng.integers(0, 9))),
        msgpack.Timestamp(1, 0),  # ext type -1
    ])
    if where == 0:
        return packb({"endpoint": ext}), ("endpoint", "not accepted")
    if where == 1:
        key = c.pick(list(c.states))
        obs["state"][key] = ext
        return packb(c.request(obs=obs)), (f"state.{key}", "not accepted")
    return packb(c.request(obs=obs, options={"t": ext})), ("options.t", "not accepted")


def _deep_nesting(c: _Ctx):
    depth = int(c.rng.integers(40, 2000))
    nested: Any = 0
    for _ in range(min(depth, 400)):
        nested = [nested]
    if depth > 400:  # deeper than msgpack-python's packer recursion: hand-roll the prefix
        body = b"\x91" * depth + b"\x00"
        head = packb({"endpoint": "get_action", "data": {"observation": c.obs(), "options": {"deep": "@@"}}})
        return head.replace(packb("@@"), body), ("nest",)
    return c.request(options={"deep": nested}), ("nest",)


def _unhashable_key(c: _Ctx):
    # A map whose key is an array: valid msgpack, but not a valid message.
    return b"\x82\xa8endpoint\xaaget_action\x91\x01\x02", ()


def _huge_container(c: _Ctx):
    head = c.pick([b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xc6\x7f\xff\xff\xff"])
    return b"\x83\xa8endpoint\xaaget_action\xa4data" + head, ()


def _unknown_marker_shape(c: _Ctx):
    obs, modality, key = _array_target(c)
    arr = obs[modality][key]
    wire = _n17(arr)
    wire[b"shape"] = c.pick([list(map(float, arr.shape)), "1,2,3", None, [True, 1], [[1], 2]])
    obs[modality][key] = wire
    return c.request(obs=obs), (f"{modality}.{key}", "shape")


def _string_key_map(c: _Ctx):
    obs = c.obs()
    obs["state"] = {i: a for i, a in enumerate(obs["state"].values())}
    return c.request(obs=obs), ("state",)


def _modality_marker_abuse(c: _Ctx):
    # A ModalityConfig marker where an array should be, with a hostile payload.
    obs, modality, key = _array_target(c)
    obs[modality][key] = c.pick([
        {"__ModalityConfig_class__": True},
        {"__ModalityConfig__": True, "as_json": "{\"delta_indices\": \"x\"}"},
        {"__ModalityConfig_class__": True, "as_json": "[" * 5000},
    ])
    return c.request(obs=obs), ()


# name -> (maker, weight). Heavier categories are the ones with more variants inside.
CATEGORIES: dict[str, tuple[Maker, float]] = {
    "random_bytes": (_random_bytes, 3),
    "empty": (_empty, 0.5),
    "truncated": (_truncated, 2),
    "trailing_bytes": (_trailing, 1),
    "not_a_map": (_not_a_map, 1),
    "endpoint_type": (_endpoint_type, 1),
    "unknown_endpoint": (_unknown_endpoint, 1),
    "kill": (_kill, 0.5),
    "data_type": (_data_type, 1),
    "missing_observation": (_missing_observation, 1),
    "api_token_type": (_token_type, 0.5),
    "embodiment_tag_type": (_tag_type, 0.5),
    "bad_embodiment_tag": (_bad_tag, 1),
    "options_type": (_options_type, 1),
    "reset_options_type": (_reset_options_type, 0.5),
    "seed_type": (_seed_type, 0.5),
    "deadline_type": (_deadline_type, 0.5),
    "observation_type": (_observation_type, 1),
    "modality_type": (_modality_type, 1),
    "missing_modality": (_missing_modality, 1),
    "missing_key": (_missing_key, 1),
    "extra_key": (_extra_key, 1),
    "state_dtype": (_state_dtype, 1),
    "video_dtype": (_video_dtype, 1),
    "wrong_ndim": (_wrong_ndim, 1),
    "wrong_dims": (_wrong_dims, 1),
    "value_not_array": (_value_not_array, 1),
    "language_type": (_language_type, 1),
    "non_finite_state": (_non_finite_state, 1),
    "batch_disagree": (_batch_disagree, 1),
    "batch_over_cap": (_batch_over_cap, 0.5),
    "batch_zero": (_batch_zero, 0.5),
    "huge_shape": (_huge_shape, 2),
    "shape_data_mismatch": (_shape_data_mismatch, 2),
    "object_dtype": (_object_dtype, 1.5),
    "bad_dtype": (_bad_dtype, 1),
    "bad_npy": (_bad_npy, 1.5),
    "non_utf8": (_non_utf8, 1.5),
    "ext_type": (_ext_type, 1),
    "deep_nesting": (_deep_nesting, 0.5),
    "unhashable_key": (_unhashable_key, 0.3),
    "huge_container": (_huge_container, 0.5),
    "bad_shape_field": (_unknown_marker_shape, 1),
    "int_keys": (_string_key_map, 0.5),
    "modality_marker_abuse": (_modality_marker_abuse, 0.5),
}


class HostileGenerator:
    """Deterministic stream of hostile messages for one embodiment (an entry of `info()["embodiments"]`).

    `tag`: put into every request as `embodiment_tag` (None: rely on the port's default embodiment).
    `served_tags`: the tags the server serves (so "bad tag" messages never name a served one).
    `max_batch_per_request`: the server's B cap (`ingress.max_batch_per_request`, 64 by default).
    `categories`: restrict to these names (default: all of CATEGORIES).
    """

    def __init__(
        self,
        embodiment: dict[str, Any],
        *,
        seed: int = 0,
        tag: str | None = None,
        served_tags: list[str] | None = None,
        max_batch_per_request: int = 64,
        image_size: tuple[int, int] = (8, 8),
        categories: list[str] | None = None,
    ) -> None:
        names = list(categories) if categories is not None else list(CATEGORIES)
        unknown = [n for n in names if n not in CATEGORIES]
        if unknown:
            raise ValueError(f"categories: unknown {unknown}; known: {sorted(CATEGORIES)}")
        self._names = names
        weights = np.array([CATEGORIES[n][1] for n in names], dtype=float)
        self._p = weights / weights.sum()
        self._rng = np.random.default_rng(seed)
        self._ctx = _Ctx(embodiment, tag, list(served_tags or []), max_batch_per_request, self._rng, image_size)

    @property
    def categories(self) -> list[str]:
        return list(self._names)

    def make(self, category: str) -> Hostile:
        maker = CATEGORIES[category][0]
        body, expect = maker(self._ctx)
        if not isinstance(body, (bytes, bytearray)):
            body = packb(body)
        return Hostile(category, bytes(body), tuple(expect))

    def next(self) -> Hostile:
        return self.make(self._names[int(self._rng.choice(len(self._names), p=self._p))])

    def __iter__(self):
        while True:
            yield self.next()

    def take(self, n: int) -> list[Hostile]:
        return [self.next() for _ in range(n)]
