"""TRAK scores: kernel terms, the checkpoint ensemble, owner totals and top-k.

For checkpoint m the kernel term of training example i for query x is
``phi_m(x)^T K_m^{-1} phi_m,i = U_m[x] . phi_m,i``. The score ensembles the
kernel term and the out-to-loss weight over checkpoints *separately* and
multiplies them (TRAK, Algorithm 1)::

    tau(x, i) = mean_m(U_m[x] . phi_m,i) * mean_m(q_m,i)

Sign and scale: a positive score means training on example i raises the
query's margin (a proponent); a negative score lowers it (an opponent). The
score is in units of margin per unit of up-weighting, on fedtrak's feature
scale (see :mod:`fedtrak.trak.projectors`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from fedtrak.errors import FedtrakError

#: Training rows per matrix product in :func:`kernel_term`.
ROW_CHUNK = 8192


def kernel_term(features: np.ndarray, preconditioned: np.ndarray) -> np.ndarray:
    """``U Phi^T``: ``(Q, n)`` float64, from ``(n, k)`` features and ``(Q, k)`` queries."""
    if features.ndim != 2 or preconditioned.ndim != 2 or features.shape[1] != preconditioned.shape[1]:
        raise FedtrakError(
            f"features {features.shape} and preconditioned queries {preconditioned.shape} disagree on k"
        )
    u = np.asarray(preconditioned, dtype=np.float64)
    out = np.empty((u.shape[0], features.shape[0]), dtype=np.float64)
    for start in range(0, features.shape[0], ROW_CHUNK):
        block = np.asarray(features[start : start + ROW_CHUNK], dtype=np.float64)
        out[:, start : start + len(block)] = u @ block.T
    return out


def self_kernel_term(features: np.ndarray, kernel_inverse: np.ndarray) -> np.ndarray:
    """``phi_i^T K^{-1} phi_i`` for every row of ``(n, k)`` features: ``(n,)`` float64.

    ``kernel_inverse`` is the (possibly rescaled) ``K^{-1}`` the queries were
    preconditioned with, so a training example scored as its own query gets
    the same scale as every other score.
    """
    kinv = np.asarray(kernel_inverse, dtype=np.float64)
    if features.ndim != 2 or kinv.shape != (features.shape[1], features.shape[1]):
        raise FedtrakError(f"features {features.shape} and kernel inverse {kinv.shape} disagree on k")
    out = np.empty(features.shape[0], dtype=np.float64)
    for start in range(0, features.shape[0], ROW_CHUNK):
        block = np.asarray(features[start : start + ROW_CHUNK], dtype=np.float64)
        out[start : start + len(block)] = np.einsum("ij,ij->i", block @ kinv, block)
    return out


class ScoreEnsemble:
    """Accumulates kernel terms and out-to-loss weights over checkpoints.

    Optionally also self-influence terms: the score of each training example
    for itself as the query, ensembled the same way (mislabel detection).
    """

    def __init__(self, num_queries: int, num_train: int) -> None:
        self._kernel_sum = np.zeros((num_queries, num_train), dtype=np.float64)
        self._q_sum = np.zeros(num_train, dtype=np.float64)
        self._self_sum: np.ndarray | None = None
        self.num_checkpoints = 0

    def add(self, kernel_terms: np.ndarray, out_to_loss: np.ndarray,
            self_terms: np.ndarray | None = None) -> None:
        """Add one checkpoint's ``(Q, n)`` kernel terms, ``(n,)`` weights and,
        optionally, ``(n,)`` self kernel terms (give them for every checkpoint or none)."""
        if kernel_terms.shape != self._kernel_sum.shape or out_to_loss.shape != self._q_sum.shape:
            raise FedtrakError(
                f"checkpoint result of shape {kernel_terms.shape}/{out_to_loss.shape} does not match "
                f"{self._kernel_sum.shape}/{self._q_sum.shape}"
            )
        if (self_terms is None) != (self._self_sum is None) and self.num_checkpoints:
            raise FedtrakError("self-influence terms must be given for every checkpoint or for none")
        if self_terms is not None:
            if self_terms.shape != self._q_sum.shape:
                raise FedtrakError(f"self terms of shape {self_terms.shape}, expected {self._q_sum.shape}")
            self._self_sum = self_terms.copy() if self._self_sum is None else self._self_sum + self_terms
        self._kernel_sum += kernel_terms
        self._q_sum += out_to_loss
        self.num_checkpoints += 1

    def self_influence(self) -> np.ndarray | None:
        """Ensembled self-influence ``(n,)``: mean self kernel term x ``qbar`` (``None`` if not added)."""
        if self._self_sum is None:
            return None
        return (self._self_sum / self.num_checkpoints) * self.mean_out_to_loss()

    def mean_out_to_loss(self) -> np.ndarray:
        """Checkpoint-averaged out-to-loss weights ``qbar``: ``(n,)``."""
        return self._q_sum / max(self.num_checkpoints, 1)

    def scores(self) -> np.ndarray:
        """The ensembled scores ``(Q, n)``."""
        if self.num_checkpoints == 0:
            raise FedtrakError("no checkpoint was scored")
        return (self._kernel_sum / self.num_checkpoints) * self.mean_out_to_loss()[None, :]


def owner_totals(scores: np.ndarray, owners: np.ndarray, num_owners: int) -> np.ndarray:
    """Sum of scores over each owner's examples: ``(Q, num_owners)``."""
    owners = np.asarray(owners)
    if owners.shape != (scores.shape[1],):
        raise FedtrakError(f"owner ids of shape {owners.shape} do not match {scores.shape[1]} examples")
    if owners.size and (owners.min() < 0 or owners.max() >= num_owners):
        raise FedtrakError(f"owner ids must lie in [0, {num_owners})")
    n = owners.size
    indicator = scipy.sparse.csr_matrix((np.ones(n), (np.arange(n), owners)), shape=(n, num_owners))
    return np.asarray((indicator.T @ np.asarray(scores, dtype=np.float64).T).T)


def owner_means(values: np.ndarray, owners: np.ndarray, num_owners: int) -> np.ndarray:
    """Mean of per-example ``values`` over each owner's examples: ``(num_owners,)``."""
    sums = owner_totals(np.asarray(values, dtype=np.float64)[None, :], owners, num_owners)[0]
    counts = np.bincount(np.asarray(owners), minlength=num_owners)
    if np.any(counts == 0):
        raise FedtrakError("an owner has no examples, so no mean")
    return sums / counts


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest-scoring training columns per query, best first.

    Returns ``(indices, values)``, each ``(Q, k)``; ``k`` is capped at ``n``.
    """
    k = min(int(k), scores.shape[1])
    if k < 1:
        raise FedtrakError(f"top-k needs k >= 1, got {k}")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)
