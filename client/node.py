"""What a client handler works with: its node's settings, the run's job, its data, its store and contract.

A node reads its own node config only (:mod:`fedtrak.client.node_settings`,
then the defaults the ClientApp was built with, see
:func:`fedtrak.client.app.client_app`), never the run config, which the server
controls. Every release leaves through :meth:`Local.release`: allowed by the
contract of the job the run bound at first contact
(:mod:`fedtrak.client.contract`), charged to the device's ledger
(:mod:`fedtrak.client.ledger`) as it leaves, and kept, so that a step sent again
gets the same release back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Context

from fedtrak.client.contract import Contract, job_digest
from fedtrak.client.data import ClientData, job_task, load_client_data
from fedtrak.client.ledger import LEDGER_FILE, Budget, PrivacyLedger
from fedtrak.client.node_settings import NodeSettings
from fedtrak.client.policy import NodePolicy
from fedtrak.client.store import FeatureStore
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release
from fedtrak.privacy.kinds import COUNT
from fedtrak.privacy.mechanisms import DPSettings, noise_rng, noised_count
from fedtrak.wire import ClientInfo
from fedtrak.wire.compat import PROTOCOL_VERSION
from fedtrak.wire.job import Job


def node_settings(ctx: Context) -> NodeSettings:
    """The node's own settings (its node config only: a server cannot set them).

    Raises:
        FedtrakError: naming an unknown key or a malformed value.
    """
    return NodeSettings.from_config(ctx.node_config)


def node_budget(settings: NodeSettings) -> Budget | None:
    """The node's privacy budget, if its config sets one."""
    n = settings.fields
    return None if n.privacy_budget is None else Budget(n.privacy_budget, n.privacy_budget_delta)


@dataclass
class Local:
    """One client's part of one run: the job, its own data, its store, ledger and contract."""

    job: Job
    data: ClientData
    store: FeatureStore
    node_id: int
    ledger: PrivacyLedger
    contract: Contract
    budget: Budget | None = None
    policy: NodePolicy = field(default_factory=NodePolicy)

    @classmethod
    def open(cls, job: Job, ctx: Context) -> Local:
        """Check the job against this node's settings and install, load its data, open its store
        and bind the run to the job in the device's ledger (at first contact; later the job must be
        the same, and the run's whole plan must fit the budget at first contact).

        Raises:
            FedtrakError: on a job below the node's floors (:mod:`fedtrak.client.policy`), a task
                import path the node config does not name, a protocol or task mismatch, data the
                node cannot load, a changed job, or a run the device's budget cannot pay for.
        """
        settings = node_settings(ctx)
        policy = NodePolicy.from_settings(settings)
        policy.check(job)  # before anything the job names is imported or loaded
        task = job_task(job, ctx.node_config)
        job.check_node(task)
        data = load_client_data(job, ctx.node_config, ctx.node_id)
        who = f"partition-{data.partition_id}" if data.partition_id >= 0 else "owner-" + re.sub(
            r"[^A-Za-z0-9_.-]", "_", data.owner)
        root = settings.store_root / who
        contract = Contract.of(job, task, len(data.y), settings.fields.serve_full)
        ledger, budget = PrivacyLedger(root / LEDGER_FILE), node_budget(settings)
        noised = contract.dp.active or contract.train_sigma > 0
        ledger.bind(job.run_id, job_digest(job), contract.planned(), job.settings.privacy.delta if noised else 0.0,
                    job.resolved.kernel_source, budget)
        return cls(job, data, FeatureStore(root, job.run_id), int(ctx.node_id), ledger, contract, budget, policy)

    @property
    def task(self) -> Task:
        """The job's task (its model and output function)."""
        return job_task(self.job)

    @property
    def weighted(self) -> bool:
        """Whether the run's kernel is curvature-weighted."""
        return self.job.settings.kernel.weighted

    @property
    def dp(self) -> DPSettings:
        """How this client clips and noises what it releases (the weight bound its own task gives)."""
        return self.contract.dp

    def charge(self, items: dict[str, Release]) -> None:
        """Charge ``items`` to the device's ledger as they leave.

        Raises:
            Refused: if the budget cannot pay for them.
        """
        self.ledger.charge(self.job.run_id, items, self.budget)

    def release(self, kind: str, checkpoints: list[int] | None, make: Callable[[], np.ndarray | dict],
                unit: Release | None = None) -> np.ndarray | dict:
        """One release of ``kind`` (over ``checkpoints``, for a per-checkpoint kind): refused unless
        the bound job plans it; under DP kept in the store (a step sent again gets the same draws back)
        and charged once, as it leaves; without noise made afresh and charged as unbounded.
        ``make`` returns the release (per-checkpoint kinds: a dict by checkpoint); ``unit``: its
        ledger entry per item, where it is not the plan's (a secure sum's Skellam Grams).

        Raises:
            Refused: for a release outside the job's plan or the budget.
        """
        items = self.contract.items(kind, checkpoints)
        entry = unit or self.contract.unit(kind)
        if not self.dp.active:
            value = make()
            self.charge(dict.fromkeys(items, entry))
            return value
        per_checkpoint = checkpoints is not None
        names = {m: f"{kind}-{m}" for m in checkpoints} if per_checkpoint else {None: kind}
        if not all(self.store.has_release(n) for n in names.values()):
            value = make()
            self.charge(dict.fromkeys(items, entry))
            parts = value if per_checkpoint else {None: value}
            for m, n in names.items():
                self.store.released(n, lambda m=m: parts[m])
        kept = {m: self.store.released(n, _never) for m, n in names.items()}
        return kept if per_checkpoint else kept[None]

    def released_count(self) -> int:
        """The example count this client releases: under DP a release of its own, noised once per
        run, kept in the store and charged as it leaves; otherwise the count itself (charged as
        unbounded; in features mode the count is public and charged nothing)."""
        if COUNT not in self.contract.planned_kinds():  # features mode: the count is public (replace one)
            return len(self.data.y)
        charge = lambda: self.charge({COUNT: self.contract.unit(COUNT)})
        if not self.dp.active:
            charge()
            return len(self.data.y)
        return self.store.released_count(lambda: noised_count(len(self.data.y), self.dp, noise_rng()), charge)

    def fedavg_weight(self) -> int:
        """The example count FedAvg weights this client's update by. Under attribution DP, the
        run's noised count (the one release every message repeats, in the ledger); with DP-SGD
        training alone, 1 (uniform weights: an exact count would be a release no accountant
        covers); otherwise the exact count."""
        if self.dp.active:
            return self.released_count()
        return 1 if self.contract.trains_privately else len(self.data.y)

    def info(self, count: int | None = None) -> ClientInfo:
        """Who this client is, its example count (``count``; default :meth:`released_count`), and
        its protocol version and task fingerprint."""
        return ClientInfo(self.data.owner, self.data.partition_id,
                          self.released_count() if count is None else count, PROTOCOL_VERSION,
                          self.job.fingerprint(self.task))


def _never() -> np.ndarray:
    raise FedtrakError("a kept release went missing between two reads of the store")
