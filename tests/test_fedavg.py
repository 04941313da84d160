"""The simulation's FedAvg arithmetic, without any transport (milliseconds)."""

import numpy as np
import pytest

from fedstream.nodes.simulate import fedavg


def test_initial_model_has_the_asked_size_and_layers():
    model = fedavg.initial_model(1 << 20, 4)
    assert list(model) == fedavg.layer_names(4)
    assert all(a.dtype == np.float32 for a in model.values())
    assert fedavg.model_bytes(model) == 1 << 20


def test_local_update_is_deterministic_and_depends_on_site_and_round():
    base = fedavg.initial_model(4096, 2)

    def updated(site, round_no):
        return fedavg.local_update({k: v.copy() for k, v in base.items()}, site, round_no)

    assert fedavg.models_equal(updated("site-1", 1), updated("site-1", 1))
    assert not fedavg.models_equal(updated("site-1", 1), updated("site-2", 1))
    assert not fedavg.models_equal(updated("site-1", 1), updated("site-1", 2))


def test_aggregate_is_the_weighted_mean():
    agg = fedavg.Aggregator()
    agg.add("a", {"w": np.array([1.0, 2.0], dtype=np.float32)}, 1)
    agg.add("b", {"w": np.array([3.0, 6.0], dtype=np.float32)}, 3)
    np.testing.assert_array_equal(agg.result()["w"], np.array([2.5, 5.0], dtype=np.float32))


def test_aggregate_needs_ascending_sites_matching_layers_and_someone():
    agg = fedavg.Aggregator()
    agg.add("b", {"w": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="ascending"):
        agg.add("a", {"w": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="layers"):
        agg.add("c", {"x": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="no site"):
        fedavg.Aggregator().result()


def test_reference_run_matches_round_by_round_aggregation():
    size, layers, sites = 8192, 3, ["site-1", "site-2", "site-3"]
    model = fedavg.initial_model(size, layers)
    for round_no, present in enumerate([sites, ["site-1", "site-3"]], start=1):
        agg = fedavg.Aggregator()
        for site in present:
            agg.add(site, fedavg.local_update({k: v.copy() for k, v in model.items()}, site, round_no),
                    fedavg.sample_count(site))
        model = agg.result()
    expected = fedavg.reference_run(size, layers, [sites, ["site-3", "site-1"]])
    assert fedavg.models_equal(model, expected)


def test_models_equal_is_bitwise():
    a = {"w": np.array([0.0], dtype=np.float32)}
    b = {"w": np.array([-0.0], dtype=np.float32)}
    assert not fedavg.models_equal(a, b)
    assert fedavg.models_equal(a, {"w": a["w"].copy()})
