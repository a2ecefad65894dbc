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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.gdp import eps_from_mu
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.stats import norm

from fedtrak.errors import FedtrakError


@dataclass(frozen=True)
class Release:
    """One ledger entry: ``count`` Gaussian mechanisms of noise multiplier ``sigma``.

    ``sensitivity`` says in words what one example can change (for the
    summary); ``what`` names the released quantity. A ``"skellam"`` entry is
    integer Skellam noise of variance ``(sigma l2)^2`` per coordinate, with
    ``l2`` and ``l1`` its sensitivities in integer units (``sigma`` is then the
    multiplier of the Gaussian with the same variance). ``kind``: the budget's name for this
    kind of release (:mod:`fedtrak.privacy.budget`).
    """

    what: str
    sigma: float
    count: int = 1
    sensitivity: str = ""
    mechanism: str = "gaussian"
    l2: float = 0.0
    l1: float = 0.0
    kind: str = ""

    def rdp(self, alpha: int) -> float:
        """Renyi DP of order ``alpha`` of the ``count`` mechanisms together."""
        if not self.sigma > 0:
            return math.inf
        gaussian = alpha / (2 * self.sigma**2)
        if self.mechanism == "gaussian":
            return self.count * gaussian
        mu = (self.sigma * self.l2) ** 2  # Agarwal, Kairouz and Liu (2021), multi-dimensional Skellam
        extra = min(((2 * alpha - 1) * self.l2**2 + 6 * self.l1) / (4 * mu**2), 3 * self.l1 / (2 * mu))
        return self.count * (gaussian + extra)

    def describe(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def check_delta(delta: float) -> None:
    """Raise FedtrakError unless ``0 < delta < 1``."""
    if not 0 < delta < 1:
        raise FedtrakError(f"delta must lie in (0, 1), got {delta}")


def gdp_mu(releases: Sequence[Release]) -> float:
    """The composed mu of the releases (0 for none; ``inf`` if one has no noise)."""
    total = 0.0
    for r in releases:
        if not r.sigma > 0:
            return math.inf
        total += r.count / r.sigma**2
    return math.sqrt(total)


#: Largest mu handled (epsilon about 200 at delta 1e-5); Opacus brackets epsilon in [0, 500].
MAX_MU = 20.0


def epsilon_from_mu(mu: float, delta: float) -> float:
    """Epsilon of mu-GDP at ``delta``: 0 when even epsilon 0 meets ``delta``; ``inf`` beyond :data:`MAX_MU`."""
    check_delta(delta)
    if math.isinf(mu) or mu > MAX_MU:
        return math.inf
    if 2 * norm.cdf(mu / 2) - 1 <= delta:  # delta(epsilon = 0) of mu-GDP
        return 0.0
    return float(eps_from_mu(mu=mu, delta=delta))


#: Integer Renyi orders of the RDP composition (the Skellam bound holds for integer orders).
RDP_ORDERS = tuple(range(2, 64)) + tuple(range(64, 257, 4)) + tuple(range(256, 4097, 64))


def epsilon(releases: Sequence[Release], delta: float) -> float:
    """Epsilon of the composed releases at ``delta`` (``inf`` if one is not noised): exact
    Gaussian composition, or Renyi DP when a release is a Skellam mechanism."""
    if all(r.mechanism == "gaussian" for r in releases):
        return epsilon_from_mu(gdp_mu(releases), delta)
    return _rdp_epsilon([sum(r.rdp(a) for r in releases) for a in RDP_ORDERS], delta)


def _rdp_epsilon(rdp: Sequence[float], delta: float) -> float:
    """Epsilon at ``delta`` of Renyi DP ``rdp`` over :data:`RDP_ORDERS` (``inf`` if any order's is)."""
    check_delta(delta)
    if any(math.isinf(v) for v in rdp):
        return math.inf
    with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": the bound still holds
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(get_privacy_spent(orders=list(RDP_ORDERS), rdp=list(rdp), delta=delta)[0])


def epsilon_with_training(releases: Sequence[Release], delta: float, noise_multiplier: float,
                          sample_rate: float, steps: int) -> float:
    """Epsilon of an example that trained the checkpoints by DP-SGD (``steps`` Poisson-subsampled
    Gaussian steps at ``sample_rate``) and then took part in the attribution's ``releases``: the two
    composed in Renyi DP (Opacus's subsampled-Gaussian bound for training, each release's own)."""
    if not noise_multiplier > 0:
        return math.inf
    training = compute_rdp(q=min(sample_rate, 1.0), noise_multiplier=noise_multiplier, steps=steps,
                           orders=list(RDP_ORDERS))
    return _rdp_epsilon([float(t) + sum(r.rdp(a) for r in releases) for t, a in zip(training, RDP_ORDERS)], delta)


def prv_epsilon(releases: Sequence[Release], delta: float) -> float:
    """The same composition through Opacus's PRV accountant (a numerical cross-check)."""
    check_delta(delta)
    if any(not r.sigma > 0 for r in releases):
        return math.inf
    acc = PRVAccountant()
    acc.history = [(float(r.sigma), 1.0, int(r.count)) for r in releases]
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
