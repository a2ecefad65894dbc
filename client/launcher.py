"""``fedtrak device start``: Flower's ``flower-supernode``, started again while the SuperLink still holds
this device's node from before a crash, and the likely cause named when it will not activate.

A SuperLink keeps a node online until :data:`HOLD_SECONDS` after its last heartbeat (Flower's
heartbeat interval times its patience: 2 x 30 s). A SuperNode that stopped cleanly deactivates its
node and may start again at once; one that crashed (power loss, ``kill -9``) leaves its node online,
and a SuperNode started with the same key within that time is refused with ``[code: 2004] Failed to
activate SuperNode.``, the same message as a key the operator never registered. The launcher starts
``flower-supernode`` with the arguments it is given, copies its output, and when activation is
refused starts it again every :data:`RETRY_SECONDS` for up to :data:`ACTIVATION_WAIT` seconds. While
the SuperNode runs it notes, beside the node's private key (``KEY.last-active``), when it was last
alive and whether it stopped cleanly: that tells the two causes apart for its owner.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

#: Seconds a SuperLink holds a node online after its last heartbeat (Flower 1.42: 2 x 30 s).
HOLD_SECONDS = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
#: How long the launcher keeps starting a refused SuperNode again (the hold, and room for start-up).
ACTIVATION_WAIT = HOLD_SECONDS + 15
#: Seconds between two starts of a refused SuperNode.
RETRY_SECONDS = 5.0
#: Seconds between two notes that the SuperNode is alive.
ALIVE_EVERY = 10.0
#: What ``flower-supernode`` prints when the SuperLink refuses to activate it, and once it is active.
REFUSED, ACTIVATED = "Failed to activate SuperNode", "SuperNode ID"


def marker_of(supernode_args: list[str]) -> Path | None:
    """Where the launcher notes when this key's SuperNode was last alive: beside the private key of
    ``--auth-supernode-private-key`` (``None`` without one)."""
    for i, arg in enumerate(supernode_args):
        if arg == "--auth-supernode-private-key" and i + 1 < len(supernode_args):
            return Path(supernode_args[i + 1] + ".last-active")
        if arg.startswith("--auth-supernode-private-key="):
            return Path(arg.partition("=")[2] + ".last-active")
    return None


def read_marker(marker: Path | None) -> tuple[float, bool] | None:
    """``(when, clean)``: the wall-clock time this key's SuperNode was last alive and whether it then
    stopped cleanly, or ``None`` if the launcher never saw it active."""
    try:
        state, when = marker.read_text().split() if marker else ("", "")
        return float(when), state == "stopped"
    except (OSError, ValueError):
        return None


def _note(marker: Path | None, state: str) -> None:
    if marker is not None:
        try:
            marker.write_text(f"{state} {time.time():.1f}\n")
        except OSError:  # a read-only key folder: the hint is a courtesy
            pass


def refused_hint(last: tuple[float, bool] | None, now: float, wait: float) -> str:
    """What a first refusal most likely means, from the key's last sign of life (:func:`read_marker`)."""
    if last is not None and not last[1] and now - last[0] < HOLD_SECONDS + ALIVE_EVERY + RETRY_SECONDS:
        return (f"not activated: this key's SuperNode was alive {now - last[0]:.0f} s ago and did not stop cleanly "
                f"(a crash), and the SuperLink holds its node online until {HOLD_SECONDS} s after its last "
                f"heartbeat; starting it again every {RETRY_SECONDS:g} s for up to {wait:g} s")
    return (f"not activated: either this key is not registered with the SuperLink, or a SuperNode with it stopped "
            f"without deactivating (a crash) less than {HOLD_SECONDS} s ago; starting it again every "
            f"{RETRY_SECONDS:g} s for up to {wait:g} s")


def given_up(key: Path | None, wait: float) -> str:
    """What the owner is told when the SuperLink still refuses after ``wait`` seconds."""
    causes = (f"its key is not registered (the operator runs: flwr supernode register {key or 'KEY'}.pub "
              "FEDERATION), or another SuperNode with this key is running (one key per device)")
    if wait < HOLD_SECONDS:
        return (f"the SuperLink refused to activate this SuperNode for {wait:g} s, less than it holds a crashed node "
                f"({HOLD_SECONDS} s after its last heartbeat): if it crashed, start it again after that; if not, "
                f"{causes}")
    return (f"the SuperLink refused to activate this SuperNode for {wait:g} s, longer than it holds a crashed node "
            f"({HOLD_SECONDS} s after its last heartbeat): most likely {causes}")


#: Run first in the SuperNode's process, on Linux: the kernel kills it when the launcher dies (``kill -9``
#: of the launcher is then a crash of the device's SuperNode, not an orphan left running outside
#: ``supernode.pid``), and it becomes the command (``exec``).
DIE_WITH_LAUNCHER = "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); os.execvp(sys.argv[1], sys.argv[1:])"


def _command(program: list[str], supernode_args: list[str]) -> list[str]:
    """The SuperNode's command line, bound to the launcher's life where the system allows it."""
    bound = [sys.executable, "-c", DIE_WITH_LAUNCHER] if sys.platform.startswith("linux") else []
    return [*bound, *program, *supernode_args]


def _copy(stream: TextIO, out: TextIO, seen: dict[str, threading.Event]) -> None:
    """Copy the SuperNode's output line by line, flagging what :data:`REFUSED` and :data:`ACTIVATED` mark."""
    for line in stream:
        out.write(line)
        out.flush()
        for text, event in seen.items():
            if text in line:
                event.set()


def start_supernode(supernode_args: list[str], wait: float = ACTIVATION_WAIT, program: list[str] | None = None,
                    out: TextIO | None = None, say: Callable[[str], None] | None = None) -> int:
    """Run ``flower-supernode supernode_args`` (``program``: another command) until it exits, starting it
    again while the SuperLink refuses to activate it, for up to ``wait`` seconds; SIGTERM and SIGINT
    go to the SuperNode, and the SuperNode dies with the launcher. Returns the SuperNode's exit status
    (2 once the launcher gives up)."""
    out = out or sys.stdout
    say = say or (lambda text: print(f"fedtrak: {text}", file=sys.stderr, flush=True))
    program = program or [shutil.which("flower-supernode") or str(Path(sys.executable).with_name("flower-supernode"))]
    marker = marker_of(supernode_args)
    stopping: list[int] = []
    current: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if current and current[-1].poll() is None:
            current[-1].send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first, last, hinted = time.monotonic(), read_marker(marker), False
    try:
        while True:
            seen = {REFUSED: threading.Event(), ACTIVATED: threading.Event()}
            proc = subprocess.Popen(_command(program, supernode_args), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            current.append(proc)
            threading.Thread(target=_copy, args=(proc.stdout, out, seen), daemon=True).start()
            while proc.poll() is None:  # the pipe may outlive it (its helper processes): wait on the process
                if seen[ACTIVATED].is_set():
                    _note(marker, "alive")
                try:
                    proc.wait(timeout=ALIVE_EVERY if seen[ACTIVATED].is_set() else 0.5)
                except subprocess.TimeoutExpired:
                    pass
            if seen[ACTIVATED].is_set():
                _note(marker, "stopped" if stopping or proc.returncode == 0 else "alive")
                return proc.returncode
            if stopping or not seen[REFUSED].wait(timeout=2):  # stopped, or failed for another reason
                return proc.returncode
            if time.monotonic() - first + RETRY_SECONDS > wait:
                say(given_up(marker.with_suffix("") if marker else None, wait))
                return 2
            if not hinted:
                say(refused_hint(last, time.time(), wait))
                hinted = True
            time.sleep(RETRY_SECONDS)
            if stopping:
                return proc.returncode
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
