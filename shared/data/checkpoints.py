"""Checkpoints: training them for a task, saving them, loading and validating them.

A checkpoint folder holds plain ``state_dict`` files (``ckpt_000.pt``, ...)
and a ``manifest.json``::

    {"task": "digits-logreg",
     "checkpoints": [{"index": 0, "file": "ckpt_000.pt", "seed": 0,
                      "algorithm": "central-sgd", "epochs": 30, "accuracy": 0.96,
                      "rounds": null}, ...]}

(``algorithm`` ``fedavg``: ``rounds`` FedAvg rounds, ``epochs`` local epochs in all.)

A folder of user-supplied ``*.pt`` files without a manifest is accepted too
(taken in file-name order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedtrak.config.seeds import derive_seed
from fedtrak.data.inputs import call_model, take, to_tensors
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint's manifest entry."""

    index: int
    file: str
    seed: int | None
    algorithm: str
    epochs: int | None
    accuracy: float | None
    rounds: int | None = None
    #: Taken along one training run (a one-run ensemble) rather than from an independent run.
    trajectory: bool = False
    #: SGD steps taken when it was saved (a one-run ensemble's checkpoint).
    steps: int | None = None


def seeded_model(task: Task, seed: int) -> nn.Module:
    """The task's model initialized under ``seed``."""
    torch.manual_seed(seed)
    return task.make_model()


@torch.no_grad()
def accuracy(task: Task, model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    """How good ``model`` is on ``(x, y)`` by the task's output: top-1 accuracy for a classifier,
    R^2 for a regression (:meth:`~fedtrak.data.modelout.ModelOutput.quality`)."""
    model.eval()
    xt, yt = to_tensors(x, y)
    logits = torch.cat([call_model(model, take(xt, slice(i, i + batch_size))) for i in range(0, len(yt), batch_size)])
    return task.output.quality(logits, yt)


def sgd_epochs(
    task: Task, model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int,
    snapshot: Callable[[int, nn.Module], None] | None = None, at_steps: frozenset[int] = frozenset(),
) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` for ``epochs`` with the task's recipe
    (minibatch SGD + momentum, or Adam, + weight decay), shuffling deterministically in ``seed``;
    ``snapshot(step, model)`` sees the model after each step in ``at_steps`` (counted from 1).

    Centralized checkpoints and each client's local FedAvg update use this one loop.
    """
    cfg = task.training
    opt = cfg.make_optimizer(model.parameters())
    xt, yt = to_tensors(x, y)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = task.output.loss
    model.train()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad()
            loss_fn(call_model(model, take(xt, idx)), yt[idx]).backward()
            opt.step()
            step += 1
            if snapshot is not None and step in at_steps:
                snapshot(step, model.eval())
                model.train()
    return model.eval()


def trajectory_steps(num: int, epochs: int, steps_per_epoch: int) -> list[int]:
    """Where a one-run ensemble of ``num`` checkpoints is taken: the ends of the last ``num`` epochs,
    or, with fewer epochs than checkpoints, ``num`` evenly spaced steps over the last half of training.

    Raises:
        FedtrakError: if training has fewer steps than checkpoints.
    """
    total = epochs * steps_per_epoch
    if num > total:
        raise FedtrakError(f"a one-run ensemble of {num} checkpoints needs at least {num} SGD steps, "
                           f"training has {total}")
    gap = steps_per_epoch if epochs >= num else max(1, total // (2 * num))
    return [total - (num - i) * gap for i in range(1, num + 1)]


def fedavg_local_seed(seed: int, checkpoint: int, server_round: int, partition_id: int) -> int:
    """The shuffling seed of one client's local epochs in one FedAvg round.

    Flower's clients and the in-process FedAvg of ground-truth retraining
    (:mod:`fedtrak.simulations.evaluation.retrain`) use this one rule, so the two train alike.
    """
    stream = derive_seed(derive_seed(seed, checkpoint), 1000 * server_round + max(partition_id, 0))
    return stream % 2**63


def train_central(
    task: Task,
    seed: int,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    epochs: int | None = None,
) -> nn.Module:
    """Train the task's model on ``(x, y)`` (default: its whole training set),
    deterministically in ``seed`` (initialization and shuffling)."""
    x = task.x_train if x is None else x
    y = task.y_train if y is None else y
    epochs = task.training.epochs if epochs is None else epochs
    return sgd_epochs(task, seeded_model(task, seed), x, y, epochs, seed)


def atomic_write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, so readers never see half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def train_checkpoints(
    task: Task,
    num: int,
    out_dir: Path,
    base_seed: int = 0,
    epochs: int | None = None,
    progress: Callable[[int], None] | None = None,
    trajectory: bool = False,
) -> list[CheckpointInfo]:
    """Train ``num`` independent models (seeds ``base_seed + m``) and save them; with
    ``trajectory``, one model (seed ``base_seed``) saved along its training, after each of its
    last ``num`` epochs (:func:`trajectory_steps`; a one-run ensemble: the cost of one training).

    Each checkpoint and the manifest are written as soon as the model is
    trained, so an interrupted run keeps what it finished.

    Raises:
        FedtrakError: on fewer than one checkpoint, or a trajectory with more checkpoints than steps.
    """
    if num < 1:
        raise FedtrakError(f"number of checkpoints must be at least 1, got {num}")
    out_dir.mkdir(parents=True, exist_ok=True)
    infos: list[CheckpointInfo] = []
    if trajectory:
        total = task.training.epochs if epochs is None else epochs
        per_epoch = -(-task.num_train // task.training.batch_size)

        def keep(step: int, model: nn.Module) -> None:
            infos.append(CheckpointInfo(len(infos), f"ckpt_{len(infos):03d}.pt", base_seed, "central-sgd",
                                        -(-step // per_epoch), accuracy(task, model, task.x_query, task.y_query),
                                        trajectory=True, steps=step))
            write_checkpoint(out_dir, task.name, model.state_dict(), infos)
            if progress is not None:
                progress(1)

        at = frozenset(trajectory_steps(num, total, per_epoch))
        sgd_epochs(task, seeded_model(task, base_seed), task.x_train, task.y_train, total, base_seed, keep, at)
        return infos
    for m in range(num):
        seed = base_seed + m
        model = train_central(task, seed, epochs=epochs)
        info = CheckpointInfo(
            m, f"ckpt_{m:03d}.pt", seed, "central-sgd",
            task.training.epochs if epochs is None else epochs,
            accuracy(task, model, task.x_query, task.y_query),
        )
        infos.append(info)
        write_checkpoint(out_dir, task.name, model.state_dict(), infos)
        if progress is not None:
            progress(1)
    return infos


def write_checkpoint(
    out_dir: Path, task_name: str, state: dict[str, torch.Tensor], infos: list[CheckpointInfo]
) -> None:
    """Save ``state`` as the file of ``infos[-1]`` and rewrite the manifest, both atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (infos[-1].file + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / infos[-1].file)
    atomic_write_json(out_dir / MANIFEST, {"task": task_name, "checkpoints": [asdict(i) for i in infos]})


def read_manifest(ckpt_dir: Path) -> tuple[str | None, list[CheckpointInfo]]:
    """The task name and entries of a checkpoint folder (manifest or bare ``*.pt`` files)."""
    if not ckpt_dir.is_dir():
        raise FedtrakError(f"checkpoint folder {ckpt_dir} does not exist")
    manifest = ckpt_dir / MANIFEST
    if not manifest.exists():
        files = sorted(p.name for p in ckpt_dir.glob("*.pt"))
        if not files:
            raise FedtrakError(f"{ckpt_dir} holds neither {MANIFEST} nor *.pt checkpoint files")
        return None, [CheckpointInfo(i, f, None, "unknown", None, None) for i, f in enumerate(files)]
    try:
        data = json.loads(manifest.read_text())
        infos = [CheckpointInfo(**entry) for entry in data["checkpoints"]]
        return data.get("task"), infos
    except (ValueError, KeyError, TypeError) as exc:
        raise FedtrakError(f"corrupt checkpoint manifest {manifest}: {exc}") from exc


def load_state(task: Task, path: Path) -> dict[str, torch.Tensor]:
    """Load one ``state_dict`` and check that it fits the task's model exactly."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise FedtrakError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise FedtrakError(f"checkpoint {path} is not a state_dict")
    model_from_state(task, state, str(path))
    return state


def model_from_state(task: Task, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The task's model with ``state`` loaded; a clear error if it does not fit."""
    model = task.make_model()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} {state[k].dtype} vs {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in state and (tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype)
    )
    if missing or extra or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                 f"shape or dtype mismatch {wrong[:3]}" if wrong else ""]
        raise FedtrakError(
            f"checkpoint {source} does not fit the model of task {task.name}: "
            + "; ".join(p for p in parts if p)
        )
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise FedtrakError(f"checkpoint {source} has NaN or infinite weights in {bad[:3]}")
    model.load_state_dict(state)
    return model.eval()


def load_checkpoints(
    task: Task, ckpt_dir: Path, num: int | None = None
) -> list[tuple[CheckpointInfo, dict[str, torch.Tensor]]]:
    """Load the first ``num`` checkpoints of a folder (all when ``None``), validated."""
    task_name, infos = read_manifest(ckpt_dir)
    if task_name is not None and task_name != task.name:
        raise FedtrakError(f"checkpoints in {ckpt_dir} were trained for task {task_name}, not {task.name}")
    if num is not None:
        if len(infos) < num:
            raise FedtrakError(f"{ckpt_dir} holds {len(infos)} checkpoints, {num} requested")
        infos = infos[:num]
    return [(info, load_state(task, ckpt_dir / info.file)) for info in infos]
