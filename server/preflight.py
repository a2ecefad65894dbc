"""Before a run trains or sends anything: load the task, resolve what the settings leave open, check it.

A bad task, projection or privacy setting fails here, naming the setting,
before Ray starts or a client is contacted. The resolved values (k, sigma,
C, secure aggregation's threshold) are computed once here
and travel in the job (:class:`fedtrak.wire.job.Resolved`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtrak.config.settings import Settings, floors_lambda
from fedtrak.data.tasks import Task, cached_task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.mechanisms import NOISE_FLOOR_FACTOR, DPSettings, noise_floor
from fedtrak.privacy.plan import planned_threshold, resolve_dp, uses_secure_agg
from fedtrak.privacy.training import trains_privately
from fedtrak.trak.kernel_sources import USES_PUBLIC, public_data, resolve_kernel_source
from fedtrak.trak.projectors import resolve_projection
from fedtrak.wire.job import Resolved


@dataclass(frozen=True)
class Plan:
    """A run's settings, its task, and what was resolved from them."""

    settings: Settings
    task: Task
    resolved: Resolved
    dp: DPSettings


def load_run_task(settings: Settings) -> Task:
    """The run's task (with its data), loaded once per process.

    Raises:
        FedtrakError: on an unknown task or a subset size it does not have.
    """
    t = settings.task
    return cached_task(t.task, t.train_size or 0, t.query_size or 0)


def preflight(settings: Settings) -> Plan:
    """Load the task and resolve and check the projection and privacy settings.

    Raises:
        FedtrakError: naming the bad setting.
    """
    task = load_run_task(settings)
    task.check_label_settings(settings)  # the clients partition and flip by it: refused here, not there
    if trains_privately(settings) and task.x_train.dtype.names:
        raise FedtrakError(f"task {task.name}: its FedAvg training would be DP-SGD, which (Opacus) takes one input "
                           f"array per example, not named inputs ({', '.join(task.x_train.dtype.names)}): attribute "
                           "checkpoints trained elsewhere (checkpoint-dir, or checkpoints= from Python), or train "
                           "with dp-train off (updates the privacy account does not cover)")
    projection = resolve_projection(settings.projection, task.make_model(), task.num_params)
    k = projection.dim
    source = resolve_kernel_source(settings, task)
    if source in USES_PUBLIC:
        public_data(settings, task)  # a bad public file fails here, before anything runs
    dp = resolve_dp(settings, task, k, source)
    if settings.privacy.clip_quantile is None:  # otherwise C, and the floor, come after the histograms
        check_lambda_against_noise(settings, dp, k, source)
    threshold = planned_threshold(settings) if uses_secure_agg(settings, source) else 0
    resolved = Resolved(k, dp.noise_multiplier, dp.clip_norm, threshold, dp.gram_weight,
                        settings.training.local_epochs or task.training.local_epochs, source, dp.scales,
                        projection.kind)
    return Plan(settings, task, resolved, dp)


def noise_copies(settings: Settings, clients: int, source: str) -> float:
    """The summed Gram noise's variance in units of ``(sigma C^2)^2``: one per client, or, under
    secure aggregation, survivors over the threshold the distributed noise is sized for."""
    return clients / planned_threshold(settings) if uses_secure_agg(settings, source) else clients


def check_lambda_against_noise(settings: Settings, dp: DPSettings, dim: int, source: str) -> None:
    """Refuse, before any computation, a fixed lambda that the Gram noise would leave indefinite
    (a private kernel's: a public one has no noise, a hybrid one is made PSD)."""
    if not dp.active or settings.release.mode != "private" or not floors_lambda(source):
        return
    try:
        fixed = float(settings.kernel.lam)
    except ValueError:
        return  # a rule: raised to the noise floor when it falls below
    floor = noise_floor(dp, dim, noise_copies(settings, settings.partition.clients, source))
    if fixed < floor:
        raise FedtrakError(
            f"lambda {fixed:g} is below the DP noise floor {floor:.4g} ({NOISE_FLOOR_FACTOR} sigma C^2 "
            f"sqrt(k x noise copies)): the noised kernel would be indefinite; use a larger lambda or a rule")
