"""Kernel, lambda, scores, ensembling, owner totals and top-k (acceptance (c))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtrak.config.settings import Settings
from fedtrak.data import models
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.simulations.attribute import central_scores
from fedtrak.trak.kernel import Kernel, lambda_to_traker, precondition, resolve_lambda
from fedtrak.trak.scoring import ScoreEnsemble, owner_totals, top_k


def _tiny_task(rng: np.random.Generator) -> Task:
    return Task(
        name="tiny", make_model=lambda: models.logistic_regression(4, 3),
        x_train=rng.standard_normal((20, 4)).astype(np.float32), y_train=rng.integers(0, 3, 20),
        x_query=rng.standard_normal((5, 4)).astype(np.float32), y_query=rng.integers(0, 3, 5),
        num_classes=3,
    )


def _numpy_margin_grads(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Analytic margin gradients of a linear softmax model, flattened as (W row-major, b)."""
    z = x @ w.T + b
    grads, q = [], []
    for zi, xi, yi in zip(z, x, y):
        others = np.delete(np.arange(len(zi)), yi)
        soft = np.exp(zi[others] - zi[others].max())
        soft /= soft.sum()
        dz = np.zeros_like(zi)
        dz[yi] = 1.0
        dz[others] = -soft
        grads.append(np.concatenate([np.outer(dz, xi).ravel(), dz]))
        p = np.exp(zi - zi.max())
        q.append(1.0 - p[yi] / p.sum())
    return np.array(grads), np.array(q)


@pytest.mark.parametrize("weighting", ["none", "curvature"])
def test_identity_scores_equal_brute_force_trak_formula(weighting):
    """TRAK's formula by hand: ``phi(x)^T (Phi^T W Phi + lambda I)^-1 phi_i``, averaged over
    checkpoints, times the mean ``1 - p_i``; ``W`` is 1 (plain) or ``p (1 - p)`` (curvature)."""
    rng = np.random.default_rng(0)
    task = _tiny_task(rng)
    states, phis, qs, qphis = [], [], [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = task.make_model()
        states.append(model.state_dict())
        w = model[1].weight.detach().double().numpy()
        b = model[1].bias.detach().double().numpy()
        g, q = _numpy_margin_grads(w, b, task.x_train.astype(np.float64), task.y_train)
        gq, _ = _numpy_margin_grads(w, b, task.x_query.astype(np.float64), task.y_query)
        phis.append(g), qs.append(q), qphis.append(gq)
    lam = 0.5
    weights = [(1 - q) * q if weighting == "curvature" else np.ones_like(q) for q in qs]
    kernel_terms = [
        gq @ np.linalg.inv(g.T @ (g * w[:, None]) + lam * np.eye(g.shape[1])) @ g.T
        for g, gq, w in zip(phis, qphis, weights)
    ]
    want = np.mean(kernel_terms, axis=0) * np.mean(qs, axis=0)[None, :]
    got, records, _ = central_scores(task, states, task.x_train, task.y_train,
                                  Settings().replaced(projector="identity", lam=lam, weighting=weighting))
    assert [r["lambda"] for r in records] == [lam, lam]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_singular_kernel_is_refused_and_lambda_fixes_it():
    phi = np.random.default_rng(0).standard_normal((5, 8))  # rank 5 < k = 8
    gram = phi.T @ phi
    with pytest.raises(FedtrakError, match="increase lambda"):
        Kernel(gram, 0.0)
    kern = Kernel(gram, 1e-3)
    np.testing.assert_allclose(kern.solve(gram + 1e-3 * np.eye(8)), np.eye(8), atol=1e-8)


def test_kernel_rejects_bad_matrices():
    with pytest.raises(FedtrakError, match="not symmetric"):
        Kernel(np.array([[1.0, 2.0], [0.0, 1.0]]), 1.0)
    with pytest.raises(FedtrakError, match="NaN"):
        Kernel(np.array([[np.nan, 0.0], [0.0, 1.0]]), 1.0)
    with pytest.raises(FedtrakError, match="square"):
        Kernel(np.ones((2, 3)), 1.0)


def test_lambda_rules():
    gram = np.diag([2.0, 4.0, 6.0])  # mean diagonal 4
    assert resolve_lambda(0.25, gram, 10, 30, None).value == 0.25
    assert resolve_lambda("rel:0.5", gram, 10, 30, None).value == pytest.approx(2.0)
    assert resolve_lambda("auto", gram, 10, 30, None).value == pytest.approx(4e-3)
    assert resolve_lambda("wd", gram, 10, 30, 0.01).value == pytest.approx(10 * 0.01 * 30 / 3)
    assert resolve_lambda("auto", gram, 10, 30, 0.01).value == pytest.approx(1.0)
    for bad in ("-1", "0", "rel:x", "banana"):
        with pytest.raises(FedtrakError):
            resolve_lambda(bad, gram, 10, 30, None)
    with pytest.raises(FedtrakError, match="weight decay"):
        resolve_lambda("wd", gram, 10, 30, 0.0)
    # a noised Gram whose noise outweighs the features can have a negative mean diagonal: with the DP
    # noise floor the caller raises lambda to, its relative rule is kept (and recorded), not refused
    noised = np.diag([-2.0, 1.0, -5.0])
    with pytest.raises(FedtrakError, match="lambda must be positive"):
        resolve_lambda("auto", noised, 10, 30, None)
    assert resolve_lambda("auto", noised, 10, 30, None, floor=0.5).value == pytest.approx(-2e-3)
    assert lambda_to_traker(6.0, 600, 600, "identity") == pytest.approx(0.01)
    assert lambda_to_traker(6.0, 600, 60, "rademacher") == pytest.approx(0.6)


def test_traker_normalization_scales_by_mean_abs_inverse():
    rng = np.random.default_rng(1)
    phi = rng.standard_normal((30, 6))
    kern = Kernel(phi.T @ phi, 0.1)
    q = rng.standard_normal((4, 6))
    inv = np.linalg.inv(phi.T @ phi + 0.1 * np.eye(6))
    np.testing.assert_allclose(precondition(q, kern), q @ inv, rtol=1e-10)
    np.testing.assert_allclose(precondition(q, kern, "traker"), q @ inv / np.abs(inv).mean(), rtol=1e-10)


def test_ensemble_averages_kernel_and_out_to_loss_separately():
    ens = ScoreEnsemble(1, 2)
    ens.add(np.array([[1.0, 2.0]]), np.array([0.2, 0.4]))
    ens.add(np.array([[3.0, 6.0]]), np.array([0.6, 0.0]))
    np.testing.assert_allclose(ens.scores(), [[2.0 * 0.4, 4.0 * 0.2]])
    with pytest.raises(FedtrakError):
        ens.add(np.zeros((2, 2)), np.zeros(2))


def test_owner_totals_and_top_k():
    scores = np.array([[0.1, -0.5, 0.7, 0.2], [1.0, 0.0, -1.0, 0.5]])
    owners = np.array([0, 0, 1, 2])
    np.testing.assert_allclose(owner_totals(scores, owners, 3), [[-0.4, 0.7, 0.2], [1.0, -1.0, 0.5]])
    idx, vals = top_k(scores, 2)
    np.testing.assert_array_equal(idx, [[2, 3], [0, 3]])
    np.testing.assert_allclose(vals, [[0.7, 0.2], [1.0, 0.5]])
    with pytest.raises(FedtrakError):
        owner_totals(scores, np.array([0, 1]), 2)


@pytest.mark.slow
def test_lambda_is_chosen_without_the_queries(tmp_path, logreg_ckpt_dir):
    """The default lambda rule reads the training side only (the kernel, n, p, the weight decay):
    scoring another query set, or none of the evaluated queries at all, leaves every checkpoint's
    lambda and the training columns' scores unchanged, and the summary records rule and value."""
    from fedtrak.simulations.attribute import run_attribute

    runs = {}
    for name, query_size in (("all", None), ("fifty", 50)):
        runs[name] = run_attribute(Settings().replaced(out=str(tmp_path / name), checkpoint_dir=str(logreg_ckpt_dir),
                                                       proj_dim=64, query_size=query_size), progress=False).doc
    assert runs["all"]["num_queries"] == 149 and runs["fifty"]["num_queries"] == 50
    assert runs["all"]["lambda"] == runs["fifty"]["lambda"] == runs["all"]["resolved"]["lambda"]
    rules = {rec["lambda_rule"] for rec in runs["all"]["checkpoints"]}
    assert len(rules) == 1 and rules.pop().startswith("n*weight_decay*p/k")


def test_float32_queries_on_the_wire_move_scores_by_under_1e_6_of_the_largest(digits_logreg, logreg_states):
    """The score request sends U as float32: on digits-logreg (k = 512, the weighted kernel, every
    checkpoint) the scores a client computes from it differ from float64's by under 1e-6 of the
    largest score (measured: about 1e-7)."""
    from fedtrak.timing import PhaseTimer
    from fedtrak.trak.kernel import gram
    from fedtrak.trak.per_checkpoint import checkpoint_featurizer, solve_checkpoint
    from fedtrak.trak.projectors import Projection
    from fedtrak.trak.scoring import kernel_term

    settings = Settings()
    worst = 0.0
    for m, state in enumerate(logreg_states):
        featurizer = checkpoint_featurizer(digits_logreg, state, m, settings, Projection("rademacher", 512))
        train = featurizer.featurize(digits_logreg.x_train, digits_logreg.y_train)
        g = gram(train.features, train.curvature)
        u, _, _ = solve_checkpoint(digits_logreg, featurizer, g, len(train.features), settings, m, PhaseTimer())
        exact = kernel_term(train.features, u)
        wire = kernel_term(train.features, u.astype(np.float32))
        worst = max(worst, float(np.abs(wire - exact).max() / np.abs(exact).max()))
    assert 0 < worst < 1e-6
