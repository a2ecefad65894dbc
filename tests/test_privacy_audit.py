"""Findings of the privacy audit (issue 30) on the noise grid: each test fails on the code before
the fix."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from fedtrak.errors import FedtrakError
from fedtrak.privacy.sampling import GRID_BITS, add_gaussian, grid_step


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
