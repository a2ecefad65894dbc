"""Projectors: per-example gradients ``(batch, p)`` to features ``(batch, k)``, by name.

:mod:`~fedtrak.trak.projectors.base` holds the interface and the seeds,
:mod:`~fedtrak.trak.projectors.dense` the seeded dense projections (generated
block by block) and the identity, :mod:`~fedtrak.trak.projectors.factorized` the
per-layer (Kronecker) projection that never forms a per-example gradient.
"""

from __future__ import annotations

import torch

from fedtrak.config.settings import DEFAULT_PROJ_DIM, PROJECTORS
from fedtrak.errors import FedtrakError
from fedtrak.trak.projectors.base import BLOCK_ROWS, Projector
from fedtrak.trak.projectors.dense import (
    DEFAULT_CACHE_BYTES,
    BlockRandomProjector,
    GaussianProjector,
    IdentityProjector,
    RademacherProjector,
)
from fedtrak.trak.projectors.factorized import FactorizedProjector

__all__ = ["BLOCK_ROWS", "DEFAULT_CACHE_BYTES", "DEFAULT_PROJ_DIM", "BlockRandomProjector", "FactorizedProjector",
           "GaussianProjector", "IdentityProjector", "Projector", "RademacherProjector",
           "make_projector"]


def make_projector(
    kind: str, grad_dim: int, proj_dim: int | None, seed: int,
    cache_bytes: int = DEFAULT_CACHE_BYTES, model: torch.nn.Module | None = None,
) -> Projector:
    """Build a projector by name (``rademacher``, ``gaussian``, ``factorized`` or ``identity``).

    ``proj_dim=None`` means the number of parameters for the identity and
    :data:`DEFAULT_PROJ_DIM` for the random projections. ``factorized``
    (:mod:`fedtrak.trak.projectors.factorized`) is built from the ``model``'s layers.
    """
    if kind == "identity":
        return IdentityProjector(grad_dim, proj_dim, seed)
    proj_dim = DEFAULT_PROJ_DIM if proj_dim is None else proj_dim
    if kind == "factorized":
        if model is None:
            raise FedtrakError("the factorized projector needs the model (its layers set the factors)")
        projector = FactorizedProjector(model, proj_dim, seed)
        if projector.grad_dim != grad_dim:
            raise FedtrakError(f"model has {projector.grad_dim} parameters, expected {grad_dim}")
        return projector
    if kind == "rademacher":
        return RademacherProjector(grad_dim, proj_dim, seed, cache_bytes)
    if kind == "gaussian":
        return GaussianProjector(grad_dim, proj_dim, seed, cache_bytes)
    raise FedtrakError(f"unknown projector {kind!r}: use one of {', '.join(PROJECTORS)}")
