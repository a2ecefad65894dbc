"""The centralized reference path: TRAK on the pooled training data.

``fedtrak attribute`` trains (or loads) M checkpoints, featurizes every
training example in global-id order (the same owners the federated runs
use), builds one kernel per checkpoint, scores the task's query set and
writes the run folder described in :mod:`fedtrak.results.folder`. The federated
modes must reproduce its numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import load_checkpoints, train_checkpoints
from fedtrak.data.corruption import corrupted, flipped_indices
from fedtrak.data.partition import partition
from fedtrak.data.tasks import Task
from fedtrak.logs import progress_bar
from fedtrak.privacy.plan import weight_bound
from fedtrak.results.folder import (
    ResultWriter,
    add_owner_values,
    add_score_arrays,
    add_self_influence,
)
from fedtrak.results.summary import Flips, Partition, RunSummary, build
from fedtrak.server.preflight import load_run_task
from fedtrak.timing import PhaseTimer
from fedtrak.trak.featurizer import Features, Featurizer
from fedtrak.trak.kernel_sources import resolve_kernel_source
from fedtrak.trak.per_checkpoint import score_features
from fedtrak.trak.projectors import resolve_projection
from fedtrak.trak.scoring import owner_means, owner_totals
from fedtrak.wire.job import Resolved


def obtain_checkpoints(task: Task, settings: Settings, out: Path, timer: PhaseTimer, progress: bool) -> list:
    """Load the settings' checkpoint folder or train checkpoints into ``OUT/checkpoints``."""
    t = settings.training
    if t.checkpoint_dir:
        with timer.phase("load_checkpoints"):
            return load_checkpoints(task, Path(t.checkpoint_dir).expanduser(), t.checkpoints)
    ckpt_dir = out / "checkpoints"
    with timer.phase("train"), progress_bar(progress, t.checkpoints, "train checkpoints") as bar:
        train_checkpoints(task, t.checkpoints, ckpt_dir, base_seed=settings.task.seed, epochs=t.epochs,
                          progress=bar.update, trajectory=t.ensemble == "trajectory")
    return load_checkpoints(task, ckpt_dir, t.checkpoints)


def central_scores(
    task: Task,
    states: list,
    x_train: np.ndarray,
    y_train: np.ndarray,
    settings: Settings,
    timer: PhaseTimer | None = None,
    progress: bool = False,
    self_influence: bool = False,
    resolved: Resolved | None = None,
) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
    """TRAK scores of the task's queries against ``(x_train, y_train)`` on pooled data.

    ``states`` are the checkpoints' state dicts (checkpoint m projects with
    ``derive_seed(seed, m)``); ``resolved``: what :func:`central_resolved` made of the settings
    (resolved here if not given). Returns ``(scores (Q, n), per-checkpoint records,
    self-influence (n,) or None)``.
    """
    resolved = resolved or central_resolved(settings, task)

    def featurize(m: int, featurizer: Featurizer) -> Features:
        with progress_bar(progress, len(y_train), f"featurize ckpt {m}", unit="ex") as bar:
            return featurizer.featurize(x_train, y_train, progress=bar.update)

    return score_features(task, states, len(y_train), featurize, settings, resolved.projection, resolved.kernel_source,
                          timer, self_influence)


def central_resolved(settings: Settings, task: Task) -> Resolved:
    """What the centralized path resolves from its settings, once: k (checked by building its
    projector), the kernel source and the kernel's weight bound (no noise, no federation).

    Raises:
        FedtrakError: on a projection or kernel source the task cannot take.
    """
    projection = resolve_projection(settings.projection, task.make_model(), task.num_params)
    return Resolved(projection.dim, weight_bound=weight_bound(settings, task), local_epochs=0,
                    kernel_source=resolve_kernel_source(settings, task), projector=projection.kind)


def run_attribute(settings: Settings, progress: bool = True) -> RunSummary:
    """Run the centralized reference attribution and write its run folder (``runs/central`` unless
    the settings name one); the owners are the settings' partition of the training set.

    Returns the summary written to ``summary.json``.

    Raises:
        FedtrakError: on any bad input; no result files are left in that case
            (checkpoints already trained are kept for reuse).
    """
    timer = PhaseTimer()
    out = settings.out_dir("central")
    p = settings.partition
    with timer.phase("load_task"):
        task = load_run_task(settings)
        task.check_label_settings(settings)
        parts = partition(task.y_train, p.clients, p.partition, p.alpha, p.partition_seed, groups=task.train_groups)
        order = parts.order()
        flips = settings.flips()
        flipped = flipped_indices(task.y_train, parts, flips)
        task = corrupted(task, parts, flips)
        resolved = central_resolved(settings, task)  # checked before spending time on training
    checkpoints = obtain_checkpoints(task, settings, out, timer, progress)
    writer = ResultWriter(out)
    try:
        scores, records, self_infl = central_scores(
            task, [state for _, state in checkpoints], task.x_train[order], task.y_train[order],
            settings, timer, progress, settings.wants_self_influence, resolved,
        )
        with timer.phase("write"):
            owners = owner_totals(scores, parts.owners(), parts.num_clients)
            add_score_arrays(writer, scores, parts.example_ids(), owners, settings.release.topk)
            add_self_influence(writer, self_infl, None if self_infl is None else
                               owner_means(self_infl, parts.owners(), parts.num_clients))
            add_owner_values(writer, settings.release.owner_value, task.y_query, owners)
            if flips.active:
                writer.add_array("flipped", flipped)
        summary = build(settings, resolved, task.name, len(order), len(task.y_query), records,
                        [info for info, _ in checkpoints], Partition.of(parts), Flips.of(flips, flipped),
                        timer).marked(True)
        writer.commit(summary)
        return summary
    except BaseException:
        writer.discard()
        raise

