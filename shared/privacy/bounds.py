"""How large an honest release can be: the server's size checks on what clients send.

Clipping bounds every release by construction. With each feature's norm at
most ``C``, each curvature weight at most ``w`` and each out-to-loss weight at
most 1, an owner of ``n`` examples has

- a Gram whose diagonal entries lie in ``[0, n C^2 w]`` (so its trace is at most
  ``n C^2 w`` too, and every entry at most that in size) and whose eigenvalues
  are non-negative;
- an owner summary of norm at most ``n C`` per checkpoint;
- a suspect count in ``[0, n]``; owner values of norm at most ``n B`` (``B``
  the server's clip of one example's share).

The noise a release carries widens each interval by a *noise allowance*: a
tail bound of its Gaussian (``TAIL`` standard deviations per number, about
1e-15 per check) or, for the smallest eigenvalue, a tail bound of the smallest
eigenvalue of the symmetric noise matrix (entries of standard deviation ``s``
on the upper triangle, mirrored): about ``-2 s sqrt(k)``, with Tracy-Widom
fluctuations of scale ``s k^(-1/6)``, so the allowance is
``s (2 sqrt(k) + EIG_TAIL k^(-1/6))``, and never below ``MIN_EDGE_FACTOR s sqrt(k)``
(:func:`eigenvalue_allowance`).
``n`` is the owner's released (noised) count plus its own allowance. A
release outside its interval was not made by the protocol from clipped
features: the server refuses it. This catches a scaled, negated or inflated
release; it cannot catch a client that lies within the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtrak.privacy.budget import COUNT, GRAM, SUMMARY, SUSPECTS, VALUE
from fedtrak.privacy.mechanisms import DPSettings, owner_value_sensitivity

#: Standard deviations of the Gaussian tail one number's noise may reach (probability ~1e-15).
TAIL = 8.0
#: Fluctuations, in units of ``s k^(-1/6)``, the smallest eigenvalue of a k x k symmetric Gaussian
#: noise matrix (entries of standard deviation ``s``, upper triangle mirrored) may reach below its
#: edge ``-2 s sqrt(k)``. Those fluctuations follow the Tracy-Widom law TW1 as k grows (mean -1.21,
#: standard deviation 1.27, 99% point 2.02); its upper tail, ``exp(-2/3 t^1.5) / (4 sqrt(pi) t^0.75)``
#: (0.012 at t = 2.02), gives about 2e-14 at 12. At small k, where the limit law is not yet reached,
#: Gaussian concentration bounds the tail by ``exp(-(12 k^(-1/6))^2 / 4)`` (below 1e-9 up to k = 4,
#: since the eigenvalue is sqrt(2) s-Lipschitz in the independent entries and its mean is above
#: ``-2 s sqrt(k)``). Measured (seeded numpy, k = 1 to 512, 200 to 200,000 draws each): the
#: largest fluctuation seen was 5.3 (k = 32), the 1e-4 quantile between 1.7 and 3.7. The room left,
#: more than 6 units, also covers the noise's rounding to its grid (each entry by at most
#: ``2^-24 s``). The rule before, ``2.2 s sqrt(k)``, refused an honest Gram 0.32% of the time at
#: k = 32 and 1.4% at k = 1.
EIG_TAIL = 12.0
#: The eigenvalue allowance is at least this times ``s sqrt(k)`` (the rule before :data:`EIG_TAIL`,
#: larger than the Tracy-Widom one above k = 465): 10% of the edge in hand for a noise a caller
#: underestimates. The secure sum's does: its Skellam noise is sized with the rounding's share of
#: the sensitivity, so its standard deviation exceeds ``sigma C^2 w sqrt(S / t)`` by up to 4% at
#: k = 2048, sigma 10 and threshold 2, 18% at sigma 50 (computed from
#: :class:`fedtrak.privacy.distributed.DistributedNoise`).
MIN_EDGE_FACTOR = 2.2


@dataclass(frozen=True)
class GramLimits:
    """The range an honest Gram (or sum of Grams) falls in: its diagonal within
    ``[diag_low, diag_high]``, its trace at most ``trace_high``, each off-diagonal entry at most
    ``entry_high`` in size, its smallest eigenvalue at least ``-eig_slack``."""

    diag_low: float
    diag_high: float
    trace_high: float
    entry_high: float
    eig_slack: float


def count_ceiling(dp: DPSettings, count: float, copies: float = 1.0) -> float:
    """The largest true example count a released count is consistent with (``copies``: how many
    clients' count noise the released number holds)."""
    noise = dp.sigma(COUNT) * math.sqrt(copies) if dp.active else 0.0
    return max(count, 0.0) + TAIL * noise


def gram_limits(dp: DPSettings, count: float, dim: int, copies: float = 1.0, rounding: float = 0.0,
                counts: int = 1) -> GramLimits:
    """The range of an honest Gram of ``count`` (released, possibly noised) examples under ``dp``;
    ``copies``: the noise's variance in units of one client's Gram noise (survivors over threshold
    for a secure sum); ``rounding``: a bound on each entry's fixed-point error; ``counts``: how many
    clients' noised counts ``count`` sums."""
    unit = dp.gram_sensitivity
    signal = count_ceiling(dp, count, counts) * unit
    entry_noise = dp.sigma(GRAM) * unit * math.sqrt(copies) if dp.active else 0.0
    slack = TAIL * entry_noise + rounding
    return GramLimits(
        diag_low=-slack, diag_high=signal + slack,
        trace_high=signal + TAIL * entry_noise * math.sqrt(dim) + dim * rounding,
        entry_high=signal + slack,
        eig_slack=eigenvalue_allowance(entry_noise, dim) + dim * rounding)


def eigenvalue_allowance(entry_noise: float, dim: int) -> float:
    """How far below 0 the smallest eigenvalue of an honest noised Gram may fall: the tail bound
    ``s (2 sqrt(k) + EIG_TAIL k^(-1/6))`` of the smallest eigenvalue of a ``dim`` x ``dim`` symmetric
    noise matrix of entry standard deviation ``s = entry_noise`` (see :data:`EIG_TAIL`), at least
    ``MIN_EDGE_FACTOR s sqrt(k)``; 0 without noise. A Gram is PSD, so the noised one's smallest
    eigenvalue is at least the noise's."""
    if entry_noise <= 0:
        return 0.0
    root = math.sqrt(dim)
    return entry_noise * max(2.0 * root + EIG_TAIL * dim ** (-1.0 / 6.0), MIN_EDGE_FACTOR * root)


@dataclass(frozen=True)
class OwnerLimits:
    """The range of an honest owner's score releases under DP: each checkpoint's summary norm at
    most ``summary_norm``, its suspect count within ``suspects`` (``None``: not a suspect count),
    its values' norm at most ``values_norm`` (``inf``: not bounded)."""

    summary_norm: float
    suspects: tuple[float, float] | None = None
    values_norm: float = math.inf


def owner_limits(dp: DPSettings, count: float, dim: int, groups: Sequence[np.ndarray] | None = None,
                 value_clip: float = 0.0, suspect_count: bool = False) -> OwnerLimits:
    """The :class:`OwnerLimits` of an owner of ``count`` (released) examples; ``groups``: each
    checkpoint's summed preconditioned queries per group, when owner values are released."""
    values = math.inf
    if groups is not None:
        per_example = value_clip if value_clip > 0 else owner_value_sensitivity(groups, dp)
        values = values_norm_ceiling(dp, count, len(groups[0]), per_example)
    return OwnerLimits(summary_norm_ceiling(dp, count, dim),
                       suspect_count_range(dp, count) if suspect_count else None, values)


def summary_norm_ceiling(dp: DPSettings, count: float, dim: int) -> float:
    """The largest norm of an honest owner summary of one checkpoint: ``n C`` plus the norm its
    noise can reach (``sigma C (sqrt(k) + TAIL)``)."""
    noise = dp.sigma(SUMMARY) * dp.clip_norm * (math.sqrt(dim) + TAIL) if dp.active else 0.0
    return count_ceiling(dp, count) * dp.clip_norm + noise


def suspect_count_range(dp: DPSettings, count: float) -> tuple[float, float]:
    """The range of an honest noised suspect count of an owner of ``count`` examples."""
    noise = TAIL * dp.sigma(SUSPECTS) if dp.active else 0.0
    return -noise, count_ceiling(dp, count) + noise


def values_norm_ceiling(dp: DPSettings, count: float, groups: int, per_example: float) -> float:
    """The largest norm of honest owner values over ``groups`` query groups when one example moves
    them by at most ``per_example`` (L2 over groups), noise included."""
    noise = dp.sigma(VALUE) * per_example * (math.sqrt(groups) + TAIL) if dp.active else 0.0
    return count_ceiling(dp, count) * per_example + noise

