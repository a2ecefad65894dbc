"""Label flips: corrupting a chosen set of owners' training data, for mislabel detection.

Simulations only (a real device has the data it has): a fraction of the
examples of each chosen client gets a wrong label, drawn uniformly from the
other classes, deterministically in a seed. The server, every virtual client
and ground-truth retraining apply the same flips, so the run trains and
featurizes on the corrupted data and evaluation knows the truth.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedtrak.config.settings import FlipSpec
from fedtrak.data.partition import Partition
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError


def flipped_indices(labels: np.ndarray, parts: Partition, flips: FlipSpec) -> np.ndarray:
    """Sorted dataset indices whose labels ``flips`` changes."""
    if not flips.active:
        return np.zeros(0, dtype=np.int64)
    flips.validate(parts.num_clients)
    rng = np.random.default_rng([flips.seed, 0x5EED])
    chosen = []
    for c in sorted(flips.clients):
        idx = parts.clients[c]
        count = round(flips.fraction * len(idx))
        chosen.append(rng.choice(idx, size=count, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def flip_labels(labels: np.ndarray, num_classes: int, parts: Partition, flips: FlipSpec) -> np.ndarray:
    """A copy of ``labels`` with the flipped examples relabeled to another class."""
    out = np.array(labels, copy=True)
    idx = flipped_indices(labels, parts, flips)
    if len(idx) and not np.issubdtype(out.dtype, np.integer):
        raise FedtrakError("label flips relabel examples to another class: these labels are real values "
                           "(a regression), which have none")
    if len(idx) and out.ndim != 1:
        raise FedtrakError("label flips relabel examples to another class: these labels are token sequences "
                           "(a language model), which have none")
    if len(idx):
        rng = np.random.default_rng([flips.seed, 0xF11B])
        out[idx] = (out[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    return out


def corrupted(task: Task, parts: Partition, flips: FlipSpec) -> Task:
    """``task`` with its training labels flipped per ``flips`` (the task itself when none are)."""
    if not flips.active:
        return task
    return replace(task, y_train=flip_labels(task.y_train, task.num_classes, parts, flips))

