"""TRAK per checkpoint: its featurizer, its kernel and preconditioned queries, and central scoring.

Every side builds checkpoint m's featurizer with :func:`checkpoint_featurizer`
from the same settings and the run's resolved k (projection seed
``derive_seed(seed, m)``), so they agree on the projection without exchanging
anything but those few numbers.
The server holds the queries: for checkpoint m it regularizes the summed
Gram ``Phi_m^T Phi_m`` with lambda and computes ``U_m = phi_m(Q) K_m^{-1}``
(:func:`solve_checkpoint`); in private mode it sends ``U_m`` to the clients.
Where one side holds every training feature (the centralized reference path,
or the trusted server of ``features`` mode) :func:`score_features` scores
them here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedtrak.config.seeds import derive_seed
from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import model_from_state
from fedtrak.data.models import count_params
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.timing import PhaseTimer
from fedtrak.trak.featurizer import Features, Featurizer
from fedtrak.trak.kernel import (
    GramAccumulator,
    Kernel,
    effective_inverse,
    precondition,
    resolve_lambda,
)
from fedtrak.trak.kernel_sources import USES_PUBLIC, public_data, source_gram
from fedtrak.trak.projectors import DEFAULT_CACHE_BYTES, Projection, make_projector
from fedtrak.trak.scoring import ScoreEnsemble, kernel_term, self_kernel_term


def kernel_weights(settings: Settings, curvature: np.ndarray | None) -> np.ndarray | None:
    """The per-example weights of the kernel under the settings' weighting (``None``: unweighted).

    Raises:
        FedtrakError: if curvature weighting is asked for and the features carry no weights.
    """
    if not settings.kernel.weighted:
        return None
    if curvature is None:
        raise FedtrakError("the curvature-weighted kernel needs each example's curvature weight")
    return curvature


def checkpoint_featurizer(task: Task, state: dict[str, torch.Tensor], m: int, settings: Settings,
                          projection: Projection, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Featurizer:
    """The featurizer of checkpoint ``m``: its model and its own seeded projector, of the run's
    resolved ``projection`` (:attr:`fedtrak.wire.job.Resolved.projection`, as preflight resolved it).

    Raises:
        FedtrakError: if the state does not fit the task's model or the
            projection settings are invalid.
    """
    model = model_from_state(task, state, f"checkpoint {m}")
    projector = make_projector(projection.kind, count_params(model), projection.dim,
                               derive_seed(settings.task.seed, m), cache_bytes, model=model)
    return Featurizer(model, task.output, projector, batch_size=settings.projection.batch_size)


def solve_checkpoint(
    task: Task,
    featurizer: Featurizer,
    gram_matrix: np.ndarray,
    num_examples: int,
    settings: Settings,
    m: int,
    timer: PhaseTimer,
    with_inverse: bool = False,
    noise_floor: float = 0.0,
) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """Preconditioned queries ``U_m`` (``(Q, k)`` float64) from the summed Gram of checkpoint ``m``.

    Returns ``(U_m, record, K_m^-1 or None)``; the record (lambda, its rule,
    seed, dims) goes into the run summary; the explicit inverse (as the
    queries used it, see :func:`fedtrak.trak.kernel.effective_inverse`) only
    ``with_inverse``, for self-influence. Under DP lambda is at least
    ``noise_floor``, so the noised kernel stays positive definite.
    """
    with timer.phase("featurize_queries"):
        query = featurizer.featurize(task.x_query, task.y_query).features
    with timer.phase("kernel"):
        lam = resolve_lambda(settings.kernel.lam, gram_matrix, num_examples, featurizer.grad_dim,
                             task.training.weight_decay, floor=noise_floor)
        lam_value = max(lam.value, noise_floor)
        kernel = Kernel(gram_matrix, lam_value)
        u = precondition(query, kernel, settings.kernel.normalize)
        kinv = effective_inverse(kernel, settings.kernel.normalize) if with_inverse else None
    proj = featurizer.projector
    record = {"index": m, "lambda": lam_value, "lambda_rule": lam.rule, "projection_seed": proj.seed,
              "num_params": featurizer.grad_dim, "proj_dim": proj.proj_dim}
    if noise_floor > 0:
        record.update(lambda_rule_value=lam.value, lambda_noise_floor=noise_floor,
                      lambda_rule=f"max({lam.rule}, DP noise floor)")
    return u, record, kinv


def score_features(
    task: Task,
    states: Sequence[dict[str, torch.Tensor]],
    num_train: int,
    train_features: Callable[[int, Featurizer], Features],
    settings: Settings,
    projection: Projection,
    source: str,
    timer: PhaseTimer | None = None,
    self_influence: bool = False,
) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
    """TRAK scores ``(Q, n)`` where the server holds every training feature.

    ``train_features(m, featurizer)`` returns checkpoint ``m``'s training
    features in column order (computed on the spot by the centralized path,
    received from clients in ``features`` mode). ``projection`` and the kernel
    ``source`` (:mod:`fedtrak.trak.kernel_sources`) are the run's resolved ones.
    Returns the scores, one record per checkpoint and, if asked, every
    example's self-influence ``(n,)``.
    """
    timer = timer or PhaseTimer()
    public = public_data(settings, task) if source in USES_PUBLIC else None
    ensemble = ScoreEnsemble(len(task.y_query), num_train)
    records = []
    for m, state in enumerate(states):
        featurizer = checkpoint_featurizer(task, state, m, settings, projection)
        with timer.phase("featurize_train"):
            feats = train_features(m, featurizer)
        with timer.phase("kernel"):
            acc = GramAccumulator(featurizer.projector.proj_dim)
            acc.add(feats.features, kernel_weights(settings, feats.curvature))
            pub = None if public is None else featurizer.featurize(*public)
            matrix, source_record = source_gram(source, acc.matrix, acc.count, pub,
                                                settings.kernel.weighted)
        u, record, kinv = solve_checkpoint(task, featurizer, matrix, acc.count, settings, m, timer,
                                           with_inverse=self_influence)
        record.update(source_record)
        featurizer.projector.release()
        with timer.phase("score"):
            ensemble.add(kernel_term(feats.features, u), np.asarray(feats.out_to_loss, np.float64),
                         None if kinv is None else self_kernel_term(feats.features, kinv))
        records.append(record)
    return ensemble.scores(), records, ensemble.self_influence()
