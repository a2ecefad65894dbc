"""Privacy accounting of a run's releases: Gaussian (and Skellam) mechanisms at sample rate 1.

Every release an example takes part in is a Gaussian mechanism with noise
multiplier ``sigma`` (noise standard deviation over L2 sensitivity). They
compose exactly under Gaussian differential privacy: ``mu = sqrt(sum 1 /
sigma_i^2)``, and ``epsilon = eps_from_mu(mu, delta)`` (Dong, Roth and Su;
Opacus's ``opacus.accountants.analysis.gdp``). Opacus's PRV accountant
gives an independent numerical cross-check. Do not use Opacus's
``GaussianAccountant`` at sample rate 1: it is far too loose there.

Under secure aggregation the Grams carry integer Skellam noise instead
(:mod:`fedtrak.privacy.distributed`), which is not a Gaussian mechanism. A plan
with a Skellam entry is composed in Renyi DP instead: the Skellam bound of
Agarwal, Kairouz and Liu (NeurIPS 2021) for those entries, ``alpha /
(2 sigma^2)`` for the Gaussian ones, converted to ``(epsilon, delta)`` with
Opacus's ``get_privacy_spent`` (Balle et al. 2020). RDP is a few percent
looser than the exact Gaussian composition.

Opacus is imported where it is used, not with this module: it takes seconds to load, and every
process that imports fedtrak's apps (each simulated client, each ClientApp process) would pay that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from fedtrak.errors import FedtrakError


@dataclass(frozen=True)
class Release:
    """One ledger entry: ``count`` mechanisms of noise multiplier ``sigma``.

    ``sensitivity`` says in words what one example can change (for the
    summary); ``what`` names the released quantity. ``mechanism`` names its
    accountant (:data:`MECHANISMS`): ``"gaussian"``; ``"skellam"``, integer
    Skellam noise of variance ``(sigma l2)^2`` per coordinate, with ``l2`` and
    ``l1`` its sensitivities in integer units (``sigma`` is then the multiplier
    of the Gaussian with the same variance); ``"subsampled-gaussian"``, ``count``
    DP-SGD steps of Poisson ``sample_rate``. ``kind``: the kind of release
    (:mod:`fedtrak.privacy.kinds`).
    """

    what: str
    sigma: float
    count: int = 1
    sensitivity: str = ""
    mechanism: str = "gaussian"
    l2: float = 0.0
    l1: float = 0.0
    kind: str = ""
    sample_rate: float = 1.0

    def rdp(self, alpha: int) -> float:
        """Renyi DP of order ``alpha`` of the ``count`` mechanisms together."""
        return float(accountant_of(self.mechanism).rdp(self, [alpha])[0])

    def describe(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


class Mechanism:
    """An accountant of one kind of mechanism: its Renyi DP, and its mu-GDP where that is exact."""

    def rdp(self, r: Release, orders: Sequence[int]) -> list[float]:
        """Renyi DP of ``r``'s ``count`` mechanisms at each order (``inf`` without noise)."""
        raise NotImplementedError

    def gdp_mu_squared(self, r: Release) -> float | None:
        """``mu^2`` of ``r`` under Gaussian DP when that composition is exact for it, else ``None``."""
        return None


class GaussianMechanism(Mechanism):
    """The Gaussian mechanism: ``alpha / (2 sigma^2)`` per use; exactly ``1 / sigma^2`` of ``mu^2``."""

    def rdp(self, r: Release, orders: Sequence[int]) -> list[float]:
        return [r.count * a / (2 * r.sigma**2) if r.sigma > 0 else math.inf for a in orders]

    def gdp_mu_squared(self, r: Release) -> float | None:
        return r.count / r.sigma**2 if r.sigma > 0 else math.inf


class SkellamMechanism(Mechanism):
    """Multi-dimensional Skellam noise (Agarwal, Kairouz and Liu, NeurIPS 2021)."""

    def rdp(self, r: Release, orders: Sequence[int]) -> list[float]:
        if not r.sigma > 0:
            return [math.inf] * len(orders)
        mu = (r.sigma * r.l2) ** 2
        return [r.count * (a / (2 * r.sigma**2) + min(((2 * a - 1) * r.l2**2 + 6 * r.l1) / (4 * mu**2),
                                                       3 * r.l1 / (2 * mu))) for a in orders]


#: Highest order at which the subsampled Gaussian's RDP is computed (Opacus's series grows costly
#: beyond it; an infinite value at higher orders is a valid, unused bound for epsilon >= 0.1).
SUBSAMPLED_MAX_ORDER = 512


class SubsampledGaussianMechanism(Mechanism):
    """DP-SGD steps: the Poisson-subsampled Gaussian mechanism (Opacus's RDP bound)."""

    def rdp(self, r: Release, orders: Sequence[int]) -> list[float]:
        if not r.sigma > 0:
            return [math.inf] * len(orders)
        from opacus.accountants.analysis.rdp import compute_rdp

        low = [a for a in orders if a <= SUBSAMPLED_MAX_ORDER]
        values = compute_rdp(q=min(r.sample_rate, 1.0), noise_multiplier=r.sigma, steps=r.count, orders=low)
        return [float(v) for v in values] + [math.inf] * (len(orders) - len(low))


#: The accountants by mechanism name: the extension point for a new mechanism.
MECHANISMS: dict[str, Mechanism] = {"gaussian": GaussianMechanism(), "skellam": SkellamMechanism(),
                                    "subsampled-gaussian": SubsampledGaussianMechanism()}


def accountant_of(mechanism: str) -> Mechanism:
    """The accountant of ``mechanism``.

    Raises:
        FedtrakError: for a mechanism no accountant knows (it is never guessed).
    """
    try:
        return MECHANISMS[mechanism]
    except KeyError:
        raise FedtrakError(f"no accountant for mechanism {mechanism!r}; known: {', '.join(MECHANISMS)}") from None


def check_delta(delta: float) -> None:
    """Raise FedtrakError unless ``0 < delta < 1``."""
    if not 0 < delta < 1:
        raise FedtrakError(f"delta must lie in (0, 1), got {delta}")


def gdp_mu(releases: Sequence[Release]) -> float:
    """The composed mu of Gaussian releases (0 for none; ``inf`` if one has no noise).

    Raises:
        FedtrakError: if a release's mechanism does not compose exactly under Gaussian DP.
    """
    total = 0.0
    for r in releases:
        part = accountant_of(r.mechanism).gdp_mu_squared(r)
        if part is None:
            raise FedtrakError(f"release {r.what!r} ({r.mechanism}) has no exact Gaussian-DP composition")
        total += part
    return math.sqrt(total)


#: Largest mu handled (epsilon about 200 at delta 1e-5); Opacus brackets epsilon in [0, 500].
MAX_MU = 20.0


def epsilon_from_mu(mu: float, delta: float) -> float:
    """Epsilon of mu-GDP at ``delta``: 0 when even epsilon 0 meets ``delta``; ``inf`` beyond :data:`MAX_MU`."""
    check_delta(delta)
    if math.isinf(mu) or mu > MAX_MU:
        return math.inf
    if math.erf(mu / (2 * math.sqrt(2))) <= delta:  # delta(epsilon = 0) of mu-GDP: 2 Phi(mu / 2) - 1
        return 0.0
    from opacus.accountants.analysis.gdp import eps_from_mu

    return float(eps_from_mu(mu=mu, delta=delta))


#: Integer Renyi orders of the RDP composition (the Skellam bound holds for integer orders).
RDP_ORDERS = tuple(range(2, 64)) + tuple(range(64, 257, 4)) + tuple(range(256, 4097, 64))


def epsilon(releases: Sequence[Release], delta: float) -> float:
    """Epsilon of the composed releases at ``delta`` (``inf`` if one is not noised): exact
    Gaussian composition when every mechanism has one, else Renyi DP over :data:`RDP_ORDERS`.

    Raises:
        FedtrakError: on a mechanism no accountant knows.
    """
    accountants = [accountant_of(r.mechanism) for r in releases]
    if all(a.gdp_mu_squared(r) is not None for a, r in zip(accountants, releases)):
        return epsilon_from_mu(gdp_mu(releases), delta)
    per = [a.rdp(r, RDP_ORDERS) for a, r in zip(accountants, releases)]
    return _rdp_epsilon([sum(p[i] for p in per) for i in range(len(RDP_ORDERS))], delta)


def _rdp_epsilon(rdp: Sequence[float], delta: float) -> float:
    """Epsilon at ``delta`` of Renyi DP ``rdp`` over :data:`RDP_ORDERS`, from the orders where it is
    finite (``inf`` if it is nowhere)."""
    check_delta(delta)
    finite = [(a, v) for a, v in zip(RDP_ORDERS, rdp) if math.isfinite(v)]
    if not finite:
        return math.inf
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": the bound still holds
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(get_privacy_spent(orders=[a for a, _ in finite], rdp=[v for _, v in finite], delta=delta)[0])


def training_release(noise_multiplier: float, sample_rate: float, steps: int) -> Release:
    """The ledger entry of ``steps`` DP-SGD steps at Poisson ``sample_rate``."""
    return Release("model updates (DP-SGD)", noise_multiplier, steps, "the DP-SGD clip norm per step",
                   "subsampled-gaussian", kind="update", sample_rate=sample_rate)


def epsilon_with_training(releases: Sequence[Release], delta: float, noise_multiplier: float,
                          sample_rate: float, steps: int) -> float:
    """Epsilon of an example that trained the checkpoints by DP-SGD (``steps`` Poisson-subsampled
    Gaussian steps at ``sample_rate``) and then took part in the attribution's ``releases``: the two
    composed in Renyi DP (Opacus's subsampled-Gaussian bound for training, each release's own)."""
    return epsilon([*releases, training_release(noise_multiplier, sample_rate, steps)], delta)


def prv_epsilon(releases: Sequence[Release], delta: float) -> float:
    """The same composition through Opacus's PRV accountant (a numerical cross-check)."""
    check_delta(delta)
    if any(not r.sigma > 0 for r in releases):
        return math.inf
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(float(r.sigma), float(r.sample_rate), int(r.count)) for r in releases]
    with warnings.catch_warnings():  # its log(1 - q) at q = 1, and its RDP domain bound, warn harmlessly
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(acc.get_epsilon(delta=delta))


def sigma_for_plan(target: float, plan: Callable[[float], Sequence[Release]], delta: float) -> float:
    """The smallest noise multiplier ``sigma`` whose ``plan(sigma)`` costs at most ``target`` epsilon.

    Raises:
        FedtrakError: on a non-positive target or a bad delta.
    """
    check_delta(delta)
    if not target > 0:
        raise FedtrakError(f"epsilon must be positive, got {target}")
    if math.isinf(target):
        return 0.0
    lo, hi = 1e-3, 1e4  # epsilon falls as sigma rises
    if epsilon(plan(hi), delta) > target:
        raise FedtrakError(f"epsilon {target} needs a noise multiplier above {hi:g}")
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if epsilon(plan(mid), delta) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return hi


def sigma_for_epsilon(target: float, num_releases: int, delta: float) -> float:
    """The noise multiplier that gives ``num_releases`` equal releases exactly ``target`` epsilon.

    Raises:
        FedtrakError: on a non-positive target or release count, or a bad delta.
    """
    check_delta(delta)
    if not target > 0:
        raise FedtrakError(f"epsilon must be positive, got {target}")
    if num_releases < 1:
        raise FedtrakError(f"need at least one release, got {num_releases}")
    if math.isinf(target):
        return 0.0
    lo, hi = 1e-6, MAX_MU  # mu bounds: epsilon rises with mu
    if epsilon_from_mu(hi, delta) < target:
        raise FedtrakError(f"epsilon {target} is beyond what this accountant handles (mu <= {MAX_MU})")
    for _ in range(200):
        mid = (lo + hi) / 2
        if epsilon_from_mu(mid, delta) < target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(num_releases) / hi
