"""The object container and spool files, without sockets: round trips, bad input, damaged files.

Files go to tmp_path; hostile files are crafted with a valid envelope (correct digest) so that
the decoder's own checks, not the digest, must catch them.
"""

import json
import math
import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from fedstream.nodes.objects import container, spool
from fedstream.nodes.objects.container import ObjectFormatError, PickleRefusedError, UnsupportedValueError
from tests.helpers import objects_payloads as payloads
from tests.procs import REPO

U64 = struct.Struct("<Q")


def roundtrip(value, tmp_path, **load_kwargs):
    path = spool.spool_object(value, directory=str(tmp_path))
    try:
        return spool.load_object(path, **load_kwargs)
    finally:
        os.unlink(path)


def spool_bytes(value, tmp_path) -> bytes:
    path = spool.spool_object(value, directory=str(tmp_path))
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def load_bytes(data: bytes, tmp_path, **kwargs):
    path = tmp_path / "input.fsobj"
    path.write_bytes(data)
    return spool.load_object(str(path), **kwargs)


def crafted(body: bytes, tmp_path, kind: bytes = container.KIND_CONTAINER) -> str:
    """A file with a valid header, trailer and digest around `body`."""
    path = tmp_path / "crafted.fsobj"
    with open(path, "wb") as f:
        out = container.BodyWriter(f, kind)
        out.write(body)
        out.finish()
    return str(path)


def array_body(header: dict, nbytes: int, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return b"a" + U64.pack(len(text)) + text + U64.pack(nbytes) + data


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return (type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


# -- plain values ----------------------------------------------------------------------------------
def test_nested_plain_values_keep_their_types(tmp_path):
    value = {"a": [1, (2, [3, {"b": None}]), ()], "": {}, "list": [], "t": (True, False, 0, 1),
             "s": "héllo \U0001f600 \ud800", "b": b"\x00\x01" * 3, "e": "", "eb": b"",
             "nested": [[[[["deep"]]]]]}
    loaded = roundtrip(value, tmp_path)
    assert loaded == value
    assert list(loaded) == list(value)  # key order kept
    assert type(loaded["a"][1]) is tuple and type(loaded["a"][1][1]) is list
    assert [type(x) for x in loaded["t"]] == [bool, bool, int, int]


@pytest.mark.parametrize("number", [0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 63, -(2 ** 63) - 1, 2 ** 64,
                                    2 ** 1000 + 17, -(2 ** 1000), 255, -256, 128, -129])
def test_integer_edge_values(tmp_path, number):
    loaded = roundtrip([number], tmp_path)[0]
    assert loaded == number and type(loaded) is int


@pytest.mark.parametrize("number", [0.0, -0.0, 1.5, float("inf"), float("-inf"), 5e-324, 1.7976931348623157e308,
                                    2.2250738585072014e-308, 0.1])
def test_float_edge_values(tmp_path, number):
    loaded = roundtrip(number, tmp_path)
    assert type(loaded) is float and loaded == number and math.copysign(1, loaded) == math.copysign(1, number)


def test_nan_and_bools_are_exact(tmp_path):
    loaded = roundtrip([float("nan"), True, False, None], tmp_path)
    assert math.isnan(loaded[0])
    assert loaded[1] is True and loaded[2] is False and loaded[3] is None


def test_subclasses_travel_as_their_base_type(tmp_path):
    from collections import OrderedDict

    loaded = roundtrip(OrderedDict([("z", 1), ("a", 2)]), tmp_path)
    assert type(loaded) is dict and list(loaded.items()) == [("z", 1), ("a", 2)]


# -- arrays ----------------------------------------------------------------------------------------
DTYPES = ["?", "i1", "u1", "<i2", ">u4", "<i8", ">i8", "<f2", "<f4", ">f8", "<c8", "<c16", "M8[ns]", "m8[s]",
          "S5", "<U3", "V8", [("x", "<f4"), ("y", ">i2", (2, 3))],
          np.dtype([("a", "u1"), ("b", [("c", "<f8"), ("d", "S2")])], align=True)]
SHAPES = [(), (0,), (7,), (4, 5), (2, 3, 4), (3, 0, 2)]


def sample(dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = np.frombuffer(bytes((i * 37 + 11) % 256 for i in range(dtype.itemsize * math.prod(shape))), np.uint8)
    array = raw.view(dtype).reshape(shape) if dtype.itemsize and math.prod(shape) else np.zeros(shape, dtype)
    if dtype.kind == "b":
        array = (raw % 2).astype(bool).reshape(shape)
    return array.copy()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_array_round_trip(tmp_path, dtype, shape):
    array = sample(dtype, shape)
    loaded = roundtrip({"x": array}, tmp_path)["x"]
    assert same_array(array, loaded)
    assert loaded.flags.writeable and loaded.flags.c_contiguous


@pytest.mark.parametrize("dtype", ["<f4", ">i2", "<c16", "U2"])
def test_fortran_order_is_preserved(tmp_path, dtype):
    array = np.asfortranarray(sample(dtype, (3, 4, 5)))
    loaded = roundtrip(array, tmp_path)
    assert same_array(array, loaded)
    assert loaded.flags.f_contiguous and not loaded.flags.c_contiguous


def test_non_contiguous_views(tmp_path):
    base = np.arange(10 * 12 * 3, dtype=np.float32).reshape(10, 12, 3)
    views = [base[::2], base[:, 1::3, :], base[::-1, :, ::-1], base.transpose(1, 0, 2), base[..., 1],
             base.T[::2], np.broadcast_to(np.arange(4.0), (5, 4)), base[3, ::5, :]]
    loaded = roundtrip(views, tmp_path)
    for view, back in zip(views, loaded):
        assert same_array(view, back)
        assert back.flags.owndata or back.base is not None and back.base.flags.owndata


def test_large_non_contiguous_view_goes_through_bounded_copies(tmp_path, monkeypatch):
    monkeypatch.setattr(container, "_COPY_LIMIT", 64)  # force the slab path on a small array
    base = np.arange(6 * 7 * 5 * 3, dtype=np.int64).reshape(6, 7, 5, 3)
    view = base[::-1, 1::2, :, ::2]
    huge_items = np.zeros(4, dtype="V100")[::2]  # items larger than the copy limit
    loaded = roundtrip([view, huge_items], tmp_path)
    assert same_array(view, loaded[0]) and same_array(huge_items, loaded[1])


def test_numpy_scalars_keep_their_type(tmp_path):
    values = [np.float32(1.25), np.int64(-7), np.bool_(True), np.uint8(255), np.complex128(1 - 1j),
              np.datetime64("2020-02-29", "D")]
    loaded = roundtrip(values, tmp_path)
    for value, back in zip(values, loaded):
        assert type(back) is type(value) and back == value


def test_nested_payload_round_trip(tmp_path):
    value = payloads.nested()
    assert payloads.fingerprint(roundtrip(value, tmp_path)) == payloads.fingerprint(value)


def test_arrays_are_written_from_their_buffer_and_read_without_a_second_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(container, "_COPY_LIMIT", 1 << 20)
    big = np.ones(32 << 20, dtype=np.uint8)
    path = str(tmp_path / "big.fsobj")
    tracemalloc.start()
    try:
        with open(path, "wb") as f:
            container.dump({"c": big, "f": big.reshape(4096, -1, order="F"), "v": big[::2]}, f)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded = spool.load_object(path)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert write_peak < 4 << 20  # the contiguous arrays without a copy, the view in 1 MiB slabs
    assert read_peak < (32 + 16 + 32 + 4) << 20  # the loaded arrays themselves, plus little
    assert same_array(big[::2], loaded["v"]) and loaded["f"].flags.f_contiguous


# -- unsupported values ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    ({"weights": {"layer3": [1, 2, {3}]}}, "weights['layer3'][2]: set is not supported"),
    ({3}, "the object: set is not supported"),
    ([0, {"a": object()}], "[1]['a']: object is not supported"),
    ({"my key": bytearray(b"x")}, "['my key']: bytearray is not supported"),
    ({"m": {1: "one"}}, "m: a dict key of type int (1) is not supported"),
    ({"w": np.array([1, "x"], dtype=object)}, "w: a numpy array of Python objects (dtype object) is not supported"),
    ({"w": [np.ma.masked_array([1, 2])]}, "w[0]: the ndarray subclass MaskedArray is not supported"),
    ({"f": print}, "f: builtin_function_or_method is not supported"),
])
def test_unsupported_values_name_their_key_path(tmp_path, value, message):
    with pytest.raises(UnsupportedValueError) as info:
        spool.spool_object(value, directory=str(tmp_path))
    assert str(info.value) == message
    assert os.listdir(tmp_path) == []  # no spool file left behind


def test_reference_cycles_and_deep_nesting_are_refused(tmp_path):
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(UnsupportedValueError, match="nesting deeper than 100 levels"):
        spool.spool_object({"c": cycle}, directory=str(tmp_path))
    deep: list = []
    for _ in range(99):
        deep = [deep]
    assert roundtrip(deep, tmp_path) == deep


@pytest.mark.skipif(not hasattr(np.dtypes, "StringDType"), reason="numpy without StringDType")
def test_string_dtype_arrays_are_refused(tmp_path):
    with pytest.raises(UnsupportedValueError, match=r"^a: a numpy array of dtype StringDType"):
        spool.spool_object({"a": np.array(["x"], dtype=np.dtypes.StringDType())}, directory=str(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="serializer must be"):
        spool.spool_object(1, serializer="json", directory=str(tmp_path))
    with pytest.raises(ValueError, match="allow_pickle must be True or False"):
        spool.load_object(str(tmp_path / "x"), allow_pickle="yes")
    with pytest.raises(ValueError, match="is not a directory"):
        spool.spool_object(1, directory=str(tmp_path / "missing"))


# -- damaged files ---------------------------------------------------------------------------------
def small_file(tmp_path) -> bytes:
    return spool_bytes({"w": np.arange(6, dtype=np.int16).reshape(2, 3), "s": "abc", "n": [1, 2.5, None]},
                       tmp_path)


def test_every_truncation_is_an_error(tmp_path):
    data = small_file(tmp_path)
    for cut in range(len(data)):
        with pytest.raises(ObjectFormatError):
            load_bytes(data[:cut], tmp_path)


def test_every_flipped_byte_is_an_error(tmp_path):
    data = small_file(tmp_path)
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x40
        with pytest.raises(ObjectFormatError):
            load_bytes(bytes(damaged), tmp_path)


def test_extra_bytes_and_foreign_files_are_errors(tmp_path):
    data = small_file(tmp_path)
    with pytest.raises(ObjectFormatError, match="truncated or damaged"):
        load_bytes(data + b"\x00", tmp_path)
    with pytest.raises(ObjectFormatError, match="not a fedstream object container"):
        load_bytes(b"PK\x03\x04" + b"\x00" * 100, tmp_path)
    with pytest.raises(ObjectFormatError, match="version 2"):
        load_bytes(data[:6] + b"\x02" + data[7:], tmp_path)


@pytest.mark.parametrize("body, message", [
    (array_body({"dtype": "<f8", "shape": [1 << 37], "fortran": False}, 8 << 37), "only 0 bytes remain"),
    (array_body({"dtype": "<f8", "shape": [4], "fortran": False}, 64, b"\x00" * 64), "declares 64 bytes"),
    (array_body({"dtype": "|O", "shape": [1], "fortran": False}, 8, b"\x00" * 8), "Python objects"),
    (array_body({"dtype": {"names": ["a"], "formats": ["|O"], "offsets": [0], "itemsize": 8}, "shape": [1],
                 "fortran": False}, 8, b"\x00" * 8), "Python objects"),
    (array_body({"dtype": "<f8", "shape": [-1], "fortran": False}, 8, b"\x00" * 8), "bad shape"),
    (array_body({"dtype": "no such type", "shape": [1], "fortran": False}, 8, b"\x00" * 8), "bad dtype"),
    (b"a" + U64.pack(5) + b"[1,2]", "not a JSON object"),
    (b"a" + U64.pack(1 << 30), "array header of"),
    (b"l" + U64.pack(1 << 40) + b"N", "declares 1099511627776 items"),
    (b"d" + U64.pack(2) + (U64.pack(1) + b"k" + b"N") * 2, "appears twice"),
    (b"s" + U64.pack(2) + b"\xff\xfe", "not valid UTF-8"),
    (b"b" + U64.pack(10) + b"abc", "only 3 bytes remain"),
    (b"I" + U64.pack(1 << 40), "an integer of"),
    (b"X", "unknown value tag"),
    (b"NN", "1 unexpected bytes after the value"),
    ((b"l" + U64.pack(1)) * 150 + b"N", "deeper than 100 levels"),
    (b"", "a value tag needs 1 bytes, but only 0 bytes remain"),
])
def test_hostile_files_with_valid_digests_are_refused(tmp_path, body, message):
    with pytest.raises(ObjectFormatError, match=message):
        spool.load_object(crafted(body, tmp_path))


def test_value_limit(tmp_path):
    path = crafted(b"l" + U64.pack(100) + b"N" * 100, tmp_path)
    assert spool.load_object(path) == [None] * 100
    with pytest.raises(ObjectFormatError, match="more than 50 values"):
        spool.load_object(path, max_values=50)


# -- cloudpickle by consent ------------------------------------------------------------------------
def test_pickle_is_refused_by_default_and_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    path = spool.spool_object(payloads.pickled(str(canary)), serializer="cloudpickle", directory=str(tmp_path))
    with pytest.raises(PickleRefusedError, match="cloudpickle.*allow_pickle=True"):
        spool.load_object(path)
    assert not canary.exists()
    loaded = spool.load_object(path, allow_pickle=True)
    assert loaded["set"] == {1, 2, 3} and loaded["inc"](1) == 2
    assert canary.exists()


def test_damaged_pickle_is_refused_before_unpickling(tmp_path):
    canary = tmp_path / "canary"
    path = spool.spool_object(payloads.pickled(str(canary)), serializer="cloudpickle", directory=str(tmp_path))
    with open(path, "r+b") as f:
        f.seek(container.HEADER_SIZE + 3)
        byte = f.read(1)
        f.seek(container.HEADER_SIZE + 3)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ObjectFormatError, match="does not match its digest"):
        spool.load_object(path, allow_pickle=True)
    assert not canary.exists()


def test_container_files_load_the_same_with_allow_pickle(tmp_path):
    assert roundtrip({"a": 1}, tmp_path, allow_pickle=True) == {"a": 1}


def test_unpicklable_objects_raise_and_leave_no_file(tmp_path):
    import threading

    with pytest.raises(UnsupportedValueError, match="cannot be pickled"):
        spool.spool_object({"lock": threading.Lock()}, serializer="cloudpickle", directory=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_numpy_is_imported_only_for_arrays(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ran = subprocess.run([sys.executable, "-m", "tests.helpers.objects_lazy_numpy", str(tmp_path)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["NUMPY", "false", "EQUAL", "true"]
