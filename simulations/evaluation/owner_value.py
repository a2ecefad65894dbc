"""How well a run's owner values rank owners against the true effect of removing each owner.

An owner's value for a query group is its total attribution summed over the
group's queries (``owner_value.npy``, released by the owners with
``--owner-value``). Its ground truth is the owner's removal effect: the
group's summed query margins of a model trained on every owner's data minus
those of a model trained without that owner, with the run's own algorithm,
averaged over ``seeds`` pairs that share their seed (common random numbers:
the seed noise of the pair mostly cancels). The measure is the Spearman
correlation over owners, per group, and its mean over groups.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedtrak.config.seeds import derive_seed
from fedtrak.errors import FedtrakError
from fedtrak.simulations.evaluation.lds import spearman_rows
from fedtrak.simulations.evaluation.retrain import Recipe, retrain_margins
from fedtrak.simulations.run_folder import RunFolder

#: Model pairs (with and without each owner) averaged per owner.
DEFAULT_SEEDS = 3


def removal_effects(recipe: Recipe, groups: np.ndarray, seeds: int = DEFAULT_SEEDS, seed: int = 0,
                    workers: int | None = None, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``(owners, G)``: each owner's removal effect on every group's summed query margins.

    Raises:
        FedtrakError: on fewer than one seed or two owners.
    """
    task, parts = recipe.load()
    if seeds < 1 or parts.num_clients < 2:
        raise FedtrakError(f"removal effects need at least one seed and two owners, got {seeds} and "
                           f"{parts.num_clients}")
    everyone = np.ones(task.num_train, dtype=bool)
    jobs = []
    for r in range(seeds):
        s = derive_seed(seed, 0x0A1E0000 + r) % 2**63
        jobs.append(((-1, r), everyone, s))
        for c, idx in enumerate(parts.clients):
            without = everyone.copy()
            without[idx] = False
            jobs.append(((c, r), without, s))
    sums = {}
    for job_id, margins in retrain_margins(recipe, [(i, m, s) for i, (_, m, s) in enumerate(jobs)], workers):
        sums[jobs[job_id][0]] = groups @ margins
        if progress:
            progress(1)
    return np.array([np.mean([sums[(-1, r)] - sums[(c, r)] for r in range(seeds)], axis=0)
                     for c in range(parts.num_clients)])


def owner_value_entry(run: RunFolder, seeds: int = DEFAULT_SEEDS, seed: int = 0, workers: int | None = None,
                      progress: Callable[[int], None] | None = None) -> dict:
    """The run's owner values against the owners' removal effects: Spearman over owners per group.

    Raises:
        FedtrakError: if the run released no owner values, or its owners are not the task's partition.
    """
    values = np.asarray(run.array("owner_value", "owner value (make the run with --owner-value all|label)"))
    groups = np.asarray(run.array("owner_value_groups", "owner value"))
    effects = removal_effects(run.recipe(), groups.astype(np.float64), seeds, seed, workers, progress)
    effects = effects[run.owner_partition_ids()]  # in the run's owner (column) order
    per_group = spearman_rows(values, effects.T)
    return {"spearman": float(np.nanmean(per_group)), "per_group": [float(v) for v in per_group],
            "groups": len(groups), "owners": int(values.shape[1]), "seeds": seeds,
            "models_trained": seeds * (values.shape[1] + 1),
            "ground_truth": "summed query margins with every owner minus without the owner, seed-paired"}
