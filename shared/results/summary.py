"""The run summary, ``summary.json``: every key of it is spelled here and nowhere else. The server
(:mod:`fedtrak.server.summary`) and the centralized path hand typed values (:mod:`.summary_blocks`)
to :func:`build` (a run ended without results: :func:`build_failed`); readers take a
:class:`RunSummary` from :func:`load`. On disk, one JSON object whose ``summary_version`` says its
format (:data:`VERSION`); one without (fedtrak 0.2, the same format) reads as version 1. A newer or
unknown version, or a file that is not a JSON object, is refused naming the file."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import CheckpointInfo
from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.results.summary_blocks import (
    Clients,
    Excluded,
    Federated,
    Flips,
    Owner,
    Partition,
    Privacy,
    Resumed,
)
from fedtrak.timing import PhaseTimer, peak_memory_mb
from fedtrak.wire.job import Job, Resolved

#: The summary's file name in a run folder.
SUMMARY = "summary.json"
#: The format this release writes; it reads every version from 1 (no version key) to this one.
VERSION = 2
#: What every run's scores mean, in the summary's words.
ENSEMBLE = "mean kernel term x mean out-to-loss (TRAK Algorithm 1)"
SCORE_SIGN = "positive = training example raises the query's margin"

#: Every top-level key a summary may hold (the blocks' keys are their dataclasses' fields).
TOP_KEYS = (
    "summary_version", "complete", "failure", "mode", "release_policy", "task", "run_id", "num_train",
    "num_queries", "num_params", "proj_dim", "projector", "num_checkpoints", "normalization", "ensemble",
    "score_sign", "lambda", "checkpoints", "owners", "clients", "excluded", "complete_federation", "bytes",
    "client_seconds", "client_peak_memory_mb", "partition", "flips", "kernel_source", "privacy",
    "secure_aggregation", "training_privacy", "resolved", "settings", "config", "seconds",
    "server_cpu_seconds", "peak_memory_mb", "warning", "resumed", "evaluation", "attacks")
#: What the summary adds to each checkpoint's record (:mod:`fedtrak.trak.per_checkpoint` writes the rest).
CHECKPOINT_KEYS = ("file", "algorithm", "accuracy")
#: Every key a summary may hold, top-level and in its typed blocks: only this module spells them (blocks
#: that others write keep their own: records, byte counts, reports, settings, seconds, evaluation, ...).
KEYS = frozenset(TOP_KEYS + CHECKPOINT_KEYS + ("per_step",)).union(
    *({f.name for f in fields(block)} for block in (Owner, Excluded, Partition, Flips, Resumed, Privacy)))


def build(settings: Settings, resolved: Resolved, task: str, num_train: int, num_queries: int,
          records: Sequence[Mapping[str, Any]], infos: Sequence[CheckpointInfo], partition: Partition | None,
          flips: Flips | None, timer: PhaseTimer, federated: Federated | None = None) -> RunSummary:
    """The summary of a run with results: the centralized reference (``federated`` ``None``) or a
    federated run; ``records`` are the checkpoints' (:mod:`fedtrak.trak.per_checkpoint`), ``infos``
    their manifest entries (a federated run records each one's algorithm and accuracy too)."""
    lambdas, fed, central = [r["lambda"] for r in records], federated, federated is None
    records = [{**r, "file": i.file, **({} if central else {"algorithm": i.algorithm, "accuracy": i.accuracy})}
               for r, i in zip(records, infos)]
    mode = settings.release.mode
    warning = None if central or not fed.clients.excluded else (
        f"{len(fed.clients.excluded)} client(s) excluded: results cover only the {len(fed.owners)} listed owners")
    doc = {"mode": "central" if central else mode,
           "release_policy": None if central else settings.release.policy if mode == "private" else "features",
           "task": task, "run_id": None if central else fed.run_id, "num_train": num_train,
           "num_queries": num_queries, "num_params": records[0]["num_params"], "proj_dim": records[0]["proj_dim"],
           "projector": resolved.projector, "num_checkpoints": len(records),
           "normalization": settings.kernel.normalize, "ensemble": ENSEMBLE, "score_sign": SCORE_SIGN,
           "lambda": lambdas, "checkpoints": list(records),
           "owners": None if central else [asdict(o) for o in fed.owners],
           **({} if central else _clients_json(fed.clients)),
           "partition": None if partition is None else {
               k: v for k, v in asdict(partition).items() if k != "client_sizes" or v is not None},
           "flips": None if flips is None else asdict(flips),
           "kernel_source": None if central else fed.kernel_source,
           "privacy": None if central else _privacy_json(fed.privacy),
           "secure_aggregation": None if central else fed.secure_aggregation,
           "training_privacy": None if central else fed.training_privacy,
           "resolved": {**resolved.describe(), "lambda": lambdas}, "settings": settings.nested(),
           "config": settings.flat(), "seconds": timer.report(),
           "server_cpu_seconds": None if central else {k: round(v, 3) for k, v in timer.cpu_seconds.items()},
           "peak_memory_mb": peak_memory_mb(), "warning": warning,
           "resumed": None if central or fed.resumed is None else asdict(fed.resumed)}
    return RunSummary({k: v for k, v in doc.items() if v is not None})  # what a run did not do, it does not record


def build_failed(failure: Mapping[str, Any], settings: Settings, resolved: Resolved, run_id: str,
                 clients: Clients, timer: PhaseTimer) -> RunSummary:
    """The summary of a run the server ended without results (:class:`fedtrak.errors.RunFailed`):
    why (``failure``: its ``reason``, the step and that step's details), every client with the
    exclusions, the settings and the seconds spent."""
    return RunSummary({"failure": dict(failure), "mode": settings.release.mode, "task": settings.task.task,
                       "run_id": run_id, **_clients_json(clients), "resolved": resolved.describe(),
                       "settings": settings.nested(), "config": settings.flat(), "seconds": timer.report()})


def _clients_json(c: Clients) -> dict[str, Any]:
    return {"clients": list(c.clients), "excluded": [asdict(e) for e in c.excluded],
            "complete_federation": not c.excluded,
            "bytes": {"sent": c.bytes_sent, "received": c.bytes_received, "per_step": dict(c.bytes_per_step)},
            "client_seconds": dict(c.client_seconds), "client_peak_memory_mb": dict(c.client_peak_memory_mb)}


def _privacy_json(p: Privacy) -> dict[str, Any]:
    """The ``privacy`` block as written: the fields that apply to the run, infinite epsilons as null."""
    optional = {"training": p.training, "epsilon_attribution": p.training,
                "owner_value_clip": p.owner_value_clip, "suspect_threshold": p.suspect_threshold,
                **dict.fromkeys(("survivors", "gram_sigma_effective", "fraction_bits",
                                 "epsilon_if_only_threshold_honest"), p.survivors)}
    names = [f.name for f in fields(p)] if p.dp else ["dp", "kernel_source", "note", "training"]
    out = {name: _json_value(getattr(p, name)) for name in names
           if (name != "note" or not p.dp) and optional.get(name, True) is not None}
    if "ledger" in out:
        out["ledger"] = [r.describe() for r in p.ledger]
    return out


def _privacy_read(block: Mapping[str, Any]) -> Privacy:
    return Privacy(**{**{k: v for k, v in block.items() if k in {f.name for f in fields(Privacy)}},
                      "ledger": tuple(Release(**r) for r in block.get("ledger", ())),
                      "not_covered": tuple(block.get("not_covered", ()))})


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return None  # an unbounded epsilon: strict JSON has no infinity
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class RunSummary:
    """A run's summary: its JSON document (``doc``, as on disk; do not change it in place, use the
    ``with_`` methods) read through typed accessors. Keys a run did not record read as empty."""

    doc: Mapping[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        raise TypeError(f"a run summary is read through its accessors (summary.{key} where it has one), or "
                        f"summary.doc[{key!r}] for the JSON itself (fedtrak 0.3)")

    @property
    def complete(self) -> bool:
        """Whether the folder holds the run's results (``False``: the server ended it without)."""
        return self.doc.get("complete") is True

    @property
    def failure_reason(self) -> str | None:
        """Why the server ended the run without results (``None`` for a run with results)."""
        failure = self.doc.get("failure")
        return str(failure.get("reason")) if isinstance(failure, Mapping) else None

    @property
    def mode(self) -> str:
        """``central`` (the centralized reference), ``private`` or ``features``."""
        return str(self.doc.get("mode", "central"))

    @property
    def release_policy(self) -> str:
        """What a federated run released (``all scores`` for the centralized reference)."""
        return str(self.doc.get("release_policy", "all scores"))

    @property
    def task(self) -> str:
        """The task's name."""
        return str(self.doc.get("task"))

    @property
    def run_id(self) -> str:
        """A federated run's id (empty for the centralized reference)."""
        return str(self.doc.get("run_id", ""))

    @property
    def num_train(self) -> int:
        """The number of training examples attributed to."""
        return int(self.doc.get("num_train", 0))

    @property
    def num_queries(self) -> int:
        """The number of queries scored."""
        return int(self.doc.get("num_queries", 0))

    @property
    def num_checkpoints(self) -> int:
        """The number of checkpoints M."""
        return int(self.doc.get("num_checkpoints", 0))

    @property
    def num_params(self) -> int:
        """The number of parameters TRAK differentiated (the model's trainable ones: p)."""
        return int(self.doc.get("num_params", 0))

    @property
    def proj_dim(self) -> int:
        """The projection dimension k."""
        return int(self.doc.get("proj_dim", 0))

    @property
    def projector(self) -> str:
        """The projector's name."""
        return str(self.doc.get("projector"))

    def describe(self) -> dict[str, str]:
        """The run's shape in words: ``ensemble``, ``normalization`` and ``score_sign``."""
        return {k: str(self.doc.get(k)) for k in ("ensemble", "normalization", "score_sign")}

    @property
    def lambdas(self) -> tuple[float, ...]:
        """Each checkpoint's ridge lambda."""
        return tuple(float(v) for v in self.doc.get("lambda", ()))

    @property
    def checkpoints(self) -> tuple[Mapping[str, Any], ...]:
        """Each checkpoint's record (:mod:`fedtrak.trak.per_checkpoint`, with its file)."""
        return tuple(self.doc.get("checkpoints", ()))

    @property
    def owners(self) -> tuple[Owner, ...]:
        """A federated run's owners, one per ``owner_scores`` column (none for the centralized path)."""
        return tuple(Owner(**o) for o in self.doc.get("owners", ()))

    @property
    def owner_labels(self) -> list[str]:
        """The label of each ``owner_scores`` column: the owners', or the partition's client numbers."""
        if "owners" in self.doc:
            return [str(o.owner) for o in self.owners]
        part = self.partition
        return [str(c) for c in range(part.num_clients if part else 0)]

    @property
    def partition(self) -> Partition | None:
        """The simulation partition (``None`` where devices brought their own data)."""
        part = self.doc.get("partition")
        sizes = None if part is None else part.get("client_sizes")  # the centralized path's; alpha: Dirichlet's
        return None if part is None else Partition(part["scheme"], part.get("alpha"), part["seed"],
                                                   part["num_clients"], None if sizes is None else tuple(sizes))

    @property
    def flips(self) -> Flips | None:
        """The label flips of a mislabel experiment (``None``: none)."""
        flips = self.doc.get("flips")
        return None if not flips else Flips(**{**flips, "clients": tuple(flips["clients"])})

    @property
    def kernel_source(self) -> str:
        """Where the kernel came from (the centralized reference: the training data's own, ``private``)."""
        return str(self.doc.get("kernel_source", "private"))

    @property
    def privacy(self) -> Privacy | None:
        """A federated run's privacy account (``None`` for the centralized reference)."""
        block = self.doc.get("privacy")
        return None if block is None else _privacy_read(block)

    @property
    def secure_aggregation(self) -> Mapping[str, Any] | None:
        """The secure sum's report (:mod:`fedtrak.server.secure_aggregation`), where it ran."""
        return self.doc.get("secure_aggregation")

    @property
    def training_privacy(self) -> Mapping[str, Any]:
        """How the checkpoints were trained and what that cost (:mod:`fedtrak.server.training`)."""
        return self.doc.get("training_privacy", {})

    @property
    def clients(self) -> Clients:
        """The federation's account of its clients (empty for the centralized reference)."""
        total = self.doc.get("bytes", {})
        return Clients(tuple(self.doc.get("clients", ())), tuple(Excluded(**e) for e in self.doc.get("excluded", ())),
                       int(total.get("sent", 0)), int(total.get("received", 0)), total.get("per_step", {}),
                       self.doc.get("client_seconds", {}), self.doc.get("client_peak_memory_mb", {}))

    @property
    def settings(self) -> Settings:
        """The run's settings."""
        return Settings.from_flat(self.doc.get("config", {}))

    @property
    def resolved(self) -> Resolved:
        """The values the run resolved from its settings."""
        known, given = {f.name for f in fields(Resolved)}, self.doc.get("resolved", {})
        return Resolved(**{"projector": self.doc.get("projector", "rademacher"), **{k: v for k, v in given.items() if k in known}})

    def job(self) -> Job:
        """The run's job (its id, settings and resolved values), as its clients received it."""
        return Job(self.run_id, self.settings, self.resolved)

    def dp_settings(self) -> DPSettings:
        """How the run's releases were clipped and noised (inactive for a run without noise)."""
        return self.job().dp() if self.privacy is not None and self.privacy.dp else DPSettings()

    @property
    def seconds(self) -> Mapping[str, float]:
        """Seconds per phase, with the ``total``."""
        return self.doc.get("seconds", {})

    @property
    def total_seconds(self) -> float:
        """The run's seconds, all phases."""
        return float(self.seconds.get("total", 0.0))

    @property
    def server_cpu_seconds(self) -> Mapping[str, float]:
        """A federated server's own CPU seconds per phase."""
        return self.doc.get("server_cpu_seconds", {})

    @property
    def peak_memory_mb(self) -> float:
        """The process's peak memory (MiB)."""
        return float(self.doc.get("peak_memory_mb", 0.0))

    @property
    def warning(self) -> str | None:
        """What a reader must know (clients excluded), if anything."""
        return self.doc.get("warning")

    @property
    def resumed(self) -> Resumed | None:
        """What a resumed run reused (``None``: not resumed)."""
        block = self.doc.get("resumed")
        return None if block is None else Resumed(block["run_id"], tuple(block["reused"]))

    @property
    def evaluation(self) -> Mapping[str, Any]:
        """The ``evaluation`` block ``fedtrak evaluate`` wrote (empty before)."""
        return self.doc.get("evaluation", {})

    @property
    def attacks(self) -> Mapping[str, Any]:
        """The ``attacks`` block ``fedtrak attack`` wrote (empty before)."""
        return self.doc.get("attacks", {})

    def with_evaluation(self, block: Mapping[str, Any]) -> RunSummary:
        """This summary with its ``evaluation`` block replaced."""
        return RunSummary({**self.doc, "evaluation": dict(block)})

    def with_attacks(self, block: Mapping[str, Any]) -> RunSummary:
        """This summary with its ``attacks`` block replaced."""
        return RunSummary({**self.doc, "attacks": dict(block)})

    def marked(self, complete: bool) -> RunSummary:
        """This summary saying whether its folder holds the run's results."""
        return RunSummary({**self.doc, "complete": complete})

    def to_json(self) -> dict[str, Any]:
        """The on-disk form: the document under this release's ``summary_version``."""
        return {"summary_version": VERSION, **{k: v for k, v in self.doc.items() if k != "summary_version"}}


def save(summary: RunSummary, folder: Path) -> Path:
    """Write ``summary`` as ``folder``'s ``summary.json`` (atomically: readers never see half of it)."""
    path = Path(folder) / SUMMARY
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary.to_json(), indent=2, default=_json_default))
    os.replace(tmp, path)
    return path


def load(folder: Path) -> RunSummary:
    """The summary of the run folder ``folder`` (any run, complete or not).

    Raises:
        FedtrakError: naming the file: missing, unreadable, not a JSON object, or of a version this
            release does not read (newer, or no version at all).
    """
    path = Path(folder) / SUMMARY
    if not path.is_file():
        raise FedtrakError(f"{folder} is not a run folder: it has no {SUMMARY}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedtrakError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise FedtrakError(f"{path} is not a run summary: it holds a JSON {type(doc).__name__}, not an object")
    version = doc.get("summary_version", 1)  # fedtrak 0.2 and earlier wrote no version: this format
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FedtrakError(f"{path} has an unknown summary version {version!r}: it was not written by fedtrak")
    if version > VERSION:
        raise FedtrakError(f"{path} was written by a newer fedtrak (summary version {version}; this one reads "
                           f"versions 1 to {VERSION}): upgrade fedtrak to read it")
    return RunSummary(doc)


def _json_default(obj: object) -> object:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()  # a numpy scalar's is its Python value
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
