"""fedtrak's log lines where a person reads them: a SuperNode's output, the ServerApp's log."""

from __future__ import annotations

import logging


def visible_logging() -> None:
    """fedtrak's messages (reused work, refusals, waiting, where results went) on the process's
    standard error, at INFO, once: not again through a handler Flower or Ray put on the root
    logger."""
    logger = logging.getLogger("fedtrak")
    if not any(getattr(h, "fedtrak_visible", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedtrak %(levelname)s: %(message)s"))
        handler.fedtrak_visible = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:  # a level the user set (WARNING: quiet) is theirs
        logger.setLevel(logging.INFO)
