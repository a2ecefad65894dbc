"""Ground-truth retraining: the run's own learning algorithm, on subsets of its training data.

LDS compares predicted and actual effects of training
on a subset. "Actual" means: train a fresh model on the subset with the
*same learning algorithm* as the run's checkpoints, and record each query's
margin. A :class:`Recipe` names that algorithm:

* ``central-sgd``: the task's SGD recipe on the pooled subset
  (:func:`fedtrak.data.checkpoints.train_central`);
* ``train-fn``: the user's own training loop (the task's ``train_fn``) on the pooled subset, for
  checkpoints the user brought;
* ``fedavg``: federated averaging over the run's partition, each client
  training on its own examples that lie in the subset. It is the same
  computation as Flower's ``FedAvg`` with fedtrak's ClientApp (same local
  loop and shuffling seeds, :func:`fedtrak.data.checkpoints.fedavg_local_seed`;
  weights averaged by example counts in float32 like Flower's
  ``aggregate_arrayrecords``), run in-process, because a Ray start-up per
  ground-truth model would cost more than the training itself. A test
  checks it against a real Flower checkpoint.

Checkpoints the user brought (``given``, or bare ``*.pt`` files) are retrained with the task's
recipe: its ``train_fn`` where it has one, else ``central-sgd`` with its ``TrainConfig``
(:meth:`Recipe.origin` says which, for the evaluation's output).

Models are trained in worker processes (one torch thread each), one model
per job; small models train in well under a second. The workers never re-run the
user's script (:mod:`fedtrak.simulations.processes`), and a task that exists only in this
process (a Task object of the user's) reaches them by value (:mod:`fedtrak.data.shipping`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedtrak.data.checkpoints import fedavg_local_seed, seeded_model, sgd_epochs, train_central
from fedtrak.data.inputs import call_model, take, to_tensors
from fedtrak.data.models import frozen_keys
from fedtrak.data.partition import Partition, partition
from fedtrak.data.shipping import receive_task, task_payload
from fedtrak.data.tasks import Task, cached_task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.training import dp_sgd_epochs
from fedtrak.simulations.processes import script_free_context

ALGORITHMS = ("central-sgd", "train-fn", "fedavg", "fedavg-dp-sgd")
#: How a manifest marks checkpoints fedtrak did not train: the user's own (``given``) or bare files.
BROUGHT = ("given", "unknown")


@dataclass(frozen=True)
class Recipe:
    """How a run's checkpoints were trained: what ground-truth retraining repeats.

    Attributes:
        task, train_size, query_size: the task as the run loaded it (sizes 0: whole split).
        algorithm: ``central-sgd``, ``train-fn``, ``fedavg`` or ``fedavg-dp-sgd``.
        epochs: training epochs (``central-sgd``), local epochs per round (``fedavg``), 0 for
            ``train-fn`` (the user's loop decides).
        rounds: FedAvg rounds (0 for ``central-sgd``).
        partition, num_clients, alpha, partition_seed: the run's partition
            (who owns what; FedAvg trains per owner, owner subsets pick owners).
        flip_fraction, flip_clients, flip_seed: label flips applied to the
            training data before training (see :mod:`fedtrak.data.corruption`).
        dp_sigmas, dp_clip: ``fedavg-dp-sgd``: each client's DP-SGD noise multiplier in the run (a
            device sets its own from its count) and the per-example clip norm; a retrained model's
            clients train at those, with fresh noise.
        checkpoints: how the run's checkpoints were trained where ground truth does not repeat
            it (``given``: the user's own; empty: by this recipe). Not part of the cache key: the
            retrained models are the same.
    """

    task: str
    train_size: int
    query_size: int
    algorithm: str
    epochs: int
    rounds: int
    partition: str
    num_clients: int
    alpha: float
    partition_seed: int
    flip_fraction: float = 0.0
    flip_clients: tuple[int, ...] = ()
    flip_seed: int = 0
    dp_sigmas: tuple[float, ...] = ()
    dp_clip: float = 0.0
    checkpoints: str = ""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise FedtrakError(
                f"cannot retrain checkpoints trained by {self.algorithm!r}: ground truth needs one of "
                f"{', '.join(ALGORITHMS)} (the checkpoint manifest says how they were trained); mark your own "
                f"checkpoints 'given' in it, and give the task your training loop "
                f"(fedtrak.task_from_model(..., train_fn=...)) or its TrainConfig (training=...)"
            )
        if (self.epochs < 1 and self.algorithm != "train-fn") or (self.algorithm.startswith("fedavg") and self.rounds < 1):
            raise FedtrakError(f"recipe needs positive epochs (and rounds for FedAvg): {self}")
        if self.algorithm == "fedavg-dp-sgd" and (len(self.dp_sigmas) != self.num_clients or self.dp_clip <= 0
                                                  or not all(s > 0 for s in self.dp_sigmas)):
            raise FedtrakError(f"a DP-SGD recipe needs a positive noise multiplier per client and a clip norm: {self}")

    def describe(self) -> dict:
        """JSON-ready form (the cache key is derived from it)."""
        out = asdict(self)
        out["flip_clients"] = list(self.flip_clients)
        out["dp_sigmas"] = list(self.dp_sigmas)
        del out["checkpoints"]
        if self.algorithm != "fedavg-dp-sgd":  # the cache keys of older recipes stay as they were
            del out["dp_sigmas"], out["dp_clip"]
        return out

    def origin(self) -> dict:
        """What the evaluation's output says of the recipe: the algorithm, and for checkpoints the
        user brought, that ground truth trains with the task's recipe instead of theirs."""
        if not self.checkpoints:
            return {"algorithm": self.algorithm, "recipe": "the run's own (as its checkpoint manifest records)"}
        if self.algorithm == "train-fn":
            recipe = "the task's train_fn"
            note = "your checkpoints were retrained with your training function"
        else:
            recipe = f"the task's TrainConfig ({self.epochs} epochs)"
            note = ("fedtrak cannot know how you trained your checkpoints: ground truth trains with the task's "
                    "TrainConfig, which may differ from your training; give task_from_model(..., train_fn=...) "
                    "to retrain with your own loop")
        return {"algorithm": self.algorithm, "checkpoints": self.checkpoints, "recipe": recipe, "note": note}

    def load(self) -> tuple[Task, Partition]:
        """The task (labels flipped as the run had them) and the run's partition."""
        return _load(self)


@lru_cache(maxsize=4)
def _load(recipe: Recipe) -> tuple[Task, Partition]:
    from fedtrak.data.corruption import FlipSpec, corrupted

    task = cached_task(recipe.task, recipe.train_size, recipe.query_size)
    parts = partition(task.y_train, recipe.num_clients, recipe.partition, recipe.alpha,
                      recipe.partition_seed, groups=task.train_groups)
    flips = FlipSpec(recipe.flip_fraction, recipe.flip_clients, recipe.flip_seed)
    return corrupted(task, parts, flips), parts


def fedavg_in_process(
    task: Task,
    client_indices: Sequence[np.ndarray],
    rounds: int,
    local_epochs: int,
    init_seed: int,
    seed: int,
    checkpoint: int,
    dp_sigmas: Sequence[float] = (),
    dp_clip: float = 0.0,
) -> nn.Module:
    """FedAvg over clients holding ``task.x_train[client_indices[c]]``; the clients are
    partitions ``0..C-1`` (their local shuffling seeds depend on it).

    The model starts from ``seeded_model(task, init_seed)``; each round every
    client with at least one example runs ``local_epochs`` of the task's SGD
    recipe from the global weights, and the updates are averaged weighted by
    example counts (in float32, like Flower's ``FedAvg``; parameters that do not train are kept as they
    are, as fedtrak's strategy keeps them). With ``dp_sigmas`` each client trains by
    DP-SGD at its own noise multiplier and clip norm ``dp_clip`` instead (fresh noise each time);
    the updates are still averaged by example counts (a private run weights them by its noised counts).
    """
    model = seeded_model(task, init_seed)
    active = [(pid, idx) for pid, idx in enumerate(client_indices) if len(idx)]
    if not active:
        raise FedtrakError("FedAvg needs at least one client with data")
    total = float(sum(len(idx) for _, idx in active))
    frozen = frozen_keys(model)  # kept as they are, as fedtrak's FedAvg strategy keeps them
    for server_round in range(1, rounds + 1):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        agg: dict[str, np.ndarray] = {}
        for pid, idx in active:
            local = model
            if dp_sigmas:  # Opacus hooks a module once: a fresh one per client and round
                local = seeded_model(task, init_seed)
                local.load_state_dict(global_state)
                dp_sgd_epochs(task, local, task.x_train[idx], task.y_train[idx], local_epochs, dp_sigmas[pid],
                              dp_clip)
            else:
                model.load_state_dict(global_state)
                local_seed = fedavg_local_seed(seed, checkpoint, server_round, pid)
                sgd_epochs(task, model, task.x_train[idx], task.y_train[idx], local_epochs, local_seed)
            weight = len(idx) / total
            for k, v in local.state_dict().items():
                term = v.detach().numpy() * weight
                agg[k] = term if k not in agg else agg[k] + term
        model.load_state_dict({k: global_state[k] if k in frozen else torch.from_numpy(np.asarray(v))
                               for k, v in agg.items()})
    return model.eval()


def train_on_subset(recipe: Recipe, mask: np.ndarray, seed: int) -> nn.Module:
    """A fresh model trained with ``recipe``'s algorithm on the examples where ``mask`` is true.

    ``seed`` drives initialization and shuffling.
    """
    task, parts = recipe.load()
    if mask.shape != (task.num_train,) or not mask.any():
        raise FedtrakError(f"subset mask must be a non-empty boolean vector over {task.num_train} examples")
    if recipe.algorithm == "central-sgd":
        return train_central(task, seed, task.x_train[mask], task.y_train[mask], recipe.epochs)
    if recipe.algorithm == "train-fn":
        return _user_trained(task, task.x_train[mask], task.y_train[mask], seed)
    return fedavg_in_process(task, [idx[mask[idx]] for idx in parts.clients], recipe.rounds,
                             recipe.epochs, seed, seed, 0, recipe.dp_sigmas, recipe.dp_clip)


def _user_trained(task: Task, x: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
    """The task's ``train_fn`` on ``(x, y)`` from a fresh model initialized under ``seed``."""
    if task.train_fn is None:
        raise FedtrakError(f"task {task.name} has no train_fn to retrain with: give "
                           "fedtrak.task_from_model(..., train_fn=...)")
    try:
        model = task.train_fn(seeded_model(task, seed), x, y, seed)
    except Exception as exc:  # the user's code: named, once
        raise FedtrakError(f"task {task.name}: train_fn failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise FedtrakError(f"task {task.name}: train_fn returned a {type(model).__name__}, not the trained "
                           "model (train_fn(model, x, y, seed) -> model)")
    return model.eval()


@torch.no_grad()
def query_margins(task: Task, model: nn.Module, batch_size: int = 2048) -> np.ndarray:
    """The model output (margin) of every query: ``(Q,)`` float64."""
    xq, yq = to_tensors(task.x_query, task.y_query)
    out = [task.output.output(call_model(model, take(xq, slice(i, i + batch_size))), yq[i : i + batch_size])
           for i in range(0, len(yq), batch_size)]
    return torch.cat(out).double().numpy()


def _margins_job(recipe: Recipe, mask: np.ndarray, seed: int) -> np.ndarray:
    return query_margins(recipe.load()[0], train_on_subset(recipe, mask, seed))


def _init_worker(payload: bytes | None) -> None:
    torch.set_num_threads(1)
    if payload is not None:
        receive_task(payload)


def retrain_margins(
    recipe: Recipe,
    jobs: Sequence[tuple[int, np.ndarray, int]],
    workers: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Train one model per job ``(id, mask, seed)`` and yield ``(id, query margins)`` as each finishes.

    ``workers`` processes (default: the machine's cores) share the jobs; with
    one worker (or one job) they run in this process. Workers get a task that exists only in this
    process by value, and never run the caller's script.

    Raises:
        FedtrakError: if a task of this process cannot be sent to the workers (before any starts),
            a job fails (its reason), or a worker process dies.
    """
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        for job_id, mask, seed in jobs:
            yield job_id, _margins_job(recipe, mask, seed)
        return
    payload = task_payload(recipe.task, "the evaluation's worker processes (or evaluate with workers=1)")
    try:  # spawned, not forked: torch and fork do not mix once threads exist
        with ProcessPoolExecutor(workers, mp_context=script_free_context(), initializer=_init_worker,
                                 initargs=(payload,)) as pool:
            futures = {pool.submit(_margins_job, recipe, mask, seed): job_id for job_id, mask, seed in jobs}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
    except BrokenProcessPool as exc:
        raise FedtrakError(
            "a training process died before finishing its models (models already cached are kept): "
            "the machine may be out of memory; use fewer workers (workers=1, --workers 1)") from exc
