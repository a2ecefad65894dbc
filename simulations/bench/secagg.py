"""Benchmark: the cost of secure aggregation in a Flower simulation, against the plain run.

``fedtrak bench secagg`` trains the checkpoints once (centralized), then runs
``fedtrak simulate`` twice on them with the same clients, k and partition:
plain (each client's Gram goes to the server) and with ``--secure-agg``. It
reports seconds per protocol round, bytes per client per round, the clients'
own seconds (featurize, Gram, encode and noise, mask) and the server's
unmasking, and checks that both runs give the same owner totals. Run by
hand; never a timed test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import train_checkpoints
from fedtrak.data.tasks import load_task
from fedtrak.simulations.simulate import run_simulation


def bench_secagg(task_name: str, out: Path, clients: int = 10, proj_dim: int = 2048, checkpoints: int = 1,
                 epsilon: float = 0.0, progress: bool = False) -> dict:
    """Run the plain and the secure simulation; return the comparison (also written to ``OUT``).
    ``progress``: each simulation's bars (on a terminal)."""
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    if not any(ckpt_dir.glob("*.pt")):
        train_checkpoints(load_task(task_name), checkpoints, ckpt_dir, base_seed=0)
    runs = {}
    for name, secure in (("plain", False), ("secure", True)):
        cfg = Settings.from_flat({"task": task_name, "clients": clients, "checkpoints": checkpoints,
                                 "checkpoint-dir": str(ckpt_dir), "proj-dim": proj_dim, "out": str(out / name),
                                 "secure-agg": secure, "epsilon": epsilon or ""})
        runs[name] = run_simulation(cfg, progress=progress)
    plain, secure = (np.load(out / n / "owner_scores.npy") for n in ("plain", "secure"))
    report = runs["secure"]["secure_aggregation"]
    n = report["clients"]
    return {
        "task": task_name, "clients": clients, "proj_dim": proj_dim, "checkpoints": checkpoints,
        "epsilon": epsilon or None,
        "owner_totals_max_abs_diff": float(np.abs(plain - secure).max()),
        "owner_totals_max_abs": float(np.abs(plain).max()),
        "plain_seconds": runs["plain"]["seconds"], "secure_seconds": runs["secure"]["seconds"],
        "plain_bytes_per_client": {k: {w: v // n for w, v in b.items()}
                                   for k, b in runs["plain"]["bytes"]["per_step"].items()},
        "rounds": {k: {"seconds": r["seconds"], "bytes_sent_per_client": r["bytes_sent"] // n,
                       "bytes_received_per_client": r["bytes_received"] // n}
                   for k, r in report["rounds"].items()},
        "client_seconds_mean": report["client_seconds_mean"],
        "server_unmask_seconds": report["server_unmask_seconds"],
        "vector_length": report["vector_length"], "threshold": report["threshold"], "graph": report["graph"],
    }


def format_table(result: dict) -> str:
    """A markdown table of the secure run's rounds and the clients' own seconds."""
    lines = ["| round | seconds | MB sent per client | MB received per client |", "|---|---:|---:|---:|"]
    for step, r in result["rounds"].items():
        lines.append(f"| {step} | {r['seconds']:.2f} | {r['bytes_sent_per_client'] / 1e6:.2f} | "
                     f"{r['bytes_received_per_client'] / 1e6:.2f} |")
    client = ", ".join(f"{k} {v:.3f} s" for k, v in result["client_seconds_mean"].items())
    plain = result["plain_seconds"]
    lines += ["", f"per client (mean): {client}; server unmasking {result['server_unmask_seconds']:.2f} s",
              (f"plain run: featurize round {plain.get('featurize_round', 0):.2f} s, total {plain['total']:.1f} s; "
              f"secure run total {result['secure_seconds']['total']:.1f} s"),
              (f"owner totals: max |plain - secure| {result['owner_totals_max_abs_diff']:.3g} "
              f"(max |total| {result['owner_totals_max_abs']:.3g})")]
    return "\n".join(lines)
