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


def _layer_length(size: int, layers: int) -> int:
    if layers <= 0:
        raise ValueError(f"layers must be positive, got {layers}.")
    return max(1, size // (layers * _ITEM))


def initial_layer(index: int, length: int) -> np.ndarray:
    """Layer `index` of the round-1 model: `length` float32 values."""
    values = np.arange(length, dtype=_DTYPE)
    values *= _DTYPE(1.0 / length)
    values += _DTYPE(index)
    return values


def initial_model(size: int, layers: int) -> Model:
    """The global model of round 1: `layers` float32 arrays of about `size` bytes in total."""
    length = _layer_length(size, layers)
    return {name: initial_layer(index, length) for index, name in enumerate(layer_names(layers))}


def _seed(site: str, round_no: int) -> int:
    return zlib.crc32(f"{site}/{round_no}".encode())


def sample_count(site: str) -> int:
    """How many samples a site trains on (its FedAvg weight); fixed per site."""
    return 100 + zlib.crc32(site.encode()) % 900


def update_factors(site: str, round_no: int, names: Iterable[str]) -> dict[str, tuple[np.float32, np.float32]]:
    """(scale, shift) per layer of the site's "training" in this round."""
    rng = np.random.default_rng(_seed(site, round_no))
    return {name: (_DTYPE(rng.uniform(0.9, 1.1)), _DTYPE(rng.uniform(-0.5, 0.5))) for name in sorted(names)}


def local_update(model: Model, site: str, round_no: int) -> Model:
    """Apply the site's deterministic "training" to `model` in place and return it."""
    for name, (scale, shift) in update_factors(site, round_no, model).items():
        array = model[name]
        array *= scale
        array += shift
    return model


class Aggregator:
    """Weighted FedAvg in float32, fed one site at a time in ascending site-name order.

    Every layer is computed on its own, so a model and a single layer of it give the same bits.
    """

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
        weight = _DTYPE(samples)
        for name, array in update.items():
            if name in self._sum:
                self._sum[name] += array * weight
            else:
                self._sum[name] = array * weight
        self._weight += samples

    def result(self) -> Model:
        """The new global model (float32); ValueError if no site contributed."""
        if not self._weight:
            raise ValueError("no site sent an update in this round.")
        total_weight = _DTYPE(self._weight)
        result, self._sum = self._sum, {}
        for total in result.values():
            total /= total_weight
        return result


def reference_run(size: int, layers: int, participants: list[list[str]]) -> Model:
    """The final model of a whole run computed in one process, one layer at a time.

    `participants` holds, per round, the sites whose updates were aggregated.
    """
    length = _layer_length(size, layers)
    final = {}
    for index, name in enumerate(layer_names(layers)):
        layer = initial_layer(index, length)
        for round_no, sites in enumerate(participants, start=1):
            aggregator = Aggregator()
            for site in sorted(sites):
                scale, shift = update_factors(site, round_no, layer_names(layers))[name]
                update = layer * scale
                update += shift
                aggregator.add(site, {name: update}, sample_count(site))
            layer = aggregator.result()[name]
        final[name] = layer
    return final


def models_equal(a: Model, b: Model) -> bool:
    """Bit-for-bit equality of two models (same layers, dtypes, shapes and bytes)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and np.array_equal(np.ascontiguousarray(a[k]).view(np.uint8), np.ascontiguousarray(b[k]).view(np.uint8))
        for k in a)


def model_bytes(model: Model) -> int:
    """Bytes of the model's array data."""
    return sum(array.nbytes for array in model.values())
