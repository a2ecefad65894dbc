"""A user's task, sent by value to the processes that train and featurize with it.

Built-in tasks, import paths (``package.module:function``) and entry points are loaded by name
anywhere. A task registered in this process (a :class:`~fedtrak.data.tasks.Task` object handed to
:func:`fedtrak.attribute`, :func:`fedtrak.simulate` or :func:`fedtrak.register_task`) exists only
here: evaluation's worker processes and Flower's virtual clients (Ray actors) get it as bytes,
pickled with cloudpickle, which pickles by value what a script defines in ``__main__`` (model
classes, functions, lambdas and closures). Nothing re-runs the user's script, and a script needs no
``if __name__ == "__main__":`` guard for it. What cloudpickle cannot pickle (a model or factory
holding an open file, a lock, a thread) is refused here, before any worker starts, naming the fix.
"""

from __future__ import annotations

import pickle
from typing import Any

from fedtrak.data.tasks import Task, cached_task, register_task, registered_tasks
from fedtrak.errors import FedtrakError

#: What to change when a task cannot be pickled.
FIX = ("build what the model needs inside its factory or its __init__ (a class or function the script "
       "defines), not from an open file, lock, thread or generator made outside it")


def _cloudpickle() -> Any:
    try:
        import cloudpickle
    except ImportError as exc:  # a device install: no worker processes to send a task to
        raise FedtrakError("sending a task to worker processes needs cloudpickle: pip install "
                           "'fedtrak[simulation]'") from exc
    return cloudpickle


def task_payload(name: str, where: str) -> bytes | None:
    """The task registered as ``name`` in this process, loaded and pickled by value for another
    process (``where``, in words: it names the processes in the error); ``None`` for a task that
    any process loads by name (built-in, import path, entry point).

    Raises:
        FedtrakError: if the task cannot be pickled, naming what and how to fix it.
    """
    if name not in registered_tasks():
        return None
    task = cached_task(name)
    try:
        return _cloudpickle().dumps((name, task), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # pickling raises TypeError, PicklingError, AttributeError, ...
        raise FedtrakError(f"task {name!r} cannot be sent to {where}: {type(exc).__name__}: {exc}; {FIX}") from exc


def receive_task(payload: bytes) -> str:
    """Register the task of a :func:`task_payload` in this process (once: a task registered here
    already is kept, with its loaded copy); return its name.

    Raises:
        FedtrakError: if the payload cannot be unpickled here (naming why).
    """
    try:
        name, task = _cloudpickle().loads(payload)
    except Exception as exc:  # a missing module, a class that changed, ...
        raise FedtrakError(f"cannot unpickle the task sent to this process: {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise FedtrakError(f"the task sent to this process is a {type(task).__name__}, not a Task")
    if name not in registered_tasks():
        register_task(name, task)
    return name
