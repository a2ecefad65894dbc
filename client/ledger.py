"""The device's own privacy ledger: every run it released data in, across runs and servers (an odometer).

A run's accounting covers one run. A server that runs many runs, each with
another cohort, could difference one owner out of their results; only the
device sees every run it takes part in. So each device keeps, on its own disk,
one entry per run it released anything in: the run id, what the run's release
plan costs (epsilon at the run's delta, recomputed here from the job's noise
multiplier, clip norm and plan, not taken from the server's word) and when.

With a budget in its node config (``privacy-budget``: total epsilon;
``privacy-budget-delta``: total delta, default :data:`DEFAULT_BUDGET_DELTA`)
the device refuses, before it releases anything, a job whose plan would take
the spent total past the budget, naming what is spent and what is left. Runs
compose by basic composition (epsilons add, deltas add), which stays valid when
a server chooses each run after seeing the last (a privacy filter). A run
without noise has unbounded epsilon and is refused under any budget.

A step the server sends again is the same run: it is charged once (and its
releases are the stored ones, :meth:`fedtrak.client.store.FeatureStore.released`).
The ledger is a JSON file written atomically, so restarting the device does not
reset it and a crash mid-write leaves the previous ledger.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedtrak.errors import FedtrakError
from fedtrak.job import Job
from fedtrak.privacy.accountant import epsilon
from fedtrak.privacy.plan import run_release_plan
from fedtrak.private_files import private_dir, write_private

#: The ledger's file name in a device's store folder.
LEDGER_FILE = "privacy-ledger.json"
#: Total delta of a budget that states only epsilon: room for ten runs at the default delta 1e-5.
DEFAULT_BUDGET_DELTA = 1e-4


@dataclass(frozen=True)
class Charge:
    """One run's entry: its id, the epsilon and delta its release plan costs, and what it released."""

    run_id: str
    epsilon: float | None  # None: unbounded (no noise)
    delta: float
    releases: list[dict]
    kernel_source: str
    at: float

    @property
    def eps(self) -> float:
        """Epsilon as a number (infinite when unbounded)."""
        return math.inf if self.epsilon is None else self.epsilon


@dataclass(frozen=True)
class Budget:
    """A device's total privacy budget: ``epsilon`` at ``delta``."""

    epsilon: float
    delta: float = DEFAULT_BUDGET_DELTA

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 < self.delta < 1:
            raise FedtrakError(f"privacy budget must have epsilon > 0 and delta in (0, 1), got "
                               f"{self.epsilon} and {self.delta}")


class PrivacyLedger:
    """The charges of one device, kept in ``path`` (a JSON file)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def charges(self) -> list[Charge]:
        """Every run charged so far (none for a new device).

        Raises:
            FedtrakError: if the file exists but is not a ledger (the device refuses to guess).
        """
        if not self.path.is_file():
            return []
        try:
            rows = json.loads(self.path.read_text())["charges"]
            return [Charge(**row) for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FedtrakError(f"privacy ledger {self.path} is unreadable ({exc}): fix or move it; the device "
                               "releases nothing while its ledger is unknown") from exc

    def spent(self) -> tuple[float, float]:
        """Total epsilon and delta charged so far."""
        charges = self.charges()
        return sum(c.eps for c in charges), sum(c.delta for c in charges)

    def charge(self, job: Job, budget: Budget | None) -> Charge:
        """Charge ``job``'s run (once: a run already charged costs nothing new), refusing it when it
        would take the total past ``budget``. Returns the run's charge.

        Raises:
            FedtrakError: naming the run's cost, what is spent and what is left.
        """
        charges = self.charges()
        for c in charges:
            if c.run_id == job.run_id:
                return c
        new = job_charge(job)
        eps, delta = sum(c.eps for c in charges), sum(c.delta for c in charges)
        if budget is not None and (eps + new.eps > budget.epsilon + 1e-9 or delta + new.delta > budget.delta * (1 + 1e-9)):
            cost = "unbounded epsilon (it adds no noise)" if new.epsilon is None else \
                f"epsilon {new.epsilon:.4g} at delta {new.delta:g}"
            raise FedtrakError(
                f"privacy budget: run {job.run_id} would cost {cost}; this device has spent epsilon {eps:.4g} "
                f"and delta {delta:g} in {len(charges)} run(s) of its budget epsilon {budget.epsilon:g} at delta "
                f"{budget.delta:g}, leaving epsilon {max(round(budget.epsilon - eps, 6), 0):g} and delta "
                f"{max(budget.delta - delta, 0):g}: the job is refused")
        self._write([*charges, new])
        return new

    def _write(self, charges: list[Charge]) -> None:
        private_dir(self.path.parent)
        write_private(self.path, json.dumps({"charges": [asdict(c) for c in charges]}, indent=1).encode())


def job_charge(job: Job) -> Charge:
    """What ``job``'s run costs one of its examples, from the job's own noise, clip norm and
    release plan (secure aggregation's Grams at the planned threshold, the least it is sized for)."""
    dp = job.dp()
    plan = run_release_plan(job.settings, dp, job.resolved.proj_dim, source=job.resolved.kernel_source)
    eps = epsilon(plan, dp.delta) if dp.active else math.inf
    return Charge(job.run_id, None if math.isinf(eps) else float(eps), dp.delta if dp.active else 0.0,
                  [r.describe() for r in plan] if dp.active else [], job.resolved.kernel_source, time.time())


def describe_ledger(ledger: PrivacyLedger, budget: Budget | None) -> dict:
    """The ledger as ``fedtrak device check`` shows it: every charge, the totals and what is left."""
    charges = ledger.charges()
    eps, delta = sum(c.eps for c in charges), sum(c.delta for c in charges)
    out = {"path": str(ledger.path), "runs": [{"run_id": c.run_id, "epsilon": c.epsilon, "delta": c.delta,
                                                "kernel_source": c.kernel_source,
                                                "releases": [r["what"] for r in c.releases]} for c in charges],
           "spent_epsilon": None if math.isinf(eps) else eps, "spent_delta": delta}
    if budget is not None:
        out.update(budget_epsilon=budget.epsilon, budget_delta=budget.delta,
                   left_epsilon=max(budget.epsilon - eps, 0.0), left_delta=max(budget.delta - delta, 0.0))
    return out
