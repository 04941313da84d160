"""Objects the object tests send, and a fingerprint to compare them across processes.

`build(kind)` makes the same object in every process: "nested" (plain values and arrays of
several dtypes, shapes and memory layouts), "weights:<MiB>" (a dict of float32 arrays of that
total size, built without temporary copies) and "pickled" (needs cloudpickle: a set, a lambda
and a Canary that creates a file when unpickled). `fingerprint(obj)` is a JSON-able description
with a sha256 per array, so two processes can compare what they hold.
"""

import hashlib
import math
import os
from typing import Any

import numpy as np

LAYER_MIB = 16


def _touch(path: str) -> str:
    with open(path, "w") as f:
        f.write("the pickle ran code\n")
    return path


class Canary:
    """Unpickling it creates the file `path`: proof that code ran (or, when absent, that none did)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return _touch, (self.path,)


def nested() -> dict:
    """Plain values of every supported type and arrays of several dtypes, shapes and layouts."""
    grid = np.arange(60, dtype=np.float64).reshape(6, 10) / 7
    cube = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    record = np.dtype([("id", "<i4"), ("pos", "<f4", (3,)), ("tag", "S3")])
    records = np.zeros(3, dtype=record)
    records["id"] = [1, 2, 3]
    records["pos"] = [[0.5, 1.5, 2.5], [3, 4, 5], [-1, -2, -3]]
    records["tag"] = [b"abc", b"de", b""]
    return {
        "round": 7,
        "meta": {"name": "fedavg", "lr": 0.01, "ok": True, "none": None, "blob": b"\x00\xff" * 5,
                 "big": 2 ** 80, "neg": -(2 ** 63), "inf": float("inf"), "ratio": -0.0},
        "weights": {
            "dense": grid.astype(np.float32),
            "fortran": np.asfortranarray(grid),
            "view": grid[::2, 1::3],
            "reversed": cube[:, ::-1, :],
            "scalar": np.array(3.5, dtype=np.float16),
            "empty": np.zeros((3, 0, 2), dtype=np.uint8),
            "flags": np.array([True, False, True]),
            "bigend": np.arange(5, dtype=">i8"),
            "complex": np.array([1 + 2j, -3.5j], dtype=np.complex64),
            "when": np.array(["2024-01-02T03:04:05"], dtype="datetime64[s]"),
            "text": np.array(["héllo", ""], dtype="<U5"),
            "records": records,
        },
        "history": [(1, 0.5), (2, 0.25), [np.int64(3), np.float32(0.125)]],
    }


def weights(total_mib: int) -> dict:
    """A dict of float32 arrays of `total_mib` MiB in all, filled in place (no temporary copies)."""
    layers = max(1, total_mib // LAYER_MIB)
    size = (total_mib << 20) // layers // 4
    result = {}
    for index in range(layers):
        array = np.empty(size, dtype=np.float32)
        array.fill(index + 0.5)
        array[:: 4099] = np.float32(index)
        result[f"layer{index}"] = array
    return result


def pickled(canary_path: str) -> dict:
    """Something only cloudpickle can carry, with a canary."""
    return {"set": {1, 2, 3}, "inc": lambda x: x + 1, "canary": Canary(canary_path)}


def build(kind: str, canary_path: str = "") -> Any:
    if kind == "nested":
        return nested()
    if kind.startswith("weights:"):
        return weights(int(kind.split(":", 1)[1]))
    if kind == "pickled":
        return pickled(canary_path)
    raise ValueError(f"unknown payload kind {kind!r}")


def fingerprint(value: Any) -> Any:
    """A JSON-able description of `value`: types, layouts and a sha256 per array."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)  # a copy only for non-contiguous views
        return {"array": value.dtype.str if value.dtype.fields is None else str(value.dtype),
                "shape": list(value.shape), "fortran": bool(value.ndim > 1 and value.flags.f_contiguous
                                                            and not value.flags.c_contiguous),
                "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(value, np.generic):
        return {"scalar": type(value).__name__, "repr": repr(value.item())}
    if isinstance(value, dict):
        return {"dict": [[key, fingerprint(item)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [fingerprint(item) for item in value]}
    if isinstance(value, float):
        return {"float": value.hex() if math.isfinite(value) else repr(value)}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, set):
        return {"set": sorted(value)}
    if callable(value):
        return {"callable": value(1)}
    if value is None or isinstance(value, (bool, int, str)):
        return {type(value).__name__: value if not isinstance(value, int) or abs(value) < 2 ** 53 else str(value)}
    return {"other": type(value).__name__}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
