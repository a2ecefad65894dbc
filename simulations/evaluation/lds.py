"""The linear datamodeling score (LDS) and its bootstrap confidence interval.

For each query, the predicted effect of training subset s is the sum of the
subset's attribution scores; the actual effect is the margin of a model
retrained on the subset (:mod:`fedtrak.simulations.evaluation.groundtruth`). LDS is the
Spearman rank correlation of the two over subsets, averaged over queries
(TRAK paper, section 2). The interval is a percentile bootstrap over
queries (resampling queries with replacement), so it says how much the mean
depends on which queries were asked, for this set of retrained models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from fedtrak.errors import FedtrakError


@dataclass(frozen=True)
class LdsResult:
    """An LDS estimate.

    Attributes:
        mean: LDS, the mean per-query Spearman correlation.
        ci_low, ci_high: the bootstrap interval at ``level``.
        per_query: ``(Q,)`` per-query correlations (NaN where either side is constant).
        num_subsets: subsets (retrained models) per query.
        level: the interval's coverage.
    """

    mean: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray
    num_subsets: int
    level: float

    def describe(self) -> dict:
        """JSON-ready summary (without the per-query values)."""
        valid = np.isfinite(self.per_query)
        return {"lds": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "level": self.level,
                "num_queries": int(valid.sum()), "num_undefined_queries": int((~valid).sum()),
                "num_subsets": self.num_subsets, "interval": "percentile bootstrap over queries"}


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b``: ``(Q,)``.

    Ties get average ranks; a row where either side is constant gives NaN.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise FedtrakError(f"predicted {a.shape} and actual {b.shape} effects must be equal 2-d shapes")
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=1) / denom, np.nan)


def seed_ceiling(margins: np.ndarray, replica_margins: np.ndarray) -> dict:
    """The most LDS any fixed scorer can expect, given the retraining's own seed noise.

    ``margins`` and ``replica_margins`` ``(S, Q)`` are the query margins of the same subsets
    trained from two different seeds. Their per-query Spearman correlation ``r`` is the
    correlation of two noisy copies of the subset effect, so a perfect predictor of the
    noise-free effect correlates at most ``sqrt(r)`` with either: the ceiling is the mean of
    ``sqrt(max(r, 0))`` over queries.

    Raises:
        FedtrakError: on mismatched shapes.
    """
    if margins.shape != replica_margins.shape or margins.ndim != 2:
        raise FedtrakError(f"margins {margins.shape} and their replica {replica_margins.shape} must match")
    r = spearman_rows(margins.T, replica_margins.T)
    valid = r[np.isfinite(r)]
    if not len(valid):
        raise FedtrakError("no query has a defined correlation between the two retrainings")
    return {"ceiling": float(np.sqrt(np.maximum(valid, 0.0)).mean()),
            "replica_spearman": float(valid.mean()), "num_queries": len(valid),
            "num_subsets": int(margins.shape[0]),
            "what": "mean over queries of sqrt(Spearman r) between the margins of the same subsets "
                    "trained from two seeds: the most LDS a fixed scorer can expect"}


def lds(
    scores: np.ndarray,
    masks: np.ndarray,
    margins: np.ndarray,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> LdsResult:
    """LDS of ``scores`` ``(Q, n)`` against retrained models.

    ``masks`` ``(S, n)`` says which of the ``n`` score columns each model
    trained on; ``margins`` ``(S, Q)`` are its query margins.

    Raises:
        FedtrakError: on mismatched shapes, non-finite scores, or no query
            with a defined correlation.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if masks.ndim != 2 or masks.shape[1] != scores.shape[1] or margins.shape != (masks.shape[0], scores.shape[0]):
        raise FedtrakError(
            f"scores {scores.shape}, subset masks {masks.shape} and margins {margins.shape} do not fit "
            "(Q, n), (S, n), (S, Q)"
        )
    if not np.all(np.isfinite(scores)):
        raise FedtrakError("scores contain NaN or infinity")
    predicted = scores @ masks.T.astype(np.float64)  # (Q, S)
    per_query = spearman_rows(predicted, margins.T)
    valid = per_query[np.isfinite(per_query)]
    if not len(valid):
        raise FedtrakError("no query has a defined rank correlation (constant scores or margins)")
    rng = np.random.default_rng(seed)
    means = valid[rng.integers(0, len(valid), size=(bootstrap, len(valid)))].mean(axis=1)
    tail = (1 - level) / 2
    return LdsResult(float(valid.mean()), float(np.quantile(means, tail)),
                     float(np.quantile(means, 1 - tail)), per_query, masks.shape[0], level)
