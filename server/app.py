"""fedtune ServerApp: parse the run config once, then run (or resume) the round loop.

Started by `flwr run .` (simulation or deployment) or by `fedtune simulate`.
"""

from __future__ import annotations

from typing import cast

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import parse_run_config
from common.flower import PromptGrid
from server.loop import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(cast(Grid, PromptGrid(grid)), parse_run_config(context.run_config))  # replies: every 0.1 s, not 3
