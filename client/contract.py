"""The device's contract: what a run may take from this device, decided here, whatever the server sends.

At a run's first contact the device binds the run id to the job it came with
(:func:`job_digest`, stored in its privacy ledger); every later message of
that run must carry the same job, or it is refused by name. From the bound job
and what the device itself knows (its task, its example count) the device
derives:

- the releases the run may make (:meth:`Contract.items`): each kind of release
  (:mod:`fedtrak.privacy.kinds`) the job's plan names, for the job's
  checkpoints ``range(M)`` exactly, in the job's mode; a Gram only through
  secure aggregation when the job sums Grams securely; a norm histogram only
  when the job chooses its clip norm by quantile; every score only where the
  node serves the ``full`` policy;
- each release's sensitivity: the kernel's weight bound from the task's own
  output function (1 unweighted), never a number the server sends;
- each release's ledger entry (:meth:`Contract.unit`), charged when the release
  leaves (:meth:`fedtrak.client.node.Local.release`), and the DP-SGD noise of
  its training rounds, set from its own example count.

Anything outside the plan is refused with :class:`~fedtrak.errors.Refused`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from fedtrak.data.tasks import Task
from fedtrak.errors import Refused
from fedtrak.privacy.accountant import Release
from fedtrak.privacy.distributed import DistributedNoise
from fedtrak.privacy.kinds import FEATURES, GRAM, HISTOGRAM, KINDS, UPDATE
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.privacy.plan import run_release_plan, uses_secure_agg, weight_bound
from fedtrak.privacy.training import (
    device_train_sigma,
    round_release,
    training_rounds,
    trains_privately,
)
from fedtrak.wire.job import Job
from fedtrak.wire.records import encode_job

#: Job fields that may change within a run: the clip norm a clip-quantile run resolves from the
#: clients' noised histograms after its first contact (it scales clipping and noise together).
MUTABLE = ("resolved-clip-norm",)
#: The kind of the exact per-example scores a node serving the ``full`` policy releases (no noise).
SCORES = "scores"


def job_digest(job: Job) -> str:
    """SHA-256 of the job's wire form (every setting, resolved value, run id, version and task
    fingerprint); with ``clip-quantile``, without the clip norm the run resolves later."""
    record = dict(encode_job(job))
    if job.settings.privacy.clip_quantile is not None:
        for key in MUTABLE:
            record.pop(key, None)
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=repr).encode()).hexdigest()


@dataclass(frozen=True)
class Contract:
    """What one run may release from this device (see the module docstring)."""

    job: Job
    dp: DPSettings
    num_examples: int
    batch_size: int
    plan: tuple[Release, ...]
    train_sigma: float
    serve_full: bool = False

    @classmethod
    def of(cls, job: Job, task: Task, num_examples: int, serve_full: bool = False) -> Contract:
        """The contract of ``job`` on a device holding ``num_examples`` examples of ``task``.

        Raises:
            Refused: if the job's kernel weight bound is not the one the task's output function gives,
                or the job is private and the output's out-to-loss weights have no bound.
        """
        bound = weight_bound(job.settings, task)
        if job.resolved.weight_bound != bound:
            raise Refused(f"the job's kernel weight bound {job.resolved.weight_bound:g} is not {bound:g}, the "
                          f"bound this device's task gives for weighting={job.settings.kernel.weighting}: "
                          "the job is refused")
        dp = job.dp()
        if dp.active and task.output.out_to_loss_bound is None:
            raise Refused(f"task {task.name}'s output ({task.output.name}) has out-to-loss weights without a "
                          "bound: its releases cannot be differentially private, the job is refused")
        plan = tuple(run_release_plan(job.settings, dp, job.resolved.proj_dim, source=job.resolved.kernel_source))
        sigma = device_train_sigma(job.settings, plan, num_examples, task.training.batch_size,
                                   job.resolved.local_epochs)
        return cls(job, dp, num_examples, task.training.batch_size, plan, sigma, serve_full)

    @property
    def checkpoints(self) -> int:
        """The job's M."""
        return self.job.settings.training.checkpoints

    @property
    def secure(self) -> bool:
        """Whether the job sums Grams with secure aggregation (never a plain Gram then)."""
        return uses_secure_agg(self.job.settings, self.job.resolved.kernel_source)

    def planned_kinds(self) -> set[str]:
        """The kinds of release the bound job's plan names (under DP or not)."""
        kinds = {r.kind for r in self.plan}
        if self.job.settings.release.mode == "private" and self.job.settings.release.policy == "full":
            kinds.add(SCORES)
        return kinds

    def items(self, kind: str, checkpoints: list[int] | None = None) -> list[str]:
        """The ledger items one release of ``kind`` over ``checkpoints`` makes: ``KIND-m`` per
        checkpoint (``KIND-all`` jointly clipped), ``KIND`` for a once-per-run kind.

        Raises:
            Refused: naming a kind the job's plan has no room for, or checkpoints other than the job's.
        """
        self.allow(kind)
        if checkpoints is not None:
            self.check_checkpoints(checkpoints)
        if kind in KINDS and KINDS[kind].per_checkpoint:
            return [f"{kind}-all"] if self.dp.clip_mode == "joint" else [f"{kind}-{m}" for m in checkpoints or ()]
        return [kind]

    def check_checkpoints(self, checkpoints: list[int]) -> None:
        """Refuse a request over checkpoints other than the bound job's ``range(M)``.

        Raises:
            Refused: naming both.
        """
        if sorted(checkpoints) != list(range(self.checkpoints)):
            raise Refused(f"the request names checkpoints {sorted(checkpoints)}; the job this run bound has "
                          f"checkpoints 0..{self.checkpoints - 1} and every release covers all of them")

    def allow(self, kind: str) -> None:
        """Refuse a release of ``kind`` that the bound job does not plan.

        Raises:
            Refused: naming the kind and the job's mode or setting that leaves it out.
        """
        s = self.job.settings
        if kind == SCORES:
            if not self.serve_full:
                raise Refused("release policy 'full' is refused: this node's config does not set serve-full")
            if s.release.policy != "full":
                raise Refused(f"the job's policy is {s.release.policy}: every example's score is not released")
            return
        if kind == UPDATE:
            if not training_rounds(s):
                raise Refused("the job trains no checkpoints on the devices: a train message is refused")
            return
        if kind not in self.planned_kinds():
            why = {FEATURES: f"the job's mode is {s.release.mode}: features leave only in features mode",
                   HISTOGRAM: "the job sets no clip-quantile: no norm histogram is released",
                   GRAM: f"the job's mode ({s.release.mode}) or kernel source ({self.job.resolved.kernel_source}) "
                         "releases no Gram"}.get(kind, f"the job's plan has no {kind} release")
            raise Refused(f"{why}: the request is refused")

    def allow_plain_gram(self) -> None:
        """Refuse a Gram in the clear when the bound job sums Grams with secure aggregation.

        Raises:
            Refused: naming the job's secure aggregation.
        """
        self.allow(GRAM)
        if self.secure:
            raise Refused("the job sums Grams with secure aggregation: this device never releases its Gram in "
                          "the clear for it")

    def allow_secure_gram(self) -> None:
        """Refuse a masked secure-sum input when the bound job does not use secure aggregation.

        Raises:
            Refused: naming the job's setting.
        """
        self.allow(GRAM)
        if not self.secure:
            raise Refused("the job does not use secure aggregation: no masked input is made for it")

    def unit(self, kind: str) -> Release:
        """The ledger entry of one item of ``kind`` (one mechanism; no noise: unbounded)."""
        if kind == SCORES:
            return Release("every example's score (policy full)", 0.0, 1, "unbounded (exact)", kind=SCORES)
        if kind == UPDATE:
            return round_release(self.train_sigma, self.num_examples, self.batch_size,
                                 self.job.resolved.local_epochs)
        entries = [r for r in self.plan if r.kind == kind]
        if not entries:
            return Release(KINDS[kind].title, 0.0, 1, "unbounded (no noise)", kind=kind)
        if len(entries) == 1 or not all(r.sigma > 0 for r in entries):
            return replace(entries[0], count=1, sigma=min(r.sigma for r in entries))
        # features mode: a checkpoint's features and weights leave together, one Gaussian of their mu
        return replace(entries[0], count=1, what=" + ".join(r.what for r in entries),
                       sigma=sum(r.sigma**-2 for r in entries) ** -0.5)

    def secure_unit(self, threshold: int, fraction_bits: int) -> Release:
        """The ledger entry of one checkpoint's Gram in a secure sum sized for ``threshold`` survivors
        at ``fraction_bits`` (what this device's noise share guarantees if only they are honest)."""
        noise = DistributedNoise(self.job.resolved.proj_dim, self.checkpoints, threshold, fraction_bits)
        return replace(noise.release(self.dp, threshold), count=1)

    def planned(self) -> list[Release]:
        """Everything the run would release from this device if it ran to the end: the attribution
        plan, its training rounds, and exact scores under the ``full`` policy (for the budget check
        at first contact)."""
        out = list(self.plan)
        rounds = training_rounds(self.job.settings)
        if rounds:
            step = self.unit(UPDATE)
            out.append(replace(step, count=step.count * len(rounds)))
        if SCORES in self.planned_kinds() and self.serve_full:
            out.append(self.unit(SCORES))
        return out

    @property
    def trains_privately(self) -> bool:
        """Whether this device trains the run's checkpoints with DP-SGD."""
        return trains_privately(self.job.settings) and self.train_sigma > 0

