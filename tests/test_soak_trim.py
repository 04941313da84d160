"""IdleTrim, driven with events and a clock in microseconds: when the broker releases freed memory."""

from fedstream.broker.memory import IdleTrim, release_free_memory

MiB = 1 << 20


def _trim() -> IdleTrim:
    return IdleTrim(min_bytes=16 * MiB, quiet=1.0, follow=10.0)


def test_nothing_is_released_without_a_burst():
    trim = _trim()
    for t in range(30):
        trim.received(100, float(t))  # heartbeats
        assert not trim.due(t + 0.5)


def test_a_burst_is_released_once_quiet_then_followed_up_for_a_while():
    trim = _trim()
    for step in range(20):
        trim.received(1 * MiB, step * 0.1)
        assert not trim.due(step * 0.1)  # never during the transfer
    assert not trim.due(2.5)  # 0.6 s after the last busy batch
    assert trim.due(2.95)
    assert not trim.due(3.5)  # follow-ups are a `quiet` apart ...
    assert trim.due(4.0)
    trim.received(200, 4.2)  # ... and heartbeats do not count as traffic
    assert trim.due(5.0)
    assert not trim.due(13.5)  # ... and end `follow` seconds after the burst
    assert not trim.due(20.0)


def test_traffic_after_a_burst_postpones_the_release():
    trim = _trim()
    trim.received(32 * MiB, 0.0)
    trim.received(64 * 1024, 0.9)
    assert not trim.due(1.5)
    assert trim.due(1.95)


def test_small_batches_add_up_to_a_burst():
    trim = _trim()
    for step in range(20_000):
        trim.received(1000, step * 0.0001)
    assert trim.due(3.0)


def test_release_free_memory_never_raises():
    assert release_free_memory() in (True, False)
