"""The noised releases of a client, each beside the ledger entry that accounts for it.

Adjacency: adding or removing one training example.
Every projected feature is clipped to L2 norm ``C`` *after* projection, on
the client, before anything is computed from it: per checkpoint (each
``||phi_m,i|| <= C``) or jointly (``sum_m ||phi_m,i||^2 <= C^2``). Then:

============================  ===================================  ====================
release (per client)           noise (std)                          sensitivity
============================  ===================================  ====================
norm histogram (optional)      ``sigma`` per bin                     1 (see ``quantile``)
Gram of checkpoint m           ``sigma C^2`` on the upper triangle   ``C^2`` (jointly: all
                               (Analyze Gauss), mirrored             M Grams together)
example count                  ``sigma``                             1
owner summary of checkpoint m  ``sigma C`` per coordinate             ``C`` (jointly: all M)
suspect count                  ``sigma``                             1 (without public data: the
  (else self-influence sum)    (else ``sigma C^2 mean_m ||K_m^-1||``) self-influence sum, ``C^2
                                                                    mean_m ||K_m^-1||_2``)
owner values (``G`` groups)    ``sigma B`` per group (else ``sigma   ``B``: each example's share
                               C mean_m ||Ubar_m||_2``)             clipped to it (L2 over groups)
features (``features`` mode)   ``sigma C`` per coordinate            ``2C`` (replace one example:
                                                                    the count is exact)
out-to-loss weights            ``sigma``, then clamped to [0, 1]     1
============================  ===================================  ====================

(``||.||_2`` is the spectral norm; ``1 - p <= 1`` bounds the weights.) The
owner summary ``s_c,m = sum_i qbar_i phi_m,i`` (k numbers) stands in for the
owner's per-query totals: the server computes every total from it, so the
privacy cost is paid once per checkpoint, not once per query. Each
is a Gaussian mechanism with noise multiplier ``sigma``; :func:`release_plan`
lists what a run's example takes part in; each kind of release has its own
``sigma`` (``DPSettings.sigma``), from the run's budget split
(:mod:`fedtrak.privacy.budget`). Without secure aggregation each
client adds the full ``sigma``. Noise comes from a ChaCha20 stream keyed by
the operating system's entropy (never from a run seed the server knows), on a
power-of-two grid so that no release leaks through its low bits
(:mod:`fedtrak.privacy.sampling`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtrak.config.settings import CLIP_MODES, DEFAULT_CLIP_MODE, DEFAULT_DELTA
from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release, check_delta
from fedtrak.privacy.budget import EQUAL_SCALES, Scales
from fedtrak.privacy.kinds import (
    COUNT,
    FEATURES,
    GRAM,
    KINDS,
    SUMMARY,
    SUSPECTS,
    VALUE,
    planned_counts,
)
from fedtrak.privacy.sampling import NoiseSource, SecureRandom, add_gaussian

#: lambda is at least this times ``sigma C^2 sqrt(k * clients)``: the summed Gram noise is a
#: symmetric Gaussian matrix whose spectral norm is about 2 sigma C^2 sqrt(k * clients).
NOISE_FLOOR_FACTOR = 2.2


@dataclass(frozen=True)
class DPSettings:
    """How a run's releases are privatized: ``sigma = 0`` means not at all.

    ``gram_weight`` bounds the kernel's per-example weight (1 for the plain ``Phi^T Phi``; the
    model output's curvature bound, 1/4 for the margin, for the curvature-weighted kernel): one
    example moves a Gram by at most ``C^2 gram_weight``, its sensitivity. ``scales``: each kind of
    release's noise multiplier relative to ``noise_multiplier`` (:class:`fedtrak.privacy.budget.Scales`;
    a kind not named, or none at all, gets ``noise_multiplier``). ``clip_mode`` and ``delta`` default
    to the settings' defaults (:mod:`fedtrak.config.settings`).
    """

    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    clip_mode: str = DEFAULT_CLIP_MODE
    delta: float = DEFAULT_DELTA
    gram_weight: float = 1.0
    scales: Scales = EQUAL_SCALES

    def sigma(self, kind: str) -> float:
        """The noise multiplier of one release of ``kind``."""
        return self.noise_multiplier * self.scales.get(kind)

    @property
    def active(self) -> bool:
        """Whether releases are clipped and noised."""
        return self.noise_multiplier > 0

    @property
    def gram_sensitivity(self) -> float:
        """How far one example can move a Gram: ``C^2`` times the weight bound."""
        return self.clip_norm**2 * self.gram_weight

    def validate(self) -> None:
        """Raise FedtrakError on a negative noise multiplier, a non-positive clip norm
        (when active), an unknown clip mode or a delta outside (0, 1)."""
        if not self.noise_multiplier >= 0 or math.isinf(self.noise_multiplier):
            raise FedtrakError(f"noise multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if self.active and not self.clip_norm > 0:
            raise FedtrakError(f"clip norm must be positive, got {self.clip_norm}")
        if self.clip_mode not in CLIP_MODES:
            raise FedtrakError(f"clip mode {self.clip_mode!r}: use one of {', '.join(CLIP_MODES)}")
        if not 0 < self.gram_weight <= 1:
            raise FedtrakError(f"the kernel weight bound must lie in (0, 1], got {self.gram_weight}")
        check_delta(self.delta)
        if not isinstance(self.scales, Scales) or not all(v > 0 for _, v in self.scales.pairs):
            raise FedtrakError(f"budget scales must be positive, got {self.scales!r}")


def noise_rng() -> SecureRandom:
    """The source of a release's noise: a ChaCha20 stream keyed by the operating system's entropy
    (:mod:`fedtrak.privacy.sampling`)."""
    return SecureRandom()


#: Features are clipped to ``C (1 - CLIP_MARGIN)``: scaling float32 rows overshoots the float64 target
#: by up to about 6e-8 relative, which must not take a row past ``C``.
CLIP_MARGIN = 1e-6


def clip_scales(norms: np.ndarray, clip_norm: float, mode: str) -> np.ndarray:
    """Per-example scale factors ``(M, n)`` that clip features of norms ``(M, n)`` to ``clip_norm``
    (a hair below it, :data:`CLIP_MARGIN`, so float32 rounding never exceeds it)."""
    norms = np.asarray(norms, dtype=np.float64)
    target = clip_norm * (1 - CLIP_MARGIN)
    if mode == "joint":
        total = np.sqrt((norms**2).sum(axis=0, keepdims=True))
        return np.broadcast_to(np.minimum(1.0, target / np.maximum(total, 1e-300)), norms.shape).copy()
    return np.minimum(1.0, target / np.maximum(norms, 1e-300))


def noised_gram(matrix: np.ndarray, dp: DPSettings, rng: NoiseSource) -> np.ndarray:
    """One Gram released: ``N(0, (sigma C^2 w)^2)`` on the upper triangle, mirrored (``w`` the kernel
    weight bound, 1 for the plain Gram), on the grid of :func:`fedtrak.privacy.sampling.add_gaussian`."""
    noised = add_gaussian(matrix, dp.sigma(GRAM) * dp.gram_sensitivity, rng)
    return np.triu(noised) + np.triu(noised, 1).T


def noised_count(count: int, dp: DPSettings, rng: NoiseSource) -> float:
    """The example count with ``N(0, sigma^2)`` noise."""
    return float(add_gaussian(count, dp.sigma(COUNT), rng))


def spectral_norm(matrix: np.ndarray) -> float:
    """The largest singular value."""
    return float(np.linalg.norm(np.asarray(matrix, dtype=np.float64), ord=2))


def owner_summaries(features: Sequence[np.ndarray], mean_out_to_loss: np.ndarray) -> np.ndarray:
    """Owner summaries ``s_m = sum_i qbar_i phi_m,i`` ``(M, k)``."""
    q = np.asarray(mean_out_to_loss, dtype=np.float64)
    return np.stack([q @ np.asarray(f, dtype=np.float64) for f in features])


def noised_owner_summaries(summaries: np.ndarray, dp: DPSettings, rng: NoiseSource) -> np.ndarray:
    """Owner summaries (:func:`owner_summaries` of clipped features) plus ``N(0, (sigma C)^2)``
    per coordinate (sensitivity ``C`` per checkpoint, as ``qbar <= 1``).

    The server turns them into the owner's total for any query, now or later,
    by post-processing: ``mean_m U_m s_m``.
    """
    return add_gaussian(summaries, dp.sigma(SUMMARY) * dp.clip_norm, rng)


def summary_ridge(dp: DPSettings, owners: int) -> float:
    """The ridge the server adds to each kernel before it turns noised owner summaries into owner
    totals: ``(sigma_s C)^2 owners``. An owner's summary ``s`` is a sum of ``n_c`` of the ``n``
    examples' features, whose spread across owners is about ``(n_c / n) K``; the noise is
    ``(sigma_s C)^2 I``. The best linear estimate of the total ``phi(x)^T K^-1 s`` from ``s + noise``
    (a Wiener filter) is then ``phi(x)^T (K + (sigma_s C)^2 n / n_c I)^-1 (s + noise)``: the
    directions where owners differ less than the noise are shrunk instead of amplified."""
    return (dp.sigma(SUMMARY) * dp.clip_norm) ** 2 * owners


def owner_values(summaries: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """An owner's value per query group ``(G,)``: ``mean_m Ubar_m s_m``, ``Ubar_m`` ``(G, k)`` the
    group's summed preconditioned queries and ``s_m`` the owner summary (its total attribution
    summed over the group's queries)."""
    return np.mean([np.asarray(g, dtype=np.float64) @ s for g, s in zip(groups, summaries)], axis=0)


def owner_value_sensitivity(groups: Sequence[np.ndarray], dp: DPSettings) -> float:
    """How far one example moves an owner's values (L2 over groups): it moves each summary ``s_m``
    by at most ``C`` (``qbar <= 1``), so ``C mean_m ||Ubar_m||_2``; jointly clipped,
    ``C sqrt(sum_m ||Ubar_m||_2^2) / M``."""
    norms = np.array([spectral_norm(g) for g in groups])
    if dp.clip_mode == "joint":
        return dp.clip_norm * float(np.sqrt(np.sum(norms**2))) / len(norms)
    return dp.clip_norm * float(norms.mean())


def noised_owner_values(values: np.ndarray, groups: Sequence[np.ndarray], dp: DPSettings,
                        rng: NoiseSource, value_clip: float = 0.0) -> np.ndarray:
    """Owner values plus ``N(0, (sigma Delta)^2)`` per group: one Gaussian release, whatever the
    groups. ``Delta`` is ``value_clip`` where each example's contribution was clipped to it, else
    the sensitivity of values made of clipped features (:func:`owner_value_sensitivity`)."""
    sens = value_clip if value_clip > 0 else owner_value_sensitivity(groups, dp)
    return add_gaussian(values, dp.sigma(VALUE) * sens, rng)


#: The server bounds one example's share of an owner value by this quantile of its public examples'
#: shares, and counts an example as a suspect (likely mislabeled) when its self-influence exceeds
#: this quantile of the public examples' own (held-out) self-influence.
SHARE_BOUND_QUANTILE = 0.95


def value_contributions(features: Sequence[np.ndarray], mean_out_to_loss: np.ndarray,
                        groups: Sequence[np.ndarray]) -> np.ndarray:
    """Each example's contribution to the owner values ``(n, G)``: ``qbar_i mean_m Ubar_m phi_m,i``
    (its scores summed over each group's queries)."""
    terms = np.mean([np.asarray(f, dtype=np.float64) @ np.asarray(g, dtype=np.float64).T
                     for f, g in zip(features, groups)], axis=0)
    return terms * np.asarray(mean_out_to_loss, dtype=np.float64)[:, None]


def clip_rows(rows: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most ``bound``."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def noised_self_influence_sum(total: float, kernel_inverses: Sequence[np.ndarray], dp: DPSettings,
                              rng: NoiseSource) -> float:
    """An owner's summed self-influence (of clipped features) plus noise at its sensitivity
    ``C^2 mean_m ||K_m^-1||_2``: the screening release where the server holds no public data."""
    sens = dp.clip_norm**2 * float(np.mean([spectral_norm(k) for k in kernel_inverses]))
    return float(add_gaussian(total, dp.sigma(SUSPECTS) * sens, rng))


def noised_suspect_count(count: int, dp: DPSettings, rng: NoiseSource) -> float:
    """An owner's count of suspects (its examples whose self-influence exceeds the server's threshold)
    plus ``N(0, sigma^2)``: one example adds or removes at most one suspect."""
    return float(add_gaussian(count, dp.sigma(SUSPECTS), rng))


def public_bound(values: np.ndarray) -> float:
    """A bound the server sets on one example's share of a release from its public examples' shares
    (their size at :data:`SHARE_BOUND_QUANTILE`): data it holds, so choosing it costs no privacy."""
    return float(np.quantile(np.abs(values), SHARE_BOUND_QUANTILE))


def noised_features(features: np.ndarray, out_to_loss: np.ndarray, dp: DPSettings,
                    rng: NoiseSource) -> tuple[np.ndarray, np.ndarray]:
    """Clipped features plus ``N(0, (sigma C)^2)`` per coordinate, and weights plus
    ``N(0, sigma^2)`` clamped to [0, 1]."""
    sigma = dp.sigma(FEATURES)
    f = add_gaussian(features, sigma * dp.clip_norm, rng)
    q = np.clip(add_gaussian(out_to_loss, sigma, rng), 0.0, 1.0)
    return f.astype(np.float32), q.astype(np.float32)


def noised_curvature(curvature: np.ndarray, dp: DPSettings, rng: NoiseSource) -> np.ndarray:
    """Curvature weights (features mode, weighted kernel) plus ``N(0, (sigma w)^2)``, clamped to
    ``[0, w]`` (``w`` the weight bound, the sensitivity of one weight)."""
    noised = add_gaussian(curvature, dp.sigma(FEATURES) * dp.gram_weight, rng)
    return np.clip(noised, 0.0, dp.gram_weight).astype(np.float32)


def noise_floor(dp: DPSettings, dim: int, noise_copies: float) -> float:
    """The smallest lambda that keeps a noised kernel positive definite. ``noise_copies``: the
    summed noise's variance in units of ``(sigma C^2 w)^2`` (the number of clients without secure
    aggregation; survivors over threshold with it)."""
    return NOISE_FLOOR_FACTOR * dp.sigma(GRAM) * dp.gram_sensitivity * math.sqrt(dim * noise_copies)


def release_plan(mode: str, checkpoints: int, dp: DPSettings, self_influence: bool,
                 clip_quantile: bool = False, gram: Release | None = None, weighted: bool = False,
                 gram_released: bool = True, owner_value: bool = False) -> list[Release]:
    """The mechanisms each training example takes part in during one run, kind by kind
    (:func:`planned_counts`; ``gram``: the Grams' entry when they are not one Gaussian release per
    client, as under secure aggregation; ``weighted``: the kernel is curvature-weighted, so features
    mode also releases the weights; ``gram_released`` false: the server's kernel is public, no Gram
    is released; ``owner_value``: owners also release their values over query groups)."""
    joint = dp.clip_mode == "joint"
    counts = planned_counts(mode, checkpoints, joint, self_influence, clip_quantile, gram_released, owner_value)
    jointly = " over all checkpoints jointly" if joint else " per checkpoint"
    plan: list[Release] = []
    for name, count in counts.items():
        if not count:
            continue
        k, sigma = KINDS[name], dp.sigma(name)
        if name == FEATURES:  # presence is not hidden: replace-one adjacency, 2C per row
            plan += [Release("features", sigma / 2, count, "2C per checkpoint (replace one example: its row "
                             "moves by up to 2C; presence is not hidden)", kind=name),
                     Release("out-to-loss weights", sigma, count, "1 per checkpoint", kind=name)]
            if weighted:
                plan.append(Release("curvature weights", sigma, count, f"{dp.gram_weight:g} per checkpoint",
                                    kind=name))
        elif name == GRAM and gram is not None:
            plan.append(gram)
        else:
            words = {GRAM: gram_sensitivity_text(dp) + jointly, SUMMARY: "C" + jointly}.get(name, k.sensitivity)
            plan.append(Release(k.title, sigma, count, words, k.mechanism, kind=name))
    return plan


def gram_sensitivity_text(dp: DPSettings) -> str:
    """A Gram release's sensitivity in words: ``C^2``, or ``C^2 x 0.25`` for a weighted kernel."""
    return "C^2" if dp.gram_weight == 1 else f"C^2 x {dp.gram_weight:g}"
