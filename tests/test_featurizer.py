"""Per-example gradients, margins and out-to-loss weights (acceptance (a))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtrak.data import models
from fedtrak.data.modelout import ClassificationMargin
from fedtrak.errors import FedtrakError
from fedtrak.trak.featurizer import Featurizer
from fedtrak.trak.projectors import make_projector


def _loop_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference: one backward pass per example."""
    out = ClassificationMargin()
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        out.output(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "make_model, shape",
    [
        (lambda: models.logistic_regression(64, 10), (64,)),
        (lambda: models.mlp(64, (32, 16), 10), (64,)),
        (lambda: models.small_cnn(10), (1, 28, 28)),
    ],
    ids=["logreg", "mlp", "cnn"],
)
def test_vmap_grads_equal_per_example_loop(make_model, shape):
    torch.manual_seed(0)
    model = make_model().eval()
    x = torch.randn(12, *shape)
    y = torch.randint(0, 10, (12,))
    p = models.count_params(model)
    feat = Featurizer(model, ClassificationMargin(), make_projector("identity", p, p, 0))
    got = feat.per_example_grads(x, y)
    want = _loop_grads(model, x, y)
    assert got.shape == (12, p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_margin_and_out_to_loss_definitions():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    out = ClassificationMargin()
    want_margin = [2.0 - np.log(np.exp(0.5) + np.exp(-1.0)), 0.0 - np.log(2.0)]
    np.testing.assert_allclose(out.output(logits, labels).numpy(), want_margin, rtol=1e-6)
    p = torch.softmax(logits, -1)
    np.testing.assert_allclose(out.out_to_loss(logits, labels).numpy(),
                               [1 - p[0, 0].item(), 1 - p[1, 2].item()], rtol=1e-6)


def test_chunking_does_not_change_features():
    torch.manual_seed(1)
    model = models.mlp(64, (32,), 10)
    x = np.random.default_rng(0).random((50, 64), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 10, 50)
    p = models.count_params(model)
    proj = make_projector("rademacher", p, 64, seed=3)
    big = Featurizer(model, ClassificationMargin(), proj, batch_size=64).featurize(x, y)
    small = Featurizer(model, ClassificationMargin(), proj, batch_size=7, chunk_bytes=1).featurize(x, y)
    np.testing.assert_allclose(small.features, big.features, rtol=1e-5, atol=1e-6)
    # A forward pass over a different batch size may round differently in the last bit.
    np.testing.assert_allclose(small.out_to_loss, big.out_to_loss, rtol=1e-6, atol=1e-7)


def test_non_finite_gradient_is_refused():
    model = models.logistic_regression(64, 10)
    with torch.no_grad():
        model[1].weight[3, 5] = float("nan")
    p = models.count_params(model)
    feat = Featurizer(model, ClassificationMargin(), make_projector("identity", p, p, 0))
    x = np.ones((4, 64), dtype=np.float32)
    with pytest.raises(FedtrakError, match="non-finite gradient"):
        feat.featurize(x, np.zeros(4, dtype=np.int64))


def test_projector_must_match_model():
    model = models.logistic_regression(64, 10)
    with pytest.raises(FedtrakError, match="projector was built for 10 parameters"):
        Featurizer(model, ClassificationMargin(), make_projector("identity", 10, 10, 0))
