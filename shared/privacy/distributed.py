"""Distributed DP noise for securely aggregated Grams: each client adds a share of Skellam noise.

Continuous Gaussian noise does not survive modular arithmetic, so under
secure aggregation each client adds integer noise to its fixed-point Gram:
symmetric Skellam, ``Poisson(v/2) - Poisson(v/2)``
with variance ``v`` per coordinate (Agarwal, Kairouz and Liu, NeurIPS 2021).
A sum of independent Skellams is Skellam, so ``S`` survivors together add
Skellam noise of variance ``S v``.

Resolution: the noise dwarfs any rounding, so under DP the fixed-point
resolution is coarsened (fewer fraction bits ``f``) until each client's
variance is near :data:`NOISE_VARIANCE_TARGET`, where the Poisson
sampler is exact (:func:`noise_fraction_bits`); the server sends ``f``.

Sizing: the noise must reach the target ``sigma`` even if only the
``threshold`` ``t`` survivors the protocol needs are honest, so each client
adds ``v = (sigma l2)^2 / t``; ``S >= t`` survivors give the Gaussian-equivalent
multiplier ``sigma sqrt(S / t)``. Sensitivities are in integer units of the
fixed-point encoding, rounding included: one example changes a Gram's upper
triangle by at most ``C^2 w`` in L2 (``w phi phi^T`` with ``||phi|| <= C`` and
the kernel weight ``w`` at most its bound, 1 unweighted), which is ``C^2 w 2^f``
after scaling, plus at most 1 per coordinate from rounding, so
``l2 = C^2 w 2^f + sqrt(E)`` and ``l1 = min(k C^2 w 2^f + E, sqrt(E) l2)`` over
the ``E`` coordinates of one release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release
from fedtrak.privacy.budget import GRAM
from fedtrak.privacy.mechanisms import DPSettings, gram_sensitivity_text
from fedtrak.privacy.sampling import NoiseSource
from fedtrak.secagg.fixedpoint import FRACTION_BITS

#: The Poisson sampler (fedtrak's PTRS on a ChaCha20 stream, as numpy's own) loses accuracy for huge means
#: (measured: standard deviation 19% too
#: large at 1e16, right to 0.1% up to 2^40), so a mean above this is drawn as a sum of parts.
POISSON_PART = 2.0**36
#: Fixed-point resolution under DP is chosen so each client's noise variance stays near this.
NOISE_VARIANCE_TARGET = 2.0**37
#: Lowest fraction bits allowed (a resolution of 2^20).
MIN_FRACTION_BITS = -20


@dataclass(frozen=True)
class DistributedNoise:
    """The Skellam noise of one secure-aggregation run's Grams.

    ``dim``: the projection dimension k; ``checkpoints``: Grams per client;
    ``threshold``: the survivors the noise is sized for.
    """

    dim: int
    checkpoints: int
    threshold: int
    fraction_bits: int = FRACTION_BITS

    @property
    def entries(self) -> int:
        """Coordinates of one Gram's upper triangle."""
        return self.dim * (self.dim + 1) // 2

    def sensitivities(self, dp: DPSettings) -> tuple[float, float, int]:
        """``(l2, l1, releases)``: integer-unit sensitivities of one release and how many releases
        (one per checkpoint; one for all of them with joint clipping)."""
        joint = dp.clip_mode == "joint"
        coords = self.entries * (self.checkpoints if joint else 1)
        scaled = dp.gram_sensitivity * 2.0**self.fraction_bits
        l2 = scaled + math.sqrt(coords)
        l1 = min(self.dim * scaled + coords, math.sqrt(coords) * l2)
        return l2, l1, 1 if joint else self.checkpoints

    def client_variance(self, dp: DPSettings) -> float:
        """Variance per coordinate (integer units) each client adds."""
        l2 = self.sensitivities(dp)[0]
        return (dp.sigma(GRAM) * l2) ** 2 / self.threshold

    def effective_sigma(self, dp: DPSettings, survivors: int) -> float:
        """The Gaussian-equivalent noise multiplier of ``survivors`` clients' noise together."""
        return dp.sigma(GRAM) * math.sqrt(survivors / self.threshold)

    def release(self, dp: DPSettings, survivors: int) -> Release:
        """The ledger entry of the aggregated Grams of ``survivors`` clients."""
        l2, l1, count = self.sensitivities(dp)
        joint = dp.clip_mode == "joint"
        return Release("Gram (secure sum, Skellam)", self.effective_sigma(dp, survivors), count,
                       (f"{gram_sensitivity_text(dp)} over all checkpoints jointly" if joint
                        else f"{gram_sensitivity_text(dp)} per checkpoint")
                       + f", in units of 2^-{self.fraction_bits} with rounding", "skellam", l2, l1, GRAM)


def noise_fraction_bits(dim: int, checkpoints: int, threshold: int, dp: DPSettings) -> int:
    """The most fraction bits (at most :data:`FRACTION_BITS`) that keep each client's Skellam variance
    at or below :data:`NOISE_VARIANCE_TARGET`; :data:`FRACTION_BITS` when there is no noise."""
    if not dp.active:
        return FRACTION_BITS
    for bits in range(FRACTION_BITS, MIN_FRACTION_BITS - 1, -1):
        if DistributedNoise(dim, checkpoints, threshold, bits).client_variance(dp) <= NOISE_VARIANCE_TARGET:
            return bits
    return MIN_FRACTION_BITS


def skellam_noise(size: int, variance: float, rng: NoiseSource) -> np.ndarray:
    """``size`` draws of symmetric Skellam noise of ``variance``, as int64.

    Raises:
        FedtrakError: on a negative or non-finite variance, or one whose draws may not fit int64.
    """
    if not (variance >= 0 and math.isfinite(variance)):
        raise FedtrakError(f"Skellam variance must be finite and >= 0, got {variance}")
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    if variance > 2.0**80:
        raise FedtrakError(f"Skellam variance {variance:.3g} is too large to draw; lower the fixed-point "
                           "fraction bits")
    half = variance / 2
    parts = max(1, math.ceil(half / POISSON_PART))
    out = np.zeros(size, dtype=np.int64)
    for _ in range(parts):
        out += rng.poisson(half / parts, size=size).astype(np.int64)
        out -= rng.poisson(half / parts, size=size).astype(np.int64)
    return out
