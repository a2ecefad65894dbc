"""The summary of a federated run: what was computed, by whom, with what privacy, at what cost.

The server gathers the values here (from its :class:`Federation` and the run's :class:`Outcome`) and
hands them, typed, to :func:`fedtrak.results.summary.build`, which owns the summary's keys."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import CheckpointInfo
from fedtrak.data.corruption import FlipSpec
from fedtrak.data.tasks import Task
from fedtrak.privacy.accountant import epsilon, prv_epsilon
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.privacy.plan import run_release_plan
from fedtrak.privacy.training import trains_openly
from fedtrak.results.summary import (
    Federated,
    Flips,
    Owner,
    Partition,
    Privacy,
    Resumed,
    RunSummary,
    build,
    build_failed,
)
from fedtrak.server.federation import Federation
from fedtrak.server.rounds import Outcome
from fedtrak.server.secure_aggregation import SecureSum
from fedtrak.server.training import training_privacy
from fedtrak.timing import PhaseTimer
from fedtrak.wire.job import Job


def _json_number(value: float) -> float | None:
    """``None`` (JSON null: unbounded) for an infinite epsilon, which strict JSON cannot hold."""
    return None if math.isinf(value) else value


def privacy_account(settings: Settings, dp: DPSettings, dim: int, secure: SecureSum | None = None,
                    source: str = "private", value_clip: float = 0.0, suspect_threshold: float = 0.0) -> Privacy:
    """The run's account of what was released and what it cost (``secure``: the secure sum,
    whose survivors set the Grams' noise; ``source``: the kernel's, a public one releases no Gram)."""
    if not dp.active:
        return Privacy(dp=False, kernel_source=source, note="no noise: nothing released is differentially private")
    p = settings.privacy
    plan = run_release_plan(settings, dp, dim, *(() if secure is None else (secure.noise, len(secure.survivors))),
                            source=source)
    rule = (f"DP quantile {p.clip_quantile:g} of the feature norms" if p.clip_quantile is not None
            else "given" if p.clip_norm else "the task's default")
    adjacency = ("replace one training example (features mode: the count and example indices leave exactly)"
                 if settings.release.mode == "features" else "add or remove one training example")
    not_covered = []
    if settings.release.mode == "features":
        not_covered.append("the number of examples each client sends (features mode hides values, not presence)")
    if settings.release.policy == "full" and settings.release.mode == "private":
        not_covered.append("policy full: example scores (and self-influence) are released without noise, for "
                           "simulation and evaluation only")
    account = Privacy(
        dp=True, kernel_source=source, adjacency=adjacency, noise_multiplier=dp.noise_multiplier,
        budget_scales=dp.scales.text(), budget=p.budget or "default weights", clip_norm=dp.clip_norm,
        clip_norm_rule=rule, clip_mode=dp.clip_mode, delta=dp.delta, target_epsilon=p.epsilon,
        gram_weight=dp.gram_weight, kernel_weighting=settings.kernel.weighting,
        epsilon=_json_number(epsilon(plan, dp.delta)), epsilon_prv=_json_number(prv_epsilon(plan, dp.delta)),
        accountant="mu-GDP composition of Gaussian mechanisms at sample rate 1 (opacus gdp); PRV cross-check",
        ledger=tuple(plan), secure_aggregation=secure is not None,
        noise_per_client="full sigma (no secure aggregation)", not_covered=tuple(not_covered),
        owner_value_clip=value_clip if value_clip > 0 else None,
        suspect_threshold=suspect_threshold if suspect_threshold > 0 else None)
    if secure is None:
        return account
    at_threshold = run_release_plan(settings, dp, dim, source=source)
    return replace(
        account,
        accountant="Renyi DP: Skellam bound (Agarwal, Kairouz and Liu 2021) for the securely summed Grams, "
                   "Gaussian for the rest, converted with opacus get_privacy_spent; PRV cross-check treats "
                   "the Skellam noise as Gaussian of the same variance",
        noise_per_client=f"Skellam, variance (sigma l2)^2 / {secure.threshold} per Gram coordinate (integer "
                         f"units): the threshold's {secure.threshold} honest survivors alone reach sigma",
        survivors=len(secure.survivors),
        gram_sigma_effective=secure.noise.effective_sigma(dp, len(secure.survivors)),
        fraction_bits=secure.noise.fraction_bits,
        epsilon_if_only_threshold_honest=_json_number(epsilon(at_threshold, dp.delta)))


def with_training(privacy: Privacy, settings: Settings, training: Mapping[str, Any]) -> Privacy:
    """``privacy`` with the whole run's epsilon, training included: under a target epsilon with
    DP-SGD sized on the devices, that target; at a given DP-SGD noise multiplier, the largest
    composed per client; plain FedAvg updates of a private run are listed as not covered."""
    privacy = replace(privacy, training=training.get("how", ""))
    if not privacy.dp:
        return privacy
    privacy = replace(privacy, epsilon_attribution=privacy.epsilon)
    if training.get("dp_sgd") and training.get("epsilon_with_attribution_max") is not None:
        return replace(privacy, epsilon=_json_number(float(training["epsilon_with_attribution_max"])))
    if trains_openly(settings):
        gap = ("the FedAvg model updates (dp-train off): each round's update leaves every device without noise")
    elif settings.training.train == "central" and not settings.training.checkpoint_dir:
        gap = ("central training on the pooled data (simulation only): the checkpoints were trained without "
               "differential privacy")
    else:
        return privacy
    return replace(privacy, not_covered=(*privacy.not_covered, gap))


def run_summary(job: Job, task: Task, fed: Federation, outcome: Outcome, infos: Sequence[CheckpointInfo],
                dp: DPSettings, flips: FlipSpec, flipped: np.ndarray, timer: PhaseTimer,
                reused: list[str] | None = None) -> RunSummary:
    """The summary of a federated run (``infos``: its checkpoints' manifest entries; ``reused``: what a
    resumed run reused of the interrupted one)."""
    settings, nodes = job.settings, fed.ordered()
    members = [fed.clients[n] for n in nodes]
    p = settings.partition
    privacy = privacy_account(settings, dp, job.resolved.proj_dim, outcome.secure, job.resolved.kernel_source,
                              outcome.value_clip, outcome.suspect_threshold)
    training = training_privacy(settings, task, {c.owner: c.num_examples for c in members},
                                job.resolved.local_epochs, list(privacy.ledger))
    owners = tuple(Owner(i, c.owner, n, c.partition_id, c.num_examples) for i, (n, c) in enumerate(zip(nodes, members)))
    part = (Partition(p.partition, p.alpha if p.partition == "dirichlet" else None, p.partition_seed, p.clients)
            if min(c.partition_id for c in members) >= 0 else None)
    federated = Federated(job.run_id, owners, fed.report(), job.resolved.kernel_source,
                          with_training(privacy, settings, training), training,
                          outcome.secure.report if outcome.secure else None,
                          None if reused is None else Resumed(job.run_id, tuple(reused)))
    return build(settings, job.resolved, task.name, sum(c.num_examples for c in members), len(task.y_query),
                 outcome.records, infos, part, Flips.of(flips, flipped), timer, federated)


def failure_summary(job: Job, fed: Federation, failure: dict[str, Any], timer: PhaseTimer) -> RunSummary:
    """The summary of a run the server ended without results (:class:`fedtrak.errors.RunFailed`;
    written with ``"complete": false``): why (``failure``: its ``reason``, the step and that step's
    details), every client with the exclusions and their reasons, the settings and the seconds spent."""
    return build_failed(failure, job.settings, job.resolved, job.run_id, fed.report(), timer)
