"""Progress bars where a person waits at a terminal, in a real pseudo-terminal: a pty whose size was
never set (it reports 0 columns and 0 lines, as a pty opened by a program often does) still shows
them; a pipe or ``--quiet`` never does (the piped run of the same ``fedtrak simulate`` command is
``tests/test_cli_simulate.py``'s main-job test)."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time

import pytest

from fedtrak.logs import progress_bar

#: The main job at its smallest, as tests/test_cli_simulate.py runs it piped.
SIMULATE = ["simulate", "--clients", "3", "--checkpoints", "1", "--rounds", "2", "--local-epochs", "1",
            "--proj-dim", "64", "--epsilon", "1"]


def in_pty(args: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run ``args`` with standard input, output and error on a new pseudo-terminal of no set size
    (``TERM=xterm``, no ``COLUMNS`` or ``LINES``); return its exit code and everything it wrote."""
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm"},
                            close_fds=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
    finally:
        os.close(master)
    return proc.wait(timeout=30), out.decode(errors="replace")


def _bar(stream: io.TextIOBase | None, progress: bool) -> None:
    with progress_bar(progress, 3, "work", file=stream) as bar:
        for _ in range(3):
            bar.update()


def test_a_bar_on_a_pty_of_no_size_has_a_width_and_none_shows_on_a_pipe_or_quiet():
    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            _bar(tty, True)
            _bar(tty, False)  # --quiet
        os.close(slave)
        shown = b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                shown += os.read(master, 65536)
            except OSError:
                break
    finally:
        os.close(master)
    text = shown.decode()
    assert text.count("work: 100%|") >= 1 and "3/3" in text and text.count("work:") < 10, text
    piped = io.StringIO()  # not a terminal
    _bar(piped, True)
    assert piped.getvalue() == ""


@pytest.mark.flower
def test_simulate_in_a_pty_shows_progress_bars_and_ends_clean(tmp_path):
    """``fedtrak simulate`` as a person runs it in a terminal: bars for the FedAvg rounds and each
    protocol step, its answer after them, and no colour-reset code left by Ray at exit."""
    out = tmp_path / "sim"
    code, text = in_pty([sys.executable, "-m", "fedtrak.simulations.cli", *SIMULATE, "--out", str(out)])
    assert code == 0, text
    assert "FedAvg rounds: 100%|" in text and "2/2" in text, text
    assert "featurize (1 checkpoint):" in text and "score:" in text, text  # each step's clients, as they reply
    assert text.rstrip().endswith(f"next: fedtrak report {out} | fedtrak evaluate {out} | fedtrak attack {out}"), text
    assert "\x1b[0m" not in text and "WARNING" not in text, text[-2000:]


@pytest.mark.flower
@pytest.mark.slow
def test_sweep_in_a_pty_shows_its_bar_and_piped_none(tmp_path):
    """``fedtrak sweep`` of one point in a terminal: its bar and the point's line; the same command
    piped (the finished point reused, so it takes seconds) shows the line and no bar."""
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "fedtrak.simulations.cli", "sweep", "--task", "digits-logreg", "--train-size", "400",
            "--query-size", "60", "--clients", "4", "--checkpoints", "1", "--projector", "rademacher", "--proj-dim",
            "64", "--epsilons", "inf", "--modes", "private", "--subsets", "4", "--cache-dir", str(tmp_path / "gt"),
            "--out", str(out)]
    code, text = in_pty(args)
    assert code == 0, text
    assert "sweep: 100%|" in text and "1/1" in text, text
    assert "private mode (private kernel), epsilon inf: LDS " in text and "\x1b[0m" not in text, text
    piped = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert piped.returncode == 0, piped.stderr
    assert "%|" not in piped.stdout + piped.stderr and "\r" not in piped.stdout + piped.stderr, piped.stderr
    assert "private mode (private kernel), epsilon inf: LDS " in piped.stdout
