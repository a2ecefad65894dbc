"""The settings of a run, defined once: nested, typed sections with their defaults and checks.

Every other form of the settings is derived from :class:`Settings` by the
generic conversion of :mod:`fedtrak.config.flat`:

- the command line (``fedtrak simulate --proj-dim 1024``: :mod:`fedtrak.simulations.cli.flags`);
- Flower's flat run config (``flwr run . --run-config "proj-dim=1024"``) and
  ``[tool.flwr.app.config]`` in ``pyproject.toml``;
- the job a client receives (:class:`fedtrak.wire.job.Job`).

Each setting has one name everywhere (the field ``proj_dim`` is the flag
``--proj-dim`` and the run-config key ``proj-dim``; ``lam`` is ``lambda``)
and one default, here. ``None`` means "not given" (the rule that replaces it
is in the field's help); a flat config spells it ``""``. This module imports
nothing heavy, so the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtrak.config.flat import Sectioned, setting
from fedtrak.errors import FedtrakError

PROJECTORS = ("auto", "factorized", "rademacher", "gaussian", "identity")
NORMALIZATIONS = ("none", "traker")
#: How each example's term of the kernel is weighted: not at all (TRAK's and traker's plain
#: ``Phi^T Phi``) or by the model output's curvature (``Phi^T diag(w) Phi``).
WEIGHTINGS = ("curvature", "none")
#: Where the kernel comes from: the clients' Grams, the server's public data (no Gram released),
#: or both (the public kernel as a prior for the noised private one); auto picks (see KernelSettings).
KERNEL_SOURCES = ("auto", "private", "public", "hybrid")


def releases_gram(source: str) -> bool:
    """Whether the clients of a run with this (resolved) kernel source release Grams: all but a
    public kernel's, which the server builds from its own data."""
    return source != "public"


def floors_lambda(source: str) -> bool:
    """Whether a noised run with this (resolved) kernel source raises lambda to the DP noise floor:
    only the private kernel, the noised Grams' sum itself (a hybrid kernel is made positive
    semi-definite, a public one has no noise)."""
    return source == "private"

MODES = ("private", "features")
POLICIES = ("owner-totals", "topk", "full")
#: Which queries an owner's value sums over: none (no owner values), the whole query set, or each label's.
OWNER_VALUE_GROUPS = ("none", "all", "label")
TRAINING = ("fedavg", "central")
#: Whether a private run's FedAvg training is DP-SGD (auto) or plain updates outside the account (off).
DP_TRAIN = ("auto", "off")
#: The share of a target epsilon the attribution releases are sized for when the run also trains by
#: DP-SGD; training takes the rest (the whole run composed: docs/results.md has the measurements).
DEFAULT_TRAIN_SHARE = 0.75
#: Where an ensemble's checkpoints come from: independent training runs, or one run's last steps.
ENSEMBLES = ("trajectory", "independent")
PARTITIONS = ("iid", "dirichlet", "natural")
CLIP_MODES = ("per-checkpoint", "joint")
#: How features are clipped and the guarantee's delta when none is given.
DEFAULT_CLIP_MODE = "per-checkpoint"
DEFAULT_DELTA = 1e-5
DEFAULT_TASK = "digits-logreg"
#: The projection dimension when none is given (the identity projector: the parameter count).
DEFAULT_PROJ_DIM = 512
#: Secure aggregation's share threshold as a fraction of each neighbourhood.
DEFAULT_SECAGG_THRESHOLD = 0.6
#: The clip quantile a private run from Python takes when neither it nor its task gives a clip norm:
#: the median feature norm, as adaptive clipping starts from (Andrew et al. 2021).
DEFAULT_CLIP_QUANTILE = 0.5
#: Where a run's folder goes when none is given, by the kind of run.
DEFAULT_OUT = {"central": "runs/central", "simulation": "runs/sim", "flower": "runs/flwr"}


@dataclass(frozen=True)
class FlipSpec:
    """Which labels to flip: ``fraction`` of each listed client's examples (0: none)."""

    fraction: float = 0.0
    clients: tuple[int, ...] = ()
    seed: int = 0

    @property
    def active(self) -> bool:
        """Whether any label is flipped."""
        return self.fraction > 0 and bool(self.clients)

    def validate(self, num_clients: int) -> None:
        """Raise FedtrakError on a fraction outside [0, 1) or a client id out of range."""
        if not 0 <= self.fraction < 1:
            raise FedtrakError(f"flip fraction must lie in [0, 1), got {self.fraction}")
        bad = [c for c in self.clients if not 0 <= c < num_clients]
        if bad:
            raise FedtrakError(f"flip clients {bad} are not among the {num_clients} clients")
        if len(set(self.clients)) != len(self.clients):
            raise FedtrakError(f"flip clients {list(self.clients)} repeat a client")


@dataclass(frozen=True)
class TaskSettings:
    """What is attributed: the task, which part of its data, and the run's base seed."""

    task: str = setting(DEFAULT_TASK, "built-in task, a registered task name, or package.module:function")
    train_size: int | None = setting(None, "use a fixed random subset of this many training examples",
                                     minimum=1)
    query_size: int | None = setting(None, "use a fixed random subset of this many queries", minimum=1)
    seed: int = setting(0, "base seed: checkpoint m trains with seed+m and projects with a seed derived "
                           "from (seed, m); label flips are drawn from it")


@dataclass(frozen=True)
class PartitionSettings:
    """How the training set is split over owners (simulation), and a mislabel experiment's flips."""

    clients: int = setting(10, "number of owners (virtual clients; SuperNodes in a deployment)", minimum=1)
    partition: str = setting("iid", "how the training set is split over the owners (natural: the data's own "
                                    "owner groups, such as the collection a text comes from)", choices=PARTITIONS)
    alpha: float = setting(0.5, "Dirichlet concentration", above=0)
    partition_seed: int = setting(0, "seed of the partition")
    flip_fraction: float = setting(0.0, "mislabel experiment: flip this fraction of the labels of "
                                         "--flip-clients", minimum=0, below=1)
    flip_clients: tuple[int, ...] | None = setting(
        None, "comma-separated client ids whose labels are flipped (default: the first half)")


@dataclass(frozen=True)
class TrainingSettings:
    """How the M checkpoints are obtained."""

    checkpoints: int = setting(3, "number of checkpoints M", minimum=1)
    ensemble: str = setting("trajectory", "trajectory: one training run, checkpoints from its last M "
                                          "epochs (SGD) or rounds (FedAvg); independent: M training runs",
                            choices=ENSEMBLES)
    train: str = setting("fedavg", "how checkpoints are trained when --checkpoint-dir is not given "
                                   "(simulate; attribute always trains centrally)", choices=TRAINING)
    checkpoint_dir: str | None = setting(None, "reuse the checkpoints in this folder instead of training")
    rounds: int = setting(10, "FedAvg rounds per checkpoint", minimum=1)
    local_epochs: int | None = setting(None, "local epochs per FedAvg round (default: the task's, 9 for "
                                              "digits-logreg, 1 for the text tasks, 3 for the others)", minimum=1)
    epochs: int | None = setting(None, "centralized training epochs per checkpoint (default: the task's)",
                                 minimum=1)
    dp_train: str = setting("auto", "auto: under DP (epsilon or noise-multiplier) the clients' FedAvg training "
                                    "is DP-SGD inside the run's budget; off: plain FedAvg updates, outside every "
                                    "account (the summary lists them in not_covered)", choices=DP_TRAIN)
    dp_train_noise: float = setting(0.0, "DP-SGD (Opacus) noise multiplier for the clients' FedAvg training "
                                         "(0: under --epsilon, each device sets it from its own example count "
                                         "so that training and attribution together cost epsilon; under "
                                         "--noise-multiplier, that one; otherwise plain SGD)", minimum=0)
    dp_train_clip: float = setting(1.0, "DP-SGD per-example gradient clip norm", above=0)


@dataclass(frozen=True)
class ProjectionSettings:
    """How per-example gradients become k-dimensional features."""

    projector: str = setting("auto", "random projection of the gradients; auto: factorized (per layer, no "
                                     "per-example gradient) when every trained layer is one it reads "
                                     "(Linear, Conv2d, Embedding, LayerNorm), else rademacher (dense)", choices=PROJECTORS)
    proj_dim: int | None = setting(None, f"projection dimension k (default {DEFAULT_PROJ_DIM}, at most the "
                                         "parameter count; the parameter count for identity)", minimum=1)
    batch_size: int = setting(256, "examples per vmap call", minimum=1)

    def resolved_dim(self, num_params: int) -> int:
        """k resolved for a model of ``num_params`` parameters: as given, else the parameter count
        for the identity projector and :data:`DEFAULT_PROJ_DIM` for the random projections, at most
        the parameter count (a projection to more dimensions than the gradient has adds nothing;
        the projector checks a given value). Only the resolution (preflight, the centralized path)
        calls this; everything after takes the resolved k."""
        if self.proj_dim is not None:
            return self.proj_dim
        return num_params if self.projector == "identity" else min(DEFAULT_PROJ_DIM, num_params)


@dataclass(frozen=True)
class KernelSettings:
    """How the kernel is regularized and the checkpoints ensembled."""

    @property
    def weighted(self) -> bool:
        """Whether the kernel is curvature-weighted (``Phi^T diag(w) Phi``) rather than plain."""
        return self.weighting == "curvature"

    weighting: str = setting("curvature", "kernel weighting: curvature (Phi^T diag(w) Phi, w the model "
                                          "output's curvature, p(1-p) for the margin) or none (Phi^T Phi, "
                                          "as traker)", choices=WEIGHTINGS)
    lam: str = setting("auto", "ridge lambda: auto, wd (n*weight_decay*p/k), rel:X (X times the mean "
                               "diagonal of the kernel) or a positive number", key="lambda")
    normalize: str = setting("none", "per-checkpoint scaling of K^-1 before ensembling (traker: by its "
                                     "mean absolute entry)", choices=NORMALIZATIONS)
    kernel_source: str = setting("auto", "where K comes from: private (the clients' Grams), public (the "
                                         "server's public data: no Gram is released), hybrid (public prior "
                                         "plus the clients' noised Grams); auto: private without noise, "
                                         "public under DP when there is public data", choices=KERNEL_SOURCES)
    public_data: str | None = setting(None, "public data of the public and hybrid kernels: an .npz file "
                                            "with arrays x and y, or 'queries' (default: the task's "
                                            "public split)")


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy of the attribution releases (off unless epsilon or noise-multiplier)."""

    epsilon: float | None = setting(None, "target epsilon of the whole run (its noise multiplier is "
                                          "derived; inf: no noise)", above=0)
    delta: float = setting(DEFAULT_DELTA, "delta of the guarantee", above=0, below=1)
    noise_multiplier: float = setting(0.0, "sigma of every release, instead of --epsilon (0: no noise)",
                                      minimum=0)
    clip_norm: float | None = setting(None, "L2 clip norm C of projected features (default: the task's)",
                                      above=0)
    clip_mode: str = setting(DEFAULT_CLIP_MODE, "clip each checkpoint's feature, or all checkpoints' "
                                               "jointly (one Gram release)", choices=CLIP_MODES)
    clip_quantile: float | None = setting(None, "choose C as this quantile of the feature norms, from the "
                                                "clients' noised histograms (one more release), instead "
                                                f"of --clip-norm (from Python, a private run of a task with "
                                                f"no clip norm gets {DEFAULT_CLIP_QUANTILE})", above=0, below=1)
    train_share: float = setting(DEFAULT_TRAIN_SHARE, "when the run trains its checkpoints by DP-SGD under "
                                                      "--epsilon: the attribution releases are sized for "
                                                      "(1 - train-share) x epsilon, and each device's DP-SGD "
                                                      "noise takes the whole run to epsilon", minimum=0, below=1)
    budget: str | None = setting(None, "how a target epsilon is split between the kinds of release: "
                                       "KIND=WEIGHT pairs over the default weights (1 each, 3 for "
                                       "suspects), e.g. 'suspects=8' for a mislabel screening run; "
                                       "kinds: gram, count, summary, value, suspects, histogram, features")

    @property
    def wants_noise(self) -> bool:
        """Whether the releases are noised (a finite target epsilon or a positive noise multiplier)."""
        return (self.epsilon is not None and not math.isinf(self.epsilon)) or self.noise_multiplier > 0


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation of the clients' Grams."""

    secure_agg: bool | None = setting(None, "sum the Grams with secure aggregation: the server never sees one "
                                             "client's Gram (private mode, 3 clients or more; default: on "
                                             "under DP whenever Grams are released and 3 clients or more "
                                             "take part)")
    secagg_threshold: float = setting(DEFAULT_SECAGG_THRESHOLD, "share threshold as a fraction of each "
                                                                "neighbourhood", above=0.5, maximum=1)


@dataclass(frozen=True)
class ReleaseSettings:
    """What clients compute and release, and what the run writes."""

    mode: str = setting("private", "private: clients release Grams and score locally; features: "
                                   "trusted server", choices=MODES)
    policy: str = setting("owner-totals", "what clients release in the score step (full: whole score "
                                          "matrices, simulation and evaluation only)", choices=POLICIES)
    allow_full: bool = setting(False, "let clients serve the full release policy (set by simulate "
                                      "--policy full)", flag=False)
    topk: int = setting(10, "top examples kept per query", minimum=1)
    self_influence: bool = setting(False, "also score every training example for itself (mislabel "
                                          "detection); on whenever labels are flipped")
    owner_value: str = setting("none", "also release each owner's value: its total attribution summed over "
                                       "all queries, or over each label's queries (one number per owner and "
                                       "group, noised at its own sensitivity under DP)", choices=OWNER_VALUE_GROUPS)
    query_batch: int = setting(0, "most queries sent to a client in one score message; a client scores "
                                  "the batches one at a time and never holds all of them (0: as many as "
                                  "fit 64 MiB of float32 queries over the checkpoints)", minimum=0)


@dataclass(frozen=True)
class RunSettings:
    """Where a run writes and how long the server waits."""

    out: str | None = setting(None, "run folder (default runs/central, runs/sim or runs/flwr)")
    store_dir: str | None = setting(None, "clients' local feature stores (default: under the run folder "
                                          "in simulation, ~/.cache/fedtrak/store on a device)", flag=False)
    timeout: float = setting(600.0, "seconds to wait for clients' replies in each step", above=0)
    wait_for_nodes: float = setting(120.0, "seconds to wait for the clients to connect", above=0, flag=False)
    resume: bool = setting(False, "resume the run saved in the run folder (same run config)", flag=False)
    rejoin_wait: float = setting(180.0, "seconds a client that went away mid-step may take to come back "
                                        "(0: never resend)", minimum=0, flag=False)
    all_connected: bool = setting(False, "deployment: start with every SuperNode connected once clients of "
                                         "them are (clients is then a minimum, not an exact count)", flag=False)
    max_client_examples: int | None = setting(None, "the most training examples any one device holds, as the "
                                                    "operator declares it: a client that reports more (under "
                                                    "DP, more than that plus 8 standard deviations of the "
                                                    "count's noise) is excluded; without it every size bound "
                                                    "follows the count each client claims", minimum=1)
    in_flight: int = setting(256, "most messages of a step out at once; replies are checked and summed as "
                                  "they arrive (0: all at once)", minimum=0, flag=False)


@dataclass(frozen=True)
class Settings(Sectioned):
    """All settings of a run, one section each (see the module docstring)."""

    task: TaskSettings = field(default_factory=TaskSettings)
    partition: PartitionSettings = field(default_factory=PartitionSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    projection: ProjectionSettings = field(default_factory=ProjectionSettings)
    kernel: KernelSettings = field(default_factory=KernelSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    release: ReleaseSettings = field(default_factory=ReleaseSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The checks that involve more than one setting; each field's own are in :mod:`fedtrak.config.flat`.

        Raises:
            FedtrakError: naming the settings that conflict.
        """
        super().check()
        p, r = self.privacy, self.release
        if p.budget is not None and p.noise_multiplier > 0:  # its pairs are checked by the privacy plan
            raise FedtrakError("budget splits a target epsilon; with noise-multiplier every release has "
                               "that sigma: drop one of them")
        if p.epsilon is not None and p.noise_multiplier > 0:
            raise FedtrakError("give either epsilon (with delta) or noise-multiplier, not both")
        if p.clip_quantile is not None and p.clip_norm is not None:
            raise FedtrakError("give either clip-norm or clip-quantile, not both")
        if r.policy == "full" and not r.allow_full:
            raise FedtrakError("policy full needs allow-full=true (simulation and evaluation only)")
        if self.secagg.secure_agg and (r.mode != "private" or self.partition.clients < 3):
            raise FedtrakError("secure-agg needs mode=private and at least 3 clients (SuperNodes): its share "
                               "threshold cannot protect fewer; with 2 devices run without secure-agg "
                               f"(got mode={r.mode}, clients={self.partition.clients})")
        flips = self.partition.flip_clients or ()
        bad = [c for c in flips if not 0 <= c < self.partition.clients]
        if bad:
            raise FedtrakError(f"flip-clients {bad} are not client ids in [0, {self.partition.clients})")

    @property
    def flipped_clients(self) -> tuple[int, ...]:
        """The clients whose labels a mislabel experiment flips (none without one)."""
        if not self.partition.flip_fraction > 0:
            return ()
        if self.partition.flip_clients is not None:
            return tuple(sorted(set(self.partition.flip_clients)))
        return tuple(range(max(1, self.partition.clients // 2)))

    def flips(self) -> FlipSpec:
        """The label flips of a mislabel experiment (simulation only; none by default), drawn from
        the run's ``seed``."""
        clients = self.flipped_clients
        return FlipSpec(self.partition.flip_fraction, clients, self.task.seed) if clients else FlipSpec()

    @property
    def wants_self_influence(self) -> bool:
        """Whether the run computes self-influence (asked for, or implied by label flips)."""
        return self.release.self_influence or bool(self.flipped_clients)

    def out_dir(self, kind: str) -> Path:
        """The run folder: as given, or the default of this ``kind`` of run (see :data:`DEFAULT_OUT`)."""
        return Path(self.run.out or DEFAULT_OUT[kind]).expanduser()


def settings_from(values: dict[str, Any] | None = None, base: Settings | None = None) -> Settings:
    """``base`` (default: every default) with the flat ``values`` (run-config keys) over it.

    Raises:
        FedtrakError: naming an unknown key, a value of the wrong type or out of range.
    """
    return (base or Settings()).updated(values or {})


def run_config_toml(settings: Settings | None = None) -> str:
    """The flat form as the ``[tool.flwr.app.config]`` table of ``pyproject.toml`` (keys in order)."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        return repr(v)

    flat = (settings or Settings()).flat()
    return "[tool.flwr.app.config]\n" + "".join(f"{k} = {value(v)}\n" for k, v in flat.items())


if __name__ == "__main__":  # python -m fedtrak.config.settings: the pyproject.toml run-config table
    print(run_config_toml(), end="")
