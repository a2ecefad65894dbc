"""fedtrak's ServerApp, with this app's task registered under the run config's ``task`` name."""

import fedtrak
from fedtrak.server.app import server_app
from wineapp.task import TASK, wine_task

fedtrak.register_task(TASK, wine_task)
app = server_app()
