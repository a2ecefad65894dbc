"""Reading a finished run folder back: its summary, arrays and training recipe.

Both the centralized path (``fedtrak attribute``) and federated runs
(``fedtrak simulate``, ``flwr run``) write the format of
:mod:`fedtrak.results.folder`; evaluation and reports read it here, the summary through
:class:`fedtrak.results.summary.RunSummary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtrak.data.checkpoints import read_manifest
from fedtrak.data.partition import Partition, partition
from fedtrak.data.tasks import Task, cached_task
from fedtrak.errors import FedtrakError
from fedtrak.results.summary import SUMMARY, RunSummary, load, save
from fedtrak.simulations.evaluation.retrain import ALGORITHMS, BROUGHT, Recipe


@dataclass
class RunFolder:
    """A complete run folder and its parsed ``summary.json``."""

    path: Path
    summary: RunSummary

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """Open a run folder.

        Raises:
            FedtrakError: if the folder or its summary is missing, unreadable, of a summary version
                this release does not read, or marks an incomplete run (one the server ended
                without results: naming its recorded reason).
        """
        path = Path(path)
        summary = load(path)
        if summary.failure_reason is not None and not summary.complete:
            raise FedtrakError(f"{path / SUMMARY} records a run that ended without results: {summary.failure_reason}")
        if not summary.complete:
            raise FedtrakError(f"{path / SUMMARY} does not describe a complete run")
        return cls(path, summary)

    def has(self, name: str) -> bool:
        """Whether the run wrote ``name.npy``."""
        return (self.path / f"{name}.npy").is_file()

    def array(self, name: str, why: str) -> np.ndarray:
        """``name.npy`` (memory-mapped); a clear error naming ``why`` it is needed if absent."""
        file = self.path / f"{name}.npy"
        if not file.is_file():
            raise FedtrakError(f"{self.path} has no {name}.npy, which {why} needs")
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FedtrakError(f"cannot read {file}: {exc}") from exc

    def owner_partition_ids(self) -> np.ndarray:
        """The simulation partition of each ``owner_scores`` column."""
        if not self.summary.owners:  # the centralized path: column c is client c
            part = self.summary.partition
            return np.arange(part.num_clients if part else 0)
        return np.array([o.partition_id for o in self.summary.owners])

    def checkpoint_folder(self) -> Path:
        """Where the run's checkpoints (and their manifest) are."""
        own = self.path / "checkpoints"
        given = self.summary.settings.training.checkpoint_dir
        return Path(given).expanduser() if given and not (own / "manifest.json").exists() else own

    def recipe(self) -> Recipe:
        """How the run's checkpoints were trained, for ground-truth retraining.

        Checkpoints the user brought (``given``; bare ``*.pt`` files) are retrained with the task's
        recipe: its ``train_fn`` where it has one (``train-fn``), else ``central-sgd`` with its
        ``TrainConfig``; the recipe's ``checkpoints`` records that they were the user's.

        Raises:
            FedtrakError: if the run's data is not the task's (devices brought
                their own), clients were excluded, the checkpoints' manifest
                is missing or mixes algorithms, or it names an algorithm fedtrak cannot repeat
                (saying how to give a recipe).
        """
        part, settings = self.summary.partition, self.summary.settings
        if part is None or min(self.owner_partition_ids(), default=-1) < 0:
            raise FedtrakError(f"{self.path}: the run's clients brought their own data; ground truth "
                               "retrains on the task's data and needs a simulation or attribute run")
        if self.summary.clients.excluded:
            raise FedtrakError(f"{self.path}: clients were excluded from the run, so its scores do not "
                               "cover the training set that ground truth retrains on")
        _, infos = read_manifest(self.checkpoint_folder())
        if infos and all(i.trajectory for i in infos):
            # steps of one training run, however many of them this run used: retrain that whole run
            infos = [max(infos, key=lambda i: (i.rounds or 0, i.epochs or 0, i.steps or 0))]
        else:
            infos = infos[: self.summary.num_checkpoints]
        kinds = {(i.algorithm, i.epochs, i.rounds) for i in infos}
        if len(kinds) != 1:
            raise FedtrakError(f"{self.path}: checkpoints were trained in different ways {sorted(map(str, kinds))}")
        algorithm, epochs, rounds = kinds.pop()
        brought = ""
        if algorithm not in ALGORITHMS:  # not fedtrak's: the user's own, or bare files
            own = self._task_recipe()
            if algorithm in BROUGHT or own[0] == "train-fn":  # else Recipe refuses it, saying how
                brought, (algorithm, epochs, rounds) = algorithm, own
        if algorithm.startswith("fedavg"):
            if not rounds or not epochs or epochs % rounds:
                raise FedtrakError(f"{self.path}: FedAvg checkpoints without a whole number of local epochs")
            epochs //= rounds
        flips = self.summary.flips
        return Recipe(
            task=settings.task.task, train_size=settings.task.train_size or 0,
            query_size=settings.task.query_size or 0, algorithm=algorithm,
            epochs=int(epochs or 0), rounds=int(rounds or 0), partition=part.scheme,
            num_clients=part.num_clients, alpha=float(part.alpha or 0.0) if part.scheme == "dirichlet" else 0.0,
            partition_seed=part.seed, flip_fraction=flips.fraction if flips else 0.0,
            flip_clients=flips.clients if flips else (), flip_seed=flips.seed if flips else 0,
            checkpoints=brought, **(self._dp_sgd(part.num_clients) if algorithm == "fedavg-dp-sgd" else {}),
        )

    def _task_recipe(self) -> tuple[str, int, int]:
        """``(algorithm, epochs, rounds)`` of the task's own recipe: its ``train_fn``, else its
        ``TrainConfig``."""
        t = self.summary.settings.task
        task = cached_task(t.task, t.train_size or 0, t.query_size or 0)
        return ("train-fn", 0, 0) if task.train_fn is not None else ("central-sgd", task.training.epochs, 0)

    def _dp_sgd(self, num_clients: int) -> dict[str, Any]:
        """Each simulated client's DP-SGD noise multiplier in this run, as its device set it (the
        contract of the run's job on the client's partition) and the clip norm."""
        from fedtrak.client.contract import Contract

        job = self.summary.job()
        settings = job.settings
        task, parts = Recipe(task=settings.task.task, train_size=settings.task.train_size or 0,
                             query_size=settings.task.query_size or 0, algorithm="central-sgd", epochs=1, rounds=0,
                             partition=settings.partition.partition, num_clients=num_clients,
                             alpha=settings.partition.alpha if settings.partition.partition == "dirichlet" else 0.0,
                             partition_seed=settings.partition.partition_seed).load()
        sigmas = tuple(Contract.of(job, task, len(idx)).train_sigma for idx in parts.clients)
        return {"dp_sigmas": sigmas, "dp_clip": settings.training.dp_train_clip}

    def task_and_partition(self) -> tuple[Task, Partition | None]:
        """The run's task with its training labels as the run saw them (flipped where it flipped
        them) and its simulation partition (``None`` for devices' own data).

        Raises:
            FedtrakError: if the run's task cannot be loaded.
        """
        try:
            return self.recipe().load()
        except FedtrakError:
            t = self.summary.settings.task
            task = cached_task(t.task, t.train_size or 0, t.query_size or 0)
        part = self.summary.partition
        if part is None or min(self.owner_partition_ids(), default=-1) < 0:
            return task, None
        return task, partition(task.y_train, part.num_clients, part.scheme, float(part.alpha or 0.5), part.seed,
                               groups=task.train_groups)

    def write_evaluation(self, block: dict) -> None:
        """Replace the summary's ``evaluation`` block, atomically (the rest is kept)."""
        self.summary = self.summary.with_evaluation(block)
        save(self.summary, self.path)
