"""Where a client finds its own data.

In simulation a virtual client takes its partition of the task's training
set: Flower sets ``partition-id`` and ``num-partitions`` in its node config,
and the server's job spec says how the data is split (the same
deterministic :func:`fedtrak.data.partition.partition` the centralized path
uses). On a device, the node config names the data instead::

    flower-supernode ... --node-config "data-path='/data/mine.npz' owner='clinic-a'"

``data-path`` is an ``.npz`` file with ``x`` (inputs shaped like the task's,
float, or int64 token ids) and ``y`` (integer labels in ``[0, num_classes)``; a
language model's are ``(n, positions)`` token ids, -100 where none is predicted). ``owner`` is the
label the owner's results are reported under (default: the node id). A
node config ``task`` entry, if present, must name the run's task.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedtrak.data.corruption import flip_labels
from fedtrak.data.inputs import finite, numeric_array
from fedtrak.data.partition import Partition, partition
from fedtrak.data.tasks import Task, cached_task, registered_tasks
from fedtrak.errors import FedtrakError
from fedtrak.wire.job import Job


@dataclass(frozen=True)
class ClientData:
    """One client's training examples.

    Attributes:
        owner: the label the owner is reported under.
        partition_id: the simulation partition, or -1 on a device.
        x, y: inputs and labels.
        indices: each example's index in the task's training set, or its
            row in the device's file.
    """

    owner: str
    partition_id: int
    x: np.ndarray
    y: np.ndarray
    indices: np.ndarray
    _digest: list = field(default_factory=list, repr=False, compare=False)

    @property
    def digest(self) -> str:
        """SHA-256 of the data (computed once): part of the feature store's fingerprint."""
        if not self._digest:
            h = hashlib.sha256()
            h.update(np.ascontiguousarray(self.x).tobytes())
            h.update(np.ascontiguousarray(self.y).tobytes())
            self._digest.append(h.hexdigest())
        return self._digest[0]


@lru_cache(maxsize=8)
def _cached_partition(job: Job, num: int) -> tuple[Partition, np.ndarray]:
    """The simulation's partition and the training labels as its clients see them (flipped
    where the job's mislabel experiment says so)."""
    task = pooled_task(job)
    p = job.settings.partition
    parts = partition(task.y_train, num, p.partition, p.alpha, p.partition_seed, groups=task.train_groups)
    return parts, flip_labels(task.y_train, task.num_classes, parts, job.flips())


def pooled_task(job: Job) -> Task:
    """The job's task with its data sets: the pooled data a simulation's clients are cut from."""
    t = job.settings.task
    return cached_task(t.task, t.train_size or 0, t.query_size or 0)


def job_task(job: Job, node_config: Mapping | None = None) -> Task:
    """The task named by a job, for its model and output function: a built-in task comes
    without its data sets (a device reads its own file; a simulation's partition loads them).

    With ``node_config`` (a node checking a job), a task given by import path
    (``module:function``) is imported only when this process registered it or the node config
    names it (``task``): the server does not choose what code a device imports.

    Raises:
        FedtrakError: for an import path the node has not accepted.
    """
    name = job.settings.task.task
    if node_config is not None and ":" in name and name not in registered_tasks() and \
            str(node_config.get("task") or "") != name:
        raise FedtrakError(f"the run names the task import path {name!r}; this node imports a task's code "
                           f"only when its node config names it (task='{name}')")
    return cached_task(name, data=False)


def load_client_data(job: Job, node_config: Mapping, node_id: int) -> ClientData:
    """This client's data, from its node config (see the module docstring).

    Raises:
        FedtrakError: naming what is wrong: no data source in the node
            config, a task mismatch, a partition id out of range, or an
            unreadable or malformed data file.
    """
    task = job_task(job)
    named_task = node_config.get("task")
    if named_task not in (None, "") and str(named_task) != job.settings.task.task:
        raise FedtrakError(f"this node holds data for task {named_task!r}, the run is for "
                           f"{job.settings.task.task!r}")
    if node_config.get("data-path"):
        if job.flips().active:
            raise FedtrakError("label flips are a simulation setting: this node reads its own data file")
        x, y = read_device_data(Path(str(node_config["data-path"])), task)
        return ClientData(owner_label(node_config, node_id), -1, x, y, np.arange(len(y), dtype=np.int64))
    if "partition-id" in node_config and "num-partitions" in node_config:
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if not 0 <= pid < num:
            raise FedtrakError(f"partition-id {pid} is outside [0, {num})")
        parts, labels = _cached_partition(replace(job, run_id=""), num)
        idx = parts.clients[pid]
        return ClientData(owner_label(node_config, node_id), pid, pooled_task(job).x_train[idx],
                          labels[idx], idx.astype(np.int64))
    raise FedtrakError(
        "the node config names no data: give data-path (an .npz with x and y) on a device, "
        "or partition-id and num-partitions in simulation"
    )


def owner_label(node_config: Mapping, node_id: int | None) -> str:
    """The label a device's results are reported under, as its replies name it: its node config's
    ``owner``; else a simulated client's partition id, or the node id (``""`` for ``None``)."""
    if node_config.get("owner"):
        return str(node_config["owner"])
    if not node_config.get("data-path") and "partition-id" in node_config:
        return str(int(node_config["partition-id"]))
    return "" if node_id is None else str(node_id)


class DataFileError(FedtrakError):
    """A device's data file that cannot be used. Its message names the problem and never the file's
    path, since an error reply carries it to the server; :attr:`local` adds the path (and the reader's
    own words, which may quote it) for the device's own log and its owner's commands."""

    def __init__(self, message: str, path: Path, detail: str = "") -> None:
        super().__init__(message)
        self.path, self.detail = Path(path), detail

    @property
    def local(self) -> str:
        """The message with the file's path, for the device only."""
        return f"data file {self.path}: {self}" + (f" ({self.detail})" if self.detail else "")


def read_device_data(path: Path, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate a device's ``.npz`` (``x``, ``y``) against the task.

    Raises:
        DataFileError: if the file is missing or corrupt, lacks ``x`` or ``y``,
            or holds inputs of the wrong shape, non-finite values or labels
            outside ``[0, num_classes)`` (named without the file's path).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError("the data file (data-path) does not exist", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"x", "y"} - set(data.files)
            x, y = (None, None) if missing else (np.asarray(data["x"]), np.asarray(data["y"]))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataFileError(f"cannot read data file: not an .npz of arrays x and y ({type(exc).__name__})", path,
                            str(exc)) from exc
    if missing:
        raise DataFileError(f"the data file lacks {sorted(missing)}: it needs arrays x and y", path)
    try:
        return _checked(x, y, task)
    except DataFileError:
        raise
    except FedtrakError as exc:  # the labels' own check, worded for the data file's y
        raise DataFileError(str(exc), path) from None


def _checked(x: np.ndarray, y: np.ndarray, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """The data file's arrays, checked against the task (errors without the file's path)."""
    want = ", ".join(("N", *map(str, task.input_shape)))
    if x.ndim < 1 or x.shape[1:] != task.input_shape:
        raise FedtrakError(f"the data file's x has shape {x.shape}, task {task.name} expects ({want})")
    expected = (len(x), *task.y_train.shape[1:])  # a language model's: a token per position
    if y.shape != expected:
        raise FedtrakError(f"the data file's y has shape {y.shape}, expected {expected} (one label per row of x)")
    if len(y) == 0:
        raise FedtrakError("the data file holds no examples")
    if x.dtype.names != task.x_train.dtype.names:
        raise FedtrakError(f"the data file's x has fields {x.dtype.names}, task {task.name} takes "
                           f"{task.x_train.dtype.names}")
    numbers = all(np.issubdtype(x.dtype[k].base, np.number) for k in x.dtype.names) if x.dtype.names else \
        np.issubdtype(x.dtype, np.number)
    if not numbers or not finite(x):
        raise FedtrakError("the data file's x must be finite numbers")
    return numeric_array(x), task.output.labels(y, task.num_classes, "the data file's y")
