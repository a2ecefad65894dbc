"""``fedtrak bench cli``: how long the command line takes to answer ``--help`` (its start-up cost).

Each command runs in a fresh process, as a user types it; the median of
``repeats`` runs is kept. The command line imports only the group of the
command it runs, and heavy libraries (torch, Flower) only when a command
does work, so both stay well under a second on a small machine.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["simulate", "--help"], ["attribute", "--help"], ["bench", "--help"])


def bench_cli(repeats: int = 5) -> list[dict]:
    """One row per command: its median, fastest and slowest seconds over ``repeats`` runs."""
    rows = []
    for args in COMMANDS:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fedtrak.simulations.cli", *args], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        rows.append({"command": "fedtrak " + " ".join(args), "median_seconds": round(statistics.median(times), 3),
                     "min_seconds": round(min(times), 3), "max_seconds": round(max(times), 3)})
    return rows


def format_rows(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| command | median s | min s | max s |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['command']}` | {r['median_seconds']:.3f} | {r['min_seconds']:.3f} | {r['max_seconds']:.3f} |"
              for r in rows]
    return "\n".join(lines)
