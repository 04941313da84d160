"""The object container: plain Python values and numpy arrays in one file, loaded without running code.

A file is an envelope around a body (docs/PROTOCOL.md, "Object container"):

    header   b"FSOBJ\\0", version (1 byte), kind (b"C": a container value, b"P": a cloudpickle stream)
    body     the encoded value (kind C) or the pickle stream (kind P)
    trailer  body length (u64 little-endian), xxh3-128 digest of the body (16 bytes), b"FSOBJEND"

Writing (`dump`) walks the value depth-first and writes each piece as it goes; an array's bytes go
straight from its buffer to the file (a Fortran-ordered array in its own order, a non-contiguous
view through bounded contiguous copies), so no second copy of the object is ever held. Reading
(`load`) first checks the header and the trailer against the file size, then decodes the body
with every declared length checked against the bytes left, reads each array with `readinto`
into a freshly allocated array, hashes everything it reads, and returns the value only once the
whole body was consumed and its digest matched: a damaged file raises ObjectFormatError and
never yields part of an object. Nothing in a container is ever executed; numpy is imported only
when a value holds an array.
"""

import io
import json
import math
import struct
import sys
from dataclasses import dataclass
from typing import IO, Any, Optional

import xxhash

MAGIC = b"FSOBJ\x00"
VERSION = 1
KIND_CONTAINER = b"C"
KIND_PICKLE = b"P"
END_MAGIC = b"FSOBJEND"
HEADER_SIZE = len(MAGIC) + 2
TRAILER_SIZE = 8 + 16 + len(END_MAGIC)

# Value tags: one byte before every encoded value.
TAG_NONE, TAG_TRUE, TAG_FALSE = b"N", b"T", b"F"
TAG_INT, TAG_BIGINT, TAG_FLOAT = b"i", b"I", b"f"
TAG_STR, TAG_BYTES = b"s", b"b"
TAG_LIST, TAG_TUPLE, TAG_DICT = b"l", b"t", b"d"
TAG_ARRAY, TAG_NUMPY_SCALAR = b"a", b"g"

MAX_DEPTH = 100  # nesting levels, when writing and when reading
MAX_VALUES = 10_000_000  # values decoded from one file: bounds the Python-object overhead
MAX_ARRAY_HEADER = 64 << 10  # bytes of an array's JSON header
MAX_BIGINT_BYTES = 1 << 20
_PIECE = 16 << 20  # bytes written or read (and hashed) at a time
_COPY_LIMIT = 8 << 20  # largest contiguous copy made of a non-contiguous array
_ARRAY_KINDS = frozenset("biufcmMSUV")  # bool, ints, floats, complex, time, bytes, unicode, void
_MAX_NDIM = 64
_MAX_DIM = 1 << 62

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")


class ObjectFormatError(ValueError):
    """A file is not a valid object container (truncated, damaged, or of another kind)."""


class PickleRefusedError(ObjectFormatError):
    """The file holds a cloudpickle stream and loading it was not allowed."""


PICKLE_REFUSED = ("the object was serialized with cloudpickle, which runs the sender's code when loaded; "
                  "allow it (allow_pickle=True) only for a sender you trust.")


class UnsupportedValueError(ValueError):
    """The object holds a value the container cannot carry; the message names its key path."""


@dataclass(frozen=True)
class Envelope:
    """What the header and trailer of a file say: its kind, body size and body digest."""

    kind: bytes
    body_size: int
    digest: bytes


# -- envelope ------------------------------------------------------------------------------------
class BodyWriter:
    """Writes a file's body, counting and hashing every byte; `finish` writes the trailer."""

    def __init__(self, f: IO[bytes], kind: bytes) -> None:
        if kind not in (KIND_CONTAINER, KIND_PICKLE):
            raise ValueError(f"unknown container kind {kind!r}")
        self._f = f
        self._hasher = xxhash.xxh3_128()
        self.size = 0
        f.write(MAGIC + bytes([VERSION]) + kind)

    def write(self, data: "bytes | memoryview") -> int:
        """Write and hash `data` (a file-like method, so pickle can write here too)."""
        self._hasher.update(data)
        self._f.write(data)
        self.size += len(data)
        return len(data)

    def finish(self) -> int:
        """Write the trailer; return the file's total size."""
        self._f.write(_U64.pack(self.size) + self._hasher.digest() + END_MAGIC)
        return HEADER_SIZE + self.size + TRAILER_SIZE


def read_envelope(f: io.BufferedIOBase, file_size: int) -> Envelope:
    """Check the header and trailer of an open file against its size; leave `f` at the body."""
    if file_size < HEADER_SIZE + TRAILER_SIZE:
        raise ObjectFormatError(f"the object file is truncated ({file_size} bytes, too short for a container).")
    f.seek(0)
    header = f.read(HEADER_SIZE)
    if header[:len(MAGIC)] != MAGIC:
        raise ObjectFormatError("the file is not a fedstream object container (bad magic bytes).")
    if header[len(MAGIC)] != VERSION:
        raise ObjectFormatError(f"the object container has version {header[len(MAGIC)]}, this fedstream reads "
                                f"version {VERSION}.")
    kind = header[len(MAGIC) + 1:]
    if kind not in (KIND_CONTAINER, KIND_PICKLE):
        raise ObjectFormatError(f"the object container has an unknown kind {kind!r}.")
    f.seek(file_size - TRAILER_SIZE)
    trailer = f.read(TRAILER_SIZE)
    if len(trailer) != TRAILER_SIZE or trailer[-len(END_MAGIC):] != END_MAGIC:
        raise ObjectFormatError("the object file is truncated or damaged (no valid trailer).")
    (body_size,) = _U64.unpack_from(trailer)
    if body_size != file_size - HEADER_SIZE - TRAILER_SIZE:
        raise ObjectFormatError(f"the object file is truncated or damaged: its trailer declares a {body_size}-byte "
                                f"body, the file holds {file_size - HEADER_SIZE - TRAILER_SIZE}.")
    f.seek(HEADER_SIZE)
    return Envelope(kind, body_size, trailer[8:24])


class BodyReader:
    """Reads a body within its declared size, hashing every byte; `finish` checks size and digest."""

    def __init__(self, f: io.BufferedIOBase, envelope: Envelope) -> None:
        self._f = f
        self._envelope = envelope
        self._hasher = xxhash.xxh3_128()
        self.left = envelope.body_size

    def _claim(self, n: int, what: str) -> None:
        if n > self.left:
            raise ObjectFormatError(f"the object file is damaged: {what} needs {n} bytes, but only {self.left} "
                                    f"bytes remain.")
        self.left -= n

    def read(self, n: int = -1, what: str = "a value") -> bytes:
        """Exactly `n` bytes of the body (all that is left if n < 0)."""
        n = self.left if n < 0 else n
        self._claim(n, what)
        data = self._f.read(n)
        if len(data) != n:
            raise ObjectFormatError("the object file is truncated: it ended in the middle of a value.")
        self._hasher.update(data)
        return data

    def readinto(self, view: memoryview, what: str = "an array") -> None:
        """Fill `view` (bytes) from the body, in bounded pieces."""
        self._claim(len(view), what)
        done = 0
        while done < len(view):
            piece = view[done:done + _PIECE]
            got = 0
            while got < len(piece):
                count = self._f.readinto(piece[got:])
                if not count:
                    raise ObjectFormatError("the object file is truncated: it ended in the middle of an array.")
                got += count
            self._hasher.update(piece)
            done += len(piece)

    def verify(self) -> None:
        """Read (and hash) the rest of the body in bounded pieces, then `finish`."""
        while self.left:
            self.read(min(self.left, _PIECE), "the body")
        self.finish()

    def finish(self) -> None:
        """Raise unless the whole body was read and matched the trailer's digest."""
        if self.left:
            raise ObjectFormatError(f"the object file is damaged: {self.left} unexpected bytes after the value.")
        if self._hasher.digest() != self._envelope.digest:
            raise ObjectFormatError("the object file is damaged: its content does not match its digest.")


# -- key paths -------------------------------------------------------------------------------------
def format_path(path: tuple) -> str:
    """`('weights', 'layer3', 2)` -> "weights['layer3'][2]"; the empty path is the object itself."""
    if not path:
        return "the object"
    parts = []
    for index, step in enumerate(path):
        if index == 0 and isinstance(step, str) and step.isidentifier():
            parts.append(step)
        else:
            parts.append(f"[{step!r}]")
    return "".join(parts)


def _unsupported(path: tuple, what: str) -> UnsupportedValueError:
    return UnsupportedValueError(f"{format_path(path)}: {what} is not supported")


# -- writing -------------------------------------------------------------------------------------
class _Encoder:
    def __init__(self, out: BodyWriter, max_depth: int) -> None:
        self.out = out
        self.max_depth = max_depth
        self.np: Any = sys.modules.get("numpy")  # without numpy loaded, no value can be an array

    def encode(self, value: Any, path: tuple, depth: int) -> None:
        if depth > self.max_depth:
            raise UnsupportedValueError(f"{format_path(path)}: nesting deeper than {self.max_depth} levels "
                                        f"(or a reference cycle) is not supported")
        write = self.out.write
        np = self.np
        if value is None:
            write(TAG_NONE)
        elif value is True or value is False:
            write(TAG_TRUE if value else TAG_FALSE)
        elif np is not None and isinstance(value, (np.ndarray, np.generic)):
            self._numpy(value, path)
        elif isinstance(value, int):
            self._int(int(value))
        elif isinstance(value, float):
            write(TAG_FLOAT + _F64.pack(value))
        elif isinstance(value, str):
            data = value.encode("utf-8", "surrogatepass")
            write(TAG_STR + _U64.pack(len(data)))
            write(data)
        elif isinstance(value, bytes):
            write(TAG_BYTES + _U64.pack(len(value)))
            write(value)
        elif isinstance(value, (list, tuple)):
            write((TAG_LIST if isinstance(value, list) else TAG_TUPLE) + _U64.pack(len(value)))
            for index, item in enumerate(value):
                self.encode(item, path + (index,), depth + 1)
        elif isinstance(value, dict):
            write(TAG_DICT + _U64.pack(len(value)))
            for key, item in value.items():
                if not isinstance(key, str):
                    raise _unsupported(path, f"a dict key of type {type(key).__name__} ({key!r:.40})")
                data = key.encode("utf-8", "surrogatepass")
                write(_U64.pack(len(data)))
                write(data)
                self.encode(item, path + (key,), depth + 1)
        else:
            raise _unsupported(path, type(value).__name__)

    def _int(self, value: int) -> None:
        if -(1 << 63) <= value < (1 << 63):
            self.out.write(TAG_INT + _I64.pack(value))
            return
        data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        self.out.write(TAG_BIGINT + _U64.pack(len(data)))
        self.out.write(data)

    def _numpy(self, value: Any, path: tuple) -> None:
        np = self.np
        if isinstance(value, np.generic):
            tag, array = TAG_NUMPY_SCALAR, np.asarray(value)
        elif type(value) is np.ndarray:
            tag, array = TAG_ARRAY, value
        else:
            raise _unsupported(path, f"the ndarray subclass {type(value).__name__}")
        problem = _dtype_problem(array.dtype)
        if problem:
            raise _unsupported(path, problem)
        fortran = bool(array.ndim > 1 and not array.flags.c_contiguous and array.flags.f_contiguous)
        header = json.dumps({"dtype": _dtype_to_json(array.dtype), "shape": list(array.shape),
                             "fortran": fortran}, separators=(",", ":")).encode()
        self.out.write(tag + _U64.pack(len(header)))
        self.out.write(header)
        self.out.write(_U64.pack(array.nbytes))
        if array.nbytes == 0:
            return
        if array.flags.c_contiguous or fortran:
            self._write_contiguous(array.T if fortran else array)
        else:
            self._write_strided(array)

    def _write_contiguous(self, array: Any) -> None:
        """Write a C-contiguous array's bytes straight from its buffer."""
        view = memoryview(array.reshape(-1).view(self.np.uint8))
        for start in range(0, len(view), _PIECE):
            self.out.write(view[start:start + _PIECE])

    def _write_strided(self, array: Any) -> None:
        """Write a non-contiguous array in C order through contiguous copies of at most _COPY_LIMIT bytes."""
        if array.nbytes <= _COPY_LIMIT or array.ndim == 0:
            self._write_contiguous(self.np.ascontiguousarray(array))
            return
        rows = max(1, _COPY_LIMIT // max(1, array[0].nbytes))
        for start in range(0, array.shape[0], rows):
            if rows == 1:
                self._write_strided(array[start])
            else:
                self._write_contiguous(self.np.ascontiguousarray(array[start:start + rows]))


def _dtype_problem(dtype: Any) -> Optional[str]:
    """Why an array of `dtype` cannot travel (None if it can)."""
    if dtype.fields is not None:
        for name in dtype.names:
            problem = _dtype_problem(dtype.fields[name][0])
            if problem:
                return problem
        return None
    if dtype.subdtype is not None:
        return _dtype_problem(dtype.subdtype[0])
    if dtype.kind == "O":
        return "a numpy array of Python objects (dtype object)"
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject:
        return f"a numpy array of dtype {dtype}"
    return None


def _dtype_to_json(dtype: Any) -> Any:
    if dtype.fields is not None:
        names = list(dtype.names)
        return {"names": names, "formats": [_dtype_to_json(dtype.fields[n][0]) for n in names],
                "offsets": [dtype.fields[n][1] for n in names], "itemsize": dtype.itemsize}
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"base": _dtype_to_json(base), "shape": list(shape)}
    return dtype.str


def dump(obj: Any, f: IO[bytes], max_depth: int = MAX_DEPTH) -> int:
    """Write `obj` as a container file to the binary file `f`; return the bytes written.

    Raises UnsupportedValueError, naming the key path, for a value the container cannot carry
    (`f` then holds an incomplete file: remove it).
    """
    out = BodyWriter(f, KIND_CONTAINER)
    _Encoder(out, max_depth).encode(obj, (), 0)
    return out.finish()


# -- reading -------------------------------------------------------------------------------------
class _Decoder:
    def __init__(self, body: BodyReader, max_depth: int, max_values: int) -> None:
        self.body = body
        self.max_depth = max_depth
        self.max_values = max_values
        self.values = 0
        self.np: Any = None

    def _u64(self, what: str) -> int:
        return _U64.unpack(self.body.read(8, what))[0]

    def _count(self, per_item: int, what: str) -> int:
        count = self._u64(what)
        if count * per_item > self.body.left:
            raise ObjectFormatError(f"the object file is damaged: {what} declares {count} items, more than the "
                                    f"{self.body.left} bytes left can hold.")
        return count

    def decode(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise ObjectFormatError(f"the object file nests values deeper than {self.max_depth} levels.")
        self.values += 1
        if self.values > self.max_values:
            raise ObjectFormatError(f"the object file holds more than {self.max_values} values.")
        tag = self.body.read(1, "a value tag")
        if tag == TAG_NONE:
            return None
        if tag == TAG_TRUE:
            return True
        if tag == TAG_FALSE:
            return False
        if tag == TAG_INT:
            return _I64.unpack(self.body.read(8, "an integer"))[0]
        if tag == TAG_BIGINT:
            size = self._u64("an integer's length")
            if size > MAX_BIGINT_BYTES:
                raise ObjectFormatError(f"the object file is damaged: an integer of {size} bytes.")
            return int.from_bytes(self.body.read(size, "an integer"), "little", signed=True)
        if tag == TAG_FLOAT:
            return _F64.unpack(self.body.read(8, "a float"))[0]
        if tag == TAG_STR:
            return self._text(self._u64("a string's length"), "a string")
        if tag == TAG_BYTES:
            return self.body.read(self._u64("a bytes value's length"), "a bytes value")
        if tag in (TAG_LIST, TAG_TUPLE):
            items = [self.decode(depth + 1) for _ in range(self._count(1, "a list"))]
            return items if tag == TAG_LIST else tuple(items)
        if tag == TAG_DICT:
            result: dict = {}
            for _ in range(self._count(9, "a dict")):
                key = self._text(self._u64("a key's length"), "a dict key")
                if key in result:
                    raise ObjectFormatError(f"the object file is damaged: dict key {key[:40]!r} appears twice.")
                result[key] = self.decode(depth + 1)
            return result
        if tag in (TAG_ARRAY, TAG_NUMPY_SCALAR):
            array = self._array()
            if tag == TAG_ARRAY:
                return array
            if array.ndim != 0:
                raise ObjectFormatError("the object file is damaged: a numpy scalar with a shape.")
            return array[()]
        raise ObjectFormatError(f"the object file is damaged: unknown value tag {tag!r}.")

    def _text(self, size: int, what: str) -> str:
        try:
            return self.body.read(size, what).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise ObjectFormatError(f"the object file is damaged: {what} is not valid UTF-8.") from None

    def _array(self) -> Any:
        if self.np is None:
            import numpy

            self.np = numpy
        np = self.np
        size = self._u64("an array header's length")
        if size > MAX_ARRAY_HEADER:
            raise ObjectFormatError(f"the object file is damaged: an array header of {size} bytes.")
        try:
            header = json.loads(self.body.read(size, "an array header"))
        except ValueError:
            raise ObjectFormatError("the object file is damaged: an array header is not valid JSON.") from None
        if not isinstance(header, dict):
            raise ObjectFormatError("the object file is damaged: an array header is not a JSON object.")
        dtype = _dtype_from_json(np, header.get("dtype"), 0)
        shape, fortran = header.get("shape"), header.get("fortran")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or \
                not all(type(n) is int and 0 <= n <= _MAX_DIM for n in shape) or type(fortran) is not bool:
            raise ObjectFormatError("the object file is damaged: an array header has a bad shape.")
        nbytes = self._u64("an array's length")
        if nbytes != dtype.itemsize * math.prod(shape):
            raise ObjectFormatError(f"the object file is damaged: an array of shape {tuple(shape)} and dtype "
                                    f"{dtype} declares {nbytes} bytes.")
        if nbytes > self.body.left:
            raise ObjectFormatError(f"the object file is truncated or damaged: an array of {nbytes} bytes, but "
                                    f"only {self.body.left} bytes remain.")
        try:
            array = np.empty(shape, dtype, order="F" if fortran else "C")
        except (ValueError, MemoryError) as exc:
            raise ObjectFormatError(f"the object file declares an array that cannot be allocated: {exc}.") from None
        if nbytes:
            self.body.readinto(memoryview((array.T if fortran else array).reshape(-1).view(np.uint8)))
        return array


def _dtype_from_json(np: Any, value: Any, depth: int) -> Any:
    """A dtype from its JSON description; never an object dtype."""
    bad = ObjectFormatError("the object file is damaged: an array has a bad dtype.")
    if depth > 16:
        raise bad
    try:
        if isinstance(value, str):
            dtype = np.dtype(value)
        elif isinstance(value, dict) and "base" in value:
            shape = value.get("shape")
            if not isinstance(shape, list) or not all(type(n) is int and 0 <= n <= _MAX_DIM for n in shape):
                raise bad
            dtype = np.dtype((_dtype_from_json(np, value["base"], depth + 1), tuple(shape)))
        elif isinstance(value, dict):
            names, formats = value.get("names"), value.get("formats")
            offsets, itemsize = value.get("offsets"), value.get("itemsize")
            if not (isinstance(names, list) and isinstance(formats, list) and isinstance(offsets, list)
                    and len(names) == len(formats) == len(offsets) and all(isinstance(n, str) for n in names)
                    and all(type(o) is int and o >= 0 for o in offsets) and type(itemsize) is int and itemsize >= 0):
                raise bad
            dtype = np.dtype({"names": names, "formats": [_dtype_from_json(np, f, depth + 1) for f in formats],
                              "offsets": offsets, "itemsize": itemsize})
        else:
            raise bad
    except ObjectFormatError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    problem = _dtype_problem(dtype)
    if problem:
        raise ObjectFormatError(f"the object file declares {problem}, which is not supported.")
    return dtype


def load(f: io.BufferedIOBase, file_size: int, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> Any:
    """Read a container file from the binary file `f` of `file_size` bytes and return its value.

    Raises ObjectFormatError if the file is truncated, damaged or exceeds the limits, and
    PickleRefusedError if it holds a cloudpickle stream (see spool.load_object).
    """
    envelope = read_envelope(f, file_size)
    if envelope.kind == KIND_PICKLE:
        raise PickleRefusedError(PICKLE_REFUSED)
    body = BodyReader(f, envelope)
    value = _Decoder(body, max_depth, max_values).decode(0)
    body.finish()
    return value

