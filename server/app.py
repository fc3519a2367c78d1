"""fedtune ServerApp: parse the run config once, then run (or resume) the round loop.

Started by `flwr run .` (simulation or deployment) or by `fedtune simulate`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import parse_run_config
from server.loop import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, parse_run_config(context.run_config))
