"""Benchmarks of scale: featurizing memory against the number of examples, and simulations of
10 to 10,000 clients. Run by hand; never timed tests.

``fedtrak bench memory`` featurizes the first N training examples of a task
into a client's feature store, exactly as a client does (chunks from the
featurizer appended to the store), once per (projector, N), each in a fresh
process, and reports the resident memory after loading the data and model,
the peak while featurizing (the kernel's high-water mark reset after
loading; Linux), the process's overall peak, and the seconds.

``fedtrak bench scale`` runs ``fedtrak simulate`` with 10, 100, 1,000 and
10,000 clients on one task (centralized checkpoints, so the protocol is what
is measured) and splits each run's wall time into the protocol rounds, the
clients' own handler seconds (summed over clients, divided by the cores
they share), the server's own computation (its thread's CPU seconds: since
replies are checked and summed as they arrive, it overlaps the clients'
work) and the rest: Flower's and Ray's overhead. Peak memory is the
server process's (the ServerApp with Flower's in-memory SuperLink).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fedtrak.logs import progress_bar
from fedtrak.timing import peak_memory_mb


def _featurize_child(task_name: str, num: int, proj_dim: int, projector: str, queue: mp.Queue) -> None:
    from fedtrak.client.store import FeatureStore
    from fedtrak.config.settings import Settings
    from fedtrak.data.checkpoints import seeded_model
    from fedtrak.data.tasks import load_task
    from fedtrak.trak.per_checkpoint import checkpoint_featurizer
    from fedtrak.trak.projectors import Projection

    task = load_task(task_name, num, 1)
    state = seeded_model(task, 0).state_dict()
    featurizer = checkpoint_featurizer(task, state, 0, Settings(), Projection(projector, proj_dim))
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    resident = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current size
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(Path(tmp), "bench")
        chunks = ((c.start, c.features, c.out_to_loss) for c in featurizer.iter_chunks(task.x_train, task.y_train))
        store.write_chunks(0, len(task.y_train), featurizer.projector.proj_dim, chunks)
    queue.put({"task": task_name, "projector": projector, "examples": len(task.y_train), "proj_dim": proj_dim,
               "seconds": round(time.perf_counter() - start, 2), "loading_peak_mb": round(loaded, 1),
               "resident_before_mb": resident, "featurize_peak_mb": _status_mb("VmHWM"),
               "process_peak_mb": peak_memory_mb()})


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def bench_memory(task_name: str = "fmnist-mlp", sizes: Sequence[int] = (10_000, 60_000), proj_dim: int = 2048,
                 projectors: Sequence[str] = ("factorized", "rademacher"), progress: bool = False) -> list[dict]:
    """Peak memory of featurizing ``N`` examples into a store, per projector and N (fresh processes);
    ``progress``: a bar of the rows (on a terminal)."""
    ctx = mp.get_context("spawn")
    rows = []
    with progress_bar(progress, len(projectors) * len(sizes), "bench memory", unit="row") as bar:
        for projector in projectors:
            for num in sizes:
                queue = ctx.Queue()
                child = ctx.Process(target=_featurize_child, args=(task_name, num, proj_dim, projector, queue))
                child.start()
                row = queue.get()
                child.join()
                rows.append(row)
                bar.update()
    return rows


def bench_scale(task_name: str, out: Path, clients: Sequence[int] = (10, 100, 1000, 10000), proj_dim: int = 1024,
                checkpoints: int = 1, projector: str = "factorized", query_size: int = 500,
                progress: bool = False) -> list[dict]:
    """One simulation per client count; each row splits its wall time (see the module doc).
    ``progress``: each simulation's bars (on a terminal)."""
    from fedtrak.config.settings import Settings
    from fedtrak.data.checkpoints import train_checkpoints
    from fedtrak.data.tasks import load_task
    from fedtrak.simulations.simulate import run_simulation

    out = Path(out)
    ckpt_dir = out / "checkpoints"
    if not (ckpt_dir / "manifest.json").exists():
        train_checkpoints(load_task(task_name, None, query_size), checkpoints, ckpt_dir)
    cores = os.cpu_count() or 1
    rows = []
    for n in clients:
        cfg = Settings.from_flat({"task": task_name, "clients": n, "checkpoints": checkpoints,
                                 "checkpoint-dir": str(ckpt_dir), "proj-dim": proj_dim, "projector": projector,
                                 "out": str(out / f"clients-{n}"), "timeout": 3600.0, "query-size": query_size,
                                 "wait-for-nodes": 600.0})
        start = time.perf_counter()
        summary = run_simulation(cfg, progress=progress)
        wall = time.perf_counter() - start
        secs = summary.seconds
        rounds = sum(v for k, v in secs.items() if k.endswith("_round"))
        client = sum(summary.clients.client_seconds.values())
        cpu = summary.server_cpu_seconds  # the server's own work, which overlaps the clients' (streaming)
        server = sum(v for k, v in cpu.items() if k != "wait_for_clients" and not k.endswith("_round"))
        overhead = wall - client / cores - server
        rows.append({"task": task_name, "clients": n, "queries": summary.num_queries, "examples_per_client": summary.num_train // n,
                     "proj_dim": proj_dim, "projector": projector, "wall_seconds": round(wall, 1),
                     "rounds_seconds": round(rounds, 1), "client_seconds_total": round(client, 1),
                     "server_compute_seconds": round(server, 1),
                     "flower_overhead_seconds": round(overhead, 1),
                     "flower_overhead_share": round(overhead / wall, 3), "peak_memory_mb": summary.peak_memory_mb})
    return rows


def format_rows(rows: list[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` with the given columns."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
