"""msgpack codec of the GR00T wire protocol, shared by the server and the robot client.

Encoding (`packb`) writes arrays in one of the two array encodings (`clients.protocol.ArrayEncoding`):
- NPY (default, N1.6): `{"__ndarray_class__": True, "as_npy": <np.save(arr, allow_pickle=False)>}` (byte-identical
  to `np.save`, so an upstream client's `np.load` reads it);
- MSGPACK_NUMPY (N1.7, and clients built on the `msgpack-numpy` package, which read nothing else): exactly what
  `msgpack_numpy.encode` writes, `{b"nd": True, b"type": dtype.str, b"kind": b"", b"shape": [...], b"data": <raw
  C-order bytes>}`.
In both, `ModalityConfig` goes as `{"__ModalityConfig_class__": True, "as_json": cfg.to_json()}`, tuples as lists,
and numpy scalars (e.g. in a reply's `info`) as plain msgpack numbers: every msgpack reader of every generation
reads those, while msgpack-numpy's scalar form `{b"nd": False, ...}` is unknown to N1.6 and N1.5 readers. The
value survives, the numpy type does not (complex scalars, which msgpack cannot hold, go as 0-d arrays).

Decoding (`unpackb`; `unpackb_with_encoding` also says which array encoding the message used) reads all generations: N1.6 `.npy` arrays, N1.7 msgpack-numpy arrays (`{b"nd": True,
b"type": ..., b"shape": ..., b"data": ...}`, bytes or str keys) and the three ModalityConfig markers. Input is
untrusted: nothing is ever unpickled, only bool/int/uint/float/complex dtypes are accepted, sizes are capped
before anything is allocated, and every failure is a `CodecError` naming the field path.

Decoded arrays are READ-ONLY, zero-copy views of the bytes msgpack produced (one copy out of the message,
none after); call `np.array(x)` where a writable array is needed. Byte order is kept as sent; N1.6 arrays
sent in Fortran order come back as Fortran-ordered views.
"""

from __future__ import annotations

import ast
import io
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack
import numpy as np

from .modality import ActionConfig, ModalityConfig
from .protocol import MODALITY_MARKER, MODALITY_MARKER_N17, ArrayEncoding

__all__ = [
    "CodecError",
    "DecodeLimits",
    "DEFAULT_LIMITS",
    "packb",
    "unpackb",
    "unpackb_with_encoding",
    "encode_ndarray",
    "decode_npy",
]

NDARRAY_MARKER = "__ndarray_class__"  # N1.6
MODALITY_MARKERS = (MODALITY_MARKER, MODALITY_MARKER_N17)  # N1.5/N1.6, N1.7
_ALLOWED_KINDS = frozenset("biufc")
# Only plain numeric descriptors; rules out object ('O'), void/structured, datetime, strings and
# anything np.dtype() would interpret in a creative way (comma lists, subarray shapes, names).
_DESCR_RE = re.compile(r"[<>|=]?[biufc][0-9]{1,2}")
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10_000  # np.load's own default max_header_size
_NPY_KEYS = frozenset(("descr", "fortran_order", "shape"))


class CodecError(ValueError):
    """A message that cannot be encoded or decoded. `path` names the field (`""` for the whole message)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path or '<message>'}: {reason}")


@dataclass(frozen=True)
class DecodeLimits:
    """Caps a hostile message cannot get past; every one is checked before memory is committed."""

    max_array_bytes: int = 256 << 20
    max_ndim: int = 8
    max_depth: int = 32
    max_str_len: int = 1 << 20
    max_container_len: int = 100_000  # elements of one msgpack array or map
    max_message_bytes: int = 1 << 30


DEFAULT_LIMITS = DecodeLimits()
_DEFAULT_CAPS = (DEFAULT_LIMITS.max_array_bytes, DEFAULT_LIMITS.max_ndim, DEFAULT_LIMITS.max_depth,
                  DEFAULT_LIMITS.max_str_len, DEFAULT_LIMITS.max_container_len, DEFAULT_LIMITS.max_message_bytes)


# ---------------------------------------------------------------------------------------------------------
# paths


def _fmt_path(path: tuple) -> str:
    out = []
    for part in path:
        if isinstance(part, str) and part.isprintable() and len(part) <= 64:  # surrogates are not printable
            out.append(("." if out else "") + part)
        elif isinstance(part, int) and not isinstance(part, bool):
            out.append(f"[{part}]")
        else:
            # ascii() keeps the message loggable even for keys holding surrogates or control characters.
            out.append(f"[{ascii(part)[:64]}]")
    return "".join(out)


def _err(path: tuple, reason: str) -> CodecError:
    return CodecError(_fmt_path(path), reason)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------------------
# encoding


@lru_cache(maxsize=1024)
def _npy_header(descr: str, fortran_order: bool, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran_order, "shape": shape})
    return buf.getvalue()


def encode_ndarray(arr: np.ndarray) -> bytes:
    """The bytes `np.save(arr, allow_pickle=False)` writes, with the header cached per dtype and shape."""
    if arr.dtype.kind not in _ALLOWED_KINDS or arr.dtype.fields is not None:
        raise TypeError(f"cannot send an array of dtype {arr.dtype}: only bool, int, uint, float and complex")
    header = np.lib.format.header_data_from_array_1_0(arr)
    try:
        head = _npy_header(header["descr"], header["fortran_order"], header["shape"])
    except ValueError:  # header too long for format 1.0; let np.save pick the version
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    # np.save writes Fortran-contiguous arrays as they lie (fortran_order=True), anything else in C order.
    body = arr.T if header["fortran_order"] else np.ascontiguousarray(arr)
    return b"".join((head, body))


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {NDARRAY_MARKER: True, "as_npy": encode_ndarray(obj)}
    if isinstance(obj, np.generic):
        kind = obj.dtype.kind
        if kind in "biuf":
            return obj.item()
        if kind == "c":
            return _default(np.asarray(obj))
        raise TypeError(f"cannot send a numpy scalar of dtype {obj.dtype}")
    if isinstance(obj, complex):
        return _default(np.asarray(obj))
    if isinstance(obj, ModalityConfig):
        return {MODALITY_MARKERS[0]: True, "as_json": obj.to_json()}
    if isinstance(obj, ActionConfig):
        return obj.to_json()
    raise TypeError(f"cannot encode a {type(obj).__name__}")


def _default_msgpack_numpy(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS or obj.dtype.fields is not None:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}: only bool, int, uint, float and complex")
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": list(obj.shape), b"data": obj.tobytes()}
    if isinstance(obj, complex) or (isinstance(obj, np.generic) and obj.dtype.kind == "c"):
        return _default_msgpack_numpy(np.asarray(obj))
    return _default(obj)


_DEFAULTS = {ArrayEncoding.NPY: _default, ArrayEncoding.MSGPACK_NUMPY: _default_msgpack_numpy}


def _find_unencodable(obj: Any, path: tuple, depth: int) -> CodecError | None:
    """Slow path after a failed packb: locate the offending value so the error names its field."""
    if depth > 256:
        return _err(path, "nesting too deep (or a reference cycle)")
    if isinstance(obj, dict):
        for key, value in obj.items():
            err = _find_unencodable(key, path + (f"<key {key!r:.40}>",), depth + 1)
            err = err or _find_unencodable(value, path + (key,), depth + 1)
            if err:
                return err
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            err = _find_unencodable(value, path + (i,), depth + 1)
            if err:
                return err
        return None
    try:
        msgpack.packb(obj, default=_default, use_bin_type=True)
    except Exception as exc:  # noqa: BLE001 - any packer failure is reported with its field
        return _err(path, str(exc))
    return None


_local = threading.local()
_KEEP_PACKER_BUFFER = 32 << 20


def _packer(encoding: ArrayEncoding) -> msgpack.Packer:
    # A fresh Packer per call grows its buffer by reallocs, and around 200 KiB (one camera frame) that was
    # measured 15x slower than reusing one whose buffer is already big; Packers are not thread-safe.
    packers = getattr(_local, "packers", None)
    if packers is None:
        packers = _local.packers = {}
    packer = packers.get(encoding)
    if packer is None:
        packer = packers[encoding] = msgpack.Packer(default=_DEFAULTS[encoding], use_bin_type=True)
    return packer


def packb(obj: Any, encoding: ArrayEncoding | str = ArrayEncoding.NPY) -> bytes:
    """Encode a request or reply, arrays in `encoding`. Raises `CodecError` (with the field path) for values that
    cannot be sent."""
    encoding = ArrayEncoding(encoding)
    packer = _packer(encoding)
    try:
        out = packer.pack(obj)
    except Exception as exc:  # noqa: BLE001
        packer.reset()
        _local.packers.pop(encoding, None)
        found = _find_unencodable(obj, (), 0)
        raise found or CodecError("", f"cannot encode: {exc}") from exc
    if len(out) > _KEEP_PACKER_BUFFER:  # do not pin a huge buffer per thread for one odd message
        _local.packers.pop(encoding, None)
    return out


# ---------------------------------------------------------------------------------------------------------
# decoding: arrays


@lru_cache(maxsize=64)
def _numeric_dtype(descr: str) -> np.dtype | None:
    if _DESCR_RE.fullmatch(descr):
        try:
            dtype = np.dtype(descr)
        except TypeError:
            return None
        if dtype.kind in _ALLOWED_KINDS:
            return dtype
    return None


def _dtype(descr: Any, path: tuple) -> np.dtype:
    if isinstance(descr, bytes):
        try:
            descr = descr.decode("ascii")
        except UnicodeDecodeError:
            raise _err(path, f"expected a numeric dtype string, got bytes {descr[:20]!r}") from None
    if not isinstance(descr, str):
        kind = "a structured dtype" if isinstance(descr, (list, tuple)) else _type_name(descr)
        raise _err(path, f"expected a numeric dtype string such as '<f4', got {kind}")
    dtype = _numeric_dtype(descr) if len(descr) <= 4 else None  # '<c16' is the longest accepted
    if dtype is None:
        raise _err(path, f"dtype {descr[:20]!r} refused: only bool, int, uint, float and complex arrays are accepted")
    return dtype


def _check_shape(shape: Any, path: tuple, limits: DecodeLimits) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int for d in shape):
        raise _err(path, f"expected the shape as a list of non-negative ints, got {shape!r:.60}")
    if len(shape) > limits.max_ndim:
        raise _err(path, f"{len(shape)} dimensions, at most {limits.max_ndim} accepted")
    for d in shape:
        if d < 0:
            raise _err(path, f"negative dimension in shape {tuple(shape)!r:.60}")
        if d > limits.max_array_bytes:  # even with a 0 elsewhere, a dimension this big is not data
            raise _err(path, f"dimension {d} in shape {tuple(shape)!r:.60} is absurd")
    return tuple(shape)


def _view(buf: bytes, offset: int, dtype: np.dtype, shape: tuple[int, ...], fortran: bool,
          path: tuple, limits: DecodeLimits) -> np.ndarray:
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dtype.itemsize
    if nbytes > limits.max_array_bytes:
        raise _err(path, f"array of {nbytes} bytes exceeds the limit of {limits.max_array_bytes}")
    got = len(buf) - offset
    if got != nbytes:
        raise _err(path, f"shape {shape} of {dtype.str} needs {nbytes} bytes of data, got {got}")
    if count == 0:
        arr = np.empty(shape, dtype)
        arr.flags.writeable = False
        return arr
    flat = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    # Reshaping a contiguous 1-D view never copies; order="F" gives a Fortran-ordered view.
    return flat.reshape(shape, order="F" if fortran else "C")


@lru_cache(maxsize=512)
def _parse_npy_header(header: bytes, version: int) -> tuple[str, bool, Any]:
    """(descr, fortran_order, shape) of a .npy header; cached because robots resend the same shapes."""
    try:
        text = header.decode("utf-8" if version >= 3 else "latin-1")
        meta = ast.literal_eval(text)  # literals only, exactly what np.load does; never code
    except Exception as exc:  # noqa: BLE001 - SyntaxError, MemoryError, RecursionError on hostile headers
        raise ValueError(f"unreadable .npy header ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or set(meta) != _NPY_KEYS:
        raise ValueError(f"malformed .npy header {text[:80]!r}")
    if not isinstance(meta["fortran_order"], bool):
        raise ValueError(f"malformed .npy header: fortran_order {meta['fortran_order']!r:.20}")
    return meta["descr"], meta["fortran_order"], meta["shape"]


def decode_npy(raw: Any, path: tuple = (), limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Array from `np.save` bytes, as a read-only view; never unpickles (object arrays are refused)."""
    if not isinstance(raw, bytes):
        raise _err(path, f"expected .npy bytes, got {_type_name(raw)}")
    if raw[:6] != _NPY_MAGIC or len(raw) < 10:
        raise _err(path, "not a .npy payload (bad magic)")
    version = raw[6]
    if version == 1:
        start = 10
    elif version in (2, 3) and len(raw) >= 12:
        start = 12
    else:
        raise _err(path, f"unsupported .npy version {raw[6]}.{raw[7]}")
    hlen = int.from_bytes(raw[start - (2 if version == 1 else 4):start], "little")
    if hlen > _NPY_MAX_HEADER:
        raise _err(path, f".npy header of {hlen} bytes exceeds {_NPY_MAX_HEADER}")
    end = start + hlen
    if end > len(raw):
        raise _err(path, ".npy payload truncated inside its header")
    try:
        descr, fortran, shape = _parse_npy_header(raw[start:end], version)
    except ValueError as exc:
        raise _err(path, str(exc)) from None
    dtype = _dtype(descr, path)
    return _view(raw, end, dtype, _check_shape(shape, path, limits), fortran, path, limits)


def _get(obj: dict, name: str, default: Any = None) -> Any:
    value = obj.get(name.encode(), default)
    return obj.get(name, default) if value is default else value


def _decode_msgpack_numpy(obj: dict, path: tuple, limits: DecodeLimits) -> Any:
    nd = _get(obj, "nd")
    kind = _get(obj, "kind", b"")
    if kind not in (b"", ""):
        raise _err(path, f"array kind {kind!r:.20} refused: structured arrays are not accepted")
    dtype = _dtype(_get(obj, "type"), path)
    data = _get(obj, "data")
    if not isinstance(data, bytes):
        raise _err(path, f"expected the array data as bytes, got {_type_name(data)}")
    if nd is True:
        return _view(data, 0, dtype, _check_shape(_get(obj, "shape"), path, limits), False, path, limits)
    if nd is False:  # msgpack-numpy's numpy scalar
        if len(data) != dtype.itemsize:
            raise _err(path, f"scalar of {dtype.str} needs {dtype.itemsize} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dtype)[0]
    raise _err(path, f"'nd' must be true or false, got {nd!r:.20}")


def _decode_modality(obj: dict, marker: str, path: tuple, depth: int, limits: DecodeLimits, seen: set) -> ModalityConfig:
    if "as_json" not in obj:
        raise _err(path, f"{marker} without 'as_json'")
    as_json = obj["as_json"]
    if isinstance(as_json, (dict, list)):
        as_json = _walk(as_json, path + ("as_json",), depth + 1, limits, seen)
    elif not isinstance(as_json, (str, bytes)):
        raise _err(path + ("as_json",), f"expected a map or a JSON string, got {_type_name(as_json)}")
    elif isinstance(as_json, str):
        _check_str(as_json, path + ("as_json",))
    where = _fmt_path(path) or "<message>"
    try:
        return ModalityConfig.from_json(as_json, where=where)
    except RecursionError:
        raise _err(path + ("as_json",), "JSON nested too deep") from None
    except ValueError as exc:
        # from_json writes "<where>.<field>: <reason>"; keep its finer field as the error's path.
        field, sep, reason = str(exc).partition(": ")
        raise CodecError(field if sep else where, reason if sep else str(exc)) from None


# ---------------------------------------------------------------------------------------------------------
# decoding: the walk


def _check_str(s: str, path: tuple) -> None:
    # msgpack decodes with surrogateescape so that a bad string is found here, where its path is known;
    # valid UTF-8 never decodes to a lone surrogate, so a failing encode means the bytes were not UTF-8.
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _err(path, "string is not valid UTF-8") from None


_SCALARS = (int, float, bool, type(None), bytes)


def _walk(obj: Any, path: tuple, depth: int, limits: DecodeLimits, seen: set) -> Any:
    """Validate the tree msgpack built and swap array/config markers for their values, in place; `seen` collects
    the array encodings met."""
    t = type(obj)
    if t in _SCALARS:
        return obj
    if t is str:
        _check_str(obj, path)
        return obj
    if depth > limits.max_depth:
        raise _err(path, f"nesting deeper than {limits.max_depth} levels")
    if t is dict:
        if NDARRAY_MARKER in obj:
            seen.add(ArrayEncoding.NPY)
            return decode_npy(obj.get("as_npy"), path, limits)
        if b"nd" in obj or (type(obj.get("nd")) is bool and "type" in obj and "data" in obj):
            seen.add(ArrayEncoding.MSGPACK_NUMPY)
            return _decode_msgpack_numpy(obj, path, limits)
        for marker in MODALITY_MARKERS:
            if marker in obj:
                return _decode_modality(obj, marker, path, depth, limits, seen)
        for key, value in obj.items():
            kt = type(key)
            if kt is str:
                if not key.isascii():
                    _check_str(key, path + (f"<key {key[:40]!a}>",))
            elif kt not in _SCALARS:  # tuple keys (from array keys) or other oddities
                raise _err(path, f"map key of type {kt.__name__} refused")
            vt = type(value)
            if vt is str:
                if not value.isascii():
                    _check_str(value, path + (key,))
            elif vt not in _SCALARS:
                # Assigning to an existing key while iterating is safe: the dict does not change size.
                obj[key] = _walk(value, path + (key,), depth + 1, limits, seen)
        return obj
    if t is list:
        for i, value in enumerate(obj):
            vt = type(value)
            if vt is str:
                if not value.isascii():
                    _check_str(value, path + (i,))
            elif vt not in _SCALARS:
                obj[i] = _walk(value, path + (i,), depth + 1, limits, seen)
        return obj
    # ExtType, Timestamp: not part of the protocol.
    raise _err(path, f"msgpack {t.__name__} values are not accepted")


_UNPACK_REASONS = (
    ("incomplete input", "truncated message"),
    ("extra data", "trailing bytes after the message"),
    ("exceeds max_", None),  # msgpack's own text says which limit
)


def unpackb(
    data: bytes | bytearray | memoryview,
    *,
    max_array_bytes: int = DEFAULT_LIMITS.max_array_bytes,
    max_ndim: int = DEFAULT_LIMITS.max_ndim,
    max_depth: int = DEFAULT_LIMITS.max_depth,
    max_str_len: int = DEFAULT_LIMITS.max_str_len,
    max_container_len: int = DEFAULT_LIMITS.max_container_len,
    max_message_bytes: int = DEFAULT_LIMITS.max_message_bytes,
    limits: DecodeLimits | None = None,
) -> Any:
    """Decode one untrusted message. Any failure is a `CodecError`; never unpickles.

    Pass `limits=` (a `DecodeLimits`, e.g. built once from config) or the individual caps; `limits` wins.
    Any buffer works as `data` (bytes, memoryview, `zmq.Frame.buffer`); it is not retained.
    """
    if limits is None:
        caps = (max_array_bytes, max_ndim, max_depth, max_str_len, max_container_len, max_message_bytes)
        limits = DEFAULT_LIMITS if caps == _DEFAULT_CAPS else DecodeLimits(*caps)
    return unpackb_with_encoding(data, limits)[0]


def unpackb_with_encoding(
    data: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[Any, ArrayEncoding | None]:
    """`unpackb`, and the array encoding the message used: None without arrays; MSGPACK_NUMPY when any array came
    in that form (a client that writes it may read nothing else), else NPY."""
    size = memoryview(data).nbytes
    if size == 0:
        raise CodecError("", "empty message")
    if size > limits.max_message_bytes:
        raise CodecError("", f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,  # N1.7 arrays have bytes keys
            unicode_errors="surrogateescape",
            max_bin_len=limits.max_array_bytes + _NPY_MAX_HEADER + 64,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=limits.max_str_len,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises ValueError, TypeError (unhashable keys), ...
        text = str(exc).lower()
        reason = next((r or f"size limit: {exc}" for needle, r in _UNPACK_REASONS if needle in text), None)
        if isinstance(exc, msgpack.StackError):
            reason = "nesting too deep"
        detail = f"{type(exc).__name__}: {str(exc)[:80]}" if str(exc) else type(exc).__name__
        raise CodecError("", reason or f"not a valid msgpack message ({detail})") from None
    seen: set = set()
    try:
        obj = _walk(obj, (), 0, limits, seen)
    except RecursionError:
        raise CodecError("", "nesting too deep") from None
    if ArrayEncoding.MSGPACK_NUMPY in seen:
        return obj, ArrayEncoding.MSGPACK_NUMPY
    return obj, (ArrayEncoding.NPY if seen else None)
