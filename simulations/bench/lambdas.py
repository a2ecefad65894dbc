"""``fedtrak bench lambda``: how far the default lambda rule lands from the best lambda (a diagnostic).

The default rule (``lambda auto``: ``n * weight_decay`` on traker's scale, the
training objective's own ridge, the Gauss-Newton Hessian's regularizer for the
curvature-weighted kernel) never looks at queries. This benchmark scores the
same checkpoints with the rule's value times each factor and evaluates every
run's LDS on the evaluated queries, to say how far the rule's choice is from
the best one there. It is a diagnostic, run by hand: nothing uses it to choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedtrak.config.settings import DEFAULT_PROJ_DIM, Settings
from fedtrak.data.checkpoints import train_checkpoints
from fedtrak.data.tasks import load_task
from fedtrak.logs import progress_bar
from fedtrak.simulations.attribute import run_attribute
from fedtrak.simulations.evaluation.evaluate import EvalOptions, evaluate_run
from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE


def bench_lambda(task_name: str, out: Path, factors: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0),
                 checkpoints: int = 5, proj_dim: int = DEFAULT_PROJ_DIM, weightings: Sequence[str] = ("curvature", "none"),
                 subsets: int = 100, cache_dir: Path = DEFAULT_CACHE, workers: int | None = None,
                 progress: bool = False) -> list[dict]:
    """One row per (kernel weighting, factor): lambda, LDS and whether it is the rule's own value;
    ``progress``: a bar of the rows (on a terminal)."""
    out = Path(out)
    task = load_task(task_name)
    ckpts = out / "checkpoints"
    if not (ckpts / "manifest.json").exists():
        train_checkpoints(task, checkpoints, ckpts, trajectory=True)
    base = Settings().replaced(task=task_name, checkpoints=checkpoints, checkpoint_dir=str(ckpts), proj_dim=proj_dim)
    rows = []
    with progress_bar(progress, len(weightings) * len(factors), "bench lambda", unit="row") as bar:
        for weighting in weightings:
            rule = run_attribute(base.replaced(out=str(out / f"{weighting}-rule"), weighting=weighting), progress=False)
            value = float(rule["lambda"][0])
            for factor in factors:
                run = out / f"{weighting}-x{factor:g}"
                run_attribute(base.replaced(out=str(run), weighting=weighting, lam=repr(value * factor)), progress=False)
                e = evaluate_run(run, EvalOptions(("lds",), subsets=subsets, cache_dir=cache_dir, workers=workers,
                                                  progress=False, ceiling=False))["lds"]
                rows.append({"task": task_name, "weighting": weighting, "factor": factor, "lambda": value * factor,
                             "rule": rule["checkpoints"][0]["lambda_rule"], "lds": e["lds"]})
                bar.update()
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table, and per weighting the rule's LDS against the best factor's."""
    lines = ["| task | kernel | lambda / rule | lambda | LDS |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['weighting']} | {r['factor']:g} | {r['lambda']:.4g} | {r['lds']:.3f} |"
              for r in rows]
    for weighting in dict.fromkeys(r["weighting"] for r in rows):
        mine = [r for r in rows if r["weighting"] == weighting]
        best = max(mine, key=lambda r: r["lds"])
        at_rule = next((r for r in mine if r["factor"] == 1.0), None)
        if at_rule is not None:
            lines.append(f"\n{weighting}: the rule's lambda gives LDS {at_rule['lds']:.3f}; the best factor on "
                         f"the evaluated queries, {best['factor']:g}, gives {best['lds']:.3f} "
                         f"({best['lds'] - at_rule['lds']:+.3f}; a diagnostic, never used to choose)")
    return "\n".join(lines)
