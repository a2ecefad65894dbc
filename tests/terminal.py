"""Running a command as a person at a terminal runs it: on a real pseudo-terminal."""

from __future__ import annotations

import os
import select
import subprocess
import time


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
