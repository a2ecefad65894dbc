"""The client's on-disk feature store."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrak.client.store import FeatureStore
from fedtrak.errors import FedtrakError


def test_round_trip_is_memory_mapped_and_survives_a_restart(tmp_path):
    f = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)
    q = np.linspace(0, 1, 7, dtype=np.float32)
    FeatureStore(tmp_path, "run-1").write(2, f, q)
    again = FeatureStore(tmp_path, "run-1")  # a restarted client
    assert again.has(2) and not again.has(0)
    got_f, got_q = again.read(2)
    assert isinstance(got_f, np.memmap)
    np.testing.assert_array_equal(got_f, f)
    np.testing.assert_array_equal(got_q, q)
    assert not FeatureStore(tmp_path, "run-2").has(2)  # keyed by run
    assert not list((tmp_path / "run-1").glob(".tmp-*"))


def test_bad_input_and_corruption_are_named(tmp_path):
    store = FeatureStore(tmp_path, "r")
    with pytest.raises(FedtrakError, match="do not match"):
        store.write(0, np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(FedtrakError, match="not in the local store"):
        store.read(1)
    store.write(1, np.zeros((3, 2)), np.zeros(3))
    (store.dir / "ckpt_001" / "features.npy").write_bytes(b"garbage")
    with pytest.raises(FedtrakError, match="corrupt local store entry"):
        store.read(1)
    for bad in ("../escape", "", "a/b"):
        with pytest.raises(FedtrakError, match="run id"):
            FeatureStore(tmp_path, bad)


def test_a_noised_release_is_made_once_and_repeated(tmp_path):
    """A resent step gets the stored release back, not fresh noise (which would cost privacy again)."""
    store = FeatureStore(tmp_path, "run-1")
    draws = []

    def make() -> np.ndarray:
        draws.append(1)
        return np.random.default_rng().normal(size=(3, 4))

    first = store.released("gram-0", make)
    again = store.released("gram-0", make)
    assert np.array_equal(first, again) and len(draws) == 1
    assert not np.array_equal(store.released("gram-1", make), first) and len(draws) == 2
    (store.dir / "released" / "gram-0.npy").write_bytes(b"\x93NUMPY torn")  # a torn write is made again
    assert store.released("gram-0", make).shape == (3, 4) and len(draws) == 3
    assert np.array_equal(FeatureStore(tmp_path, "run-1").released("gram-1", make), store.released("gram-1", make))
    with pytest.raises(FedtrakError, match="release name"):
        store.released("../escape", make)
