"""fedtrak's ClientApp, with this app's task registered; each SuperNode reads its own data from the
``data-path`` of its node config."""

import fedtrak
from fedtrak.client.app import client_app
from wineapp.task import TASK, wine_task

fedtrak.register_task(TASK, wine_task)
app = client_app()
