"""fedtrak's Flower ServerApp: reads the run config and drives the protocol (:mod:`fedtrak.server.run`)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtrak.config.settings import Settings
from fedtrak.logs import visible_logging
from fedtrak.server.preflight import Plan
from fedtrak.server.run import run_federated


def server_app(plan: Plan | None = None, outcome: list | None = None, progress: bool = False) -> ServerApp:
    """The ServerApp. Without ``plan`` it reads Flower's run config (``flwr run``) and preflights it
    itself; with one it runs that plan's settings with what was resolved already
    (:func:`fedtrak.simulate` preflights before Ray starts, and Flower's Python simulation entry
    point leaves the run config empty). ``outcome`` receives the summary or the exception the run
    ended with; ``progress`` shows progress bars (a simulation's, on a terminal)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if plan is None:  # deployed: the operator reads this process's log (flwr run --stream)
                visible_logging()
                summary = run_federated(grid, Settings.from_flat(dict(context.run_config)), "flower")
            else:
                summary = run_federated(grid, plan.settings, "simulation", progress, plan)
        except BaseException as exc:
            if outcome is not None:
                outcome.append(exc)
            raise
        if outcome is not None:
            outcome.append(summary)

    return app


#: The ServerApp that ``flwr run`` loads (``fedtrak.server.app:app`` in pyproject.toml).
app = server_app()
