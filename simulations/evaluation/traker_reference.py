"""Running MadryLab's ``traker`` on fedtrak's checkpoints, for comparison.

traker is an optional (test and benchmark) dependency; these helpers import
it lazily and raise :class:`ImportError` when it is missing. traker's
conventions, which the callers must match: it divides projected gradients by
``sqrt(p)`` (so lambda converts with :func:`fedtrak.trak.kernel.lambda_to_traker`),
rescales each ``(Phi^T Phi + lambda I)^-1`` by its mean absolute entry
(fedtrak's ``normalize="traker"``), and returns scores as
(training examples x queries).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedtrak.data.inputs import to_tensors
from fedtrak.data.tasks import Task


def _traker(task: Task, projector, num_train: int, save_dir: Path, lam: float, proj_dim: int):
    from trak import TRAKer

    return TRAKer(
        model=task.make_model(),
        task="image_classification",
        train_set_size=num_train,
        save_dir=str(save_dir),
        load_from_save_dir=True,  # a fresh folder: nothing to load, but traker needs its files
        device="cpu",
        projector=projector,
        proj_dim=proj_dim,
        use_half_precision=False,
        lambda_reg=lam,
        logging_level=logging.ERROR,
    )


def traker_scores(
    task: Task,
    states: Sequence[dict[str, torch.Tensor]],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_query: np.ndarray,
    y_query: np.ndarray,
    lam_traker: float,
    save_dir: Path,
    batch_size: int = 256,
) -> np.ndarray:
    """traker's scores with its ``NoOpProjector`` (identity): ``(queries, train)``."""
    from trak.projectors import NoOpProjector

    grad_dim = task.num_params
    trak = _traker(task, NoOpProjector(device="cpu"), len(y_train), save_dir, lam_traker, grad_dim)
    xt, yt = to_tensors(x_train, y_train)
    xq, yq = to_tensors(x_query, y_query)
    for model_id, state in enumerate(states):
        trak.load_checkpoint(state, model_id=model_id)
        for i in range(0, len(yt), batch_size):
            trak.featurize(batch=(xt[i : i + batch_size], yt[i : i + batch_size]),
                           num_samples=len(yt[i : i + batch_size]))
    trak.finalize_features()
    for model_id, state in enumerate(states):
        trak.start_scoring_checkpoint("queries", state, model_id=model_id, num_targets=len(yq))
        for i in range(0, len(yq), batch_size):
            trak.score(batch=(xq[i : i + batch_size], yq[i : i + batch_size]),
                       num_samples=len(yq[i : i + batch_size]))
    return np.asarray(trak.finalize_scores(exp_name="queries")).T.copy()


def traker_featurize(
    task: Task,
    state: dict[str, torch.Tensor],
    x: np.ndarray,
    y: np.ndarray,
    proj_dim: int,
    save_dir: Path,
    batch_size: int = 64,
) -> None:
    """Featurize ``(x, y)`` with traker's ``BasicProjector`` (Rademacher, float32, CPU)."""
    from trak.projectors import BasicProjector, ProjectionType

    grad_dim = task.num_params
    projector = BasicProjector(
        grad_dim=grad_dim, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher,
        device="cpu", dtype=torch.float32,
    )
    trak = _traker(task, projector, len(y), save_dir, 0.0, proj_dim)
    trak.load_checkpoint(state, model_id=0)
    xt, yt = to_tensors(x, y)
    for i in range(0, len(yt), batch_size):
        trak.featurize(batch=(xt[i : i + batch_size], yt[i : i + batch_size]),
                       num_samples=len(yt[i : i + batch_size]))
