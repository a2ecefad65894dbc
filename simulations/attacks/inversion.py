"""Gradient inversion against released features ("Inverting Gradients", Geiping et al. 2020).

Given a released feature ``t`` (a projected gradient, maybe clipped and
noised) the attacker optimizes inputs ``x`` so that ``phi(x, y)`` points the
same way: loss ``1 - cos(phi(x, y), t)`` plus a total-variation image prior,
with Adam from several random starts, inputs kept in [0, 1]. Given a released
*span* (a small client's Gram, :mod:`.small_owner`) the loss is the share of
``phi(x, y)`` outside it, ``1 - |B^T phi|^2 / |phi|^2``, which ignores sign.

Labels are inferred first from the output layer: the margin's gradient with
respect to the last layer's bias is +1 at the true label and negative
elsewhere, and the server can estimate that bias gradient from the released
feature (the minimum-norm preimage ``P (P^T P)^-1 t``; exact without a
projection). With a small k that estimate is noisy, so a short optimization
under every label screens them; the attack then runs in full for the
best-fitting labels and keeps the best fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from simulations.attacks.metrics import image_shape
from simulations.attacks.view import ServerView


@dataclass(frozen=True)
class InversionSettings:
    """Optimization budget of one inversion."""

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

    Uses the last parameter tensor when it is the output layer's bias (one entry per class);
    otherwise every label ranks equal (the attack then tries them in order).
    """
    n, classes = len(targets), view.task.num_classes
    last = list(view.featurizer.params.values())[-1]
    if last.numel() != classes:
        return np.tile(np.arange(classes), (n, 1))
    t = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    if view.matrix is None:
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


def _fit(view: ServerView, labels: np.ndarray, target_dirs: torch.Tensor, basis: torch.Tensor | None,
         settings: InversionSettings) -> tuple[np.ndarray, np.ndarray]:
    """Optimize one input per row of ``labels``; return the inputs and their final match loss.

    ``target_dirs`` ``(R, k)``: unit targets (cosine loss), used when ``basis`` is None;
    ``basis`` ``(k, r)``: an orthonormal span (span loss).
    """
    shape = view.task.input_shape
    img = image_shape(shape)
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.rand((len(labels), *shape), generator=gen).requires_grad_(True)
    y = torch.as_tensor(labels, dtype=torch.int64)
    opt = torch.optim.Adam([x], lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)

    def match(phi: torch.Tensor) -> torch.Tensor:
        norm2 = (phi**2).sum(dim=1).clamp_min(1e-30)
        if basis is None:
            return 1 - (phi * target_dirs).sum(dim=1) / norm2.sqrt()
        return 1 - ((phi @ basis) ** 2).sum(dim=1) / norm2

    for _ in range(settings.steps):
        opt.zero_grad()
        phi = view.features(x, y).to(torch.float64)
        loss = match(phi) + settings.tv * total_variation(x, img)
        loss.sum().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    with torch.no_grad():
        final = match(view.features(x, y).to(torch.float64))
    return x.detach().numpy(), final.numpy()


def screen_labels(view: ServerView, dirs: torch.Tensor, ranking: np.ndarray,
                  settings: InversionSettings) -> np.ndarray:
    """The ``label_candidates`` labels per target that fit best after a short optimization
    (a fifth of the steps, one start) under every label; ties keep the bias-gradient ranking."""
    n, classes = ranking.shape
    if settings.label_candidates >= classes:
        return ranking
    short = InversionSettings(steps=max(1, settings.steps // 5), restarts=1, lr=settings.lr, tv=settings.tv,
                              seed=settings.seed + 1)
    labels = ranking.reshape(-1)
    _, loss = _fit(view, labels, dirs[np.repeat(np.arange(n), classes)], None, short)
    order = np.argsort(loss.reshape(n, classes), axis=1, kind="stable")[:, : settings.label_candidates]
    return np.take_along_axis(ranking, order, axis=1)


def invert_features(view: ServerView, targets: np.ndarray,
                    settings: InversionSettings = DEFAULT_INVERSION) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reconstruct one input per released feature ``targets`` ``(n, k)``.

    Returns the reconstructions ``(n, *input_shape)``, their chosen labels and match losses.
    """
    targets = np.asarray(targets, dtype=np.float64)
    n = len(targets)
    dirs = torch.as_tensor(targets / np.maximum(np.linalg.norm(targets, axis=1, keepdims=True), 1e-300))
    ranks = screen_labels(view, dirs, label_ranking(view, targets), settings)
    cand = ranks.shape[1]
    labels = np.repeat(ranks, settings.restarts, axis=1).reshape(-1)  # (n * cand * restarts,)
    owner = np.repeat(np.arange(n), cand * settings.restarts)
    x, loss = _fit(view, labels, dirs[owner], None, settings)
    best = np.array([np.flatnonzero(owner == i)[np.argmin(loss[owner == i])] for i in range(n)])
    return x[best], labels[best], loss[best]


def invert_span(view: ServerView, basis: np.ndarray, labels: np.ndarray,
                settings: InversionSettings = DEFAULT_INVERSION) -> tuple[np.ndarray, np.ndarray]:
    """Inputs whose features lie in the span of ``basis`` ``(k, r)`` (orthonormal columns), one
    optimization per entry of ``labels``; returns the inputs and their losses (share outside)."""
    b = torch.as_tensor(np.asarray(basis, dtype=np.float64))
    return _fit(view, np.asarray(labels), torch.empty(0), b, settings)
