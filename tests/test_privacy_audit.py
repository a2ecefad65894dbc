"""Findings of the privacy audit (issue 30) on the noise grid, the server's eigenvalue allowance and
the example count a client claims: each test fails on the code before the fix."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from fedtrak import wire
from fedtrak.errors import FedtrakError
from fedtrak.privacy.bounds import TAIL, gram_limits, owner_limits
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.privacy.sampling import GRID_BITS, add_gaussian, grid_step
from fedtrak.server.validation import check_psd, gram_release, read_info, score_release
from fedtrak.trak.kernel import gram
from fedtrak.wire.codecs import pack_upper
from fedtrak.wire.compat import PROTOCOL_VERSION


@pytest.mark.parametrize("std", [5e-324, sys.float_info.min / 2, 0.0, -1.0, math.nan, math.inf, -math.inf])
def test_a_noise_std_that_is_not_a_normal_positive_float_is_refused_not_answered_exactly(std):
    """Finding 8: sigma x B underflowing to 0 or a subnormal released the exact value."""
    rng = np.random.default_rng(0)
    with pytest.raises(FedtrakError, match=rf"noise standard deviation {re_float(std)} is not a normal"):
        add_gaussian(np.array([7.0, 3.0]), std, rng)


def re_float(value: float) -> str:
    """How the error writes ``value``, escaped for a regular expression."""
    return repr(float(value)).replace(".", r"\.").replace("+", r"\+").replace("-", r"\-")


def test_a_normal_std_whose_grid_step_is_subnormal_is_refused():
    """A std just above the smallest normal float has a grid 2^-24 below it: not a normal float."""
    std = 2.0**-1010
    with pytest.raises(FedtrakError, match=r"gives the grid step .*, not a normal float"):
        add_gaussian(1.0, std, np.random.default_rng(0))
    assert grid_step(2.0**-998) == sys.float_info.min  # the smallest std whose grid is normal


def test_the_grid_depends_on_the_std_alone_not_on_the_size_of_the_values():
    """Finding 11a: the step coarsened with max|x|, so the result's grid told the data's size."""
    rng = np.random.default_rng(1)
    small, large = np.array([0.5]), np.array([2e8])  # 2e8: 3.4e15 grid steps, it fits
    assert grid_step(1.0, small) == grid_step(1.0, large) == grid_step(1.0) == 2.0**-GRID_BITS
    noised = np.array([add_gaussian(large, 1.0, rng)[0] for _ in range(200)])
    on_fine = noised / 2.0**-GRID_BITS
    assert np.all(on_fine == np.rint(on_fine))  # every result on the std's own grid
    coarse = noised / 2.0**-22
    assert not np.all(coarse == np.rint(coarse))  # not all on the coarser grid 2e8 used to give


def test_values_too_large_for_the_grid_are_refused_naming_the_ratio():
    rng = np.random.default_rng(2)
    step = grid_step(1.0)
    fits = (2.0**52 - 1) * step
    out = add_gaussian(np.array([fits, -fits]), 1.0, rng)
    assert np.all(out / step == np.rint(out / step))
    with pytest.raises(FedtrakError, match=r"is 4\.504e\+15 grid steps .* beyond the 2\^52"):
        add_gaussian(np.array([0.0, 2.0**52 * step]), 1.0, rng)
    with pytest.raises(FedtrakError, match="NaN or infinite"):
        add_gaussian(np.array([np.nan]), 1.0, rng)


def _smallest_eigenvalues(base: np.ndarray, std: float, draws: int, rng: np.random.Generator
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The smallest eigenvalue of ``base`` plus ``draws`` symmetric Gaussian noise matrices (entries
    ``N(0, std^2)`` on the upper triangle, mirrored, as a client noises its Gram), and the worst
    noised matrix."""
    k = base.shape[0]
    smallest, worst, worst_value = [], None, np.inf
    for start in range(0, draws, 2500):
        noise = rng.normal(scale=std, size=(min(2500, draws - start), k, k))
        noised = base + np.triu(noise) + np.triu(noise, 1).transpose(0, 2, 1)
        low = np.linalg.eigvalsh(noised)[:, 0]
        smallest.append(low)
        if low.min() < worst_value:
            worst_value, worst = low.min(), noised[int(np.argmin(low))]
    return np.concatenate(smallest), worst


@pytest.mark.parametrize("k", [2, 32])
def test_honest_noised_grams_pass_the_psd_check_20000_times(k):
    """Finding 9: with the allowance 2.2 s sqrt(k) the server refused about 0.3% of honest noised
    Grams at k = 32 (1.7% at k = 2); the Tracy-Widom allowance refuses none of 20,000."""
    dp = DPSettings(noise_multiplier=2.0, clip_norm=1.0)
    rng = np.random.default_rng(30 + k)
    features = rng.normal(size=(3, k))
    features /= np.linalg.norm(features, axis=1, keepdims=True)  # 3 examples clipped to C = 1
    honest = gram(features)
    s = dp.sigma("gram") * dp.gram_sensitivity
    smallest, worst = _smallest_eigenvalues(honest, s, 20_000, rng)
    limits = gram_limits(dp, 3, k)
    assert smallest.min() > -limits.eig_slack
    info = wire.ClientInfo("a", 0, 3, PROTOCOL_VERSION, "ab" * 8)
    gram_release(wire.encode_grams_reply({0: pack_upper(worst)}, info), [0], k, "client a", False, limits)
    old = 2.2 * s * math.sqrt(k)  # the allowance before the fix
    assert np.sum(smallest < -old) > 10
    with pytest.raises(FedtrakError, match="not positive semi-definite"):
        check_psd(worst, "Gram", "client a", old)


def test_the_eigenvalue_allowance_is_never_below_the_rule_before():
    """Above k = 465 the Tracy-Widom allowance is smaller than 2.2 s sqrt(k); the larger is kept
    (room for noise a caller underestimates), and the rounding term is still added."""
    from fedtrak.privacy.bounds import eigenvalue_allowance

    s = 3.0
    for k in (1, 32, 465, 466, 2048, 8192):
        assert eigenvalue_allowance(s, k) >= 2.2 * s * math.sqrt(k)
    assert eigenvalue_allowance(s, 2048) == pytest.approx(2.2 * s * math.sqrt(2048))
    assert eigenvalue_allowance(s, 32) == pytest.approx(s * (2 * math.sqrt(32) + 12 * 32 ** (-1 / 6)))
    assert eigenvalue_allowance(0.0, 32) == 0.0
    dp = DPSettings(noise_multiplier=1.0, clip_norm=1.0)
    assert gram_limits(dp, 5, 64, rounding=1e-3).eig_slack == pytest.approx(eigenvalue_allowance(1.0, 64) + 0.064)


def test_a_count_above_the_operators_declaration_is_refused_by_name():
    """Finding 7: every size bound grows with the count the client claims, so a count x1e6 with a
    Gram and a summary x1e6 passed; with the most examples per device declared, the claim is
    refused by name (beyond the count noise's allowance under DP)."""
    from fedtrak.server.validation import check_example_count

    dp = DPSettings(noise_multiplier=2.0, clip_norm=1.0)
    rng = np.random.default_rng(7)
    n, k, scale = 20, 16, 10**6
    features = rng.normal(size=(n, k))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    noise = rng.normal(scale=2.0, size=(k, k))
    inflated_gram = scale * gram(features) + np.triu(noise) + np.triu(noise, 1).T
    inflated_summary = scale * features.sum(axis=0, keepdims=True) + rng.normal(scale=2.0, size=(1, k))
    info = wire.ClientInfo("a", 0, n * scale, PROTOCOL_VERSION, "ab" * 8)
    grams = wire.encode_grams_reply({0: pack_upper(inflated_gram)}, info)
    us = [rng.normal(size=(3, k))]
    summaries = wire.encode_score_reply(wire.ScoreRelease(owner_summaries=inflated_summary), info)

    # No declaration: the bounds follow the claim, and the inflated releases pass.
    claimed = read_info(grams, "client a").num_examples
    assert claimed == n * scale
    gram_release(grams, [0], k, "client a", False, gram_limits(dp, claimed, k))
    score_release(summaries, "owner-totals", 3, claimed, "client a", False, True, us, None,
                  owner_limits(dp, claimed, k))

    # Declared: at most 100 examples per device; the count's noise may add TAIL sigma = 16.
    for reply in (grams, summaries):
        with pytest.raises(FedtrakError, match=r"client a: reports 2e\+07 examples, above the 100 the operator "
                                               r"declares any one device holds \(max-client-examples\) plus 16 for "
                                               r"the count's noise"):
            read_info(reply, "client a", max_examples=100, dp=dp)
    check_example_count(100 + TAIL * 2.0, 100, dp, "client a")  # an honest count's noise may reach this
    with pytest.raises(FedtrakError, match=r"client a: reports 117 examples, above the 100"):
        check_example_count(117, 100, dp, "client a")
    check_example_count(100, 100, None, "client a")  # without DP the count is exact
    with pytest.raises(FedtrakError, match=r"client a: reports 101 examples, above the 100 .*\(max-client-examples\)$"):
        check_example_count(101, 100, DPSettings(), "client a")
    check_example_count(10**12, None, dp, "client a")  # no declaration: nothing to check
    for bad in (0, -5, 2.5, True):
        with pytest.raises(FedtrakError, match="max-client-examples must be a whole number >= 1"):
            check_example_count(5, bad, dp, "client a")
