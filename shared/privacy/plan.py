"""A run's privacy plan: the noise its settings ask for, resolved, and what each example is released in.

The server resolves the noise multiplier (from a target epsilon, over every
release of the plan) and the clip norm once, before the run, and sends them to
the clients in the job (:mod:`fedtrak.wire.job`); the summary's ledger is
:func:`run_release_plan` of the same settings.
"""

from __future__ import annotations

from dataclasses import replace

from fedtrak.config.settings import Settings, releases_gram
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release, sigma_for_plan
from fedtrak.privacy.budget import Scales, budget_weights, kind_scales, kinds_of
from fedtrak.privacy.distributed import DistributedNoise, noise_fraction_bits
from fedtrak.privacy.mechanisms import DPSettings, release_plan
from fedtrak.privacy.training import attribution_epsilon
from fedtrak.secagg.graph import threshold


def uses_secure_agg(settings: Settings, source: str) -> bool:
    """Whether the run sums Grams with secure aggregation: as set, or by default under DP whenever
    the kernel ``source`` releases Grams (not ``public``) and there are 3 clients or more."""
    if not releases_gram(source):
        return False
    if settings.secagg.secure_agg is not None:
        return settings.secagg.secure_agg
    return (settings.privacy.wants_noise and settings.release.mode == "private"
            and settings.partition.clients >= 3)


def planned_threshold(settings: Settings) -> int:
    """Secure aggregation's threshold if all ``clients`` advertise: the fewest survivors the
    distributed noise is sized for."""
    return threshold(settings.partition.clients, settings.secagg.secagg_threshold)


def distributed_noise(settings: Settings, dim: int, dp: DPSettings) -> DistributedNoise:
    """How secure aggregation's clients would share the Gram noise if all ``clients`` advertise."""
    t = planned_threshold(settings)
    checkpoints = settings.training.checkpoints
    return DistributedNoise(dim, checkpoints, t, noise_fraction_bits(dim, checkpoints, t, dp))


def run_release_plan(settings: Settings, dp: DPSettings, dim: int, noise: DistributedNoise | None = None,
                     survivors: int | None = None, source: str = "private") -> list[Release]:
    """What each training example's data is released in during this run.

    With secure aggregation the Grams are one Skellam release of the
    ``survivors``' ``noise`` together (defaults: the planned noise and its
    threshold, the least it is sized for); otherwise each client's Gram is
    a Gaussian release. A ``public`` kernel ``source`` releases no Gram.
    """
    gram = None
    if uses_secure_agg(settings, source) and dp.active:
        noise = noise or distributed_noise(settings, dim, dp)
        gram = noise.release(dp, noise.threshold if survivors is None else survivors)
    return release_plan(settings.release.mode, settings.training.checkpoints, dp, settings.wants_self_influence,
                        settings.privacy.clip_quantile is not None, gram, settings.kernel.weighted,
                        gram_released=releases_gram(source), owner_value=settings.release.owner_value != "none")


def weight_bound(settings: Settings, task: Task) -> float:
    """The kernel's largest per-example weight: the task's model output's curvature bound for the
    curvature-weighted kernel, 1 for the plain one."""
    return kernel_weight_bound(settings.kernel.weighted, task)


def kernel_weight_bound(weighted: bool, task: Task) -> float:
    """The largest per-example weight of a kernel: the task's model output's curvature bound when
    it is ``weighted``, 1 for the plain one."""
    return task.output.curvature_bound if weighted else 1.0


def resolve_dp(settings: Settings, task: Task, dim: int, source: str = "private") -> DPSettings:
    """The run's privacy settings, resolved: the noise multiplier from ``epsilon`` (over every
    release of the plan, at projection dimension ``dim``) or as given, the clip norm as given or
    the task's default (with ``clip-quantile``, a placeholder until the clients' noised norm
    histograms are in). ``source``: the resolved kernel source (a public kernel releases no Gram).
    A target epsilon is split between the kinds of release by the ``budget`` weights
    (:mod:`fedtrak.privacy.budget`), after training's share when the devices train by DP-SGD sized
    to it (:func:`fedtrak.privacy.training.attribution_epsilon`); a given noise multiplier is every
    release's.

    Raises:
        FedtrakError: if noise is asked for and the task has no default clip norm, or the
            settings are invalid.
    """
    p = settings.privacy
    weights = budget_weights(p.budget)  # names a bad pair, whether or not the run is private
    if not p.wants_noise:
        return DPSettings(delta=p.delta, clip_mode=p.clip_mode, gram_weight=weight_bound(settings, task))
    task.output.check_private(task.name)
    clip = p.clip_norm or task.clip_norm or (1.0 if p.clip_quantile is not None else None)
    if not clip:
        raise FedtrakError(f"task {task.name} has no default clip norm: set clip-norm or clip-quantile")
    dp = DPSettings(p.noise_multiplier or 1.0, float(clip), p.clip_mode, p.delta, weight_bound(settings, task))
    target = attribution_epsilon(settings)
    if target is not None:
        unit = run_release_plan(settings, replace(dp, noise_multiplier=1.0), dim, source=source)
        dp = replace(dp, scales=Scales.of(kind_scales(kinds_of((r.kind, r.count) for r in unit),
                                                          weights)))
        sigma = sigma_for_plan(target, lambda s: run_release_plan(settings, replace(dp, noise_multiplier=s), dim,
                                                                     source=source),
                               p.delta)
        dp = replace(dp, noise_multiplier=sigma)
    dp.validate()
    return dp
