"""Label flips: corrupting a chosen set of owners' training data, for mislabel detection.

Simulations only (a real device has the data it has): a fraction of the
examples of each chosen client gets a wrong label, drawn uniformly from the
other classes, deterministically in a seed. The server, every virtual client
and ground-truth retraining apply the same flips, so the run trains and
featurizes on the corrupted data and evaluation knows the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from shared.errors import FedtrakError
from shared.partition import Partition
from shared.tasks import Task


@dataclass(frozen=True)
class FlipSpec:
    """Which labels to flip: ``fraction`` of each listed client's examples (0: none)."""

    fraction: float = 0.0
    clients: tuple[int, ...] = ()
    seed: int = 0

    @property
    def active(self) -> bool:
        """Whether any label is flipped."""
        return self.fraction > 0 and bool(self.clients)

    def validate(self, num_clients: int) -> None:
        """Raise FedtrakError on a fraction outside [0, 1) or a client id out of range."""
        if not 0 <= self.fraction < 1:
            raise FedtrakError(f"flip fraction must lie in [0, 1), got {self.fraction}")
        bad = [c for c in self.clients if not 0 <= c < num_clients]
        if bad:
            raise FedtrakError(f"flip clients {bad} are not among the {num_clients} clients")
        if len(set(self.clients)) != len(self.clients):
            raise FedtrakError(f"flip clients {list(self.clients)} repeat a client")


def parse_clients(text: str, num_clients: int) -> tuple[int, ...]:
    """``"0,3,4"`` -> ``(0, 3, 4)``; ``""`` or ``"half"`` -> the first half of the clients."""
    text = text.strip()
    if text in ("", "half"):
        return tuple(range(max(num_clients // 2, 1)))
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise FedtrakError(f"flip clients must be comma-separated client ids, got {text!r}") from None


def flip_spec(fraction: float, clients: str, num_clients: int, seed: int) -> FlipSpec:
    """The flips of a run's settings: ``fraction`` of the labels of ``clients`` (``"0,3"``; empty:
    the first half of the ``num_clients``), drawn from ``seed``; none when ``fraction`` is 0."""
    if not fraction:
        return FlipSpec()
    return FlipSpec(fraction, parse_clients(clients, num_clients), seed)


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
    if len(idx):
        rng = np.random.default_rng([flips.seed, 0xF11B])
        out[idx] = (out[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    return out


def corrupted(task: Task, parts: Partition, flips: FlipSpec) -> Task:
    """``task`` with its training labels flipped per ``flips`` (the task itself when none are)."""
    if not flips.active:
        return task
    return replace(task, y_train=flip_labels(task.y_train, task.num_classes, parts, flips))

