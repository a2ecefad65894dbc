"""The curious server's knowledge, and the releases it receives.

The server knows a checkpoint's weights, the model, the projection (seeded:
it can build the same matrix), k, the clip norm and the noise multiplier. The
releases are made here with the functions the clients run
(:mod:`fedtrak.privacy.mechanisms`): clipping per checkpoint, Gaussian noise on
features, Grams, counts and owner summaries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedtrak.config.settings import Settings, releases_gram
from fedtrak.data.tasks import Task
from fedtrak.privacy.mechanisms import (
    DPSettings,
    clip_scales,
    noised_count,
    noised_features,
    noised_gram,
    noised_owner_summaries,
    owner_summaries,
)
from fedtrak.trak.featurizer import Featurizer
from fedtrak.trak.kernel import gram
from fedtrak.trak.per_checkpoint import checkpoint_featurizer
from fedtrak.trak.projectors import IdentityProjector, Projection
from fedtrak.trak.projectors.factorized import FactorizedProjector


@dataclass
class Releases:
    """What one client releases for one checkpoint (``None``: not released in that mode)."""

    features: np.ndarray | None = None
    out_to_loss: np.ndarray | None = None
    gram: np.ndarray | None = None
    count: float | None = None
    summary: np.ndarray | None = None


class ServerView:
    """Checkpoint ``m`` as the server sees it: a differentiable feature map and the client's releases."""

    def __init__(self, task: Task, state: dict[str, torch.Tensor], m: int, settings: Settings,
                 dp: DPSettings, projection: Projection, kernel_source: str) -> None:
        """``projection`` and ``kernel_source``: the run's resolved projector and k, and kernel source."""
        self.task, self.m, self.dp = task, m, dp
        #: Whether the run's kernel is curvature-weighted (its Gram releases are ``Phi^T diag(w) Phi``).
        self.weighted = settings.kernel.weighted
        #: Whether clients release Grams (not under a public kernel, which the server builds itself).
        self.gram_released = releases_gram(kernel_source)
        self.featurizer: Featurizer = checkpoint_featurizer(task, state, m, settings, projection)
        proj = self.featurizer.projector
        self.proj_dim = proj.proj_dim
        self.identity = isinstance(proj, IdentityProjector)
        #: The dense ``(p, k)`` projection (None: no projection, or the factorized projector, which
        #: projects per layer and never forms it).
        self.matrix: torch.Tensor | None = None
        if not self.identity and not isinstance(proj, FactorizedProjector):
            self.matrix = proj.matrix()

    @functools.cached_property
    def _class_groups(self) -> list[np.ndarray]:
        task = self.task
        task.require_class_labels("the reconstruction attacks' class prior", "attack it with membership only")
        return [task.x_query[task.y_query == c] for c in range(task.num_classes)]

    @functools.cached_property
    def class_means(self) -> torch.Tensor:
        """Mean of each input dimension per class over the server's own query set: the attacker's
        prior (no client data); computed when a reconstruction first needs it."""
        return torch.as_tensor(np.stack([g.mean(axis=0) if len(g) else np.full(self.task.input_shape, 0.5)
                                         for g in self._class_groups]), dtype=torch.float32)

    @functools.cached_property
    def class_vars(self) -> torch.Tensor:
        """Variance (at least 1e-3) of each input dimension per class over the server's query set."""
        return torch.as_tensor(np.stack([np.maximum(g.var(axis=0), 1e-3) if len(g) > 1
                                         else np.full(self.task.input_shape, 0.25) for g in self._class_groups]),
                               dtype=torch.float32)

    def features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Projected gradients ``(b, k)`` of inputs ``x`` with labels ``y``, differentiable in ``x``."""
        g = self.featurizer.per_example_grads(x, y)
        if self.identity:
            return g
        return g @ self.matrix if self.matrix is not None else self.featurizer.projector.project(g)

    def client_features(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A client's features, out-to-loss weights and kernel weights (``None`` for the plain
        kernel), the features clipped to C when DP is on, as it stores and releases them."""
        f = self.featurizer.featurize(x, y)
        phi = f.features.astype(np.float64)
        if self.dp.active:
            phi = phi * clip_scales(np.linalg.norm(phi, axis=1)[None], self.dp.clip_norm, "per-checkpoint")[0, :, None]
        w = f.curvature.astype(np.float64) if self.weighted else None
        return phi, f.out_to_loss.astype(np.float64), w

    def releases(self, phi: np.ndarray, q: np.ndarray, mode: str, rng: np.random.Generator,
                 w: np.ndarray | None = None) -> Releases:
        """What a client with (clipped) features ``phi``, out-to-loss weights ``q`` and kernel
        weights ``w`` releases in ``mode`` (``features``: its features; ``private``: its Gram
        (none under a public kernel), count and owner summary)."""
        noisy = self.dp.active
        if mode == "features":
            f, w = noised_features(phi, q, self.dp, rng) if noisy else (phi, q)
            return Releases(features=np.asarray(f, dtype=np.float64), out_to_loss=np.asarray(w, dtype=np.float64))
        g = gram(phi, w)
        s = owner_summaries([phi], q)
        if not self.gram_released:
            g = None
        elif noisy:
            g = noised_gram(g, self.dp, rng)
        return Releases(gram=g,
                        count=noised_count(len(q), self.dp, rng) if noisy else float(len(q)),
                        summary=(noised_owner_summaries(s, self.dp, rng) if noisy else s)[0])
