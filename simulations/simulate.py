"""``fedtrak simulate``: the federated protocol on Flower's simulation engine, one machine.

Every client is a virtual Flower SuperNode (Ray actors); the ServerApp and
ClientApp are fedtrak's real apps. The run gets its own ``FLWR_HOME`` under
the run folder, telemetry and run-time dependency installation are off, and
Ray is shut down when the run ends, so no background process is left.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtrak.client.app import Handler, client_app
from fedtrak.config.settings import Settings
from fedtrak.data.shipping import task_payload
from fedtrak.errors import FedtrakError
from fedtrak.results.summary import RunSummary
from fedtrak.server.app import server_app
from fedtrak.server.preflight import preflight
from fedtrak.server.resume import RunState

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


@contextmanager
def flower_environment(home: Path) -> Iterator[None]:
    """Point ``FLWR_HOME`` at ``home`` and quiet Flower for the duration."""
    changes = {**FLOWER_ENV, "FLWR_HOME": str(home), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    saved = {k: os.environ.get(k) for k in changes}
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: Messages in flight per local CPU in a simulation: Flower's simulation engine scans every stored
#: message for every virtual node ten times a second, so more than its actors can take only costs.
IN_FLIGHT_PER_CPU = 4


def simulation_settings(settings: Settings, cpus: int | None = None) -> Settings:
    """A simulation's settings: ``clients`` virtual SuperNodes whose stores live under the run folder
    (unless ``store-dir`` says otherwise), its folder ``runs/sim`` unless given; on ``cpus`` local
    CPUs, at most :data:`IN_FLIGHT_PER_CPU` messages in flight per CPU."""
    out = settings.out_dir("simulation")
    in_flight = settings.run.in_flight
    if cpus is not None:
        in_flight = min(in_flight or IN_FLIGHT_PER_CPU * cpus, IN_FLIGHT_PER_CPU * cpus)
    return settings.replaced(out=str(out), store_dir=settings.run.store_dir or str(out / "client-stores"),
                             in_flight=in_flight)


def client_defaults(settings: Settings) -> dict[str, Any]:
    """The node settings every virtual client gets (Flower's simulation has no run config)."""
    return {"store-dir": settings.run.store_dir, "serve-full": settings.release.allow_full,
            "task": settings.task.task}  # one user runs both sides: its nodes accept its task


def run_simulation(settings: Settings, verbose: bool = False, handlers: Mapping[str, Handler] | None = None,
                   node_settings: Mapping[str, Any] | None = None, progress: bool = False,
                   ray_address: str | None = None) -> RunSummary:
    """Run ``settings`` with ``clients`` virtual clients; return the run summary.

    The virtual clients run on a Ray runtime started for this run on this machine's cores, or,
    with ``ray_address`` (``HOST:PORT`` of a running head node, or ``auto``), on that existing
    Ray cluster, one CPU per client at a time; every node needs fedtrak installed alike.

    Without ``verbose`` Flower's INFO lines, Ray's and the virtual clients' output (its actors'
    warnings) and deprecation warnings stay hidden; ``progress`` shows the training rounds (on a
    terminal).

    A task registered in this process (:func:`fedtrak.register_task`, or a Task object given to
    :func:`fedtrak.simulate`) travels to the clients by value (:mod:`fedtrak.data.shipping`); one
    that cannot is refused before Ray starts, as are bad settings (the preflight) and ``resume``
    of a saved run that had other settings.
    ``handlers`` replace some of the clients' query handlers and ``node_settings`` some of their
    node settings (tests use misbehaving clients).

    Raises:
        RunFailed: the server ended the run without results; the run folder's ``summary.json``
            records why (``"complete": false``, its ``failure`` block).
        FedtrakError: with the server's reason if the run failed.
    """
    if importlib.util.find_spec("ray") is None:  # a device install has no Ray
        raise FedtrakError("simulation needs Flower's simulation engine (Ray), which this install lacks: "
                           "pip install 'fedtrak[simulation]'")
    from flwr.simulation import run_simulation as flower_run_simulation

    settings = simulation_settings(settings, None if ray_address else os.cpu_count() or 1)
    plan = preflight(settings)  # a bad task or privacy setting fails here, before Ray starts; the server runs it
    out = settings.out_dir("simulation")
    if settings.run.resume:  # so does resuming a saved run of other settings (the server checks it again)
        RunState(out).saved_job(settings.flat())
    out.mkdir(parents=True, exist_ok=True)
    payload = task_payload(settings.task.task, "the simulation's virtual clients (Ray actors)")
    tasks = {} if payload is None else {settings.task.task: payload}
    outcome: list = []
    cpus = os.cpu_count() or 1
    init = {"include_dashboard": False, "log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    init.update({"address": ray_address} if ray_address else {"num_cpus": cpus})
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init}
    loggers = {name: logging.getLogger(name) for name in ("flwr", "fedtrak")}
    levels = {name: logger.level for name, logger in loggers.items()}
    if not verbose:  # Flower's INFO lines and its deprecation notice; fedtrak's INFO (the CLI prints the result)
        loggers["flwr"].setLevel(logging.ERROR)
        loggers["fedtrak"].setLevel(logging.WARNING)
    with flower_environment(out / ".flwr"), warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
        try:
            flower_run_simulation(
                server_app=server_app(plan, outcome, progress),
                client_app=client_app({**client_defaults(settings), **(node_settings or {})}, tasks, handlers),
                num_supernodes=settings.partition.clients,
                backend_config=backend,
            )
        except BaseException as exc:  # the server's own error, if it has one, says more
            if not outcome:
                raise FedtrakError(f"Flower simulation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            _shutdown_ray()
            for name, logger in loggers.items():
                logger.setLevel(levels[name])
    if not outcome:
        raise FedtrakError("Flower simulation ended without running the ServerApp")
    if isinstance(outcome[0], BaseException):
        if isinstance(outcome[0], FedtrakError):
            raise outcome[0]
        raise FedtrakError(f"server failed: {type(outcome[0]).__name__}: {outcome[0]}") from outcome[0]
    return outcome[0]


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
    _no_colour_reset_at_exit()


def _no_colour_reset_at_exit() -> None:
    """Take back the exit handler of the colorama that Ray bundles: Ray's CLI logger calls
    ``colorama.init`` when it is imported, whose exit handler writes a colour-reset code to standard
    output if that is a terminal, after everything the command printed."""
    initialise = sys.modules.get("colorama.initialise")
    if initialise is not None:
        atexit.unregister(initialise.reset_all)
