"""A user's own task, as a user would write it: their model class and their data.

Nothing here is fedtrak's: a small PyTorch MLP and scikit-learn's breast
cancer data set (569 patients, 30 features, benign or malignant), split into
training examples and queries, standardized. ``cancer_task()`` wraps them for
fedtrak; it is also what a SuperNode loads by import path
(``--task model:cancer_task`` with this folder on its ``PYTHONPATH``).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

import fedtrak


class TumourNet(nn.Module):
    """Two hidden layers; logits for benign and malignant."""

    def __init__(self, features: int = 30, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def cancer_data(queries: int = 69, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(x_train, y_train), (x_query, y_query)``: the data set standardized on its training part."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:queries], order[queries:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = ((x - mean) / std).astype(np.float32)
    return (x[train], y[train]), (x[test], y[test])


def cancer_task() -> fedtrak.Task:
    """The task: this model, this data, fedtrak's default TRAK output (the classification margin)."""
    train, query = cancer_data()
    return fedtrak.task_from_model("breast-cancer-mlp", TumourNet(), train=train, query=query,
                                   training=fedtrak.TrainConfig(epochs=30, batch_size=32, lr=0.05,
                                                                weight_decay=1e-3))
