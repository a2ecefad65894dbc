"""Benchmark: featurize throughput of fedtrak against traker, side by side in one run.

``fedtrak bench featurize`` featurizes the same examples of the same model
(``digits-mlp``: an MLP 64-256-256-10, 85,002 parameters, by default) at the
same k with fedtrak's projectors (factorized per layer, dense Rademacher and
Gaussian) and with traker's ``BasicProjector``, and reports examples per
second. fedtrak's time includes generating the projection matrix. With the default budget the matrix is cached when the data set spans
several gradient chunks (256 MiB each, about 790 examples here) and applied
block by block otherwise; "no cache" always goes block by block. Each variant
runs twice: ``cold`` is the first projector of its shape in the process (a
cached matrix then pays for first-touching its memory, about 1.6 s for 700 MB
on the 2-core CI box), ``warm`` is the next checkpoint's, which reuses the
released buffer, as every checkpoint after the first does in a run (best of
three).
``--examples`` beyond the data set's size repeats it. Run by hand; never a
timed test.

The first row is the **floor**: the model's own batched forward and backward
pass (the summed loss's gradient, one backward per batch of the same size),
which any method that needs a gradient signal per batch of examples pays at
least. Each row gives its throughput as a fraction of it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import seeded_model
from fedtrak.data.inputs import call_model, take, to_tensors
from fedtrak.data.modelout import ClassificationMargin, ModelOutput
from fedtrak.data.models import count_params
from fedtrak.data.tasks import load_task
from fedtrak.trak.featurizer import Featurizer
from fedtrak.trak.projectors import DEFAULT_CACHE_BYTES, make_projector, resolve_projection
from fedtrak.trak.projectors.dense import _MATRIX_POOL


def _rate(num: int, seconds: float) -> float:
    return round(num / seconds, 1) if seconds > 0 else float("inf")


def floor_model(model: torch.nn.Module, output: ModelOutput, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Seconds of the model's own batched forward and backward pass over ``x`` (the task's training
    loss of each batch, one backward per batch): the floor of any per-example-gradient method."""
    xs, ys = to_tensors(x, y)
    t0 = time.perf_counter()
    for start in range(0, len(ys), batch_size):
        model.zero_grad(set_to_none=True)
        out = call_model(model, take(xs, slice(start, start + batch_size)))
        output.loss(out, ys[start:start + batch_size]).backward()
    return time.perf_counter() - t0


def bench_featurize(
    task_name: str = "digits-mlp",
    proj_dim: int = 2048,
    num_examples: int = 1500,
    traker_examples: int = 128,
    projectors: tuple[str, ...] = ("auto", "factorized", "rademacher", "gaussian"),
    batch_size: int = 256,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> list[dict]:
    """Measure featurize throughput; one row per implementation.

    Each row: ``impl``, ``examples``, ``seconds``, ``examples_per_s``. traker
    is measured on ``traker_examples`` examples (it is slow) when installed.
    """
    task = load_task(task_name)
    model = seeded_model(task, 0)
    rows_idx = np.arange(num_examples) % task.num_train  # repeat the data set past its size
    x, y = task.x_train[rows_idx], task.y_train[rows_idx]
    grad_dim = count_params(model)
    # One-time library warm-up (torch.func's first vmap call), not counted.
    Featurizer(model, task.output, make_projector("gaussian", grad_dim, 8, seed=0)).featurize(x[:8], y[:8])
    floor_model(model, task.output, x, y, batch_size)  # warm-up
    dt = min(floor_model(model, task.output, x, y, batch_size) for _ in range(3))  # best of 3, as the warm rows
    rows = [{"impl": "floor: the model's batched forward + backward", "examples": len(y), "seconds": round(dt, 3),
             "examples_per_s": _rate(len(y), dt)}]
    for asked in projectors:
        kind = asked if asked != "auto" else resolve_projection(
            Settings().replaced(projector="auto", proj_dim=proj_dim).projection, model, grad_dim).kind
        budgets = [(f"fedtrak {asked}" + (f" (= {kind})" if asked != kind else ""), cache_bytes)]
        if kind != "factorized":  # it has no matrix to cache
            budgets.append((f"fedtrak {kind} (no cache)", 0))
        for label, budget in budgets:
            for run in ("cold", "warm"):
                # cold: the first projector of this shape in the process; warm: the
                # next checkpoint's projector, reusing the released buffer (best of 3).
                times = []
                for _ in range(1 if run == "cold" else 3):
                    t0 = time.perf_counter()
                    proj = make_projector(kind, grad_dim, proj_dim, seed=0, cache_bytes=budget, model=model)
                    Featurizer(model, task.output, proj, batch_size=batch_size).featurize(x, y)
                    times.append(time.perf_counter() - t0)
                    proj.release()
                dt = min(times)
                rows.append({"impl": f"{label}, {run}", "examples": len(y), "seconds": round(dt, 3),
                             "examples_per_s": _rate(len(y), dt)})
        _MATRIX_POOL.clear()
    try:
        if task.output.name != ClassificationMargin.name:  # traker's reference output is a classifier's margin
            raise LookupError(task.output.name)
        from fedtrak.simulations.evaluation.traker_reference import traker_featurize

        n = min(traker_examples, len(y))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            traker_featurize(task, model.state_dict(), x[:n], y[:n], proj_dim, Path(tmp))
            dt = time.perf_counter() - t0
        rows.append({"impl": "traker BasicProjector (rademacher, fp32)", "examples": n,
                     "seconds": round(dt, 3), "examples_per_s": _rate(n, dt)})
    except ImportError:
        rows.append({"impl": "traker (not installed)", "examples": 0, "seconds": None,
                     "examples_per_s": None})
    except LookupError as exc:
        rows.append({"impl": f"traker (no reference for output {exc.args[0]})", "examples": 0, "seconds": None,
                     "examples_per_s": None})
    for row in rows:
        row.update(task=task_name, params=grad_dim, proj_dim=proj_dim,
                   threads=torch.get_num_threads())
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of benchmark rows, with the speed-up over traker."""
    base = next((r["examples_per_s"] for r in rows if r["impl"].startswith("traker ")
                 and r["examples_per_s"]), None)
    floor = next((r["examples_per_s"] for r in rows if r["impl"].startswith("floor")), None)
    lines = ["| implementation | examples | seconds | examples/s | of the floor | vs traker |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['examples_per_s'] / base:.1f}x" if base and r["examples_per_s"] else "-"
        share = f"{r['examples_per_s'] / floor:.0%}" if floor and r["examples_per_s"] else "-"
        lines.append(f"| {r['impl']} | {r['examples']} | {r['seconds']} | {r['examples_per_s']} | {share} | "
                     f"{speedup} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_table(bench_featurize()))
