"""fedtrak: privacy-aware federated training-data attribution (TRAK on Flower).

The public API::

    import fedtrak

    task = fedtrak.task_from_model("mine", model, train=(x, y), query=(xq, yq))
    central = fedtrak.attribute(task, proj_dim=512)              # the centralized reference
    federated = fedtrak.simulate(task, clients=10, policy="full") # 10 virtual Flower clients
    central.scores, federated.scores, federated.owner_scores     # in memory, and in the run folder
    fedtrak.evaluate(central, lds=True)                           # LDS against retrained models

Names are imported when first used, so ``import fedtrak`` stays light (the
``fedtrak`` command line and a SuperNode import only what they need).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

#: Public name -> the module that defines it.
_API = {
    "Task": "fedtrak.data.tasks", "TrainConfig": "fedtrak.data.tasks", "load_task": "fedtrak.data.tasks",
    "register_task": "fedtrak.data.tasks",
    "ModelOutput": "fedtrak.data.modelout", "ClassificationMargin": "fedtrak.data.modelout",
    "Regression": "fedtrak.data.modelout", "SequenceMargin": "fedtrak.data.modelout",
    "task_from_model": "fedtrak.data.own_model",
    "Settings": "fedtrak.config.settings",
    "FedtrakError": "fedtrak.errors", "RunFailed": "fedtrak.errors",
    "Result": "fedtrak.simulations.api", "attribute": "fedtrak.simulations.api",
    "simulate": "fedtrak.simulations.api", "evaluate": "fedtrak.simulations.api",
}

__all__ = ["ClassificationMargin", "FedtrakError", "ModelOutput", "Regression", "Result", "RunFailed", "SequenceMargin",
           "Settings", "Task", "TrainConfig", "attribute", "evaluate", "load_task", "register_task", "simulate",
           "task_from_model"]
__version__ = "0.3.0"


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedtrak' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


#: Modules of release 0.2.0 that now sit in a subpackage: importing the old name is an error that
#: names the new one (the public names above are unchanged).
MOVED = {
    "settings": "config.settings", "flat": "config.flat",
    "tasks": "data.tasks", "datasets": "data.datasets", "models": "data.models", "modelout": "data.modelout",
    "partition": "data.partition", "corruption": "data.corruption", "own_model": "data.own_model",
    "checkpoints": "data.checkpoints", "featurizer": "trak.featurizer", "projectors": "trak.projectors",
    "kernel": "trak.kernel", "kernel_sources": "trak.kernel_sources", "scoring": "trak.scoring",
    "job": "wire.job", "compat": "wire.compat", "codecs": "wire.codecs", "answer": "results.answer",
}


class _MovedModules(importlib.abc.MetaPathFinder):
    """Refuses ``import fedtrak.tasks`` and the other moved modules with their new place."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        old = fullname.removeprefix("fedtrak.")
        if fullname.startswith("fedtrak.") and old in MOVED:
            face = sorted(n for n, m in _API.items() if m == f"fedtrak.{MOVED[old]}")
            hint = f" (or the package's own {', '.join(f'fedtrak.{n}' for n in face)})" if face else ""
            raise ModuleNotFoundError(f"{fullname} moved to fedtrak.{MOVED[old]} in fedtrak 0.3{hint}",
                                      name=fullname)


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
