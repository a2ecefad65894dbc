"""Reading a finished run folder back: its summary, arrays and training recipe.

Both the centralized path (``fedtrak attribute``) and federated runs
(``fedtrak simulate``, ``flwr run``) write the format of
:mod:`fedtrak.results.folder`; evaluation and reports read it here. Config keys
differ in spelling between the two (``train_size`` vs ``train-size``);
:meth:`RunFolder.setting` reads either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtrak.data.checkpoints import atomic_write_json, read_manifest
from fedtrak.data.partition import Partition, partition
from fedtrak.data.tasks import Task, cached_task
from fedtrak.errors import FedtrakError
from fedtrak.results.folder import SUMMARY
from fedtrak.simulations.evaluation.retrain import Recipe


@dataclass
class RunFolder:
    """A complete run folder and its parsed ``summary.json``."""

    path: Path
    summary: dict

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """Open a run folder.

        Raises:
            FedtrakError: if the folder or its summary is missing, unreadable
                or marks an incomplete run (one the server ended without results:
                naming its recorded reason).
        """
        path = Path(path)
        file = path / SUMMARY
        if not file.is_file():
            raise FedtrakError(f"{path} is not a run folder: it has no {SUMMARY}")
        try:
            summary = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise FedtrakError(f"cannot read {file}: {exc}") from exc
        failure = summary.get("failure") if isinstance(summary, dict) else None
        if isinstance(failure, dict) and summary.get("complete") is False:
            raise FedtrakError(f"{file} records a run that ended without results: {failure.get('reason')}")
        if not isinstance(summary, dict) or summary.get("complete") is not True:
            raise FedtrakError(f"{file} does not describe a complete run")
        return cls(path, summary)

    def setting(self, name: str, default: Any = None) -> Any:
        """A config value by its Python name, from either spelling of the run's config."""
        config = self.summary.get("config", {})
        for key in (name, name.replace("_", "-")):
            if key in config:
                return config[key]
        return default

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
        owners = self.summary.get("owners")
        if owners is None:  # the centralized path: column c is client c
            return np.arange(int(self.summary["partition"]["num_clients"]))
        return np.array([int(o["partition_id"]) for o in owners])

    def checkpoint_folder(self) -> Path:
        """Where the run's checkpoints (and their manifest) are."""
        own = self.path / "checkpoints"
        given = self.setting("checkpoint_dir")
        return Path(given).expanduser() if given and not (own / "manifest.json").exists() else own

    def recipe(self) -> Recipe:
        """How the run's checkpoints were trained, for ground-truth retraining.

        Raises:
            FedtrakError: if the run's data is not the task's (devices brought
                their own), clients were excluded, or the checkpoints' manifest
                is missing or mixes algorithms.
        """
        part = self.summary.get("partition")
        if part is None or min(self.owner_partition_ids(), default=-1) < 0:
            raise FedtrakError(f"{self.path}: the run's clients brought their own data; ground truth "
                               "retrains on the task's data and needs a simulation or attribute run")
        if self.summary.get("excluded"):
            raise FedtrakError(f"{self.path}: clients were excluded from the run, so its scores do not "
                               "cover the training set that ground truth retrains on")
        _, infos = read_manifest(self.checkpoint_folder())
        if infos and all(i.trajectory for i in infos):
            # steps of one training run, however many of them this run used: retrain that whole run
            infos = [max(infos, key=lambda i: (i.rounds or 0, i.epochs or 0, i.steps or 0))]
        else:
            infos = infos[: int(self.summary["num_checkpoints"])]
        kinds = {(i.algorithm, i.epochs, i.rounds) for i in infos}
        if len(kinds) != 1:
            raise FedtrakError(f"{self.path}: checkpoints were trained in different ways {sorted(map(str, kinds))}")
        algorithm, epochs, rounds = kinds.pop()
        if algorithm.startswith("fedavg"):
            if not rounds or not epochs or epochs % rounds:
                raise FedtrakError(f"{self.path}: FedAvg checkpoints without a whole number of local epochs")
            epochs //= rounds
        flips = self.summary.get("flips") or {}
        return Recipe(
            task=str(self.setting("task")), train_size=int(self.setting("train_size") or 0),
            query_size=int(self.setting("query_size") or 0), algorithm=algorithm,
            epochs=int(epochs or 0), rounds=int(rounds or 0), partition=str(part["scheme"]),
            num_clients=int(part["num_clients"]),
            alpha=float(part["alpha"]) if part["scheme"] == "dirichlet" else 0.0,
            partition_seed=int(part["seed"]), flip_fraction=float(flips.get("fraction", 0.0)),
            flip_clients=tuple(int(c) for c in flips.get("clients", ())), flip_seed=int(flips.get("seed", 0)),
            **(self._dp_sgd(int(part["num_clients"])) if algorithm == "fedavg-dp-sgd" else {}),
        )

    def _dp_sgd(self, num_clients: int) -> dict[str, Any]:
        """Each simulated client's DP-SGD noise multiplier in this run, as its device set it (the
        contract of the run's job on the client's partition) and the clip norm."""
        from fedtrak.client.contract import Contract
        from fedtrak.config.settings import Settings
        from fedtrak.wire.job import Job, Resolved

        settings = Settings.from_flat(self.summary["config"])
        resolved = Resolved(**{k: v for k, v in self.summary["resolved"].items()
                               if k in Resolved.__dataclass_fields__})
        job = Job(str(self.summary.get("run_id", "")), settings, resolved)
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
            task = cached_task(str(self.setting("task")), int(self.setting("train_size") or 0),
                               int(self.setting("query_size") or 0))
        part = self.summary.get("partition")
        if part is None or min(self.owner_partition_ids(), default=-1) < 0:
            return task, None
        return task, partition(task.y_train, int(part["num_clients"]), str(part["scheme"]),
                               float(part.get("alpha") or 0.5), int(part["seed"]))

    def write_evaluation(self, block: dict) -> None:
        """Replace the summary's ``evaluation`` block, atomically (the rest is kept)."""
        self.summary["evaluation"] = block
        atomic_write_json(self.path / SUMMARY, self.summary)
