"""How features are made and combined: the settings every mode shares.

The server, every client and the centralized reference path build the
featurizer of checkpoint m from the same :class:`ScoreSettings`, so they
agree on the projection (seed ``derive_seed(seed, m)``) without exchanging
anything but these few numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.checkpoints import model_from_state
from shared.featurizer import Featurizer
from shared.models import count_params
from shared.projectors import DEFAULT_CACHE_BYTES, derive_seed, make_projector
from shared.tasks import Task


@dataclass(frozen=True)
class ScoreSettings:
    """Projection, regularization and ensembling knobs of a run.

    ``proj_dim=None`` is the projector's default k; ``lam`` is a lambda
    specification (see :func:`shared.kernel.resolve_lambda`); ``normalize`` is
    ``none`` or ``traker`` (see :func:`shared.kernel.precondition`).
    """

    proj_dim: int | None = None
    projector: str = "rademacher"
    seed: int = 0
    lam: str | float = "auto"
    normalize: str = "none"
    batch_size: int = 256
    cache_bytes: int = DEFAULT_CACHE_BYTES


def checkpoint_featurizer(
    task: Task, state: dict[str, torch.Tensor], m: int, settings: ScoreSettings
) -> Featurizer:
    """The featurizer of checkpoint ``m``: its model and its own seeded projector.

    Raises:
        FedtrakError: if the state does not fit the task's model or the
            projection settings are invalid.
    """
    model = model_from_state(task, state, f"checkpoint {m}")
    projector = make_projector(
        settings.projector, count_params(model), settings.proj_dim, derive_seed(settings.seed, m),
        settings.cache_bytes, model=model,
    )
    return Featurizer(model, task.output, projector, batch_size=settings.batch_size)
