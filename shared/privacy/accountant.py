"""Privacy accounting of a run's releases: Gaussian mechanisms at sample rate 1.

Every release an example takes part in is a Gaussian mechanism with noise
multiplier ``sigma`` (noise standard deviation over L2 sensitivity). They
compose exactly under Gaussian differential privacy: ``mu = sqrt(sum 1 /
sigma_i^2)``, and ``epsilon = eps_from_mu(mu, delta)`` (Dong, Roth and Su;
Opacus's ``opacus.accountants.analysis.gdp``). Opacus's PRV accountant
gives an independent numerical cross-check. Do not use Opacus's
``GaussianAccountant`` at sample rate 1: it is far too loose there
(DESIGN.md section 4).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.gdp import eps_from_mu
from scipy.stats import norm

from shared.errors import FedtrakError


@dataclass(frozen=True)
class Release:
    """One ledger entry: ``count`` Gaussian mechanisms of noise multiplier ``sigma``.

    ``sensitivity`` says in words what one example can change (for the
    summary); ``what`` names the released quantity.
    """

    what: str
    sigma: float
    count: int = 1
    sensitivity: str = ""

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


def epsilon(releases: Sequence[Release], delta: float) -> float:
    """Exact epsilon of the composed releases at ``delta`` (``inf`` if one is not noised)."""
    return epsilon_from_mu(gdp_mu(releases), delta)


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
