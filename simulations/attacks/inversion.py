"""Gradient inversion against released features ("Inverting Gradients", Geiping et al. 2020).

Given a released feature ``t`` (a projected gradient, maybe clipped and
noised) the attacker optimizes inputs ``x`` so that ``phi(x, y)`` points the
same way: loss ``1 - cos(phi(x, y), t)`` plus a total-variation image prior,
with Adam from several random starts, inputs kept in [0, 1]. Given a released
*span* (a small client's Gram, :mod:`.small_owner`) the loss is the share of
``phi(x, y)`` outside it, ``1 - |B^T phi|^2 / |phi|^2``, which ignores sign.
Against a noised release the attacker, who knows sigma and C, maximizes the
posterior instead (Gaussian likelihood of the clipped feature, Gaussian prior
around the label's mean image from its own query set), so under heavy noise
its answer falls back to what the label alone tells.

Labels are inferred first from the output layer: the margin's gradient with
respect to the last layer's bias is +1 at the true label and negative
elsewhere, and the server can estimate that bias gradient from the released
feature (the minimum-norm preimage ``P (P^T P)^-1 t``; exact without a
projection). With a small k that estimate is noisy, so a short optimization
under every label screens them; the attack then runs in full for the
best-fitting labels and keeps the best fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedtrak.privacy.budget import FEATURES
from fedtrak.simulations.attacks.metrics import image_shape
from fedtrak.simulations.attacks.view import ServerView


@dataclass(frozen=True)
class InversionSettings:
    """Optimization budget of one inversion (``tv``: weight of the total-variation image prior)."""

    steps: int = 300
    restarts: int = 4
    label_candidates: int = 2
    lr: float = 0.05
    tv: float = 1e-3
    seed: int = 0


#: The default budget.
DEFAULT_INVERSION = InversionSettings()


def label_ranking(view: ServerView, targets: np.ndarray, signed: bool = True) -> np.ndarray:
    """Labels ranked most likely first for each released feature ``(n, k)``: ``(n, classes)``.

    Uses the last parameter tensor when it is the output layer's bias (one entry per class) and
    the projection is dense or absent; otherwise every label ranks equal (the screen decides).
    """
    n, classes = len(targets), view.task.num_classes
    last = list(view.featurizer.params.values())[-1]
    if last.numel() != classes or (view.matrix is None and not view.identity):
        return np.tile(np.arange(classes), (n, 1))  # no dense matrix to take a preimage with
    t = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    if view.identity:
        pre = t
    else:
        p = view.matrix.to(torch.float64)
        pre = torch.linalg.solve(p.T @ p, t.T).T @ p.T  # minimum-norm preimage of each target
    bias = pre[:, -classes:].numpy()
    return np.argsort(-(bias if signed else np.abs(bias)), axis=1)


def total_variation(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Anisotropic total variation of each input seen as an image: ``(b,)``."""
    img = x.reshape(len(x), *shape)
    return (img[:, 1:, :] - img[:, :-1, :]).abs().mean(dim=(1, 2)) + \
        (img[:, :, 1:] - img[:, :, :-1]).abs().mean(dim=(1, 2))


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_objective(dirs: torch.Tensor) -> Objective:
    """``1 - cos(phi, t)`` per row against unit targets ``dirs`` ``(R, k)``: a noise-free release."""
    return lambda phi, x, y: 1 - (phi * dirs).sum(dim=1) / (phi**2).sum(dim=1).clamp_min(1e-30).sqrt()


def span_objective(basis: torch.Tensor) -> Objective:
    """The share of ``phi`` outside the span of ``basis`` ``(k, r)`` (sign-free)."""
    return lambda phi, x, y: 1 - ((phi @ basis) ** 2).sum(dim=1) / (phi**2).sum(dim=1).clamp_min(1e-30)


def gaussian_objective(view: ServerView, targets: torch.Tensor) -> Objective:
    """Negative log posterior of a noised release ``t = clip_C(phi(x)) + N(0, (sigma C)^2 I)`` under
    a Gaussian prior on ``x`` around its label's mean image (the server's query set), per input
    dimension: the maximum a posteriori attack, which falls back to the prior as noise grows."""
    sd = view.dp.sigma(FEATURES) * view.dp.clip_norm

    def objective(phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        clipped = phi * (view.dp.clip_norm / (phi**2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-30)).clamp_max(1.0)
        data = ((targets - clipped) ** 2).sum(dim=1) / (2 * sd**2)
        flat = (x - view.class_means[y]).reshape(len(x), -1)
        prior = (flat**2 / (2 * view.class_vars[y].reshape(len(x), -1))).sum(dim=1)
        return (data + prior) / flat.shape[1]

    return objective


def _fit(view: ServerView, labels: np.ndarray, objective: Objective,
         settings: InversionSettings) -> tuple[np.ndarray, np.ndarray]:
    """Optimize one input per row of ``labels`` (plus the total-variation prior); return the
    inputs and their final objective values."""
    shape = view.task.input_shape
    img = image_shape(shape)
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.rand((len(labels), *shape), generator=gen).requires_grad_(True)
    y = torch.as_tensor(labels, dtype=torch.int64)
    opt = torch.optim.Adam([x], lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    for _ in range(settings.steps):
        opt.zero_grad()
        phi = view.features(x, y).to(torch.float64)
        loss = objective(phi, x, y) + settings.tv * total_variation(x, img)
        loss.sum().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    with torch.no_grad():
        final = objective(view.features(x, y).to(torch.float64), x, y)
    return x.detach().numpy(), final.numpy()


def _objective(view: ServerView, targets: np.ndarray, rows: np.ndarray) -> Objective:
    """The objective for released features ``targets`` repeated as ``targets[rows]``."""
    t = torch.as_tensor(targets[rows])
    if view.dp.active:
        return gaussian_objective(view, t)
    return cosine_objective(t / t.norm(dim=1, keepdim=True).clamp_min(1e-300))


def screen_labels(view: ServerView, targets: np.ndarray, ranking: np.ndarray,
                  settings: InversionSettings) -> np.ndarray:
    """The ``label_candidates`` labels per target that fit best after a short optimization
    (a fifth of the steps, one start) under every label; ties keep the bias-gradient ranking."""
    n, classes = ranking.shape
    if settings.label_candidates >= classes:
        return ranking
    short = replace(settings, steps=max(1, settings.steps // 5), restarts=1, seed=settings.seed + 1)
    _, loss = _fit(view, ranking.reshape(-1), _objective(view, targets, np.repeat(np.arange(n), classes)), short)
    order = np.argsort(loss.reshape(n, classes), axis=1, kind="stable")[:, : settings.label_candidates]
    return np.take_along_axis(ranking, order, axis=1)


def invert_features(view: ServerView, targets: np.ndarray,
                    settings: InversionSettings = DEFAULT_INVERSION) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reconstruct one input per released feature ``targets`` ``(n, k)``: the cosine attack on a
    noise-free release, the maximum a posteriori attack on a noised one.

    Returns the reconstructions ``(n, *input_shape)``, their chosen labels and objective values.
    """
    targets = np.asarray(targets, dtype=np.float64)
    n = len(targets)
    ranks = screen_labels(view, targets, label_ranking(view, targets), settings)
    cand = ranks.shape[1]
    labels = np.repeat(ranks, settings.restarts, axis=1).reshape(-1)  # (n * cand * restarts,)
    owner = np.repeat(np.arange(n), cand * settings.restarts)
    x, loss = _fit(view, labels, _objective(view, targets, owner), settings)
    best = np.array([np.flatnonzero(owner == i)[np.argmin(loss[owner == i])] for i in range(n)])
    return x[best], labels[best], loss[best]


def invert_span(view: ServerView, basis: np.ndarray, labels: np.ndarray,
                settings: InversionSettings = DEFAULT_INVERSION) -> tuple[np.ndarray, np.ndarray]:
    """Inputs whose features lie in the span of ``basis`` ``(k, r)`` (orthonormal columns), one
    optimization per entry of ``labels``; returns the inputs and their losses (share outside)."""
    b = torch.as_tensor(np.asarray(basis, dtype=np.float64))
    return _fit(view, np.asarray(labels), span_objective(b), settings)
