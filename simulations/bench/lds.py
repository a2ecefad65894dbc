"""Benchmark: LDS of fedtrak across k, M, kernels and ensembles on one task (the baseline table).

``fedtrak bench lds --task T`` trains the checkpoints once (centralized SGD,
the task's recipe: independent runs and one-run trajectories), runs
``fedtrak attribute`` for every (k, M, kernel weighting, ensemble), and
evaluates each run's LDS and its seed-noise ceiling against one shared set of
ground-truth models (S models retrained on random halves, and S more from
other seeds; cached, so a second call trains nothing).
Every run folder is kept under ``OUT`` with its evaluation in its summary.
Run by hand; never a timed test.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from fedtrak.config.settings import WEIGHTINGS, Settings
from fedtrak.data.checkpoints import train_checkpoints
from fedtrak.data.tasks import load_task
from fedtrak.logs import progress_bar
from fedtrak.simulations.attribute import run_attribute
from fedtrak.simulations.evaluation.evaluate import EvalOptions, evaluate_run
from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE


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
    weightings: Sequence[str] = WEIGHTINGS,
    ensembles: Sequence[str] = ("trajectory",),
    progress: bool = False,
) -> list[dict]:
    """One row per (projector, k, M, kernel weighting, ensemble): LDS, its interval, the seed-noise
    ceiling, the training runs the checkpoints cost and the attribution's seconds.

    Independent checkpoints are trained once (seeds 0..M-1, the first M used); a trajectory of M is
    one training run's last M epochs. ``progress``: a bar of the rows (on a terminal). A k of ``"identity"`` uses no projection (k = the parameter
    count: only for small models, e.g. digits-logreg, whose 650 parameters are fewer than 2048).
    """
    out = Path(out)
    task = load_task(task_name, train_size, query_size)
    folders: dict[tuple[str, int], Path] = {}
    start = time.perf_counter()
    if "independent" in ensembles:
        folder = out / "checkpoints"
        if not (folder / "manifest.json").exists():
            train_checkpoints(task, max(checkpoints), folder)
        folders.update({("independent", m): folder for m in checkpoints})
    for m in checkpoints if "trajectory" in ensembles else ():
        folder = out / f"trajectory-{m}"
        if not (folder / "manifest.json").exists():
            train_checkpoints(task, m, folder, trajectory=True)
        folders[("trajectory", m)] = folder
    train_seconds = time.perf_counter() - start
    rows = []
    combos = [("identity", "identity") if k == "identity" else (kind, k) for kind in projectors for k in proj_dims]
    points = [(kind, k, m, ensemble, weighting) for kind, k in dict.fromkeys(combos) for m in checkpoints
              for ensemble in ensembles for weighting in weightings]
    with progress_bar(progress, len(points), "bench lds", unit="row") as bar:
        for kind, k, m, ensemble, weighting in points:
            rows.append(_row(task_name, out, kind, k, m, ensemble, weighting, folders[(ensemble, m)],
                             train_size, query_size, subsets, cache_dir, workers, train_seconds))
            bar.update()
    return rows


def _row(task_name: str, out: Path, kind: str, k: int | str, m: int, ensemble: str, weighting: str, ckpts: Path,
         train_size: int | None, query_size: int | None, subsets: int, cache_dir: Path, workers: int | None,
         train_seconds: float) -> dict:
    run = out / f"{kind}-k{k}-m{m}-{ensemble}-{weighting}"
    projection = {"projector": "identity"} if k == "identity" else {"projector": kind, "proj_dim": int(k)}
    summary = run_attribute(Settings().replaced(
        out=str(run), task=task_name, checkpoints=m, checkpoint_dir=str(ckpts), train_size=train_size,
        query_size=query_size, weighting=weighting, **projection), progress=False)
    e = evaluate_run(run, EvalOptions(("lds",), subsets=subsets, cache_dir=cache_dir, workers=workers,
                                      progress=False))["lds"]
    return {"task": task_name, "num_train": summary.num_train, "num_queries": summary.num_queries,
            "projector": summary.projector, "k": summary.proj_dim, "M": m, "ensemble": ensemble,
            "training_runs": m if ensemble == "independent" else 1, "weighting": weighting,
            "lambda": summary.lambdas[0], "lds": e["lds"], "ci_low": e["ci_low"], "ci_high": e["ci_high"],
            "ceiling": e["ceiling"]["ceiling"], "subsets": e["num_subsets"],
            "attribute_seconds": summary.total_seconds,
            "ground_truth_seconds": e["ground_truth"]["seconds"], "checkpoint_seconds": round(train_seconds, 1)}


def format_table(rows: list[dict]) -> str:
    """A markdown table of :func:`bench_lds` rows."""
    lines = [("| task | train x queries | k | M | ensemble (training runs) | kernel | LDS | 95% interval | ceiling | "
             "LDS / ceiling | attribute s |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = str(r["k"]) if r["projector"] == "rademacher" else f"{r['k']} ({r['projector']})"
        lines.append(f"| {r['task']} | {r['num_train']} x {r['num_queries']} | {k} | {r['M']} | "
                     f"{r['ensemble']} ({r['training_runs']}) | {r['weighting']} | {r['lds']:.3f} | "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['ceiling']:.3f} | "
                     f"{r['lds'] / r['ceiling']:.2f} | {r['attribute_seconds']:.1f} |")
    return "\n".join(lines)
