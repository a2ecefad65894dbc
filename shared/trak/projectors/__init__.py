"""Projectors: per-example gradients ``(batch, p)`` to features ``(batch, k)``, by name.

:mod:`~fedtrak.trak.projectors.base` holds the interface and the seeds,
:mod:`~fedtrak.trak.projectors.dense` the seeded dense projections (generated
block by block) and the identity, :mod:`~fedtrak.trak.projectors.factorized` the
per-layer (Kronecker) projection that never forms a per-example gradient.
"""

from __future__ import annotations

import numbers

import torch

from fedtrak.config.settings import PROJECTORS
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

__all__ = ["BLOCK_ROWS", "DEFAULT_CACHE_BYTES", "BlockRandomProjector", "FactorizedProjector",
           "GaussianProjector", "IdentityProjector", "Projector", "RademacherProjector",
           "make_projector"]


def make_projector(
    kind: str, grad_dim: int, proj_dim: int, seed: int,
    cache_bytes: int = DEFAULT_CACHE_BYTES, model: torch.nn.Module | None = None,
) -> Projector:
    """Build a projector by name (``rademacher``, ``gaussian``, ``factorized`` or ``identity``).

    ``proj_dim`` is the resolved k (:meth:`fedtrak.config.settings.ProjectionSettings.resolved_dim`;
    for the identity, the parameter count ``grad_dim``). ``factorized``
    (:mod:`fedtrak.trak.projectors.factorized`) is built from the ``model``'s layers.

    Raises:
        FedtrakError: on an unknown kind, a k that is not a resolved positive integer or does not
            fit the projector.
    """
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, numbers.Integral):
        raise FedtrakError(f"the {kind} projector needs a resolved projection dimension k, got {proj_dim!r}")
    proj_dim = int(proj_dim)
    if kind == "identity":
        return IdentityProjector(grad_dim, proj_dim, seed)
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
