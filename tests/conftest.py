import pytest

from tests.procs import Procs


@pytest.fixture
def procs(tmp_path):
    """Start real processes for a test; all are killed when the test ends."""
    group = Procs(tmp_path)
    yield group
    group.cleanup()


@pytest.fixture
def broker_address(procs):
    """Address of a broker running in its own process on free loopback ports."""
    _proc, address = procs.broker()
    return address
