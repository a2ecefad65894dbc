"""The summary of a federated run: what was computed, by whom, with what privacy, at what cost."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedtrak.config.settings import Settings
from fedtrak.data.corruption import FlipSpec
from fedtrak.data.tasks import Task
from fedtrak.privacy.accountant import Release, epsilon, prv_epsilon
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.privacy.plan import run_release_plan
from fedtrak.privacy.training import trains_openly
from fedtrak.results.folder import flips_block
from fedtrak.server.federation import Federation
from fedtrak.server.rounds import Outcome
from fedtrak.server.secure_aggregation import SecureSum
from fedtrak.server.training import training_privacy
from fedtrak.timing import PhaseTimer, peak_memory_mb
from fedtrak.wire.job import Job


def _json_number(value: float) -> float | None:
    """``None`` (JSON null: unbounded) for an infinite epsilon, which strict JSON cannot hold."""
    return None if math.isinf(value) else value


def privacy_block(settings: Settings, dp: DPSettings, dim: int, secure: SecureSum | None = None,
                  source: str = "private", value_clip: float = 0.0, suspect_threshold: float = 0.0) -> dict:
    """The summary's account of what was released and what it cost (``secure``: the secure sum,
    whose survivors set the Grams' noise; ``source``: the kernel's, a public one releases no Gram)."""
    if not dp.active:
        return {"dp": False, "kernel_source": source, "note": "no noise: nothing released is differentially private"}
    p = settings.privacy
    plan = run_release_plan(settings, dp, dim, *(() if secure is None else (secure.noise, len(secure.survivors))),
                            source=source)
    rule = (f"DP quantile {p.clip_quantile:g} of the feature norms" if p.clip_quantile is not None
            else "given" if p.clip_norm else "the task's default")
    adjacency = ("replace one training example (features mode: the count and example indices leave exactly)"
                 if settings.release.mode == "features" else "add or remove one training example")
    block = {"dp": True, "adjacency": adjacency,
             "noise_multiplier": dp.noise_multiplier, "budget_scales": dp.scales.text(),
             "budget": p.budget or "default weights", "clip_norm": dp.clip_norm, "clip_norm_rule": rule,
             "clip_mode": dp.clip_mode, "delta": dp.delta, "target_epsilon": p.epsilon,
             "gram_weight": dp.gram_weight, "kernel_weighting": settings.kernel.weighting,
             "kernel_source": source,
             "epsilon": _json_number(epsilon(plan, dp.delta)),
             "epsilon_prv": _json_number(prv_epsilon(plan, dp.delta)),
             "accountant": "mu-GDP composition of Gaussian mechanisms at sample rate 1 (opacus gdp); "
                           "PRV cross-check",
             "ledger": [r.describe() for r in plan], "secure_aggregation": secure is not None,
             "noise_per_client": "full sigma (no secure aggregation)", "not_covered": []}
    if secure is not None:
        at_threshold = run_release_plan(settings, dp, dim, source=source)
        block.update(
            accountant="Renyi DP: Skellam bound (Agarwal, Kairouz and Liu 2021) for the securely summed Grams, "
                       "Gaussian for the rest, converted with opacus get_privacy_spent; PRV cross-check treats "
                       "the Skellam noise as Gaussian of the same variance",
            noise_per_client=f"Skellam, variance (sigma l2)^2 / {secure.threshold} per Gram coordinate (integer "
                             f"units): the threshold's {secure.threshold} honest survivors alone reach sigma",
            survivors=len(secure.survivors),
            gram_sigma_effective=secure.noise.effective_sigma(dp, len(secure.survivors)),
            fraction_bits=secure.noise.fraction_bits,
            epsilon_if_only_threshold_honest=_json_number(epsilon(at_threshold, dp.delta)))
    if value_clip > 0:
        block["owner_value_clip"] = value_clip
    if suspect_threshold > 0:
        block["suspect_threshold"] = suspect_threshold
    if settings.release.mode == "features":
        block["not_covered"].append("the number of examples each client sends (features mode hides values, "
                                    "not presence)")
    if settings.release.policy == "full" and settings.release.mode == "private":
        block["not_covered"].append("policy full: example scores (and self-influence) are released without "
                                    "noise, for simulation and evaluation only")
    return block


def with_training(privacy: dict, settings: Settings, training: dict) -> None:
    """Make ``privacy``'s epsilon the whole run's, training included: under a target epsilon with
    DP-SGD sized on the devices, that target; at a given DP-SGD noise multiplier, the largest
    composed per client; plain FedAvg updates of a private run are listed as not covered."""
    privacy["training"] = training.get("how", "")
    if not privacy.get("dp"):
        return
    privacy["epsilon_attribution"] = privacy["epsilon"]
    if training.get("dp_sgd") and training.get("epsilon_with_attribution_max") is not None:
        privacy["epsilon"] = _json_number(float(training["epsilon_with_attribution_max"]))
    elif trains_openly(settings):
        privacy["not_covered"].append("the FedAvg model updates (dp-train off): each round's update leaves every "
                                      "device without noise")
    elif settings.training.train == "central" and not settings.training.checkpoint_dir:
        privacy["not_covered"].append("central training on the pooled data (simulation only): the checkpoints "
                                      "were trained without differential privacy")


def run_summary(job: Job, task: Task, fed: Federation, outcome: Outcome, dp: DPSettings, flips: FlipSpec,
                flipped: np.ndarray, timer: PhaseTimer, num_checkpoints: int) -> dict[str, Any]:
    """The ``summary.json`` of a federated run (the run folder's format: :mod:`fedtrak.results.folder`)."""
    settings, records, nodes = job.settings, outcome.records, fed.ordered()
    dim = job.resolved.proj_dim
    pids = [fed.clients[n].partition_id for n in nodes]
    clients = fed.report()
    p = settings.partition
    privacy = privacy_block(settings, dp, dim, outcome.secure, job.resolved.kernel_source, outcome.value_clip,
                            outcome.suspect_threshold)
    training = training_privacy(settings, task, {fed.clients[n].owner: fed.clients[n].num_examples for n in nodes},
                                job.resolved.local_epochs, [Release(**r) for r in privacy.get("ledger", [])])
    with_training(privacy, settings, training)
    summary = {
        "mode": settings.release.mode,
        "release_policy": settings.release.policy if settings.release.mode == "private" else "features",
        "task": task.name,
        "run_id": job.run_id,
        "num_train": sum(fed.clients[n].num_examples for n in nodes),
        "num_queries": len(task.y_query),
        "num_params": records[0]["num_params"],
        "proj_dim": records[0]["proj_dim"],
        "projector": settings.projection.projector,
        "num_checkpoints": num_checkpoints,
        "normalization": settings.kernel.normalize,
        "ensemble": "mean kernel term x mean out-to-loss (TRAK Algorithm 1)",
        "score_sign": "positive = training example raises the query's margin",
        "lambda": [r["lambda"] for r in records],
        "checkpoints": records,
        "owners": [{"column": i, "owner": fed.clients[n].owner, "node_id": n,
                    "partition_id": fed.clients[n].partition_id,
                    "num_examples": fed.clients[n].num_examples} for i, n in enumerate(nodes)],
        **clients,
        **({"partition": {"scheme": p.partition, "alpha": p.alpha if p.partition == "dirichlet" else None,
                          "seed": p.partition_seed, "num_clients": p.clients}} if min(pids) >= 0 else {}),
        **flips_block(flips, flipped),
        "kernel_source": job.resolved.kernel_source,
        "privacy": privacy,
        **({"secure_aggregation": outcome.secure.report} if outcome.secure else {}),
        "training_privacy": training,
        "resolved": {**job.resolved.describe(), "lambda": [r["lambda"] for r in records]},
        "settings": settings.nested(),
        "config": settings.flat(),
        "seconds": timer.report(),
        "server_cpu_seconds": {k: round(v, 3) for k, v in timer.cpu_seconds.items()},
        "peak_memory_mb": peak_memory_mb(),
    }
    if not clients["complete_federation"]:
        summary["warning"] = (f"{len(clients['excluded'])} client(s) excluded: results cover only the "
                              f"{len(nodes)} listed owners")
    return summary


def failure_summary(job: Job, fed: Federation, failure: dict[str, Any], timer: PhaseTimer) -> dict[str, Any]:
    """The ``summary.json`` of a run the server ended without results
    (:class:`fedtrak.errors.RunFailed`; written with ``"complete": false``): why (``failure``: its
    ``reason``, the step and that step's details), every client with the exclusions and their
    reasons, the settings and the seconds spent."""
    settings = job.settings
    return {
        "failure": failure,
        "mode": settings.release.mode,
        "task": settings.task.task,
        "run_id": job.run_id,
        **fed.report(),
        "resolved": job.resolved.describe(),
        "settings": settings.nested(),
        "config": settings.flat(),
        "seconds": timer.report(),
    }
