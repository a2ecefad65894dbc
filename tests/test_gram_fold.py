"""The server's streamed Gram sum: batches checked on their sum, the culprit found on failure,
the same bits whatever the arrival order, and the client-facing checks it keeps."""

import numpy as np
import pytest

from fedtrak.privacy.bounds import gram_limits
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.server.gram_fold import CompensatedSum, GramFold, batch_size
from fedtrak.server.validation import check_minors
from fedtrak.wire.codecs import pack_upper

K = 6


def _grams(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(int(rng.integers(2, 9)), K)) * rng.uniform(0.1, 10)
        out.append(x.T @ x)
    return out


def _not_psd_but_minors_pass() -> np.ndarray:
    """Every 2 x 2 principal minor is >= 0, the matrix is not PSD (an eigenvalue of -0.8)."""
    g = np.eye(K)
    g[:3, :3] = [[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1]]
    return g


def test_a_batch_failing_its_sum_is_checked_client_by_client_and_only_the_culprit_is_excluded():
    honest = _grams(7)
    bad = 1e4 * _not_psd_but_minors_pass()
    check_minors(pack_upper(bad), K, "Gram", "client 3")  # the cheap per-client check lets it through
    excluded = {}
    fold = GramFold([0], K, None, lambda node, why: excluded.setdefault(node, why), batch=4)
    for node, g in enumerate(honest[:3] + [bad] + honest[3:]):
        fold.add(node, f"client {node}", 5.0, {0: pack_upper(g)})
    (total,) = fold.result()
    assert list(excluded) == [3] and "not positive semi-definite" in excluded[3]
    assert fold.included == [0, 1, 2, 4, 5, 6, 7] and fold.count == 35.0
    np.testing.assert_allclose(total, np.sum(honest, axis=0), rtol=1e-12)


def test_the_sum_has_the_same_bits_whatever_the_arrival_order():
    grams = _grams(200, seed=1)
    sums = []
    for order in (range(200), reversed(range(200)), np.random.default_rng(2).permutation(200)):
        fold = GramFold([0], K, None, lambda node, why: pytest.fail(why), batch=7)
        for i in order:
            fold.add(int(i), "c", 1.0, {0: pack_upper(grams[i])})
        sums.append(fold.result()[0])
    np.testing.assert_array_equal(sums[0], sums[1])
    np.testing.assert_array_equal(sums[0], sums[2])
    plain = [np.sum([grams[i] for i in order], axis=0) for order in (range(200), reversed(range(200)))]
    assert not np.array_equal(*plain)  # a plain float sum does depend on the order


def test_compensated_sum_is_exact_where_a_plain_sum_loses_everything():
    s = CompensatedSum((1,))
    for term in (1e16, 1.0, -1e16, 1.0):
        s.add(np.array([term]))
    assert s.value()[0] == 2.0  # a plain float64 sum gives 0.0 here


def test_under_dp_the_batch_sum_is_held_to_the_range_of_that_many_noised_grams():
    dp = DPSettings(noise_multiplier=2.0, clip_norm=1.0, delta=1e-5)
    rng = np.random.default_rng(3)
    limits = lambda count, clients: gram_limits(dp, count, K, clients, counts=clients)
    excluded = {}
    fold = GramFold([0], K, limits, lambda node, why: excluded.setdefault(node, why), batch=5)
    sigma = dp.noise_multiplier * dp.clip_norm**2
    for node in range(10):
        x = rng.normal(size=(20, K))
        x /= np.maximum(1.0, np.linalg.norm(x, axis=1, keepdims=True))
        noise = rng.normal(scale=sigma, size=(K, K))
        g = x.T @ x + np.triu(noise) + np.triu(noise, 1).T
        if node == 7:
            g = 30 * (np.eye(K) - 5 / K * np.ones((K, K)))  # diagonal 5, trace 30, an eigenvalue -120
        fold.add(node, f"client {node}", 20.0, {0: pack_upper(g)})
    fold.result()
    assert list(excluded) == [7] and "positive semi-definite" in excluded[7]


def test_batch_size_keeps_a_batch_within_its_memory():
    assert batch_size(1024, 1) == 63 and batch_size(1024, 3) == 21 and batch_size(8192, 2) == 1
