"""The server's side of one federated attribution run.

1. :mod:`~fedtrak.server.preflight`: load the task, resolve k, sigma, C and
   the label flips once, before anything is trained or sent.
2. Wait for the clients; obtain M checkpoints (FedAvg through Flower,
   centralized training in simulation, or a checkpoint folder).
3. :mod:`~fedtrak.server.rounds`: ``private`` mode sums the clients' Grams
   (with secure aggregation, only their masked sum:
   :mod:`~fedtrak.server.secure_aggregation`), keeps the sums in
   ``OUT/.resume`` so that a run that dies can be resumed
   (:mod:`~fedtrak.server.resume`), preconditions its queries and lets the
   clients score; ``features`` mode receives the features and scores them.
4. :mod:`~fedtrak.server.summary`: write the run folder in the centralized
   path's format, with per-phase seconds, bytes per client, the clients that
   were excluded and the privacy ledger.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import numpy as np
from flwr.serverapp import Grid

from fedtrak.config.settings import Settings
from fedtrak.data.corruption import corrupted, flipped_indices
from fedtrak.data.partition import partition
from fedtrak.errors import FedtrakError, RunFailed
from fedtrak.results.answer import answer_lines
from fedtrak.results.folder import (
    ResultWriter,
    add_owner_values,
    add_score_arrays,
    add_self_influence,
)
from fedtrak.results.summary import SUMMARY, RunSummary
from fedtrak.results.summary_blocks import coverage_line
from fedtrak.server.federation import Federation
from fedtrak.server.grid import PULL_PAUSE, SIMULATION_PULL_PAUSE, CountingGrid, wait_for_nodes
from fedtrak.server.preflight import Plan, check_lambda_against_noise, preflight
from fedtrak.server.resume import RunState
from fedtrak.server.rounds import estimate_clip_norm, obtain_checkpoints, run_features, run_private
from fedtrak.server.summary import failure_summary, run_summary
from fedtrak.timing import PhaseTimer
from fedtrak.wire.job import Job

log = logging.getLogger("fedtrak.server")


def run_federated(flower_grid: Grid, settings: Settings, kind: str = "flower", progress: bool = False,
                  plan: Plan | None = None) -> RunSummary:
    """Run one federated attribution and write its run folder; returns the summary.

    ``kind`` (``flower`` or ``simulation``) picks the run folder's default; ``progress`` shows progress
    bars (on a terminal): training rounds, and each step's clients as they reply. ``plan``: the
    settings' :func:`~fedtrak.server.preflight.preflight` where the caller ran it already (a
    simulation, before Ray starts); without one the run preflights here, once.

    Raises:
        RunFailed: when the server ends the run on purpose (too few clients for secure
            aggregation): ``summary.json`` then records why, with ``"complete": false``, and no
            result array is written.
        FedtrakError: on bad settings (or a ``plan`` of other settings), too few clients, or no
            client left; no result files are written then (trained checkpoints are kept).
    """
    if plan is not None and plan.settings != settings:
        raise FedtrakError("run_federated: the plan was resolved from other settings than the run's")
    timer = PhaseTimer()
    grid = CountingGrid(flower_grid, SIMULATION_PULL_PAUSE if kind == "simulation" else PULL_PAUSE[1])
    out_dir = settings.out_dir(kind)
    with timer.phase("load_task"):
        plan = plan if plan is not None else preflight(settings)
        task, dp = plan.task, plan.dp
        flipped = np.zeros(0, dtype=np.int64)
    state = RunState(out_dir)
    config = settings.flat()
    resumed = state.saved_job(config) if settings.run.resume else None
    if resumed is not None:
        job, dp = resumed, resumed.dp()
        log.warning("resuming run %s from %s", job.run_id, state.dir)
    else:
        state.clear()  # a fresh run: nothing of an older one may be resumed into it
        job = Job(f"{out_dir.name or 'run'}-{uuid.uuid4().hex[:12]}", settings, plan.resolved).fingerprinted(task)
    flips = job.flips()
    if flips.active:  # a mislabel experiment: central training sees the flipped labels too
        p = settings.partition
        parts = partition(task.y_train, p.clients, p.partition, p.alpha, p.partition_seed, groups=task.train_groups)
        flipped = flipped_indices(task.y_train, parts, flips)
        task = corrupted(task, parts, flips)
    with timer.phase("wait_for_clients"):
        nodes = wait_for_nodes(grid, settings.partition.clients, settings.run.wait_for_nodes,
                               at_least=settings.run.all_connected)
    grid.step = "train"
    checkpoints = obtain_checkpoints(grid, task, job, out_dir, len(nodes), timer, reuse=resumed is not None,
                                     progress=progress)
    states = [s for _, s in checkpoints]
    fed = Federation(grid, nodes, settings.run.timeout, job.task_fingerprint,
                     settings.run.rejoin_wait, settings.run.in_flight, progress,
                     settings.run.max_client_examples, dp)
    if dp.active and settings.privacy.clip_quantile is not None and resumed is None:
        clip = estimate_clip_norm(fed, job, states, settings.privacy.clip_quantile, timer)
        dp, job = replace(dp, clip_norm=clip), replace(job, resolved=replace(job.resolved, clip_norm=clip))
        check_lambda_against_noise(settings, dp, job.resolved.proj_dim, job.resolved.kernel_source)
    saved = state.saved_kernels() if resumed is not None else None
    reused = ["the job (run id, resolved settings)", "checkpoints"] if resumed is not None else []
    if saved is not None:
        reused.append(f"the summed kernels of {len(saved.participants)} owners (no featurize round)")
    writer = ResultWriter(out_dir)
    try:
        if settings.release.mode == "private":
            state.save_job(job, config)
            outcome = run_private(fed, task, job, states, timer, state, saved)
        else:
            outcome = run_features(fed, task, job, states, timer)
        with timer.phase("write"):
            add_score_arrays(writer, outcome.scores, outcome.ids, outcome.owner_totals, settings.release.topk)
            add_self_influence(writer, outcome.self_influence, outcome.owner_self_influence)
            add_owner_values(writer, settings.release.owner_value, task.y_query, outcome.owner_totals,
                             outcome.owner_values)
            if flips.active:
                writer.add_array("flipped", flipped)
        summary = run_summary(job, task, fed, outcome, [info for info, _ in checkpoints], dp, flips, flipped,
                              timer, reused if resumed is not None else None).marked(True)
        writer.commit(summary)
        state.clear()
        log.info("wrote %s", out_dir)
        if kind == "flower":  # the operator reads the ServerApp's log (flwr run --stream): say where and what next
            where = (f"results: {out_dir} on the SuperLink host ({SUMMARY}, owner_scores.npy and the rest of "
                     "the run folder)")
            if summary.warning:
                log.warning("%s", summary.warning)
            for line in [where, *answer_lines(out_dir, summary),
                         coverage_line([o.owner for o in summary.owners], list(summary.clients.excluded))]:
                log.info("%s", line)
        return summary
    except RunFailed as exc:  # ended on purpose: the run folder says why
        path = writer.fail(failure_summary(job, fed, exc.failure, timer))
        if kind == "flower":  # the operator reads the ServerApp's log; a simulation's caller gets the error
            log.error("no result: %s (recorded in %s on the SuperLink host)", exc, path)
        raise RunFailed(f"{exc} (recorded in {path})", exc.failure) from None
    except BaseException:
        writer.discard()
        raise
