"""Ground truth for LDS: models retrained on random subsets, cached on disk.

For subset s (``s = 0, 1, ...``) a mask is drawn from ``(seed, s)``: a
random ``alpha`` fraction of the training examples (``kind="examples"``) or
of the owners (``kind="owners"``, the union of their examples). A model is
trained on it with the run's :class:`~fedtrak.simulations.retrain.Recipe` and each
query's margin recorded.

The cache lives in ``CACHE/<task>-<kind>-<hash>/``, the hash taken over the
recipe (task, sizes, algorithm and its settings, partition, label flips),
the kind, ``alpha`` and ``seed``; ``meta.json`` holds that key in the clear.
Each model is one file ``subset-00042.npz`` (its mask and the margins),
written atomically when the model is done, so an interrupted evaluation
keeps what it finished, a later one with more subsets trains only the
missing ones, and another run with the same recipe (other k, M, projector or
mode) reuses all of them. A file that is corrupt or disagrees with its mask
is retrained, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtrak.config.seeds import derive_seed
from fedtrak.data.checkpoints import atomic_write_json
from fedtrak.data.partition import Partition
from fedtrak.errors import FedtrakError
from fedtrak.simulations.evaluation.retrain import Recipe, retrain_margins

KINDS = ("examples", "owners")
CACHE_VERSION = 1
DEFAULT_CACHE = Path.home() / ".cache" / "fedtrak" / "groundtruth"


@dataclass(frozen=True)
class GroundTruth:
    """Retrained models' query margins.

    Attributes:
        masks: ``(S, n)`` bool, which training examples (dataset order) each model saw.
        owner_masks: ``(S, C)`` bool, which owners each model saw (``kind="owners"``), else ``None``.
        margins: ``(S, Q)`` float64 query margins of each model.
        folder: the cache folder.
        reused, trained: how many models came from the cache and how many were trained now.
        seconds: wall time of this call.
    """

    masks: np.ndarray
    owner_masks: np.ndarray | None
    margins: np.ndarray
    folder: Path
    reused: int
    trained: int
    seconds: float


def subset_mask(kind: str, parts: Partition, num_train: int, alpha: float, seed: int,
                s: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The example mask (and, for ``owners``, the owner mask) of subset ``s``."""
    rng = np.random.default_rng([seed, s, KINDS.index(kind)])
    if kind == "examples":
        mask = np.zeros(num_train, dtype=bool)
        mask[rng.choice(num_train, size=max(round(alpha * num_train), 1), replace=False)] = True
        return mask, None
    owners = np.zeros(parts.num_clients, dtype=bool)
    owners[rng.choice(parts.num_clients, size=max(round(alpha * parts.num_clients), 1), replace=False)] = True
    mask = np.zeros(num_train, dtype=bool)
    for c in np.flatnonzero(owners):
        mask[parts.clients[c]] = True
    return mask, owners


def cache_folder(root: Path, recipe: Recipe, kind: str, alpha: float, seed: int,
                 replica: int = 0) -> tuple[Path, dict]:
    """Where the ground truth of this key lives, and the key itself (``replica`` > 0: the same
    subsets trained from other seeds, for the seed-noise ceiling)."""
    key = {"version": CACHE_VERSION, "recipe": recipe.describe(), "kind": kind, "alpha": alpha,
           "seed": seed}
    if replica:
        key["replica"] = replica
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", recipe.task)
    return Path(root) / f"{name}-{kind}-{digest}", key


def _read_model(path: Path, mask: np.ndarray, num_queries: int) -> np.ndarray | None:
    """The margins stored in ``path``, or ``None`` (with a warning) if the file is unusable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = np.unpackbits(data["mask"], count=len(mask)).astype(bool)
            margins = np.asarray(data["margins"], dtype=np.float64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ground-truth cache file {path} is unreadable ({exc}); retraining it", stacklevel=3)
        return None
    if not np.array_equal(stored, mask) or margins.shape != (num_queries,) or not np.all(np.isfinite(margins)):
        warnings.warn(f"ground-truth cache file {path} does not match its subset; retraining it", stacklevel=3)
        return None
    return margins


def _write_model(path: Path, mask: np.ndarray, margins: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mask=np.packbits(mask), margins=margins)
    os.replace(tmp, path)


def ground_truth(
    recipe: Recipe,
    kind: str,
    num_subsets: int,
    alpha: float = 0.5,
    seed: int = 0,
    cache_root: Path = DEFAULT_CACHE,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    replica: int = 0,
) -> GroundTruth:
    """Margins of ``num_subsets`` models retrained on random subsets, from the cache where possible.

    ``replica`` > 0 trains the same subsets (the masks depend on ``seed`` only) from other
    training seeds: two replicas' margins say how much of a query's margin is seed noise, which
    no attribution can predict (:func:`fedtrak.simulations.evaluation.lds.seed_ceiling`).

    Raises:
        FedtrakError: on a bad kind, alpha or subset count, or a cache folder
            whose ``meta.json`` holds another key.
    """
    if kind not in KINDS:
        raise FedtrakError(f"unknown ground-truth kind {kind!r}: use one of {', '.join(KINDS)}")
    if not 0 < alpha < 1:
        raise FedtrakError(f"subset fraction alpha must lie in (0, 1), got {alpha}")
    if num_subsets < 2:
        raise FedtrakError(f"LDS needs at least 2 subsets, got {num_subsets}")
    start = time.perf_counter()
    task, parts = recipe.load()
    folder, key = cache_folder(cache_root, recipe, kind, alpha, seed, replica)
    train_seed = seed if not replica else derive_seed(seed, 0x5EED0000 + replica)
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "meta.json"
    if meta.exists():
        try:
            stored_key = json.loads(meta.read_text())
        except ValueError:
            stored_key = None
        if stored_key != key:
            raise FedtrakError(f"ground-truth cache {folder} holds another key in meta.json; remove the folder")
    else:
        atomic_write_json(meta, key)
    nq = len(task.y_query)
    masks, owner_masks = zip(*(subset_mask(kind, parts, task.num_train, alpha, seed, s)
                               for s in range(num_subsets)))
    margins = np.empty((num_subsets, nq))
    todo = []
    for s, mask in enumerate(masks):
        path = folder / f"subset-{s:05d}.npz"
        got = _read_model(path, mask, nq) if path.exists() else None
        if got is None:
            todo.append((s, mask, derive_seed(train_seed, s) % 2**63))
        else:
            margins[s] = got
            if progress:
                progress(1)
    for s, got in retrain_margins(recipe, todo, workers):
        margins[s] = got
        _write_model(folder / f"subset-{s:05d}.npz", masks[s], got)
        if progress:
            progress(1)
    return GroundTruth(np.stack(masks), np.stack(owner_masks) if kind == "owners" else None, margins,
                       folder, num_subsets - len(todo), len(todo), time.perf_counter() - start)
