"""The ServerApp: reads the run's fed.yaml and hands the grid to the round loop."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from uharmony_fed.fed.server_loop import run_federation
from uharmony_fed.fedconfig import load_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation configured by the run config's ``config-path``."""
    rc = context.run_config
    cfg = load_config(str(rc["config-path"]) or None)
    run_federation(grid, cfg, Path(str(rc["run-dir"])), resume=bool(rc.get("resume", False)))
