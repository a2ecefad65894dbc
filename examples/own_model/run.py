"""Attribute a user's own model's predictions, centrally and over 10 simulated Flower clients.

    python examples/own_model/run.py            # from the repository root, after installing fedtrak

The two runs use the same three checkpoints (trained here, as the user's own
training loop would) and the same settings, so their scores agree to float
precision: the federated protocol computes exactly the centralized TRAK.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from model import cancer_task

import fedtrak


def train(task: fedtrak.Task, seed: int) -> torch.nn.Module:
    """The user's own training loop (any would do): full-batch Adam on the training set."""
    torch.manual_seed(seed)
    model = task.make_model()
    x, y = torch.from_numpy(task.x_train), torch.from_numpy(task.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for both run folders (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtrak-own-model-"))

    task = cancer_task()
    models = [train(task, seed) for seed in range(3)]
    settings = {"proj_dim": 256, "clients": 10, "partition": "dirichlet", "alpha": 1.0}

    central = fedtrak.attribute(task, checkpoints=models, out=out / "central", **settings)
    federated = fedtrak.simulate(task, checkpoints=models, out=out / "federated", policy="full", **settings)

    scale = np.abs(central.scores).max()
    diff = np.abs(central.scores - federated.scores).max()
    print(f"{task.name}: {central.scores.shape[0]} queries x {central.scores.shape[1]} training examples, "
          f"10 owners, M = 3, k = 256")
    print(f"largest |central - federated| score difference: {diff:.2e} (scores up to {scale:.3g})")
    q = 0
    best = np.argsort(-central.scores[q])[:3]
    print(f"query 0 (label {task.y_query[q]}): top training examples {central.ids['index'][best].tolist()}, "
          f"top owners {np.argsort(-federated.owner_scores[q])[:3].tolist()}")
    np.testing.assert_array_equal(central.ids, federated.ids)
    if not np.allclose(federated.scores, central.scores, rtol=1e-4, atol=1e-4 * scale):
        print("the federated scores differ from the centralized ones", file=sys.stderr)
        return 1
    print(f"equal to 1e-4; run folders under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
