"""Exact influence functions for small models: the reference that LDS sanity checks use.

For a model trained to (near) optimum of ``L(theta) = mean_i loss_i + (wd/2) ||theta||^2``
(the task's SGD recipe), adding training example i changes a query's output
``f(x)`` by about ``-grad f(x)^T H^{-1} grad loss_i / n``, with ``H`` the
Hessian of ``L`` (Koh & Liang 2017): a leave-one-out estimate without
projection, kernel approximation or Gauss-Newton step. On a convex task
(logistic regression) it is the best linear estimate TRAK approximates, so
its LDS bounds what TRAK can reach. Scores use fedtrak's sign convention
(positive: the example raises the query's margin) and are averaged over
checkpoints. The full ``p x p`` Hessian is formed, so only small models
(up to :data:`MAX_PARAMS` parameters) are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, hessian, vmap

from fedtrak.data.checkpoints import model_from_state
from fedtrak.data.inputs import to_tensors
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError

MAX_PARAMS = 5000


def influence_scores(
    task: Task,
    states: Sequence[dict[str, torch.Tensor]],
    x_train: np.ndarray,
    y_train: np.ndarray,
) -> np.ndarray:
    """``(Q, n)`` influence of each training example on each query's margin, checkpoint-averaged.

    Raises:
        FedtrakError: if the model has more than :data:`MAX_PARAMS` parameters.
    """
    xt, yt = to_tensors(x_train, y_train)
    xq, yq = to_tensors(task.x_query, task.y_query)
    total = np.zeros((len(yq), len(yt)))
    for m, state in enumerate(states):
        total += _checkpoint_influence(task, model_from_state(task, state, f"checkpoint {m}"), xt, yt, xq, yq)
    return total / len(states)


def _checkpoint_influence(task: Task, model: torch.nn.Module, xt: torch.Tensor, yt: torch.Tensor,
                          xq: torch.Tensor, yq: torch.Tensor) -> np.ndarray:
    """``(Q, n)`` influence scores at one checkpoint."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named]).double()
    if theta.numel() > MAX_PARAMS:
        raise FedtrakError(f"exact influence forms the full Hessian: {theta.numel()} parameters is too many "
                           f"(at most {MAX_PARAMS})")
    model = model.double()

    def unflat(vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, p in named:
            out[name] = vec[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out

    def logits(vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat(vec), (x.double() if x.is_floating_point() else x,))

    def loss_one(vec: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task.output.loss(logits(vec, x[None]), y[None])

    def margin_one(vec: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task.output.output(logits(vec, x[None]), y[None])[0]

    def objective(vec: torch.Tensor) -> torch.Tensor:
        mean_loss = task.output.loss(logits(vec, xt), yt)
        return mean_loss + 0.5 * task.training.weight_decay * (vec**2).sum()

    h = hessian(objective)(theta)
    g_train = vmap(grad(loss_one), in_dims=(None, 0, 0))(theta, xt, yt)
    g_query = vmap(grad(margin_one), in_dims=(None, 0, 0))(theta, xq, yq)
    solved = torch.linalg.solve(h, g_train.T)  # H^{-1} grad loss_i, (p, n)
    return (-(g_query @ solved) / len(yt)).numpy()
