"""A client's part of FedAvg training: local epochs on its own data from the global weights."""

from __future__ import annotations

import torch

from fedtrak.checkpoints import fedavg_local_seed, model_from_state, sgd_epochs
from fedtrak.client.node import Local
from fedtrak.privacy.training import dp_sgd_epochs


def local_update(local: Local, checkpoint: int, server_round: int,
                 state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights after this round's local epochs of the task's SGD recipe (DP-SGD through Opacus
    when the job asks for it; accounted by the server, apart from attribution)."""
    job, data, task = local.job, local.data, local.task
    t = job.settings.training
    model = model_from_state(task, state, "global model")
    if t.dp_train_noise > 0:  # sampling and noise from the device's entropy, never the run seed
        dp_sgd_epochs(task, model, data.x, data.y, job.resolved.local_epochs, t.dp_train_noise,
                      t.dp_train_clip)
    else:
        seed = fedavg_local_seed(job.settings.task.seed, checkpoint, server_round, data.partition_id)
        sgd_epochs(task, model, data.x, data.y, job.resolved.local_epochs, seed)
    return model.state_dict()
