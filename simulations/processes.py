"""Worker processes that do not re-run the user's script.

Python's ``spawn`` start method prepares each child by running the parent's main module again (as
``__mp_main__``) whenever it has a file: a script without an ``if __name__ == "__main__":`` guard
then runs its whole body once more in every worker, Flower simulations included, and the workers
die when the body starts processes of its own. :func:`script_free_context` is the ``spawn`` context
with that step left out: its children start from Python's own bootstrap, import only what their
target needs (fedtrak's modules, by name), and get anything the script defined by value (a
user's task: :mod:`fedtrak.data.shipping`).
"""

from __future__ import annotations

import sys
import threading
import types
from multiprocessing.context import SpawnContext, SpawnProcess

_STARTING = threading.Lock()


class ScriptFreeProcess(SpawnProcess):
    """A spawned process whose preparation leaves out the parent's main module."""

    def start(self) -> None:
        """Start the child with ``__main__`` hidden from its preparation data (for that moment only)."""
        with _STARTING:
            main = sys.modules["__main__"]
            sys.modules["__main__"] = types.ModuleType("__main__")  # no file, no spec: nothing to re-run
            try:
                super().start()
            finally:
                sys.modules["__main__"] = main


class ScriptFreeContext(SpawnContext):
    """The ``spawn`` context, its processes :class:`ScriptFreeProcess` (for ``ProcessPoolExecutor``'s
    ``mp_context``)."""

    Process = ScriptFreeProcess


def script_free_context() -> ScriptFreeContext:
    """A ``spawn`` context whose children never run the parent's main module."""
    return ScriptFreeContext()
