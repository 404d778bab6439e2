import random

from agents.backoff import Backoff


def test_grows_exponentially_within_jitter_and_caps():
    b = Backoff(0.5, 30.0, rng=random.Random(1))
    delays = [b.next() for _ in range(12)]
    for i, d in enumerate(delays):
        ceiling = min(30.0, 0.5 * 2**i)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 30.0
    assert delays[-1] >= 15.0  # reached the cap region


def test_reset_starts_over():
    b = Backoff(1.0, 8.0, rng=random.Random(2))
    for _ in range(5):
        b.next()
    b.reset()
    assert b.next() <= 1.0


def test_long_connection_resets_by_itself(monkeypatch):
    import agents.backoff as mod

    now = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    b = Backoff(1.0, 64.0, reset_after=60.0, rng=random.Random(3))
    for _ in range(5):
        b.next()
    b.mark_up()
    now[0] += 61
    assert b.next() <= 1.0
    b.mark_up()
    now[0] += 5  # short connection: keeps growing
    assert b.next() > 1.0
