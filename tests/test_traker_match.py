"""fedtrak's scores against MadryLab's traker on the same checkpoints (acceptance (d))."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrak.config.settings import Settings
from fedtrak.simulations.attribute import central_scores
from fedtrak.trak.kernel import lambda_to_traker

pytest.importorskip("trak", reason="traker is a dev dependency (pip install -e '.[dev]')")
from fedtrak.simulations.evaluation.traker_reference import traker_scores


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.mark.parametrize("num_ckpts, normalize", [(1, "none"), (3, "traker")])
def test_identity_projector_matches_traker(digits_logreg, logreg_states, tmp_path, num_ckpts, normalize):
    """With the identity projector (traker: NoOpProjector) the per-query Pearson
    correlation is >= 0.999 on every query. One checkpoint: fedtrak's default
    ensembling. Three: traker rescales each K^-1 by its mean absolute entry
    before averaging, so fedtrak uses its normalize="traker" convention to match."""
    task = digits_logreg
    lam = task.num_train * task.training.weight_decay  # n * wd on the identity scale
    p = task.num_params
    states = logreg_states[:num_ckpts]
    ours, _, _ = central_scores(
        task, states, task.x_train, task.y_train,
        Settings().replaced(projector="identity", lam=lam, normalize=normalize, weighting="none"),
    )
    theirs = traker_scores(task, states, task.x_train, task.y_train, task.x_query, task.y_query,
                           lambda_to_traker(lam, p, p, "identity"), tmp_path)
    assert ours.shape == theirs.shape == (len(task.y_query), task.num_train)
    r = _rowwise_pearson(ours, theirs)
    assert r.min() >= 0.999, f"worst query Pearson {r.min():.6f}"
    if normalize == "traker":
        # Same convention, same numbers up to the feature scale: traker's features
        # are fedtrak's / sqrt(p) (identity), the normalized K^-1 is scale-free, so
        # traker's scores are fedtrak's / p.
        np.testing.assert_allclose(ours / p, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max())
