"""The device's own privacy ledger: every release it made, across runs and servers (an odometer).

A run's accounting covers one run. A server that runs many runs, each with
another cohort, could difference one owner out of their results; only the
device sees every run it takes part in. So each device keeps, on its own disk,
one entry per run it was contacted for:

- at first contact, the run id bound to the digest of the job it came with
  (:func:`fedtrak.client.contract.job_digest`): a later message of that run id
  with another job is refused (:meth:`PrivacyLedger.bind`);
- then each release as it leaves (:meth:`PrivacyLedger.charge`): its item
  (``gram-0``, ``count``, ``update-0-3``, ...) and its ledger entry, recomputed
  on the device from the bound job and its own data (never the server's word).
  A run's epsilon is its releases composed (exact Gaussian DP, or Renyi DP
  with training and Skellam noise); a run that released nothing costs nothing.

With a budget in its node config (``privacy-budget``: total epsilon;
``privacy-budget-delta``: total delta) the device refuses at first contact a
job whose whole plan would take the spent total past the budget, and refuses
any release that would (two runs in flight at once), naming what is spent and
what is left. Runs compose by basic composition (epsilons add, deltas add),
which stays valid when a server chooses each run after seeing the last (a
privacy filter). A release without noise has unbounded epsilon and is refused
under any budget.

An item already charged is not charged again (a step sent again gets the
stored release back: :meth:`fedtrak.client.store.FeatureStore.released`). The
ledger is a JSON file, read, checked and rewritten under an exclusive file lock
(two processes of one device never lose a charge) and replaced atomically with
its folder synced, so restarting the device does not reset it and a crash
mid-write leaves the previous ledger.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedtrak.client.node_settings import DEFAULT_BUDGET_DELTA
from fedtrak.errors import FedtrakError, Refused
from fedtrak.privacy.accountant import Release, epsilon
from fedtrak.private_files import private_dir, write_private

#: The ledger's file name in a device's store folder.
LEDGER_FILE = "privacy-ledger.json"
#: The ledger's on-disk format (1: one charge per run at first contact, before items existed).
LEDGER_VERSION = 2
_RELEASE_FIELDS = {f.name for f in fields(Release)}


@dataclass(frozen=True)
class Charge:
    """One run's entry: its id, the digest of the job it is bound to, what it released (one ledger
    entry per item), their composed epsilon and delta, and what its whole plan would cost."""

    run_id: str
    epsilon: float | None  # None: unbounded (a release without noise)
    delta: float
    releases: list[dict]
    kernel_source: str
    at: float
    digest: str = ""
    planned_epsilon: float | None = None

    @property
    def eps(self) -> float:
        """Epsilon as a number (infinite when unbounded)."""
        return math.inf if self.epsilon is None else self.epsilon

    @property
    def items(self) -> set[str]:
        """The items released so far."""
        return {r["item"] for r in self.releases if "item" in r}


@dataclass(frozen=True)
class Budget:
    """A device's total privacy budget: ``epsilon`` at ``delta``."""

    epsilon: float
    delta: float = DEFAULT_BUDGET_DELTA

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 < self.delta < 1:
            raise FedtrakError(f"privacy budget must have epsilon > 0 and delta in (0, 1), got "
                               f"{self.epsilon} and {self.delta}")


def _cost(releases: Sequence[Release], delta: float) -> float:
    """The composed epsilon of ``releases`` (0 for none; ``inf`` if one carries no noise)."""
    if not releases:
        return 0.0
    return math.inf if any(not r.sigma > 0 for r in releases) else epsilon(releases, delta)


def _number(value: float) -> float | None:
    return None if math.isinf(value) else float(value)


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
            raise FedtrakError(f"this device's privacy ledger is unreadable ({type(exc).__name__}): fix or move "
                               f"{self.path}; the device releases nothing while its ledger is unknown") from exc

    def spent(self) -> tuple[float, float]:
        """Total epsilon and delta charged so far."""
        charges = self.charges()
        return sum(c.eps for c in charges), sum(c.delta for c in charges if c.releases)

    @contextmanager
    def _locked(self) -> Iterator[list[Charge]]:
        """The charges, read under an exclusive lock held until the block ends."""
        private_dir(self.path.parent)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self.charges()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def bind(self, run_id: str, digest: str, planned: Sequence[Release], delta: float, kernel_source: str,
             budget: Budget | None) -> Charge:
        """Bind ``run_id`` to the job of ``digest`` at first contact, refusing a job whose whole
        ``planned`` releases the budget cannot pay for; a later contact must carry the same job.

        Raises:
            Refused: naming the run if its job changed, or its cost, what is spent and what is left.
        """
        with self._locked() as charges:
            for c in charges:
                if c.run_id == run_id:
                    if c.digest and c.digest != digest:
                        raise Refused(f"run {run_id} was bound at first contact to another job: this device refuses "
                                      "a changed job for the same run (start a new run)")
                    return c
            cost = _cost(planned, delta)
            self._check(charges, run_id, cost, delta if planned else 0.0, budget, "would cost")
            new = Charge(run_id, 0.0, delta, [], kernel_source, time.time(), digest, _number(cost))
            self._write([*charges, new])
            return new

    def charge(self, run_id: str, items: Mapping[str, Release], budget: Budget | None) -> Charge:
        """Charge the run bound as ``run_id`` for the ``items`` leaving now (those already charged
        cost nothing new); refuse them if the total would pass ``budget``.

        Raises:
            Refused: if the run was never bound, or the budget cannot pay.
        """
        with self._locked() as charges:
            at = next((i for i, c in enumerate(charges) if c.run_id == run_id), None)
            if at is None:
                raise Refused(f"run {run_id} is not bound on this device: nothing is released for it")
            run = charges[at]
            fresh = {k: r for k, r in items.items() if k not in run.items}
            if not fresh:
                return run
            rows = [*run.releases, *({**r.describe(), "item": k} for k, r in fresh.items())]
            cost = _cost([Release(**{k: v for k, v in row.items() if k in _RELEASE_FIELDS}) for row in rows],
                         run.delta)
            others = [c for c in charges if c.run_id != run_id]
            self._check(others, run_id, cost, run.delta, budget, "would reach")
            updated = Charge(run.run_id, _number(cost), run.delta, rows, run.kernel_source, run.at, run.digest,
                             run.planned_epsilon)
            self._write([*charges[:at], updated, *charges[at + 1:]])
            return updated

    @staticmethod
    def _check(others: Sequence[Charge], run_id: str, cost: float, delta: float, budget: Budget | None,
               verb: str) -> None:
        if budget is None:
            return
        eps = sum(c.eps for c in others)
        spent_delta = sum(c.delta for c in others if c.releases)
        if eps + cost > budget.epsilon + 1e-9 or spent_delta + delta > budget.delta * (1 + 1e-9):
            what = "unbounded epsilon (it adds no noise)" if math.isinf(cost) else f"epsilon {cost:.4g} at delta {delta:g}"
            raise Refused(
                f"privacy budget: run {run_id} {verb} {what}; this device has spent epsilon {eps:.4g} and delta "
                f"{spent_delta:g} in {len(others)} other run(s) of its budget epsilon {budget.epsilon:g} at delta "
                f"{budget.delta:g}, leaving epsilon {max(round(budget.epsilon - eps, 6), 0):g} and delta "
                f"{max(budget.delta - spent_delta, 0):g}: refused")

    def _write(self, charges: list[Charge]) -> None:
        write_private(self.path, json.dumps({"version": LEDGER_VERSION, "charges": [asdict(c) for c in charges]},
                                            indent=1).encode())


def describe_ledger(ledger: PrivacyLedger, budget: Budget | None) -> dict:
    """The ledger as ``fedtrak device check`` shows it: every charge, the totals and what is left."""
    charges = ledger.charges()
    eps, delta = sum(c.eps for c in charges), sum(c.delta for c in charges if c.releases)
    out = {"path": str(ledger.path), "runs": [{"run_id": c.run_id, "epsilon": c.epsilon, "delta": c.delta,
                                                "kernel_source": c.kernel_source,
                                                "releases": [r.get("item", r["what"]) for r in c.releases],
                                                "planned_epsilon": c.planned_epsilon} for c in charges],
           "spent_epsilon": None if math.isinf(eps) else eps, "spent_delta": delta}
    if budget is not None:
        out.update(budget_epsilon=budget.epsilon, budget_delta=budget.delta,
                   left_epsilon=max(budget.epsilon - eps, 0.0), left_delta=max(budget.delta - delta, 0.0))
    return out
