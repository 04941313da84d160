"""The arithmetic of the simulated federation: a model, a stand-in for training, FedAvg.

Everything here is deterministic and transport-free, so the server can recompute the whole
run in one process and compare bit for bit:

1. `initial_model(size, layers)` — a dict of float32 arrays, `layers` of them, about `size` bytes.
2. `local_update(model, site, round_no)` — what a site sends back: the model scaled and shifted
   by per-layer factors derived from the site's name and the round (in place: no second copy),
   with a sample count that weights the site.
3. `Aggregator` — the weighted average of the updates, added one site at a time in the order
   of the site names, so the order updates arrive in never changes a bit of the result.
"""

import zlib
from typing import Iterable

import numpy as np

Model = dict[str, np.ndarray]

_DTYPE = np.float32
_ITEM = np.dtype(_DTYPE).itemsize


def layer_names(layers: int) -> list[str]:
    """Names of the model's arrays in their fixed order."""
    return [f"layer{i}" for i in range(layers)]


def initial_model(size: int, layers: int) -> Model:
    """The global model of round 1: `layers` float32 arrays of about `size` bytes in total."""
    if layers <= 0:
        raise ValueError(f"layers must be positive, got {layers}.")
    per_layer = max(1, size // (layers * _ITEM))
    model = {}
    for index, name in enumerate(layer_names(layers)):
        values = np.arange(per_layer, dtype=_DTYPE)
        values *= _DTYPE(1.0 / per_layer)
        values += _DTYPE(index)
        model[name] = values
    return model


def _seed(site: str, round_no: int) -> int:
    return zlib.crc32(f"{site}/{round_no}".encode())


def sample_count(site: str) -> int:
    """How many samples a site trains on (its FedAvg weight); fixed per site."""
    return 100 + zlib.crc32(site.encode()) % 900


def local_update(model: Model, site: str, round_no: int) -> Model:
    """Apply the site's deterministic "training" to `model` in place and return it."""
    rng = np.random.default_rng(_seed(site, round_no))
    for name in sorted(model):
        scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.5, 0.5)
        array = model[name]
        array *= _DTYPE(scale)
        array += _DTYPE(shift)
    return model


class Aggregator:
    """Weighted FedAvg, fed one site at a time in ascending site-name order."""

    def __init__(self) -> None:
        self._sum: Model = {}
        self._weight = 0
        self._last_site = ""

    def add(self, site: str, update: Model, samples: int) -> None:
        """Add one site's update; sites must come in ascending name order."""
        if site <= self._last_site:
            raise ValueError(f"updates must be added in ascending site order: {site!r} after {self._last_site!r}")
        if samples <= 0:
            raise ValueError(f"{site}: sample count must be positive, got {samples}.")
        self._last_site = site
        if self._sum and set(update) != set(self._sum):
            raise ValueError(f"{site}: the update's layers differ from the other sites'.")
        for name, array in update.items():
            weighted = array.astype(np.float64) * samples
            if name in self._sum:
                self._sum[name] += weighted
            else:
                self._sum[name] = weighted
        self._weight += samples

    def result(self) -> Model:
        """The new global model (float32); ValueError if no site contributed."""
        if not self._weight:
            raise ValueError("no site sent an update in this round.")
        return {name: (total / self._weight).astype(_DTYPE) for name, total in self._sum.items()}


def reference_run(size: int, layers: int, participants: Iterable[Iterable[str]]) -> Model:
    """The final model of a whole run computed in one process: one entry of sites per round."""
    model = initial_model(size, layers)
    for round_no, sites in enumerate(participants, start=1):
        aggregator = Aggregator()
        for site in sorted(sites):
            update = local_update({k: v.copy() for k, v in model.items()}, site, round_no)
            aggregator.add(site, update, sample_count(site))
        model = aggregator.result()
    return model


def models_equal(a: Model, b: Model) -> bool:
    """Bit-for-bit equality of two models (same layers, dtypes, shapes and bytes)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and np.array_equal(np.ascontiguousarray(a[k]).view(np.uint8), np.ascontiguousarray(b[k]).view(np.uint8))
        for k in a)


def model_bytes(model: Model) -> int:
    """Bytes of the model's array data."""
    return sum(array.nbytes for array in model.values())
