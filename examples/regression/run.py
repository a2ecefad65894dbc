"""Regression through fedtrak's Python API: scikit-learn's diabetes progression, an MLP of your own,
TRAK with the squared-error output (f = the prediction, q = the residual), and its LDS against
models retrained on random halves, with the seed-noise ceiling.

    .venv/bin/python examples/regression/run.py [OUT]     # about a minute of attribution, then the evaluation
"""

import sys

import numpy as np
from sklearn.datasets import load_diabetes
from torch import nn

import fedtrak

out = sys.argv[1] if len(sys.argv) > 1 else "runs/diabetes"
x, y = load_diabetes(return_X_y=True)
x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
y = ((y - y.mean()) / y.std()).astype(np.float32)  # standardized progression a year on
order = np.random.default_rng(0).permutation(len(y))
train, query = order[:380], order[380:]

task = fedtrak.task_from_model(
    "diabetes-mlp", nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1)),
    train=(x[train], y[train]), query=(x[query], y[query]), output=fedtrak.Regression(),
    training=fedtrak.TrainConfig(epochs=30, lr=0.05, batch_size=32, weight_decay=1e-3))
central = fedtrak.attribute(task, out=out, checkpoints=3, clients=10)
fedtrak.evaluate(central, lds=True, owner_lds=True)
print(central)
