"""Distributed Skellam noise for securely aggregated Grams: its variance, its sizing for the
threshold, its fixed-point resolution and its Renyi-DP accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release, epsilon, sigma_for_plan
from fedtrak.privacy.distributed import (
    NOISE_VARIANCE_TARGET,
    DistributedNoise,
    noise_fraction_bits,
    skellam_noise,
)
from fedtrak.privacy.mechanisms import DPSettings

DELTA = 1e-5


def test_skellam_noise_has_its_variance_and_sums_to_the_survivors_variance():
    rng = np.random.default_rng(0)
    for variance in (10.0, 2.0**37, 2.0**40):  # the last is drawn in 8 parts
        x = skellam_noise(100_000, variance, rng)
        assert x.dtype == np.int64
        assert x.std() == pytest.approx(math.sqrt(variance), rel=0.01)
        assert abs(x.mean()) < 0.01 * math.sqrt(variance)
    total = sum(skellam_noise(200_000, 2.0**30, rng) for _ in range(5))
    assert total.std() == pytest.approx(math.sqrt(5 * 2.0**30), rel=0.01)
    with pytest.raises(FedtrakError, match="finite and >= 0"):
        skellam_noise(3, -1.0, rng)


def test_noise_is_sized_so_the_threshold_alone_reaches_sigma():
    dp = DPSettings(1.5, 5.0)
    bits = noise_fraction_bits(512, 3, 4, dp)
    noise = DistributedNoise(512, 3, 4, bits)
    assert noise.client_variance(dp) <= NOISE_VARIANCE_TARGET < 4 * noise.client_variance(dp)
    l2, l1, count = noise.sensitivities(dp)
    assert count == 3 and l2 == pytest.approx(25 * 2.0**bits + math.sqrt(512 * 513 / 2))
    assert l2 < l1 <= math.sqrt(512 * 513 / 2) * l2
    # 4 survivors together: variance (sigma l2)^2, the Gaussian mechanism's at sigma
    assert 4 * noise.client_variance(dp) == pytest.approx((1.5 * l2) ** 2)
    assert noise.effective_sigma(dp, 4) == pytest.approx(1.5)
    assert noise.effective_sigma(dp, 9) == pytest.approx(1.5 * 1.5)
    joint = DistributedNoise(512, 3, 4, bits).sensitivities(DPSettings(1.5, 5.0, "joint"))
    assert joint[2] == 1 and joint[0] > l2  # one release over all three Grams' coordinates
    assert noise_fraction_bits(512, 3, 4, DPSettings()) == 24


def test_skellam_accounting_is_close_to_and_above_the_gaussian():
    dp = DPSettings(2.0, 5.0)
    noise = DistributedNoise(256, 3, 5, noise_fraction_bits(256, 3, 5, dp))
    skellam = noise.release(dp, 5)
    gaussian = Release("Gram", 2.0, 3)
    e_sk, e_g = epsilon([skellam], DELTA), epsilon([gaussian], DELTA)
    assert e_g < e_sk < 1.12 * e_g  # RDP composition is a little looser than exact GDP
    assert epsilon([noise.release(dp, 10)], DELTA) < e_sk  # more survivors, more noise
    # the Skellam's own excess term is negligible at this resolution: RDP of a Gaussian of the same sigma
    rdp_gauss = [3 * a / (2 * 2.0**2) for a in (2, 16, 128)]
    assert [skellam.rdp(a) for a in (2, 16, 128)] == pytest.approx(rdp_gauss, rel=1e-6)
    # calibration to a target under RDP
    sigma = sigma_for_plan(4.0, lambda s: [DistributedNoise(256, 3, 5, noise_fraction_bits(
        256, 3, 5, DPSettings(s, 5.0))).release(DPSettings(s, 5.0), 5)], DELTA)
    assert epsilon([DistributedNoise(256, 3, 5, noise_fraction_bits(256, 3, 5, DPSettings(sigma, 5.0)))
                    .release(DPSettings(sigma, 5.0), 5)], DELTA) == pytest.approx(4.0, rel=1e-4)


def test_the_count_decodes_exactly_when_the_grams_fraction_bits_go_negative(tmp_path):
    """C = 1000 at k = 512 under DP pushes the Grams' fixed point below 2^0; the count slot is an
    integer of its own and decodes exactly."""
    from fedtrak.client.secure_aggregation import encoded_grams
    from fedtrak.client.store import FeatureStore
    from fedtrak.server.secure_aggregation import decoded_sum

    k, n, threshold = 512, 40, 3
    dp = DPSettings(noise_multiplier=1.0, clip_norm=1000.0)
    bits = noise_fraction_bits(k, 1, threshold, dp)
    assert bits < 0
    store = FeatureStore(tmp_path, "run")
    rng = np.random.default_rng(0)
    rows = (rng.normal(size=(n, k)) * 100).astype(np.float32)
    store.write_chunks(0, n, k, [(0, rows, np.full(n, 0.5, np.float32), np.full(n, 0.25, np.float32))], "fp")
    vector, _ = encoded_grams(store, [0], 1235, dp, threshold, bits)  # odd: 2^-bits does not divide it
    grams, count = decoded_sum(vector, k, 1, bits)
    assert count == 1235.0
    clipped = rows.astype(np.float64) * np.minimum(1.0, 1000.0 / np.linalg.norm(rows, axis=1))[:, None]
    noise = grams[0] - clipped.T @ clipped  # only the Skellam noise and rounding are left
    integer_std = np.sqrt(DistributedNoise(k, 1, threshold, bits).client_variance(dp))
    assert noise.std() == pytest.approx(integer_std * 2.0**-bits, rel=0.05)
