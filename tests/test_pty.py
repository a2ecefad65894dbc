"""Progress bars where a person waits at a terminal, in a real pseudo-terminal: a pty whose size was
never set (it reports 0 columns and 0 lines, as a pty opened by a program often does) still shows
them; a pipe or ``--quiet`` never does (the piped run of the same ``fedtrak simulate`` command is
``tests/test_cli_simulate.py``'s main-job test; ``fedtrak sweep`` in a pty and piped is in
``tests/test_sweep.py``, on the points its small sweep measured)."""

from __future__ import annotations

import io
import os
import select
import sys

import pytest
from terminal import in_pty

from fedtrak.logs import progress_bar

#: The main job at its smallest, as tests/test_cli_simulate.py runs it piped.
SIMULATE = ["simulate", "--clients", "3", "--checkpoints", "1", "--rounds", "2", "--local-epochs", "1",
            "--proj-dim", "64", "--epsilon", "1"]


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
