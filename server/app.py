"""fedtrak's Flower ServerApp: reads the run config and drives the protocol (:mod:`server.run`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import RunConfig
from server.run import run_federated


def build_server_app(overrides: Mapping[str, Any] | None = None,
                     outcome: list | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` take precedence over the run config.

    ``fedtrak simulate`` passes its settings as ``overrides`` (Flower's Python
    simulation entry point leaves the run config empty) and an ``outcome``
    list, which receives the summary or the exception the run ended with.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
            summary = run_federated(grid, cfg)
        except BaseException as exc:
            if outcome is not None:
                outcome.append(exc)
            raise
        if outcome is not None:
            outcome.append(summary)

    return app


#: The ServerApp that ``flwr run`` loads (``server.app:app`` in pyproject.toml).
app = build_server_app()
