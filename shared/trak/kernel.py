"""The TRAK kernel ``K = Phi^T Phi + lambda I``: accumulation, lambda, solve, preconditioning.

All kernel math runs in float64. ``K`` is factorized with Cholesky; a kernel
that is not (numerically) positive definite is refused with an error that
says to raise lambda: ``Phi^T Phi`` is singular whenever k exceeds the number
of examples, and for models whose margin gradients span a subspace
(logistic regression: constant-zero pixels, the softmax's all-ones
direction), so lambda must be positive in practice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from fedtrak.config.settings import NORMALIZATIONS
from fedtrak.errors import FedtrakError

#: Default relative lambda (times the mean diagonal of Phi^T Phi) when the
#: training weight decay is unknown or zero.
DEFAULT_LAMBDA_REL = 1e-3

#: Smallest accepted reciprocal condition estimate of the regularized kernel.
MIN_RCOND = 1e-13



def check_symmetric(matrix: np.ndarray, what: str) -> None:
    """Raise FedtrakError unless ``matrix`` is square and symmetric to float64 round-off."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise FedtrakError(f"{what} must be square, got shape {matrix.shape}")
    scale = max(1.0, float(np.abs(matrix).max(initial=0.0)))
    if not np.allclose(matrix, matrix.T, rtol=1e-10, atol=1e-12 * scale):
        raise FedtrakError(f"{what} is not symmetric")


def gram(features: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``Phi^T Phi`` in float64 for an ``(n, k)`` feature matrix; with ``(n,)`` ``weights``,
    ``Phi^T diag(w) Phi`` (the curvature-weighted kernel)."""
    f = np.asarray(features, dtype=np.float64)
    if weights is None:
        return f.T @ f
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (f.shape[0],) or np.any(w < 0):
        raise FedtrakError(f"kernel weights of shape {w.shape} must be ({f.shape[0]},) and non-negative")
    return (f * w[:, None]).T @ f


class GramAccumulator:
    """Sums ``Phi^T diag(w) Phi`` (``w`` 1 without weights) over chunks of features (float64) and
    counts examples."""

    def __init__(self, proj_dim: int) -> None:
        self.matrix = np.zeros((proj_dim, proj_dim), dtype=np.float64)
        self.count = 0

    def add(self, features: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add one ``(b, k)`` chunk of features (and, weighting, its ``(b,)`` weights)."""
        if features.ndim != 2 or features.shape[1] != self.matrix.shape[0]:
            raise FedtrakError(
                f"features of shape {features.shape} do not match a {self.matrix.shape[0]}-dim kernel"
            )
        self.matrix += gram(features, weights)
        self.count += features.shape[0]


@dataclass(frozen=True)
class LambdaChoice:
    """The lambda a run used and the rule that produced it (recorded in summaries)."""

    value: float
    rule: str


def resolve_lambda(
    spec: str | float,
    gram_matrix: np.ndarray,
    num_examples: int,
    grad_dim: int,
    weight_decay: float | None,
    floor: float = 0.0,
) -> LambdaChoice:
    """Turn a lambda specification into a value on fedtrak's feature scale.

    ``floor`` (a noised Gram's DP noise floor, which the caller raises lambda to) lets a relative rule
    give a non-positive value: a noised Gram's mean diagonal can be, where the noise outweighs the
    features. Without a floor such a value is refused.

    ``spec`` is one of:

    * a positive number: used as is;
    * ``"rel:X"``: ``X`` times the mean diagonal of ``Phi^T Phi``;
    * ``"wd"``: ``n * weight_decay * p / k``, the training objective's own
      ridge ``(n wd / 2) ||theta||^2`` carried into the projected space (with
      entries of P of variance 1/k, ``P^T P ~ (p/k) I``); in traker's scale
      this is plainly ``n * weight_decay``;
    * ``"auto"`` (default): ``"wd"`` when the weight decay is known and
      positive, else ``rel:1e-3``.
    """
    k = gram_matrix.shape[0]
    mean_diag = float(np.trace(gram_matrix)) / k
    if isinstance(spec, (int, float)) or _is_number(spec):
        value = float(spec)
        rule = "fixed"
    elif spec == "wd" or (spec == "auto" and weight_decay):
        if not weight_decay or weight_decay <= 0:
            raise FedtrakError("--lambda wd needs a task with a positive training weight decay")
        value = num_examples * weight_decay * grad_dim / k
        rule = f"n*weight_decay*p/k (n={num_examples}, weight_decay={weight_decay}, p={grad_dim}, k={k})"
    elif spec == "auto" or str(spec).startswith("rel:"):
        rel = DEFAULT_LAMBDA_REL if spec == "auto" else _parse_float(str(spec)[4:], spec)
        value = rel * mean_diag
        rule = f"{rel}*mean_diag(Phi^T Phi) (mean_diag={mean_diag:.6g})"
    else:
        raise FedtrakError(f"bad --lambda {spec!r}: use a positive number, rel:X, wd or auto")
    if not np.isfinite(value) or (value <= 0 and not floor > 0):
        raise FedtrakError(f"lambda must be positive and finite, got {value} from {spec!r}")
    return LambdaChoice(value, rule)


def lambda_to_traker(lam: float, grad_dim: int, proj_dim: int, projector: str) -> float:
    """Convert a fedtrak lambda to traker's ``lambda_reg`` for the same projection.

    traker divides projected gradients by ``sqrt(p)`` and its random entries
    are +-1 / N(0, 1); fedtrak's random entries are scaled by ``1/sqrt(k)``
    and its identity projector not at all. fedtrak features are therefore
    ``s`` times traker's with ``s^2 = p / k`` (random) or ``s^2 = p``
    (identity), and ``lam_traker = lam / s^2``.
    """
    scale_sq = grad_dim if projector == "identity" else grad_dim / proj_dim
    return lam / scale_sq


class Kernel:
    """A Cholesky-factorized ``Phi^T Phi + lambda I``.

    Raises:
        FedtrakError: if the matrix is not square, symmetric and finite, or
            if it is not positive definite after adding lambda.
    """

    def __init__(self, gram_matrix: np.ndarray, lam: float) -> None:
        g = np.asarray(gram_matrix, dtype=np.float64)
        if not np.all(np.isfinite(g)):
            raise FedtrakError("kernel contains NaN or infinity")
        check_symmetric(g, "kernel")
        if not lam >= 0:
            raise FedtrakError(f"lambda must be non-negative, got {lam}")
        self.lam = float(lam)
        self.dim = g.shape[0]
        reg = g + self.lam * np.eye(self.dim)
        try:
            self._factor = scipy.linalg.cho_factor(reg, lower=True, check_finite=False)
        except np.linalg.LinAlgError as exc:
            raise FedtrakError(
                f"kernel Phi^T Phi + {self.lam:.4g} I is not positive definite: increase lambda"
            ) from exc
        diag = np.abs(np.diag(self._factor[0]))
        rcond = float((diag.min() / diag.max()) ** 2)
        if rcond < MIN_RCOND:
            raise FedtrakError(
                f"kernel Phi^T Phi + {self.lam:.4g} I is numerically singular "
                f"(condition estimate {1 / rcond:.3g}): increase lambda"
            )

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``K^{-1} rhs`` for a ``(k,)`` or ``(k, m)`` right-hand side."""
        return scipy.linalg.cho_solve(self._factor, np.asarray(rhs, dtype=np.float64), check_finite=False)

    def inverse(self) -> np.ndarray:
        """The explicit ``K^{-1}`` (k x k)."""
        return self.solve(np.eye(self.dim))


def precondition(query_features: np.ndarray, kernel: Kernel, normalize: str = "none") -> np.ndarray:
    """Preconditioned queries ``U = phi(Q) K^{-1}``: ``(Q, k)`` float64.

    ``normalize="traker"`` divides ``K^{-1}`` by the mean absolute value of
    its entries, as traker does before scoring. That factor cancels in the
    ranking for one checkpoint but reweights checkpoints in the ensemble.
    """
    q = np.asarray(query_features, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != kernel.dim:
        raise FedtrakError(f"query features of shape {q.shape} do not match a {kernel.dim}-dim kernel")
    if normalize == "none":
        return kernel.solve(q.T).T
    return q @ effective_inverse(kernel, normalize)


def with_more_ridge(preconditioned: np.ndarray, regularized: np.ndarray, extra: float) -> np.ndarray:
    """Queries preconditioned with ``K`` (``regularized``: ``Phi^T Phi + lambda I``, any rescaling
    kept) turned into queries preconditioned with ``K + extra I``: ``U K (K + extra I)^-1``."""
    reg = np.asarray(regularized, dtype=np.float64)
    shifted = reg + extra * np.eye(reg.shape[0])
    return scipy.linalg.solve(shifted, reg @ np.asarray(preconditioned, dtype=np.float64).T, assume_a="pos").T


def effective_inverse(kernel: Kernel, normalize: str = "none") -> np.ndarray:
    """The explicit ``K^{-1}`` queries are preconditioned with (rescaled for ``traker``)."""
    if normalize not in NORMALIZATIONS:
        raise FedtrakError(f"unknown normalization {normalize!r}: use one of {', '.join(NORMALIZATIONS)}")
    inv = kernel.inverse()
    inv = (inv + inv.T) / 2  # exactly symmetric, so it packs as an upper triangle
    return inv / np.abs(inv).mean() if normalize == "traker" else inv


def _is_number(text: object) -> bool:
    try:
        float(str(text))
    except ValueError:
        return False
    return True


def _parse_float(text: str, spec: object) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise FedtrakError(f"bad --lambda {spec!r}: expected rel:<number>") from exc
