"""DP-SGD for the clients' local training (Opacus), and its accounting.

A client trains its local FedAvg epochs with Opacus's ``PrivacyEngine``:
per-example gradients clipped to ``max_grad_norm``, Gaussian noise of
``noise_multiplier * max_grad_norm`` added to their sum, batches drawn by
Poisson sampling at rate ``batch_size / n``. This protects the *training*
of the checkpoints; its epsilon is accounted separately from the
attribution's releases (:func:`training_epsilon`), over every local step of
every round of every checkpoint the client's data was used in.

Both sources of DP-SGD's randomness, the Poisson sampling of batches and the
Gaussian noise, come from generators seeded with 63 bits of the operating
system's entropy on the device, never from the run's seed: the server knows
the run seed, and with it could replay the noise and subtract it from the
weights it receives.
"""

from __future__ import annotations

import math
import secrets
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtrak.errors import FedtrakError
from fedtrak.tasks import Task, to_tensors


def secret_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's entropy (unknown to the server)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def dp_sgd_epochs(task: Task, model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int,
                  noise_multiplier: float, max_grad_norm: float) -> nn.Module:
    """Train ``model`` in place for ``epochs`` of DP-SGD with the task's optimizer settings.

    Batches and noise are drawn from secret generators (:func:`secret_generator`), so two calls
    with the same inputs train different weights.

    Raises:
        FedtrakError: on a non-positive noise multiplier or clip norm.
    """
    if not noise_multiplier > 0 or not max_grad_norm > 0:
        raise FedtrakError(f"DP-SGD needs a positive noise multiplier and clip norm, got "
                           f"{noise_multiplier} and {max_grad_norm}")
    cfg = task.training
    xt, yt = to_tensors(x, y)
    loader = DataLoader(TensorDataset(xt, yt), batch_size=min(cfg.batch_size, len(yt)),
                        generator=secret_generator())
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()  # Opacus validates the module in training mode
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # Opacus says its noise is not drawn from a CSPRNG (secure_mode needs torchcsprng, which no
        # longer builds; the generators are seeded from OS entropy instead), and
        # torch that a full backward hook fires on outputs only (inputs need no gradient here).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp")
        private, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                   noise_multiplier=noise_multiplier,
                                                   max_grad_norm=max_grad_norm,
                                                   noise_generator=secret_generator())
        private.train()
        for _ in range(epochs):
            for xb, yb in loader:
                if len(yb) == 0:  # Poisson sampling can draw an empty batch
                    continue
                opt.zero_grad()
                loss_fn(private(xb), yb).backward()
                opt.step()
    return model.eval()


def training_epsilon(noise_multiplier: float, batch_size: int, num_examples: int, steps: int,
                     delta: float) -> float:
    """Epsilon of ``steps`` DP-SGD steps at sample rate ``batch_size / n`` (Opacus's RDP accountant)."""
    if not noise_multiplier > 0:
        return math.inf
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, min(1.0, batch_size / max(num_examples, 1)), steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is then loose, not wrong
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(acc.get_epsilon(delta=delta))


def local_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """Expected DP-SGD steps of ``epochs`` local epochs (one per expected batch)."""
    return epochs * max(1, math.ceil(num_examples / batch_size))
