"""The user's own task: nothing here is fedtrak's but the last function.

scikit-learn's wine data set (178 wines, 13 chemical measurements, 3 cultivars), standardized,
split into training examples (each device holds its own share of them) and the queries the
operator asks about, and a small PyTorch classifier.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

import fedtrak

#: The name the run config's ``task`` gives.
TASK = "wine-mlp"


class WineNet(nn.Module):
    """One hidden layer; logits for the three cultivars."""

    def __init__(self, features: int = 13, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def wine_data(queries: int = 28, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(x_train, y_train), (x_query, y_query)``, standardized on the training part."""
    x, y = load_wine(return_X_y=True)
    x_train, x_query, y_train, y_query = train_test_split(x, y, test_size=queries, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)
    return ((scaler.transform(x_train).astype(np.float32), y_train.astype(np.int64)),
            (scaler.transform(x_query).astype(np.float32), y_query.astype(np.int64)))


def wine_task() -> fedtrak.Task:
    """The task fedtrak attributes: this model and this data."""
    train, query = wine_data()
    return fedtrak.task_from_model(TASK, WineNet(), train=train, query=query,
                                   training=fedtrak.TrainConfig(epochs=40, batch_size=16, lr=0.05,
                                                                weight_decay=1e-3))
