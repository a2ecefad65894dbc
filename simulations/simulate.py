"""``fedtrak simulate``: the federated protocol on Flower's simulation engine, one machine.

Every client is a virtual Flower SuperNode (Ray actors); the ServerApp and
ClientApp are fedtrak's real apps. The run gets its own ``FLWR_HOME`` under
the run folder, telemetry and run-time dependency installation are off, and
Ray is shut down when the run ends, so no background process is left.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from client.app import build_client_app
from server.app import build_server_app
from server.config import RunConfig
from server.run import preflight
from shared.errors import FedtrakError

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


def simulation_config(settings: Mapping[str, Any]) -> RunConfig:
    """The run config of a simulation: ``settings`` (Flower keys) over the defaults.

    In simulation, ``clients`` is the number of virtual SuperNodes and the
    client stores live under the run folder.
    """
    cfg = RunConfig.from_mapping(dict(settings))
    if not cfg.store_dir:
        cfg = RunConfig.from_mapping({**cfg.to_mapping(), "store-dir": str(cfg.out_dir / "client-stores")})
    return cfg


def run_simulation(cfg: RunConfig, verbose: bool = False, client_app: ClientApp | None = None) -> dict:
    """Run ``cfg`` with ``cfg.clients`` virtual clients; return the run summary.

    ``client_app`` replaces fedtrak's ClientApp (tests use a faulty one).

    Raises:
        FedtrakError: with the server's reason if the run failed.
    """
    if importlib.util.find_spec("ray") is None:  # a device install has no Ray
        raise FedtrakError("simulation needs Flower's simulation engine (Ray), which this install lacks: "
                           "pip install 'fedtrak[simulation]'")
    from flwr.simulation import run_simulation as flower_run_simulation

    preflight(cfg)  # a bad task or privacy setting fails here, before Ray starts
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    settings = cfg.to_mapping()
    outcome: list = []
    cpus = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False,
                             "logging_level": "INFO" if verbose else "ERROR"}}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:  # Flower's INFO lines and its run_simulation deprecation notice
        flwr_logger.setLevel(logging.ERROR)
    with flower_environment(out / ".flwr"):
        try:
            flower_run_simulation(
                server_app=build_server_app(settings, outcome),
                client_app=client_app or build_client_app(settings),
                num_supernodes=cfg.clients,
                backend_config=backend,
            )
        except BaseException as exc:  # the server's own error, if it has one, says more
            if not outcome:
                raise FedtrakError(f"Flower simulation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            _shutdown_ray()
            flwr_logger.setLevel(level)
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
