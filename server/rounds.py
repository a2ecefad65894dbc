"""The server's protocol steps, one function each: checkpoints, the clip-norm round, the Gram sum,
the score round (private mode), and the features round (trusted-server mode)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict

from fedtrak import wire
from fedtrak.config.settings import floors_lambda, releases_gram
from fedtrak.data.checkpoints import CheckpointInfo, load_checkpoints, train_checkpoints
from fedtrak.data.partition import example_ids
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.bounds import OwnerLimits, gram_limits, owner_limits
from fedtrak.privacy.budget import GRAM
from fedtrak.privacy.mechanisms import noise_floor, public_bound, summary_ridge, value_contributions
from fedtrak.privacy.quantile import NORM_EDGES, quantile_from_histogram
from fedtrak.results.folder import query_groups
from fedtrak.server.federation import Federation
from fedtrak.server.gram_fold import GramFold
from fedtrak.server.grid import CountingGrid
from fedtrak.server.query_batches import batch_request, batch_rows, joined_releases
from fedtrak.server.resume import RunState, SavedKernels, restored_secure_sum, saved_secure_sum
from fedtrak.server.secure_aggregation import SecureSum, secure_gram_sum
from fedtrak.server.training import train_fedavg_checkpoints
from fedtrak.server.validation import (
    check_values_agree,
    features_release,
    histogram_release,
    packed_gram_release,
    score_release,
)
from fedtrak.timing import PhaseTimer
from fedtrak.trak.featurizer import Features, Featurizer
from fedtrak.trak.kernel import with_more_ridge
from fedtrak.trak.kernel_sources import USES_PUBLIC, held_out_self_terms, public_data, source_gram
from fedtrak.trak.per_checkpoint import checkpoint_featurizer, score_features, solve_checkpoint
from fedtrak.trak.scoring import owner_means, owner_totals
from fedtrak.wire.codecs import pack_upper
from fedtrak.wire.job import Job

log = logging.getLogger("fedtrak.server")

States = list[dict[str, torch.Tensor]]


@dataclass
class Outcome:
    """What a run produced: scores (where released), owner totals, ids, per-checkpoint
    records and, where asked, self-influence (per example where released, per owner)."""

    scores: np.ndarray | None
    owner_totals: np.ndarray
    ids: np.ndarray | None
    records: list[dict]
    self_influence: np.ndarray | None = None
    owner_self_influence: np.ndarray | None = None
    secure: SecureSum | None = None
    owner_values: np.ndarray | None = None  # (G, owners)
    value_clip: float = 0.0  # the bound of one example's owner-value contribution (0: none)
    suspect_threshold: float = 0.0  # self-influence above it makes an example a suspect (0: none)


def obtain_checkpoints(grid: CountingGrid, task: Task, job: Job, out_dir: Path, num_nodes: int,
                       timer: PhaseTimer, reuse: bool = False, progress: bool = False
                       ) -> list[tuple[CheckpointInfo, dict[str, torch.Tensor]]]:
    """Load the settings' checkpoint folder or train checkpoints into ``OUT/checkpoints`` (with
    ``reuse``, a resumed run, those already there are loaded instead when all of them are)."""
    t = job.settings.training
    if t.checkpoint_dir:
        with timer.phase("load_checkpoints"):
            return load_checkpoints(task, Path(t.checkpoint_dir).expanduser(), t.checkpoints)
    ckpt_dir = out_dir / "checkpoints"
    if reuse and (ckpt_dir / "manifest.json").is_file():
        try:
            with timer.phase("load_checkpoints"):
                return load_checkpoints(task, ckpt_dir, t.checkpoints)
        except FedtrakError as exc:
            log.warning("not reusing %s: %s", ckpt_dir, exc)
    with timer.phase("train"):
        if t.train == "fedavg":
            return train_fedavg_checkpoints(grid, task, job, num_nodes, ckpt_dir, progress)
        train_checkpoints(task, t.checkpoints, ckpt_dir, base_seed=job.settings.task.seed, epochs=t.epochs,
                          trajectory=t.ensemble == "trajectory")
    return load_checkpoints(task, ckpt_dir, t.checkpoints)


def estimate_clip_norm(fed: Federation, job: Job, states: States, quantile: float, timer: PhaseTimer) -> float:
    """The clip norm at ``quantile`` of all clients' feature norms, from their noised histograms
    (:mod:`fedtrak.privacy.quantile`); clients featurize into their stores on the way."""
    with timer.phase("clip_round"):
        request = wire.encode_featurize_request(job, states, clip_round=True)
        replies = fed.broadcast(wire.FEATURIZE, lambda node: RecordDict(request), label="clip-norm round (norm histograms)")
    fed.note_info(replies)
    total = np.zeros(len(NORM_EDGES) - 1)

    def add(node: int, content: RecordDict) -> None:
        nonlocal total
        total = total + histogram_release(content, len(total), fed.source(node))

    fed.accept({n: replies[n] for n in fed.ordered() if n in replies}, add)
    fed.require_clients("the clip-norm round")
    return quantile_from_histogram(total, quantile)


def plain_gram_sum(fed: Federation, job: Job, states: States, ms: list[int], timer: PhaseTimer
                   ) -> tuple[list[np.ndarray], int, float]:
    """Featurize without secure aggregation: every client's Gram is checked and folded into the
    sums as it arrives (:class:`~fedtrak.server.gram_fold.GramFold`). Returns the sums, the total
    count and the noise copies (clients) in them."""
    dim, dp = job.resolved.proj_dim, job.dp()
    limits = (lambda count, clients: gram_limits(dp, count, dim, clients, counts=clients)) if dp.active else None
    fold = GramFold(ms, dim, limits, fed.exclude)
    request = wire.encode_featurize_request(job, states)

    def add(node: int, content: RecordDict) -> None:
        if not fed.note_one(node, content):
            return
        count = fed.clients[node].num_examples
        with timer.phase("gram_sum"):  # inside the round: the server's own share of it
            try:
                grams = packed_gram_release(content, ms, dim, fed.source(node), not dp.active,
                                            gram_limits(dp, count, dim) if dp.active else None)
            except FedtrakError as exc:
                fed.exclude(node, str(exc))
                return
            fold.add(node, fed.source(node), count, grams)

    with timer.phase("featurize_round"):
        fed.broadcast(wire.FEATURIZE, lambda node: RecordDict(request), on_reply=add,
                      label=f"featurize ({len(states)} checkpoint{'' if len(states) == 1 else 's'})")
    with timer.phase("gram_sum"):
        sums = fold.result()
    nodes = fed.require_clients("featurize")
    return sums, sum(fed.clients[n].num_examples for n in nodes), float(len(nodes))


def _summed_kernels(fed: Federation, job: Job, states: States, timer: PhaseTimer, state: RunState | None,
                    saved: SavedKernels | None) -> tuple[list[np.ndarray], int, float, SecureSum | None]:
    """The summed Grams of every checkpoint: saved (a resumed run), securely summed or summed in the
    clear; kept in ``state`` as soon as they exist."""
    ms = list(range(len(states))) if releases_gram(job.resolved.kernel_source) else []  # public: counts only
    if saved is not None:
        return saved.grams, saved.total, saved.copies, restored_secure_sum(saved)
    secure = None
    if job.resolved.threshold > 0:  # secure aggregation (set, or the default under DP)
        secure = secure_gram_sum(fed, job, states, ms, timer)
        sums, total, copies = secure.grams, round(secure.count), len(secure.survivors) / secure.threshold
        fed.require_clients("secure aggregation")
    else:
        sums, total, copies = plain_gram_sum(fed, job, states, ms, timer)
    if state is not None:
        state.save_kernels(SavedKernels(sums, total, copies, [
            {"owner": fed.clients[n].owner, "partition_id": fed.clients[n].partition_id,
             "num_examples": fed.clients[n].num_examples} for n in fed.ordered()],
            None if secure is None else saved_secure_sum(secure)))
    return sums, total, copies, secure


def run_private(fed: Federation, task: Task, job: Job, states: States, timer: PhaseTimer,
                state: RunState | None = None, saved: SavedKernels | None = None) -> Outcome:
    """Private mode: Grams in, preconditioned queries (and, for self-influence, the
    kernel inverses) out, owner totals (or, with ``full``, scores) back. Under DP, and for
    ``owner-totals`` with at least k queries, clients get no queries and release owner summaries
    instead (the summary route), from which the server derives the totals.

    The summed kernels are kept in ``state`` as soon as they exist; with
    ``saved`` kernels (a resumed run) there is no featurize round."""
    settings = job.settings
    request, records, secure, owner_us = _score_request(fed, task, job, states, timer, state, saved)
    groups = query_groups(settings.release.owner_value, task.y_query)
    released = _score_replies(fed, job, request, owner_us, groups, timer, saved)
    nodes = [n for n in fed.require_clients("score") if n in released]
    out = Outcome(None, np.stack([released[n].owner_totals for n in nodes], axis=1), None, records, secure=secure,
                  value_clip=request.value_clip, suspect_threshold=request.suspect_threshold)
    if groups is not None:
        out.owner_values = np.stack([released[n].owner_values for n in nodes], axis=1)
    if request.inverses:  # each owner's screening statistic over its released count: a mean or a fraction
        out.owner_self_influence = np.array([released[n].screening[0] / fed.clients[n].num_examples
                                             for n in nodes])
    if settings.release.policy == "full":
        out.scores = np.concatenate([released[n].scores for n in nodes], axis=1)
        out.ids = example_ids([released[n].indices for n in nodes])
        if request.inverses:
            out.self_influence = np.concatenate([released[n].self_influence for n in nodes])
    return out


def _score_replies(fed: Federation, job: Job, request: wire.ScoreRequest, owner_us: dict[int, np.ndarray],
                   groups: np.ndarray | None, timer: PhaseTimer, saved: SavedKernels | None
                   ) -> dict[int, wire.ScoreRelease]:
    """Send the score request (in query batches where the queries are large:
    :mod:`fedtrak.server.query_batches`) and return each client's checked release, joined over the
    batches. With ``saved`` kernels, clients whose owner is not among their participants are
    excluded."""
    dp, policy = job.dp(), job.settings.release.policy
    summed = None if request.groups is None else [request.groups[m] for m in sorted(request.groups)]

    def limits(node: int) -> OwnerLimits | None:
        return owner_limits(dp, fed.clients[node].num_examples, job.resolved.proj_dim, summed, request.value_clip,
                            request.suspect_threshold > 0) if dp.active else None

    summarized = dp.active or request.summary_route
    num_queries = next(iter(request.queries.values())).shape[0]
    rows = batch_rows(num_queries, job.resolved.proj_dim, len(owner_us), job.settings.release.query_batch)
    whole = len(rows) == 1
    parts = []
    for start, stop in rows:
        batch = request if whole else batch_request(request, start, stop, num_queries)
        content = wire.encode_score_request(batch)
        with timer.phase("score_round"):
            replies = fed.broadcast(wire.SCORE, lambda node, content=content: RecordDict(content),
                                    label="score" if whole else f"score (queries {start}-{stop - 1} of {num_queries})")
        if saved is not None and start == 0:  # no featurize round: who is who comes with the score replies
            fed.note_info(replies)
            kernel_owners = {p["owner"] for p in saved.participants}
            for node in [n for n in replies if fed.clients[n].owner not in kernel_owners]:
                fed.exclude(node, "its owner is not among the participants of the saved kernels")
                del replies[node]
        span = slice(None) if whole else slice(start, stop)
        us = [owner_us[m][span] for m in sorted(owner_us)]
        parts.append(fed.accept(replies, lambda node, c, batch=batch, us=us: score_release(
            c, policy, us[0].shape[0], fed.clients[node].num_examples, fed.source(node), bool(batch.inverses),
            dp.active, us, groups if batch.query_offset == 0 else None, limits(node), summarized, whole)))
    if whole:
        return parts[0]
    released = joined_releases(parts, fed.source, fed.exclude)
    if groups is not None and not dp.active:  # the values against the totals, now that all are in
        for node in list(released):
            try:
                check_values_agree(released[node].owner_values, groups, released[node].owner_totals,
                                   fed.source(node))
            except FedtrakError as exc:
                fed.exclude(node, str(exc))
                del released[node]
    return released


def _score_request(fed: Federation, task: Task, job: Job, states: States, timer: PhaseTimer,
                   state: RunState | None, saved: SavedKernels | None
                   ) -> tuple[wire.ScoreRequest, list[dict], SecureSum | None, dict[int, np.ndarray]]:
    """The kernels of every checkpoint (from the clients' Grams, public data or both), and the score
    request they give: preconditioned queries, kernel inverses for self-influence, query groups for
    owner values and, under DP, the bounds the server sets from its public data. Also the queries
    that turn owner summaries into owner totals: under DP those of each kernel plus the summaries'
    noise ridge (:func:`fedtrak.privacy.mechanisms.summary_ridge`), else the request's."""
    settings, dp, source, dim = job.settings, job.dp(), job.resolved.kernel_source, job.resolved.proj_dim
    weighted = settings.kernel.weighted
    featurizers = [checkpoint_featurizer(task, s, m, settings, job.resolved.projection) for m, s in enumerate(states)]
    sums, total, copies, secure = _summed_kernels(fed, job, states, timer, state, saved)
    groups = query_groups(settings.release.owner_value, task.y_query)
    bounded = dp.active and (groups is not None or settings.wants_self_influence)
    public = public_data(settings, task) if source in USES_PUBLIC or bounded else None
    floor = noise_floor(dp, dim, copies) if dp.active and floors_lambda(source) else 0.0
    noise_energy = (dim * dp.sigma(GRAM) * dp.gram_sensitivity) ** 2 * copies  # E||noise||_F^2
    us, records, inverses, shares, owner_us = {}, [], {}, [], {}
    ridge = summary_ridge(dp, len(fed.active())) if dp.active else 0.0
    for m, featurizer in enumerate(featurizers):
        private = sums[m] if sums else None
        with timer.phase("kernel"):
            pub = None if public is None else featurizer.featurize(*public)  # once per checkpoint
            matrix, source_record = source_gram(source, private, total, pub if source in USES_PUBLIC else None,
                                                weighted, noise_energy)
        u, record, kinv = solve_checkpoint(task, featurizer, matrix, total, settings, m, timer,
                                           with_inverse=settings.wants_self_influence, noise_floor=floor)
        record.update(source_record)
        if bounded and pub is not None:
            with timer.phase("kernel"):
                shares.append((pub, None if kinv is None else held_out_self_terms(
                    source, pub, private, total, weighted, noise_energy, record["lambda"],
                    settings.kernel.normalize, kinv)))
        featurizer.projector.release()
        us[m] = owner_us[m] = u
        if ridge > 0:
            with timer.phase("kernel"):
                owner_us[m] = with_more_ridge(u, matrix + record["lambda"] * np.eye(dim), ridge)
            record["owner_total_ridge"] = ridge
        records.append(record)
        if kinv is not None:
            inverses[m] = pack_upper(kinv)
    summed = None if groups is None else {m: groups.astype(np.float64) @ u for m, u in us.items()}
    value_clip, threshold = public_bounds(shares, summed)
    if settings.release.policy == "owner-totals" and (dp.active or len(task.y_query) >= dim):
        us = {m: u[:0] for m, u in us.items()}  # the summary route: no queries leave the server
    return (wire.ScoreRequest(job, settings.release.policy, settings.release.topk, us, inverses or None, summed,
                              value_clip, threshold), records, secure, owner_us)


def public_bounds(shares: list[tuple[Features, np.ndarray | None]], summed: dict[int, np.ndarray] | None
                  ) -> tuple[float, float]:
    """The bound of one example's share of an owner's values and the suspect threshold of
    self-influence, from the public examples' own shares (``shares``: per checkpoint, their
    features and held-out self terms); 0 where there is no public data or no such release."""
    if not shares:
        return 0.0, 0.0
    qbar = np.mean([f.out_to_loss for f, _ in shares], axis=0)
    value = 0.0 if summed is None else public_bound(np.linalg.norm(value_contributions(
        [f.features for f, _ in shares], qbar, [summed[m] for m in sorted(summed)]), axis=1))
    terms = [t for _, t in shares if t is not None]
    return value, public_bound(np.mean(terms, axis=0) * qbar) if terms else 0.0


def run_features(fed: Federation, task: Task, job: Job, states: States, timer: PhaseTimer) -> Outcome:
    """Trusted-server mode: clients send features, the server scores them."""
    ms, dim = list(range(len(states))), job.resolved.proj_dim
    with timer.phase("features_round"):
        request = wire.encode_featurize_request(job, states)
        replies = fed.broadcast(wire.FEATURES, lambda node: RecordDict(request))
    fed.note_info(replies)
    bound = job.resolved.weight_bound if job.settings.kernel.weighted else None
    received = fed.accept(replies, lambda node, c: features_release(
        c, ms, dim, fed.clients[node].num_examples, fed.source(node), bound))
    nodes = [n for n in fed.require_clients("features") if n in received]

    def gathered(m: int, featurizer: Featurizer) -> Features:
        f, q, w = ([received[n][1][m][i] for n in nodes] for i in range(3))
        return Features(np.concatenate(f), np.concatenate(q), None if bound is None else np.concatenate(w))

    total = sum(fed.clients[n].num_examples for n in nodes)
    scores, records, self_infl = score_features(task, states, total, gathered, job.settings, job.resolved.projection,
                                                job.resolved.kernel_source, timer,
                                                self_influence=job.settings.wants_self_influence)
    ids = example_ids([received[n][0] for n in nodes])
    return Outcome(scores, owner_totals(scores, ids["client"], len(nodes)), ids, records, self_infl,
                   None if self_infl is None else owner_means(self_infl, ids["client"], len(nodes)))
