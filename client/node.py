"""What a client handler works with: its node's settings, the run's job, its data and its store.

Settings a node reads (its node config only, then the defaults the ClientApp
was built with, see :func:`fedtrak.client.app.client_app`; never the run
config, which the server controls):

``store-dir``   root of the local feature store (default ``~/.cache/fedtrak/store``); the
                device's privacy ledger is kept beside its store (:mod:`fedtrak.client.ledger`)
``privacy-budget``, ``privacy-budget-delta``  the owner's total budget over every run (default: none,
                the ledger only records)
``allow-full``  whether the ``full`` release policy may be served (default false)
``min-noise-multiplier``, ``min-secagg-threshold``, ``max-proj-dim``, ``max-clip-norm``  floors
                the device holds every run to (:mod:`fedtrak.client.policy`)
``data-path``, ``owner``, ``task``  see :mod:`fedtrak.client.data`
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedtrak.client.data import ClientData, job_task, load_client_data
from fedtrak.client.ledger import DEFAULT_BUDGET_DELTA, LEDGER_FILE, Budget, PrivacyLedger
from fedtrak.client.policy import NodePolicy
from fedtrak.client.store import FeatureStore
from fedtrak.compat import PROTOCOL_VERSION
from fedtrak.errors import FedtrakError
from fedtrak.job import Job
from fedtrak.privacy.mechanisms import DPSettings, noise_rng, noised_count
from fedtrak.tasks import Task
from fedtrak.wire import ClientInfo

DEFAULT_STORE = Path.home() / ".cache" / "fedtrak" / "store"


def node_setting(ctx: Context, key: str, fallback: Any) -> Any:
    """A node's own setting: its node config, else ``fallback``. Never the run config, which the
    server sets: where a device keeps its data and whether it serves every score are the device's
    choices."""
    value = ctx.node_config.get(key)
    return fallback if value in ("", None) else value


def node_budget(ctx: Context) -> Budget | None:
    """The node's privacy budget (node config only: a server cannot set a device's budget)."""
    eps = ctx.node_config.get("privacy-budget")
    if eps in (None, ""):
        return None
    try:
        return Budget(float(eps), float(ctx.node_config.get("privacy-budget-delta") or DEFAULT_BUDGET_DELTA))
    except (TypeError, ValueError) as exc:
        raise FedtrakError(f"node config privacy-budget {eps!r} is not a number: {exc}") from exc


@dataclass
class Local:
    """One client's part of one run: the job, its own data, its store and privacy settings."""

    job: Job
    data: ClientData
    store: FeatureStore
    node_id: int
    ledger: PrivacyLedger | None = None
    policy: NodePolicy = field(default_factory=NodePolicy)

    @classmethod
    def open(cls, job: Job, ctx: Context, releases: bool = True) -> Local:
        """Check the job against this node's install, load its data and open its store; for a step
        that ``releases`` anything, charge the run to the device's privacy ledger first.

        Raises:
            FedtrakError: on a job below the node's floors (:mod:`fedtrak.client.policy`), a task
                import path the node config does not name, a protocol or task mismatch, data the
                node cannot load, or a run the device's privacy budget cannot pay for.
        """
        policy = NodePolicy.from_config(ctx.node_config)
        policy.check(job)  # before anything the job names is imported or loaded
        job.check_node(job_task(job, ctx.node_config))
        data = load_client_data(job, ctx.node_config, ctx.node_id)
        root = Path(str(node_setting(ctx, "store-dir", DEFAULT_STORE))).expanduser()
        who = f"partition-{data.partition_id}" if data.partition_id >= 0 else "owner-" + re.sub(
            r"[^A-Za-z0-9_.-]", "_", data.owner)
        local = cls(job, data, FeatureStore(root / who, job.run_id), int(ctx.node_id),
                    PrivacyLedger(root / who / LEDGER_FILE), policy)
        if releases:
            local.ledger.charge(job, node_budget(ctx))
        return local

    @property
    def task(self) -> Task:
        """The job's task (its model and output function)."""
        return job_task(self.job)

    @property
    def weighted(self) -> bool:
        """Whether the run's kernel is curvature-weighted."""
        return self.job.settings.kernel.weighting == "curvature"

    @property
    def dp(self) -> DPSettings:
        """How this client clips and noises what it releases."""
        return self.job.dp()

    def released_count(self) -> int:
        """The example count this client releases: under DP a release of its own, noised once per
        run and kept in the store; otherwise the count itself."""
        if not self.dp.active:
            return len(self.data.y)
        return self.store.released_count(lambda: noised_count(len(self.data.y), self.dp, noise_rng()))

    def fedavg_weight(self) -> int:
        """The example count FedAvg weights this client's update by. Under attribution DP, the
        run's noised count (the one release every message repeats, in the ledger); with DP-SGD
        training alone, 1 (uniform weights: an exact count would be a release no accountant
        covers); otherwise the exact count."""
        if self.dp.active:
            return self.released_count()
        return 1 if self.job.settings.training.dp_train_noise > 0 else len(self.data.y)

    def info(self, count: int | None = None) -> ClientInfo:
        """Who this client is, its example count (``count``; default :meth:`released_count`), and
        its protocol version and task fingerprint."""
        return ClientInfo(self.data.owner, self.data.partition_id,
                          self.released_count() if count is None else count, PROTOCOL_VERSION,
                          self.job.fingerprint(self.task))
