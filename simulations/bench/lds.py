"""Benchmark: LDS of fedtrak across k and M on one task (the README's baseline table).

``fedtrak bench lds --task T`` trains the largest number of checkpoints once
(centralized SGD, the task's recipe, seeds 0..M-1) into ``OUT/checkpoints``,
runs ``fedtrak attribute`` for every (k, M) pair on the first M of them, and
evaluates each run's LDS against one shared set of ground-truth models (S
models retrained on random halves; cached, so a second call trains nothing).
Every run folder is kept under ``OUT`` with its evaluation in its summary.
Run by hand; never a timed test.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from fedtrak.checkpoints import train_checkpoints
from fedtrak.settings import Settings
from fedtrak.simulations.attribute import run_attribute
from fedtrak.simulations.evaluation.evaluate import EvalOptions, evaluate_run
from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE
from fedtrak.tasks import load_task


def bench_lds(
    task_name: str,
    out: Path,
    proj_dims: Sequence[int | str] = (512, 2048),
    checkpoints: Sequence[int] = (1, 5),
    subsets: int = 100,
    train_size: int | None = None,
    query_size: int | None = None,
    cache_dir: Path = DEFAULT_CACHE,
    workers: int | None = None,
    projectors: Sequence[str] = ("rademacher",),
) -> list[dict]:
    """One row per (projector, k, M): LDS, its interval and the attribution's seconds.

    A k of ``"identity"`` uses no projection (k = the parameter count: only
    for small models, e.g. digits-logreg, whose 650 parameters are fewer than 2048).
    """
    out = Path(out)
    task = load_task(task_name, train_size, query_size)
    ckpt_dir = out / "checkpoints"
    start = time.perf_counter()
    if not (ckpt_dir / "manifest.json").exists():
        train_checkpoints(task, max(checkpoints), ckpt_dir)
    train_seconds = time.perf_counter() - start
    rows = []
    combos = [("identity", "identity") if k == "identity" else (kind, k) for kind in projectors for k in proj_dims]
    for kind, k in dict.fromkeys(combos):
        for m in checkpoints:
            run = out / (f"k{k}-m{m}" if kind in ("rademacher", "identity") else f"{kind}-k{k}-m{m}")
            projection = {"projector": "identity"} if k == "identity" else {"projector": kind, "proj_dim": int(k)}
            summary = run_attribute(Settings().replaced(
                out=str(run), task=task_name, checkpoints=m, checkpoint_dir=str(ckpt_dir), train_size=train_size,
                query_size=query_size, **projection), progress=False)
            block = evaluate_run(run, EvalOptions(("lds",), subsets=subsets, cache_dir=cache_dir,
                                                  workers=workers, progress=False))
            e = block["lds"]
            rows.append({"task": task_name, "num_train": summary["num_train"],
                         "num_queries": summary["num_queries"], "projector": summary["projector"],
                         "k": summary["proj_dim"], "M": m, "lds": e["lds"],
                         "ci_low": e["ci_low"], "ci_high": e["ci_high"], "subsets": e["num_subsets"],
                         "attribute_seconds": summary["seconds"]["total"],
                         "ground_truth_seconds": e["ground_truth"]["seconds"],
                         "checkpoint_seconds": round(train_seconds, 1)})
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of :func:`bench_lds` rows."""
    lines = ["| task | train x queries | k | M | LDS | 95% interval | attribute s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        k = str(r["k"]) if r["projector"] == "rademacher" else f"{r['k']} ({r['projector']})"
        lines.append(f"| {r['task']} | {r['num_train']} x {r['num_queries']} | {k} | {r['M']} | "
                     f"{r['lds']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['attribute_seconds']:.1f} |")
    return "\n".join(lines)
