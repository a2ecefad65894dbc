"""A client's part of FedAvg training: local epochs on its own data from the global weights.

Each round's model update is a release: under a private run it is trained by
DP-SGD (Opacus) at the noise multiplier the device set from its own example
count (:mod:`fedtrak.client.contract`), charged to the device's ledger as it
leaves, and kept, so that a round the server sends again gets the same update
back instead of a second noised one.
"""

from __future__ import annotations

import hashlib
import io

import torch

from fedtrak.client.node import Local
from fedtrak.data.checkpoints import fedavg_local_seed, model_from_state, sgd_epochs
from fedtrak.errors import FedtrakError, Refused
from fedtrak.privacy.kinds import UPDATE
from fedtrak.privacy.training import dp_sgd_epochs, training_rounds
from fedtrak.private_files import private_dir, write_private


def local_update(local: Local, checkpoint: int, server_round: int,
                 state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights after this round's local epochs of the task's SGD recipe: DP-SGD through Opacus
    at the device's own noise multiplier when the run trains privately, else plain SGD."""
    job, data, task = local.job, local.data, local.task
    model = model_from_state(task, state, "global model")
    if local.contract.train_sigma > 0:  # sampling and noise from the device's entropy, never the run seed
        dp_sgd_epochs(task, model, data.x, data.y, job.resolved.local_epochs, local.contract.train_sigma,
                      job.settings.training.dp_train_clip)
    else:
        seed = fedavg_local_seed(job.settings.task.seed, checkpoint, server_round, data.partition_id)
        sgd_epochs(task, model, data.x, data.y, job.resolved.local_epochs, seed)
    return model.state_dict()


def released_update(local: Local, checkpoint: int, server_round: int,
                    state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This round's update as it leaves the device: refused unless the bound job trains this
    checkpoint run and round, charged to the ledger once, and kept for a resent round.

    Raises:
        Refused: for a round outside the job's training plan, or one the budget cannot pay for.
    """
    local.contract.allow(UPDATE)
    if (checkpoint, server_round) not in training_rounds(local.job.settings):
        raise Refused(f"the job trains rounds 1..{local.job.settings.training.rounds} of its checkpoint runs; "
                      f"checkpoint {checkpoint} round {server_round} is not one of them")
    name = f"{UPDATE}-{checkpoint}-{server_round}"
    path = private_dir(local.store.dir / "released") / f"{name}.pt"
    start = hashlib.sha256(b"".join(k.encode() + t.detach().cpu().numpy().tobytes() for k, t in state.items()))
    marker = path.with_suffix(".from")
    if path.is_file() and local.contract.train_sigma > 0:
        if not marker.is_file() or marker.read_text() != start.hexdigest():
            raise Refused(f"checkpoint {checkpoint} round {server_round} was trained from other global weights: a "
                          "second noised update of the same round is refused")
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:
            raise FedtrakError(f"the kept update {name} is unreadable ({type(exc).__name__}): restore or remove "
                               "it; the device will not train a second noised update for it") from exc
    update = local_update(local, checkpoint, server_round, state)
    local.charge({name: local.contract.unit(UPDATE)})
    if not local.contract.train_sigma > 0:  # plain SGD is seeded: a resent round trains the same update
        return update
    buffer = io.BytesIO()
    torch.save(update, buffer)
    write_private(marker, start.hexdigest().encode())
    write_private(path, buffer.getvalue())
    return update
