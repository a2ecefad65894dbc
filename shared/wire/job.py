"""A run's job: the settings every client works under, with the values the server resolved once.

The server resolves what the settings leave open (the projection dimension,
the noise multiplier an epsilon implies, the clip norm, secure aggregation's
threshold) once, before anything is trained or sent, and
records them in the run summary. Every client receives the same
:class:`Job` with each request (:mod:`fedtrak.wire` encodes it), checks it
against its own install, and featurizes the server's way without exchanging
anything else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from fedtrak.config.settings import FlipSpec, Settings
from fedtrak.data.tasks import Task
from fedtrak.privacy.budget import EQUAL_SCALES, Scales
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.trak.projectors import Projection
from fedtrak.wire.compat import PROTOCOL_VERSION, check_compatible, task_fingerprint

#: The sections of the settings a client receives (the run section stays on the server).
JOB_SECTIONS = ("task", "partition", "training", "projection", "kernel", "privacy", "secagg", "release")


@dataclass(frozen=True)
class Resolved:
    """The values a run resolved from its settings, once.

    Attributes:
        proj_dim: the projection dimension k.
        noise_multiplier: the base noise multiplier of the attribution releases (0: no noise).
        clip_norm: the clip norm C of projected features (0: no clipping).
        threshold: secure aggregation's planned share threshold (0: no secure aggregation).
        weight_bound: the kernel's largest per-example weight (1 unweighted; the model output's
            curvature bound for the curvature-weighted kernel): a Gram's sensitivity is ``C^2`` times it.
        local_epochs: each client's epochs per FedAvg round (as given, or the task's).
        kernel_source: where the kernel comes from, ``auto`` decided
            (:mod:`fedtrak.trak.kernel_sources`): clients release no Gram for ``public``.
        budget_scales: each kind of release's noise multiplier relative to ``noise_multiplier``,
            the split of a target epsilon (:class:`fedtrak.privacy.budget.Scales`; empty: all equal).
            Its text form (:meth:`describe`'s, the run summary's) is accepted and parsed.
        projector: the projector, ``auto`` decided (:func:`fedtrak.trak.projectors.resolve_projection`;
            a run folder of fedtrak 0.2, which did not record it, used the dense ``rademacher``
            unless its settings name another).
    """

    proj_dim: int
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    threshold: int = 0
    weight_bound: float = 1.0
    local_epochs: int = 3
    kernel_source: str = "private"
    budget_scales: Scales = EQUAL_SCALES
    projector: str = "rademacher"

    def __post_init__(self) -> None:
        if isinstance(self.budget_scales, str):  # as the run summary and the job record write it
            object.__setattr__(self, "budget_scales", Scales.parse(self.budget_scales))

    @property
    def projection(self) -> Projection:
        """The projector and k every checkpoint's featurizer uses."""
        return Projection(self.projector, self.proj_dim)

    def describe(self) -> dict:
        """JSON-ready, for the run summary and the job record (the scales as their text)."""
        return {**asdict(self), "budget_scales": self.budget_scales.text()}


@dataclass(frozen=True)
class Job:
    """What every client needs to know to take part in one run."""

    run_id: str
    settings: Settings
    resolved: Resolved
    task_fingerprint: str = ""
    protocol_version: int = PROTOCOL_VERSION

    def dp(self) -> DPSettings:
        """How this run's releases are clipped and noised (``noise_multiplier`` 0: not at all)."""
        p = self.settings.privacy
        dp = DPSettings(self.resolved.noise_multiplier, self.resolved.clip_norm, p.clip_mode, p.delta,
                        self.resolved.weight_bound, self.resolved.budget_scales)
        dp.validate()
        return dp

    def flips(self) -> FlipSpec:
        """The label flips every simulated client applies to its data (none by default)."""
        return self.settings.flips()

    def fingerprint(self, task: Task) -> str:
        """The fingerprint of ``task`` under this job's projection settings."""
        return task_fingerprint(task, self.resolved.projector, self.resolved.proj_dim,
                                self.settings.task.seed)

    def fingerprinted(self, task: Task) -> Job:
        """This job with ``task``'s fingerprint, which every node checks against its own."""
        return replace(self, task_fingerprint=self.fingerprint(task))

    def check_node(self, task: Task) -> None:
        """Refuse the job if this node's protocol version or task fingerprint differs (names both)."""
        check_compatible(self.protocol_version, self.task_fingerprint, self.fingerprint(task), "the server")
