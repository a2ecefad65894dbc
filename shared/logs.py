"""fedtrak's log lines where a person reads them: a SuperNode's output, the ServerApp's log; and its
progress bars, where a person waits at a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any

from tqdm import tqdm

#: Width of a progress bar on a terminal that reports no width (a pseudo-terminal whose size was
#: never set reports 0 columns, and tqdm then draws a bar of no width at all).
FALLBACK_COLUMNS = 80


def visible_logging() -> None:
    """fedtrak's messages (reused work, refusals, waiting, each protocol step, where results went) on
    the process's standard error, at INFO, once: not again through a handler Flower or Ray put on the
    root logger. Flower's own lines are printed once, by Flower's handler: they no longer also reach
    the root logger, where a library may have put a handler of its own (Opacus's module_utils calls
    ``logging.basicConfig`` when it is imported, which printed every Flower line a second time in a
    ServerApp's log)."""
    logger = logging.getLogger("fedtrak")
    if not any(getattr(h, "fedtrak_visible", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedtrak %(levelname)s: %(message)s"))
        handler.fedtrak_visible = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:  # a level the user set (WARNING: quiet) is theirs
        logger.setLevel(logging.INFO)
    flower = logging.getLogger("flwr")
    if flower.handlers:  # Flower prints its lines itself
        flower.propagate = False


def _shape(stream: IO[str]) -> dict[str, int]:
    """tqdm's ``ncols`` and ``nrows`` for ``stream``: none (tqdm asks the terminal) unless it is a
    terminal that reports no size; then ``COLUMNS`` (or :data:`FALLBACK_COLUMNS`) and ``LINES`` (or
    24): tqdm draws nothing in a terminal of 0 columns and 0 lines."""
    try:
        if not stream.isatty() or os.get_terminal_size(stream.fileno()).columns > 0:
            return {}
    except (AttributeError, OSError, ValueError):
        return {}
    columns, lines = os.environ.get("COLUMNS", ""), os.environ.get("LINES", "")
    return {"ncols": (int(columns) if columns.isdigit() and int(columns) > 1 else FALLBACK_COLUMNS) - 1,
            "nrows": int(lines) if lines.isdigit() and int(lines) > 1 else 24}


def progress_bar(progress: bool, total: int | None = None, desc: str = "", **kwargs: Any) -> tqdm:
    """A tqdm bar on standard error where a person waits: shown when ``progress`` is set and standard
    error is a terminal (a pseudo-terminal included, even one that reports no width), never when it
    is piped or redirected; ``kwargs`` go to tqdm (``unit``, ``leave``)."""
    stream = kwargs.pop("file", None) or sys.stderr
    return tqdm(total=total, desc=desc, file=stream, disable=None if progress else True, **_shape(stream), **kwargs)
