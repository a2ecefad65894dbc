"""The settings of a federated run, read from Flower's run config.

Keys are Flower-style (hyphenated). Their defaults are the ones declared in
``pyproject.toml`` under ``[tool.flwr.app.config]`` (a test keeps the two in
step); ``flwr run . --run-config "key=value ..."`` overrides them, and
``fedtrak simulate`` fills them from its flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from shared.corruption import FlipSpec, flip_spec
from shared.errors import FedtrakError
from shared.kernel import NORMALIZATIONS
from shared.privacy.accountant import Release, check_delta, sigma_for_plan
from shared.privacy.distributed import DistributedNoise, noise_fraction_bits
from shared.privacy.mechanisms import CLIP_MODES, DPSettings, release_plan
from shared.projectors import PROJECTOR_KINDS
from shared.protocol import MODES, POLICIES, JobSpec
from shared.secagg.graph import THRESHOLD_FRACTION, threshold
from shared.settings import ScoreSettings
from shared.tasks import Task

TRAINING = ("fedavg", "central")


@dataclass(frozen=True)
class RunConfig:
    """One federated attribution run (attribute ``x_y`` is run-config key ``x-y``)."""

    task: str = "digits-logreg"
    train_size: int = 0
    query_size: int = 0
    clients: int = 2
    partition: str = "iid"
    alpha: float = 0.5
    partition_seed: int = 0
    mode: str = "private"
    policy: str = "owner-totals"
    allow_full: bool = False
    topk: int = 10
    checkpoints: int = 3
    train: str = "fedavg"
    checkpoint_dir: str = ""
    rounds: int = 10
    local_epochs: int = 3
    epochs: int = 0
    proj_dim: int = 512
    projector: str = "rademacher"
    seed: int = 0
    lam: str = "auto"
    normalize: str = "none"
    batch_size: int = 256
    out: str = "runs/flwr"
    store_dir: str = ""
    timeout: float = 600.0
    wait_for_nodes: float = 120.0
    self_influence: bool = False
    flip_fraction: float = 0.0
    flip_clients: str = ""
    noise_multiplier: float = 0.0
    epsilon: float = 0.0
    delta: float = 1e-5
    clip_norm: float = 0.0
    clip_mode: str = "per-checkpoint"
    clip_quantile: float = 0.0
    dp_train_noise: float = 0.0
    dp_train_clip: float = 1.0
    secure_agg: bool = False
    secagg_threshold: float = THRESHOLD_FRACTION
    resume: bool = False
    rejoin_wait: float = 180.0

    @staticmethod
    def key(name: str) -> str:
        """The run-config key of a field (``lam`` is ``lambda``)."""
        return "lambda" if name == "lam" else name.replace("_", "-")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> RunConfig:
        """Parse and validate a run config.

        Raises:
            FedtrakError: naming the key of an unknown setting, a value of
                the wrong type or a value outside its allowed set.
        """
        by_key = {cls.key(f.name): f for f in fields(cls)}
        unknown = sorted(set(config) - set(by_key))
        if unknown:
            raise FedtrakError(f"unknown run config key(s) {unknown}; known: {sorted(by_key)}")
        values = {}
        for key, value in config.items():
            f = by_key[key]
            values[f.name] = _coerce(key, value, str(f.type))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        """The run config as Flower keys and values."""
        return {self.key(f.name): getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        """Check choices and ranges; raise FedtrakError naming the key."""
        choices = {"mode": MODES, "policy": POLICIES, "train": TRAINING, "projector": PROJECTOR_KINDS,
                   "normalize": NORMALIZATIONS, "partition": ("iid", "dirichlet")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FedtrakError(f"run config {self.key(name)}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("clients", "checkpoints", "rounds", "local_epochs", "topk", "batch_size"):
            if getattr(self, name) < 1:
                raise FedtrakError(f"run config {self.key(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("train_size", "query_size", "epochs", "proj_dim"):
            if getattr(self, name) < 0:
                raise FedtrakError(f"run config {self.key(name)} must be non-negative, got {getattr(self, name)}")
        if self.rejoin_wait < 0:
            raise FedtrakError(f"run config rejoin-wait must be >= 0 (0: never resend), got {self.rejoin_wait}")
        for name in ("alpha", "timeout", "wait_for_nodes"):
            if not getattr(self, name) > 0:
                raise FedtrakError(f"run config {self.key(name)} must be positive, got {getattr(self, name)}")
        self.flips().validate(self.clients)
        if self.epsilon < 0 or self.noise_multiplier < 0 or self.clip_norm < 0:
            raise FedtrakError("run config epsilon, noise-multiplier and clip-norm must not be negative "
                               "(0 leaves them unset)")
        if not 0 <= self.clip_quantile < 1:
            raise FedtrakError(f"run config clip-quantile must lie in [0, 1) (0: off), got {self.clip_quantile}")
        if self.clip_quantile and self.clip_norm:
            raise FedtrakError("give either clip-norm or clip-quantile, not both")
        if self.dp_train_noise < 0 or not self.dp_train_clip > 0:
            raise FedtrakError("run config dp-train-noise must be >= 0 and dp-train-clip positive")
        if self.epsilon > 0 and self.noise_multiplier > 0:
            raise FedtrakError("give either epsilon (with delta) or noise-multiplier, not both")
        check_delta(self.delta)
        if self.clip_mode not in CLIP_MODES:
            raise FedtrakError(f"run config clip-mode={self.clip_mode!r}: use one of {', '.join(CLIP_MODES)}")
        if self.secure_agg and (self.mode != "private" or self.clients < 3):
            raise FedtrakError("run config secure-agg needs mode=private and at least 3 clients "
                               f"(got mode={self.mode}, clients={self.clients})")
        if not 0.5 < self.secagg_threshold <= 1:
            raise FedtrakError(f"run config secagg-threshold must lie in (0.5, 1], got {self.secagg_threshold}")
        if self.policy == "full" and not self.allow_full:
            raise FedtrakError("run config policy='full' needs allow-full=true (simulation and evaluation only)")

    def score_settings(self) -> ScoreSettings:
        """The featurizing and scoring settings."""
        return ScoreSettings(proj_dim=self.proj_dim or None, projector=self.projector, seed=self.seed,
                             lam=self.lam, normalize=self.normalize, batch_size=self.batch_size)

    def flips(self) -> FlipSpec:
        """The label flips of a mislabel experiment (simulation only; none by default).

        ``flip-clients`` lists client ids (``"0,3"``); empty means the first
        half of the clients. The flips are drawn from the run's ``seed``.
        """
        return flip_spec(self.flip_fraction, self.flip_clients, self.clients, self.seed)

    @property
    def wants_self_influence(self) -> bool:
        """Whether the run computes self-influence (asked for, or implied by label flips)."""
        return self.self_influence or self.flips().active

    def dp_settings(self, task: Task, dim: int) -> DPSettings:
        """The run's privacy settings, resolved: the noise multiplier from ``epsilon`` (over
        every release of the plan, at projection dimension ``dim``) or as given, the clip norm
        as given or the task's default.

        Raises:
            FedtrakError: if DP is asked for and the task has no default clip norm, or the
                settings are invalid.
        """
        if not (self.epsilon > 0 and not math.isinf(self.epsilon)) and not self.noise_multiplier > 0:
            return DPSettings(delta=self.delta, clip_mode=self.clip_mode)
        clip = self.clip_norm or task.clip_norm or (1.0 if self.clip_quantile else None)
        if not clip:
            raise FedtrakError(f"task {task.name} has no default clip norm: set clip-norm or clip-quantile")
        # with clip-quantile, C is a placeholder until the clients' noised norm histograms are in
        dp = DPSettings(self.noise_multiplier or 1.0, float(clip), self.clip_mode, self.delta)
        if self.epsilon > 0:
            sigma = sigma_for_plan(self.epsilon, lambda s: self.release_plan(replace(dp, noise_multiplier=s), dim),
                                   self.delta)
            dp = replace(dp, noise_multiplier=sigma)
        dp.validate()
        return dp

    @property
    def planned_threshold(self) -> int:
        """Secure aggregation's threshold if all ``clients`` advertise: the fewest survivors the
        distributed noise is sized for."""
        return threshold(self.clients, self.secagg_threshold)

    def distributed_noise(self, dim: int, dp: DPSettings) -> DistributedNoise:
        """How secure aggregation's clients would share the Gram noise if all ``clients`` advertise."""
        t = self.planned_threshold
        return DistributedNoise(dim, self.checkpoints, t, noise_fraction_bits(dim, self.checkpoints, t, dp))

    def release_plan(self, dp: DPSettings, dim: int, noise: DistributedNoise | None = None,
                     survivors: int | None = None) -> list[Release]:
        """What each training example's data is released in during this run.

        With secure aggregation the Grams are one Skellam release of the
        ``survivors``' ``noise`` together (defaults: the planned noise and its
        threshold, the least it is sized for); otherwise each client's Gram is
        a Gaussian release.
        """
        gram = None
        if self.secure_agg and dp.active:
            noise = noise or self.distributed_noise(dim, dp)
            gram = noise.release(dp, noise.threshold if survivors is None else survivors)
        return release_plan(self.mode, self.checkpoints, dp, self.wants_self_influence, self.clip_quantile > 0,
                            gram)

    def job(self, run_id: str, dp: DPSettings | None = None, task: Task | None = None) -> JobSpec:
        """What clients are told about the run: the job spec's fields, taken from this config
        (the flipped clients spelled out; with ``dp``, the resolved noise multiplier and clip norm;
        with ``task``, its fingerprint, which every node checks against its own)."""
        own = {"run_id", "protocol_version", "task_fingerprint"}
        values = {f.name: getattr(self, f.name) for f in fields(JobSpec) if f.name not in own}
        values["flip_clients"] = ",".join(map(str, self.flips().clients))
        if dp is not None:
            values.update(noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm)
        job = JobSpec(run_id=run_id, **values)
        return replace(job, task_fingerprint=job.fingerprint(task)) if task is not None else job

    @property
    def out_dir(self) -> Path:
        """The run folder."""
        return Path(self.out).expanduser()


def _coerce(key: str, value: Any, kind: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise FedtrakError(f"run config {key} must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise FedtrakError(f"run config {key} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FedtrakError(f"run config {key} must be a number, got {value!r}")
        return float(value)
    return str(value)
