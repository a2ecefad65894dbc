"""Projectors: per-example gradients ``(batch, p)`` to features ``(batch, k)``, by name.

:mod:`~fedtrak.trak.projectors.base` holds the interface and the seeds,
:mod:`~fedtrak.trak.projectors.dense` the seeded dense projections (generated
block by block) and the identity, :mod:`~fedtrak.trak.projectors.factorized` the
per-layer (Kronecker) projection that never forms a per-example gradient.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from fedtrak.config.settings import PROJECTORS, ProjectionSettings
from fedtrak.errors import FedtrakError
from fedtrak.trak.projectors.base import BLOCK_ROWS, Projector, check_fits
from fedtrak.trak.projectors.dense import (
    DEFAULT_CACHE_BYTES,
    BlockRandomProjector,
    GaussianProjector,
    IdentityProjector,
    RademacherProjector,
)
from fedtrak.trak.projectors.factorized import FactorizedProjector
from fedtrak.trak.projectors.layers import factorizes

__all__ = ["BLOCK_ROWS", "DEFAULT_CACHE_BYTES", "BlockRandomProjector", "FactorizedProjector",
           "GaussianProjector", "IdentityProjector", "Projection", "Projector", "RademacherProjector",
           "make_projector", "resolve_projection"]


@dataclass(frozen=True)
class Projection:
    """A run's projection as resolved once: the projector's kind (``auto`` decided) and k."""

    kind: str
    dim: int


def resolve_projection(settings: ProjectionSettings, model: torch.nn.Module, num_params: int) -> Projection:
    """The projector and k of a run on ``model``: ``auto`` is ``factorized`` where every trained layer
    allows it (:func:`~fedtrak.trak.projectors.layers.factorizes`: it never forms a per-example
    gradient, hundreds of times faster on an MLP) and ``rademacher`` otherwise; k as
    :meth:`~fedtrak.config.settings.ProjectionSettings.resolved_dim` gives it. The projector is
    built once here, so a k it cannot take fails before anything runs.

    Raises:
        FedtrakError: if the projector cannot take k for this model.
    """
    kind = settings.projector
    if kind == "auto":
        kind = "factorized" if factorizes(model) else "rademacher"
    projection = Projection(kind, settings.resolved_dim(num_params))
    if kind != "identity":
        check_fits(projection.dim, num_params)
    make_projector(projection.kind, num_params, projection.dim, 0, cache_bytes=0, model=model)
    return projection


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
    if kind == "auto":
        raise FedtrakError("projector auto is decided once per run (resolve_projection), not per checkpoint")
    raise FedtrakError(f"unknown projector {kind!r}: use one of {', '.join(PROJECTORS)}")
