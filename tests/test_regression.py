"""Regression as a built-in model output: squared loss, f = the prediction, q = the residual."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from torch import nn

import fedtrak
from fedtrak.errors import FedtrakError


def _diabetes() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    return (x[:300], y[:300]), (x[300:330], y[300:330])


def test_regression_scores_are_the_ridge_influence_of_each_training_example(tmp_path):
    """A linear model at the ridge optimum, the identity projector and lambda = the ridge's: TRAK's
    score with q = y - f is exactly the influence of up-weighting one example on a query's
    prediction, ``phi(x)^T (Phi^T Phi + lambda I)^-1 phi_i r_i``; and its sign says the example
    raises the prediction (it agrees with leaving the example out)."""
    (x, y), (xq, yq) = _diabetes()
    lam = 5.0
    phi = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    theta = np.linalg.solve(phi.T @ phi + lam * np.eye(11), phi.T @ y)
    model = nn.Linear(10, 1)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[:10][None]))
        model.bias.copy_(torch.tensor([theta[10]]))
    task = fedtrak.task_from_model("diabetes", nn.Linear(10, 1), train=(x, y), query=(xq, yq),
                                   output=fedtrak.Regression())
    assert task.num_classes == 1 and task.y_train.dtype == np.float32
    result = fedtrak.attribute(task, checkpoints=[model], out=tmp_path / "run", projector="identity", lam=str(lam),
                               clients=3)
    phi_q = np.hstack([xq, np.ones((len(xq), 1))])
    residual = y - phi @ theta
    expected = phi_q @ np.linalg.solve(phi.T @ phi + lam * np.eye(11), phi.T) * residual[None, :]
    ids = result.ids["index"]  # the run's columns are in the owners' order
    np.testing.assert_allclose(result.scores, expected[:, ids], rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    # Leaving example i out moves the query's prediction by about minus its score.
    i = int(np.argmax(np.abs(expected[0])))
    keep = np.arange(len(y)) != i
    loo = np.linalg.solve(phi[keep].T @ phi[keep] + lam * np.eye(11), phi[keep].T @ y[keep])
    assert np.sign(phi_q[0] @ theta - phi_q[0] @ loo) == np.sign(expected[0, i])


def test_a_regression_is_named_where_only_classification_is_supported():
    (x, y), (xq, yq) = _diabetes()
    with pytest.raises(FedtrakError, match=r"labels must be integer class indices, got float32 \(for real-valued "
                                           r"targets give output=fedtrak.Regression\(\)\)"):
        fedtrak.task_from_model("d", nn.Linear(10, 1), train=(x, y), query=(xq, yq))
    with pytest.raises(FedtrakError, match=r"a model with one output is a regression"):
        fedtrak.task_from_model("d", nn.Linear(10, 1), train=(x, y.astype(np.int64)), query=(xq, yq.astype(np.int64)))
    task = fedtrak.task_from_model("d", nn.Linear(10, 1), train=(x, y), query=(xq, yq), output=fedtrak.Regression())
    with pytest.raises(FedtrakError, match=r"its output \(regression\) has out-to-loss weights without a bound"):
        from fedtrak.privacy.plan import resolve_dp

        resolve_dp(fedtrak.Settings().replaced(epsilon=1.0, clip_norm=1.0), task, 11, "private")
    from fedtrak.data.partition import partition

    with pytest.raises(FedtrakError, match="partition dirichlet skews the owners' classes"):
        partition(task.y_train, 3, "dirichlet")
    with pytest.raises(FedtrakError, match="returns one value per example"):
        fedtrak.task_from_model("d", nn.Linear(10, 2), train=(x, y), query=(xq, yq), output=fedtrak.Regression())
