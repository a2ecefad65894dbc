"""A device's own floors on what it takes part in, from its node config (never the run config).

``min-noise-multiplier``  every release of a run must carry at least this noise multiplier (a
                          run without noise is refused)
``min-secagg-threshold``  the run must sum Grams with secure aggregation, at a share threshold of
                          at least this many clients
``max-proj-dim``          the projection dimension k may be at most this
``max-clip-norm``         the clip norm may be at most this (it sets the noise's scale, not the
                          privacy, but bounds what one example can move)

A job below a floor is refused before the device loads its data or imports anything the job names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedtrak.client.node_settings import NodeSettings
from fedtrak.errors import Refused
from fedtrak.privacy.plan import run_release_plan
from fedtrak.wire.job import Job


@dataclass(frozen=True)
class NodePolicy:
    """The floors a device holds runs to (``None``: no floor)."""

    min_sigma: float | None = None
    min_threshold: int | None = None
    max_proj_dim: int | None = None
    max_clip_norm: float | None = None

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> NodePolicy:
        """The floors a node's settings set."""
        n = settings.fields
        return cls(n.min_noise_multiplier, n.min_secagg_threshold, n.max_proj_dim, n.max_clip_norm)

    @classmethod
    def from_config(cls, node_config: Mapping) -> NodePolicy:
        """The floors a node config sets.

        Raises:
            FedtrakError: naming a key whose value is malformed.
        """
        return cls.from_settings(NodeSettings.from_config(node_config))

    def check(self, job: Job) -> None:
        """Refuse ``job`` if it falls below a floor.

        Raises:
            FedtrakError: naming the floor and the job's value.
        """
        r = job.resolved
        if self.max_proj_dim is not None and r.proj_dim > self.max_proj_dim:
            raise Refused(f"the run projects to k = {r.proj_dim}, above this node's max-proj-dim "
                               f"{self.max_proj_dim}: the job is refused")
        if self.min_threshold is not None:
            self.check_threshold(r.threshold)
        dp = job.dp()
        if self.max_clip_norm is not None and dp.active and dp.clip_norm > self.max_clip_norm:
            raise Refused(f"the run clips to C = {dp.clip_norm:g}, above this node's max-clip-norm "
                               f"{self.max_clip_norm:g}: the job is refused")
        if self.min_sigma is not None:
            plan = run_release_plan(job.settings, dp, r.proj_dim, source=r.kernel_source) if dp.active else []
            least = min((rel.sigma for rel in plan), default=0.0)
            if least < self.min_sigma:
                what = "adds no noise" if not dp.active else f"has a release at noise multiplier {least:.4g}"
                raise Refused(f"the run {what}, below this node's min-noise-multiplier {self.min_sigma:g}: "
                                   "the job is refused")

    def check_threshold(self, threshold: int) -> None:
        """Refuse a secure aggregation whose share threshold is below the floor (0: none at all).

        Raises:
            FedtrakError: naming the floor and the threshold.
        """
        if self.min_threshold is not None and threshold < self.min_threshold:
            what = "does not use secure aggregation" if threshold == 0 else f"has a share threshold of {threshold}"
            raise Refused(f"the run {what}, below this node's min-secagg-threshold {self.min_threshold}: "
                               "the job is refused")
