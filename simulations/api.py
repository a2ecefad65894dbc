"""fedtrak's Python API: attribute, simulate and evaluate, with results in memory.

``fedtrak.attribute`` (the centralized reference), ``fedtrak.simulate``
(federated, on Flower's simulation engine) and ``fedtrak.evaluate`` are the
functions behind ``fedtrak attribute``, ``simulate`` and ``evaluate``: they
write the same run folder and also return its contents as a :class:`Result`.
A task is a built-in task's name, a registered name, an import path, or a
:class:`~fedtrak.data.tasks.Task` object (for example from
:func:`fedtrak.task_from_model`), which is registered under its name so that
the simulation's virtual clients can load it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from fedtrak.config.settings import DEFAULT_CLIP_QUANTILE, Settings
from fedtrak.data.checkpoints import CheckpointInfo, read_manifest, write_checkpoint
from fedtrak.data.tasks import BUILTIN_TASKS, Task, load_task, register_task
from fedtrak.errors import FedtrakError
from fedtrak.logs import visible_logging
from fedtrak.results.answer import answer_lines
from fedtrak.results.summary import RunSummary

log = logging.getLogger("fedtrak")

#: Checkpoints a user passes in: a folder with a manifest, or models or state dicts.
Checkpoints = int | str | Path | Sequence[nn.Module | Mapping[str, torch.Tensor]]


@dataclass
class Result:
    """A finished run, in memory and on disk.

    Attributes:
        out: the run folder (the same files the CLI writes).
        summary: its ``summary.json``, read through its accessors
            (:class:`~fedtrak.results.summary.RunSummary`; ``summary.doc`` is the JSON itself).
        owner_scores: ``(queries, owners)``: the sum of each owner's scores.
        owners: the owner label of each ``owner_scores`` column.
        scores: ``(queries, training examples)`` where the run released them (``attribute``,
            features mode, or the ``full`` policy), else ``None``. A positive score means the
            training example raises the query's margin.
        ids: per ``scores`` column, its ``(client, local, index)``: owner, position in the
            owner's data, dataset index (``None`` without scores).
        self_influence: each training example's score for itself, where computed and released.
    """

    out: Path
    summary: RunSummary
    owner_scores: np.ndarray
    owners: list[str]
    scores: np.ndarray | None = None
    ids: np.ndarray | None = None
    self_influence: np.ndarray | None = None

    def __repr__(self) -> str:
        """What the run was and found, in one line: its mode, data, projection (k of the p parameters
        TRAK differentiated: those with ``requires_grad``), kernel source, privacy, exclusions and,
        once evaluated, its LDS."""
        from fedtrak.simulations.evaluation.evaluate import headline

        s = self.summary
        privacy = s.privacy
        spent = ("not private (all data in one place)" if s.mode == "central" else
                 "no noise" if privacy is None or not privacy.dp else
                 f"epsilon {'unbounded' if privacy.epsilon is None else format(privacy.epsilon, '.3g')} "
                 f"at delta {privacy.delta:g}")
        excluded, evaluated = len(s.clients.excluded), headline(s.evaluation)
        data = f"{s.num_queries} queries x {s.num_train} examples of {len(self.owners)} owners"
        words = [f"{s.mode} run of {s.task}", data,
                 f"{s.projector} k={s.proj_dim} of {s.num_params:,} parameters, M={s.num_checkpoints}",
                 f"kernel {s.resolved.kernel_source}", spent,
                 *([f"{excluded} client(s) excluded"] if excluded else []),
                 *([evaluated] if evaluated else [])]
        return f"Result({str(self.out)!r}: {'; '.join(words)})"

    @classmethod
    def load(cls, out: str | Path) -> Result:
        """Read a run folder back.

        Raises:
            FedtrakError: if the folder holds no complete run.
        """
        from fedtrak.simulations.run_folder import RunFolder

        folder = RunFolder.open(Path(out))
        optional = {name: np.load(folder.path / f"{name}.npy") if folder.has(name) else None
                    for name in ("scores", "example_ids", "self_influence")}
        return cls(folder.path, folder.summary, np.load(folder.path / "owner_scores.npy"), folder.summary.owner_labels,
                   optional["scores"], optional["example_ids"], optional["self_influence"])


def _settings(task: str | Task, settings: Settings | None, out: str | Path | None,
              overrides: Mapping[str, Any]) -> Settings:
    """The run's settings: ``settings`` (or the defaults) with the task, folder and field overrides."""
    if isinstance(task, Task):
        if task.name in BUILTIN_TASKS:  # the run would load the built-in, not this object
            raise FedtrakError(f"this Task object is named {task.name!r}, a built-in task's name, and the run would "
                               "load the built-in task instead of it: give it a name of its own (dataclasses."
                               f"replace(task, name='my-task')), or pass the name {task.name!r} for the built-in")
        register_task(task.name, task)
        name = task.name
    else:
        name = str(task)
    values = dict(overrides)
    if out is not None:
        values["out"] = str(out)
    run = (settings or Settings()).replaced(task=name, **values)
    p = run.privacy
    if p.wants_noise and p.clip_norm is None and p.clip_quantile is None and \
            (task if isinstance(task, Task) else load_task(name, data=False)).clip_norm is None:
        log.info("task %s has no clip norm: the private run chooses C as the DP quantile %s of the feature "
                 "norms (give clip_norm or clip_quantile to choose)", name, DEFAULT_CLIP_QUANTILE)
        run = run.replaced(clip_quantile=DEFAULT_CLIP_QUANTILE)
    return run


def _given_checkpoints(settings: Settings, checkpoints: Checkpoints | None, kind: str,
                       count_given: bool = False) -> Settings:
    """Settings that use ``checkpoints``: a folder as it is (every checkpoint its manifest lists,
    unless ``count_given``: the caller said how many); models or state dicts saved first into
    ``OUT/given-checkpoints``."""
    if checkpoints is None:
        return settings
    if isinstance(checkpoints, int) and not isinstance(checkpoints, bool):
        return settings.replaced(checkpoints=checkpoints)  # how many to train
    if isinstance(checkpoints, (str, Path)):
        held = len(read_manifest(Path(checkpoints).expanduser())[1])
        return settings.replaced(checkpoint_dir=str(checkpoints),
                                 **({} if count_given or not held else {"checkpoints": held}))
    states = [dict(c.state_dict()) if isinstance(c, nn.Module) else dict(c) for c in checkpoints]
    if not states:
        raise FedtrakError("checkpoints: give at least one model or state dict")
    folder = settings.out_dir(kind) / "given-checkpoints"
    task_name = settings.task.task
    load_task(task_name, data=False)  # a bad task name fails before anything is written
    infos: list[CheckpointInfo] = []
    for m, state in enumerate(states):
        infos.append(CheckpointInfo(m, f"ckpt_{m:03d}.pt", None, "given", None, None))
        write_checkpoint(folder, task_name, {k: v.detach().cpu() for k, v in state.items()}, infos)
    return settings.replaced(checkpoint_dir=str(folder), checkpoints=len(states))


F = TypeVar("F", bound=Callable[..., Any])


def _python_words(fn: F) -> F:
    """``fn`` whose errors name settings the Python way (``clip_norm``, not ``clip-norm``)."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedtrakError as exc:
            exc.args = (Settings.in_python_words(str(exc)), *exc.args[1:])
            raise

    return wrapped  # type: ignore[return-value]


@_python_words
def attribute(task: str | Task = "digits-logreg", *, settings: Settings | None = None,
              out: str | Path | None = None, checkpoints: Checkpoints | None = None, progress: bool = False,
              **overrides: Any) -> Result:
    """TRAK attribution on the pooled training data (the centralized reference), in memory.

    Args:
        task: a built-in task's name, a registered name, an import path, or a :class:`Task`.
        settings: the run's settings (default: every default); ``overrides`` replace fields of
            it by name (``proj_dim=1024``, ``clients=5``, ``lam="wd"``).
        out: the run folder (default ``runs/central``).
        checkpoints: models or state dicts to attribute with, or a checkpoint folder; or how many
            models fedtrak trains with the task's recipe (default: the settings' ``checkpoints``).
        progress: show progress bars.

    Raises:
        FedtrakError: on bad settings, a task or checkpoint that does not fit, or bad data.
    """
    from fedtrak.simulations.attribute import run_attribute

    run = _given_checkpoints(_settings(task, settings, out, overrides), checkpoints, "central",
                             "checkpoints" in overrides)
    run_attribute(run, progress=progress)
    return _told(Result.load(run.out_dir("central")))


@_python_words
def simulate(task: str | Task = "digits-logreg", *, settings: Settings | None = None,
             out: str | Path | None = None, checkpoints: Checkpoints | None = None, verbose: bool = False,
             **overrides: Any) -> Result:
    """Federated attribution on Flower's simulation engine (``clients`` virtual clients), in memory.

    Arguments as :func:`attribute`; ``out`` defaults to ``runs/sim``. Example scores are in
    the result only where the run releases them (``mode="features"`` or ``policy="full"``,
    which sets ``allow_full``); owner scores always are.

    Raises:
        RunFailed: a run the server ended without results (its ``failure`` says why, as does
            the run folder's ``summary.json``, which :meth:`Result.load` then refuses by that reason).
        FedtrakError: on bad settings or a run that failed (with the server's reason).
    """
    from fedtrak.simulations.simulate import run_simulation

    if overrides.get("policy") == "full":
        overrides = {"allow_full": True, **overrides}
    run = _given_checkpoints(_settings(task, settings, out, overrides), checkpoints, "simulation",
                             "checkpoints" in overrides)
    run_simulation(run, verbose=verbose)
    return _told(Result.load(run.out_dir("simulation")))


def _told(result: Result) -> Result:
    """``result``, once its answer (the lines the command line ends with) is in fedtrak's log, which
    a script shows on its standard error."""
    visible_logging()
    for line in answer_lines(result.out, result.summary):
        log.info(line)
    return result


@_python_words
def evaluate(run: Result | str | Path, *, lds: bool = True, owner_lds: bool = False, mislabel: bool = False,
             subsets: int = 100, owner_subsets: int = 100, alpha: float = 0.5, seed: int = 0,
             cache_dir: str | Path | None = None, workers: int | None = None, progress: bool = False,
             ceiling: bool = True) -> dict:
    """Judge a run's attributions against retrained models: LDS (the TRAK paper's linear
    datamodeling score), owner-level LDS and mislabel detection. Returns the evaluation block
    (also written into the run's summary). ``ceiling``: also retrain every subset from other
    seeds and report the seed-noise ceiling, the most LDS any fixed scorer can expect, and LDS
    over it.

    Raises:
        FedtrakError: if the run cannot be evaluated (naming why).
    """
    from fedtrak.simulations.evaluation.evaluate import EvalOptions, evaluate_run
    from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE

    folder = run.out if isinstance(run, Result) else Path(run)
    metrics = tuple(m for m, on in (("lds", lds), ("owner_lds", owner_lds), ("mislabel", mislabel)) if on)
    if not metrics:
        raise FedtrakError("evaluate: ask for at least one of lds, owner_lds, mislabel")
    block = evaluate_run(folder, EvalOptions(metrics, subsets, owner_subsets, alpha, seed,
                                             Path(cache_dir) if cache_dir else DEFAULT_CACHE, workers,
                                             progress=progress, ceiling=ceiling))
    if isinstance(run, Result):
        run.summary = run.summary.with_evaluation(block)
    return block


__all__ = ["Result", "attribute", "evaluate", "simulate"]
