"""DP-SGD for the clients' local training (Opacus), and its accounting.

A client trains its local FedAvg epochs with Opacus's ``PrivacyEngine``:
per-example gradients clipped to ``max_grad_norm``, Gaussian noise of
``noise_multiplier * max_grad_norm`` added to their sum, batches drawn by
Poisson sampling at rate ``batch_size / n``. This protects the *training*
of the checkpoints: each round's model update is a release, composed with the
attribution's releases in one account (Renyi DP over every local step of every
round of every checkpoint the client's data was used in).

Under a target epsilon the run's training is DP-SGD by default
(:func:`trains_privately`): the attribution releases are sized for ``(1 -
train-share)`` of epsilon (:func:`attribution_epsilon`), and each device sets
its own DP-SGD noise multiplier from its own example count so that training
and attribution together cost exactly epsilon (:func:`device_train_sigma`).
The server never chooses it, and never needs a device's count to.

Both sources of DP-SGD's randomness, the Poisson sampling of batches and the
Gaussian noise, come from generators seeded with 63 bits of the operating
system's entropy on the device, never from the run's seed: the server knows
the run seed, and with it could replay the noise and subtract it from the
weights it receives.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtrak.config.settings import Settings
from fedtrak.data.inputs import to_tensors
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release, epsilon, training_release


def secret_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's entropy (unknown to the server)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def dp_sgd_epochs(task: Task, model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int,
                  noise_multiplier: float, max_grad_norm: float) -> nn.Module:
    """Train ``model`` in place for ``epochs`` of DP-SGD with the task's optimizer settings (its SGD
    or Adam steps take the clipped, noised gradients).

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
    if isinstance(xt, dict):
        raise FedtrakError(f"task {task.name}: DP-SGD (Opacus) takes one input array per example, not named "
                           "inputs: train its checkpoints another way (train central, or give checkpoints)")
    loader = DataLoader(TensorDataset(xt, yt), batch_size=min(cfg.batch_size, len(yt)),
                        generator=secret_generator())
    opt = cfg.make_optimizer(model.parameters())
    model.train()  # Opacus validates the module in training mode
    loss_fn = task.output.loss
    with warnings.catch_warnings():
        # Opacus says its noise is not drawn from a CSPRNG (secure_mode needs torchcsprng, which no
        # longer builds; the generators are seeded from OS entropy instead), and
        # torch that a full backward hook fires on outputs only (inputs need no gradient here).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        # Opacus is imported where it is used: it takes seconds to load (fedtrak.privacy.accountant)
        from opacus import PrivacyEngine

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
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, min(1.0, batch_size / max(num_examples, 1)), steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is then loose, not wrong
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(acc.get_epsilon(delta=delta))


def local_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """Expected DP-SGD steps of ``epochs`` local epochs (one per expected batch)."""
    return epochs * max(1, math.ceil(num_examples / batch_size))


def trains_privately(settings: Settings) -> bool:
    """Whether the run's own FedAvg training is DP-SGD: a given ``dp-train-noise``, or, with
    ``dp-train=auto``, any run that noises its attribution (the run trains what it attributes)."""
    t = settings.training
    if t.train != "fedavg" or t.checkpoint_dir:
        return False
    return t.dp_train_noise > 0 or (t.dp_train == "auto" and settings.privacy.wants_noise)


def trains_openly(settings: Settings) -> bool:
    """Whether a private run trains its checkpoints with plain FedAvg updates (``dp-train=off``):
    updates no account covers."""
    t = settings.training
    return settings.privacy.wants_noise and t.train == "fedavg" and not t.checkpoint_dir and \
        not trains_privately(settings)


def sized_to_target(settings: Settings) -> bool:
    """Whether each device sizes its DP-SGD noise to the run's target epsilon (no noise multiplier given)."""
    return trains_privately(settings) and settings.training.dp_train_noise == 0 and \
        settings.privacy.epsilon is not None and not math.isinf(settings.privacy.epsilon)


def given_train_sigma(settings: Settings) -> float:
    """The DP-SGD noise multiplier where the settings give it rather than each device sizing it to a
    target epsilon: ``dp-train-noise``, else the run's noise multiplier as given."""
    return settings.training.dp_train_noise or settings.privacy.noise_multiplier


def attribution_epsilon(settings: Settings) -> float | None:
    """The epsilon the attribution releases are sized for: the run's target, less training's share
    when the devices size their DP-SGD noise to that target (``None``: no target)."""
    p = settings.privacy
    if p.epsilon is None:
        return None
    return p.epsilon * (1 - p.train_share) if sized_to_target(settings) else p.epsilon


def training_rounds(settings: Settings) -> list[tuple[int, int]]:
    """The ``(checkpoint run, round)`` pairs a run's FedAvg training sends a device (rounds count from
    1, as Flower's do): one run for a trajectory ensemble, one per checkpoint otherwise."""
    t = settings.training
    if t.train != "fedavg" or t.checkpoint_dir:
        return []
    runs = 1 if t.ensemble == "trajectory" else t.checkpoints
    return [(m, r) for m in range(runs) for r in range(1, t.rounds + 1)]


def round_release(noise_multiplier: float, num_examples: int, batch_size: int, epochs: int) -> Release:
    """One FedAvg round's model update of a device with ``num_examples`` examples: ``epochs`` local
    epochs of DP-SGD steps at Poisson rate ``batch_size / n`` (noise multiplier 0: a plain update,
    unbounded)."""
    return training_release(noise_multiplier, min(1.0, batch_size / max(num_examples, 1)),
                            local_steps(num_examples, batch_size, epochs))


def device_train_sigma(settings: Settings, attribution: Sequence[Release], num_examples: int, batch_size: int,
                       epochs: int) -> float:
    """See :func:`_device_train_sigma` (solved once per run and device in a process)."""
    return _device_train_sigma(settings, tuple(attribution), num_examples, batch_size, epochs)


@functools.lru_cache(maxsize=64)
def _device_train_sigma(settings: Settings, attribution: tuple[Release, ...], num_examples: int, batch_size: int,
                        epochs: int) -> float:
    """The DP-SGD noise multiplier a device trains with (0: plain SGD), decided on the device: as
    given; under a target epsilon, the smallest whose rounds composed with the ``attribution``
    releases cost at most that epsilon on this device's ``num_examples``; else the run's noise
    multiplier.

    Raises:
        FedtrakError: if the attribution releases alone already cost the whole target.
    """
    if not trains_privately(settings):
        return 0.0
    if not sized_to_target(settings):
        return given_train_sigma(settings)
    p = settings.privacy
    rounds = len(training_rounds(settings))

    def cost(sigma: float) -> float:
        step = round_release(sigma, num_examples, batch_size, epochs)
        return epsilon([*attribution, Release(step.what, sigma, step.count * rounds, step.sensitivity,
                                              step.mechanism, kind=step.kind, sample_rate=step.sample_rate)],
                       p.delta)

    lo, hi = 0.05, 1e4
    if cost(hi) > p.epsilon:
        raise FedtrakError(f"the attribution releases leave no room for DP-SGD training within epsilon {p.epsilon:g} "
                           "(lower train-share, or set dp-train-noise)")
    if cost(lo) <= p.epsilon:
        return lo
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cost(mid) > p.epsilon else (lo, mid)
    return hi
