"""The Flower ServerApp: the federation driver and its referee for one sweep point.

:func:`make_server_app` wraps a driver the engine built (``run_simulation`` has no run config,
so the point travels in a closure). The module-level ``app`` serves ``flwr run .``: on a real
federation there is no truth store, so the referee attacks but scores nothing, and records go
to stdout.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from simulator.core.config import DEFAULT_SCENARIO
from simulator.core.records import NoteRecord
from simulator.core.scenario import load
from simulator.run.driver import FederationDriver, connected_nodes
from simulator.run.folder import print_record
from simulator.run.privacy import PrivacyLedger
from simulator.run.referee import Referee


def make_server_app(driver: FederationDriver) -> ServerApp:
    """A ServerApp whose main is ``driver.main``."""
    server_app = ServerApp()
    server_app.main()(driver.main)
    return server_app


app = ServerApp()


@app.main()
def flwr_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the scenario named in the run config, records to stdout.

    The federation, not the scenario, decides how many clients there are: ``federation.clients``
    is set to the number of connected SuperNodes.
    """
    name = str(context.run_config.get("scenario", DEFAULT_SCENARIO))
    scenario = load(name)
    nodes = connected_nodes(grid, timeout=scenario.federation.timeout_s)
    if nodes != scenario.federation.clients:
        print_record(NoteRecord(f"federation.clients set to {nodes} SuperNodes"))
        scenario = scenario.with_overrides({"federation.clients": nodes})
    referee = Referee(scenario, print_record, PrivacyLedger(scenario), truth_store=None)
    FederationDriver(scenario, print_record, referee).main(grid, context)
