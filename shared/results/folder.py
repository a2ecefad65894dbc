"""The on-disk result format shared by the centralized path and the federated server.

A run folder holds ``scores.npy`` (queries x training examples, global-id
order, where released), ``example_ids.npy`` (structured: client, local,
index), ``owner_scores.npy`` (queries x owners), ``topk_indices.npy`` /
``topk_scores.npy`` and ``summary.json``. Results are staged in a hidden
folder and moved into place only when the whole run succeeded, with
``summary.json`` last: a folder whose summary says ``"complete": true`` holds
a consistent result, and a failed run never leaves a partial one behind. A
federated run the server ended on purpose (:class:`fedtrak.errors.RunFailed`)
writes a ``summary.json`` that says ``"complete": false`` and why, in its
``failure`` block (:meth:`ResultWriter.fail`), and no arrays.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fedtrak.results.summary import SUMMARY, RunSummary, save
from fedtrak.trak.scoring import top_k


class ResultWriter:
    """Stages result arrays and commits them atomically with the summary."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out_dir))

    def add_array(self, name: str, array: np.ndarray) -> None:
        """Stage ``name.npy``."""
        np.save(self._stage / f"{name}.npy", array, allow_pickle=False)

    def commit(self, summary: RunSummary) -> Path:
        """Move staged arrays into the run folder, then write ``summary.json`` (saying ``"complete": true``)."""
        stale = self.out_dir / SUMMARY
        if stale.exists():
            stale.unlink()  # the old summary no longer describes the arrays about to land
        for path in sorted(self._stage.iterdir()):
            os.replace(path, self.out_dir / path.name)
        path = save(summary.marked(True), self.out_dir)
        self.discard()
        return path

    def discard(self) -> None:
        """Drop everything staged (after a failure)."""
        shutil.rmtree(self._stage, ignore_errors=True)

    def fail(self, summary: RunSummary) -> Path:
        """Drop everything staged and write ``summary.json`` with ``"complete": false``: the record of
        a run that ended without results (``summary`` says why, in its ``failure`` block). It replaces
        an older run's summary, so that the folder describes its latest run; any older arrays stay,
        and readers refuse them (:class:`fedtrak.simulations.run_folder.RunFolder` reads complete
        runs only)."""
        self.discard()
        return save(summary.marked(False), self.out_dir)


def add_score_arrays(
    writer: ResultWriter,
    scores: np.ndarray | None,
    example_ids: np.ndarray | None,
    owner_scores: np.ndarray,
    topk: int,
) -> None:
    """Stage the score outputs: ``owner_scores`` always; ``scores``, ``example_ids`` and
    the ``topk`` best columns per query where the scores were released."""
    writer.add_array("owner_scores", np.asarray(owner_scores, dtype=np.float64))
    if example_ids is not None:
        writer.add_array("example_ids", example_ids)
    if scores is not None:
        idx, vals = top_k(scores, topk)
        writer.add_array("scores", scores.astype(np.float32))
        writer.add_array("topk_indices", idx)
        writer.add_array("topk_scores", vals.astype(np.float32))


def add_self_influence(writer: ResultWriter, per_example: np.ndarray | None,
                       per_owner: np.ndarray | None) -> None:
    """Stage ``self_influence.npy`` (per example, global-id order, where released) and
    ``owner_self_influence.npy`` (each owner's mean), where computed."""
    if per_example is not None:
        writer.add_array("self_influence", np.asarray(per_example, dtype=np.float64))
    if per_owner is not None:
        writer.add_array("owner_self_influence", np.asarray(per_owner, dtype=np.float64))


def query_groups(kind: str, labels: np.ndarray) -> np.ndarray | None:
    """The owner-value groups ``(G, Q)`` bool: none, all queries, or one group per label present."""
    if kind == "none":
        return None
    if kind == "all":
        return np.ones((1, len(labels)), dtype=bool)
    return np.stack([labels == c for c in np.unique(labels)])


def add_owner_values(writer: ResultWriter, kind: str, labels: np.ndarray, owner_scores: np.ndarray,
                     released: np.ndarray | None = None) -> None:
    """Stage ``owner_value.npy`` ``(G, owners)`` and ``owner_value_groups.npy`` ``(G, Q)`` for the
    settings' owner-value ``kind``: the ``released`` values (private mode), or the sums of the exact
    ``owner_scores`` over each group (where the server holds them)."""
    groups = query_groups(kind, labels)
    if groups is None:
        return
    writer.add_array("owner_value", np.asarray(groups @ owner_scores if released is None else released, np.float64))
    writer.add_array("owner_value_groups", groups)
