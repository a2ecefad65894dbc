"""Checkpoints trained with federated averaging, through Flower's own FedAvg strategy.

Checkpoint m is an independent FedAvg run from the task's model initialized
under seed ``seed + m``: ``rounds`` rounds in which every connected client
runs ``local-epochs`` epochs of the task's SGD recipe on its own data
(:func:`fedtrak.data.checkpoints.sgd_epochs`) and Flower's ``FedAvg`` averages the
updates weighted by example counts. Each checkpoint is saved like the
centralized ones as soon as it is trained.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import (
    CheckpointInfo,
    accuracy,
    model_from_state,
    seeded_model,
    write_checkpoint,
)
from fedtrak.data.models import frozen_keys
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.logs import progress_bar
from fedtrak.privacy.accountant import Release, epsilon_with_training
from fedtrak.privacy.training import (
    attribution_epsilon,
    given_train_sigma,
    local_steps,
    sized_to_target,
    training_epsilon,
    training_rounds,
    trains_openly,
    trains_privately,
)
from fedtrak.server.step_log import fedavg_round
from fedtrak.wire import FEDAVG_KEYS, record_to_state, state_to_record, train_config, with_frozen
from fedtrak.wire.job import Job


class _FedAvg(FedAvg):
    """Flower's ``FedAvg``, keeping the first line of each client's error reply (Flower logs them at
    INFO only), so that a round without updates can say why, and keeping the parameters that do not
    train (``frozen``, state_dict keys) as it sent them: what is averaged is what trains (LoRA
    adapters over a frozen base: their A and B averaged each, as FedIT does), and buffers."""

    def __init__(self, frozen: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures: list[str] = []
        self.frozen = frozen
        self._sent: Any = None  # the ArrayRecord of the round's global model

    def configure_train(self, server_round: int, arrays: Any, config: Any,
                        grid: Grid) -> Iterable[Message]:
        """Flower's configuration, noting the global model it sends."""
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        """Flower's aggregation, after noting the reasons of error replies; frozen parameters as sent
        (an average of equal copies is not always equal to them in float32)."""
        replies = list(replies)
        self.failures += [(m.error.reason or "").strip().splitlines()[0] if (m.error.reason or "").strip()
                          else f"error code {m.error.code}" for m in replies if m.has_error()]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self._sent is not None and self.frozen:
            arrays = with_frozen(arrays, self._sent, self.frozen)
        return arrays, metrics


def train_fedavg_checkpoints(
    grid: Grid, task: Task, job: Job, num_nodes: int, out_dir: Path, progress: bool = False
) -> list[tuple[CheckpointInfo, dict[str, torch.Tensor]]]:
    """Train the job's ``checkpoints`` models with FedAvg over the connected clients and save them:
    independent runs (model initialized with ``seed + m``), or, with ``ensemble=trajectory``, one
    run whose global model is saved after each of its last ``checkpoints`` rounds (a one-run
    ensemble: the cost of one training).

    Raises:
        FedtrakError: if a round produced no update (every client failed), or a trajectory asks
            for more checkpoints than rounds.
    """
    strategy = _FedAvg(frozen=frozen_keys(task.make_model()), fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_nodes,
                      min_available_nodes=num_nodes, **FEDAVG_KEYS)
    t, timeout = job.settings.training, job.settings.run.timeout
    algorithm = "fedavg-dp-sgd" if trains_privately(job.settings) else "fedavg"
    out: list[tuple[CheckpointInfo, dict[str, torch.Tensor]]] = []
    infos: list[CheckpointInfo] = []

    def save(state: dict[str, torch.Tensor], seed: int, rounds: int, trajectory: bool) -> None:
        m = len(infos)
        model = model_from_state(task, state, f"FedAvg checkpoint {m}")
        infos.append(CheckpointInfo(m, f"ckpt_{m:03d}.pt", seed, algorithm, rounds * job.resolved.local_epochs,
                                    accuracy(task, model, task.x_query, task.y_query), rounds=rounds,
                                    trajectory=trajectory))
        write_checkpoint(out_dir, task.name, state, infos)
        out.append((infos[-1], state))

    def run(m: int, seed: int, keep_from: int | None = None) -> dict[str, torch.Tensor]:
        def snapshot(server_round: int, arrays: Any) -> None:  # Flower's ArrayRecord of the round's model
            if server_round >= 1:
                bar.update()
                fedavg_round(m, runs, server_round, t.rounds, time.monotonic() - start)
            if keep_from is not None and server_round >= keep_from:
                save(record_to_state(arrays), seed, server_round, True)

        start = time.monotonic()
        result = strategy.start(grid, state_to_record(seeded_model(task, seed).state_dict()), num_rounds=t.rounds,
                                timeout=timeout, train_config=train_config(job, m), evaluate_fn=snapshot)
        if len(result.train_metrics_clientapp) < t.rounds:
            why = f" (a client failed: {strategy.failures[0]})" if strategy.failures else ""
            raise FedtrakError(f"FedAvg for checkpoint {m}: some rounds got no client update{why}")
        return record_to_state(result.arrays)

    if t.ensemble == "trajectory" and t.checkpoints > t.rounds:
        raise FedtrakError(f"a one-run ensemble of {t.checkpoints} checkpoints needs at least as many "
                           f"rounds, got {t.rounds}")
    runs = 1 if t.ensemble == "trajectory" else t.checkpoints
    with progress_bar(progress, runs * t.rounds, "FedAvg rounds", unit="round") as bar:
        if t.ensemble == "trajectory":
            run(0, job.settings.task.seed, keep_from=t.rounds - t.checkpoints + 1)
            return out
        for m in range(t.checkpoints):
            seed = job.settings.task.seed + m
            save(run(m, seed), seed, t.rounds, False)
    return out


def training_privacy(settings: Settings, task: Task, counts: dict[str, int], local_epochs: int,
                     releases: Sequence[Release] = ()) -> dict:
    """How the run's checkpoints were trained, and what that cost: ``how`` in words, and, for
    DP-SGD at a given noise multiplier, the account per client (from its released example count):
    every local step of every round of every checkpoint on the client's data; with the
    attribution's ``releases`` (a DP attribution run), also both composed, per client. Under a
    target epsilon each device sets its own DP-SGD noise so that the whole run costs that epsilon
    (:func:`fedtrak.privacy.training.device_train_sigma`)."""
    t, delta = settings.training, settings.privacy.delta
    if t.checkpoint_dir:
        return {"dp_sgd": False, "how": "given checkpoints: not trained by this run, no training cost"}
    if t.train != "fedavg":
        return {"dp_sgd": False, "how": "central (simulation only: the server trained on the pooled data; no "
                                        "device released a model update)"}
    if not trains_privately(settings):
        return {"dp_sgd": False, "how": "plain FedAvg: the model updates carry no noise" + (
            " (dp-train off: not covered by the account)" if trains_openly(settings) else "")}
    batch = task.training.batch_size
    block = {"dp_sgd": True, "library": "opacus PrivacyEngine (Poisson sampling, RDP accountant)",
             "max_grad_norm": t.dp_train_clip, "delta": delta, "rounds_per_device": len(training_rounds(settings)),
             "fedavg_weights": "the noised example counts" if releases else "uniform (no count leaves a client)"}
    if sized_to_target(settings):
        block.update(noise_multiplier="set on each device from its own example count (smaller devices add more)",
                     how=f"DP-SGD sized on each device: the attribution releases cost epsilon "
                         f"{attribution_epsilon(settings):.4g} (1 - train-share {settings.privacy.train_share:g} of "
                         f"{settings.privacy.epsilon:g}), and each device's DP-SGD noise takes its whole run, composed "
                         f"in Renyi DP, to epsilon {settings.privacy.epsilon:g}",
                     epsilon_with_attribution_max=settings.privacy.epsilon)
        return block
    sigma = given_train_sigma(settings)
    steps = {owner: len(training_rounds(settings)) * local_steps(n, batch, local_epochs) for owner, n in counts.items()}
    per_client = {owner: training_epsilon(sigma, batch, n, steps[owner], delta) for owner, n in counts.items()}
    block.update(noise_multiplier=sigma, how=f"DP-SGD at noise multiplier {sigma:g}",
                 epsilon_per_client=per_client, epsilon_max=max(per_client.values(), default=None),
                 note="training alone; counts as the clients released them")
    if releases:
        both = {owner: epsilon_with_training(releases, delta, sigma, batch / max(n, 1), steps[owner])
                for owner, n in counts.items()}
        block.update(epsilon_with_attribution_per_client=both,
                     epsilon_with_attribution_max=max(both.values(), default=None),
                     composition="Renyi DP: Opacus's subsampled-Gaussian bound for the DP-SGD steps plus the "
                                 "attribution ledger's releases, converted once at delta")
    return block
