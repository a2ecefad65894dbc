"""Checkpoints trained with federated averaging, through Flower's own FedAvg strategy.

Checkpoint m is an independent FedAvg run from the task's model initialized
under seed ``seed + m``: ``rounds`` rounds in which every connected client
runs ``local-epochs`` epochs of the task's SGD recipe on its own data
(:func:`fedtrak.checkpoints.sgd_epochs`) and Flower's ``FedAvg`` averages the
updates weighted by example counts. Each checkpoint is saved like the
centralized ones as soon as it is trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtrak.checkpoints import (
    CheckpointInfo,
    accuracy,
    model_from_state,
    seeded_model,
    write_checkpoint,
)
from fedtrak.errors import FedtrakError
from fedtrak.job import Job
from fedtrak.privacy.training import local_steps, training_epsilon
from fedtrak.settings import Settings
from fedtrak.tasks import Task
from fedtrak.wire import FEDAVG_KEYS, record_to_state, state_to_record, train_config


def train_fedavg_checkpoints(
    grid: Grid, task: Task, job: Job, num_nodes: int, out_dir: Path
) -> list[tuple[CheckpointInfo, dict[str, torch.Tensor]]]:
    """Train the job's ``checkpoints`` models with FedAvg over the connected clients and save them.

    Raises:
        FedtrakError: if a round produced no update (every client failed).
    """
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_nodes,
                      min_available_nodes=num_nodes, **FEDAVG_KEYS)
    t, timeout = job.settings.training, job.settings.run.timeout
    out = []
    infos: list[CheckpointInfo] = []
    for m in range(t.checkpoints):
        seed = job.settings.task.seed + m
        initial = state_to_record(seeded_model(task, seed).state_dict())
        result = strategy.start(grid, initial, num_rounds=t.rounds, timeout=timeout,
                                train_config=train_config(job, m))
        if len(result.train_metrics_clientapp) < t.rounds:
            raise FedtrakError(f"FedAvg for checkpoint {m}: some rounds got no client update")
        state = record_to_state(result.arrays)
        model = model_from_state(task, state, f"FedAvg checkpoint {m}")
        algorithm = "fedavg-dp-sgd" if t.dp_train_noise > 0 else "fedavg"
        info = CheckpointInfo(m, f"ckpt_{m:03d}.pt", seed, algorithm, t.rounds * job.resolved.local_epochs,
                              accuracy(model, task.x_query, task.y_query), rounds=t.rounds)
        infos.append(info)
        write_checkpoint(out_dir, task.name, state, infos)
        out.append((info, state))
    return out


def training_privacy(settings: Settings, task: Task, counts: dict[str, int], local_epochs: int) -> dict:
    """The DP-SGD account of FedAvg training, per client (from its example count), apart from
    the attribution's: every local step of every round of every checkpoint on the client's data."""
    t, delta = settings.training, settings.privacy.delta
    if not t.dp_train_noise > 0 or t.train != "fedavg" or t.checkpoint_dir:
        return {"dp_sgd": False}
    batch = task.training.batch_size
    per_client = {owner: training_epsilon(t.dp_train_noise, batch, n,
                                          t.checkpoints * t.rounds * local_steps(n, batch, local_epochs),
                                          delta) for owner, n in counts.items()}
    return {"dp_sgd": True, "library": "opacus PrivacyEngine (Poisson sampling, RDP accountant)",
            "noise_multiplier": t.dp_train_noise, "max_grad_norm": t.dp_train_clip, "delta": delta,
            "epsilon_per_client": per_client, "epsilon_max": max(per_client.values(), default=None),
            "note": "accounted apart from the attribution releases; counts as the clients released them"}
