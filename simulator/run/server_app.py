"""The Flower ServerApp: the federation driver and its referee for one sweep point.

:func:`make_server_app` wraps a driver the engine built (``run_simulation`` has no run config,
so the point travels in a closure). The module-level ``app`` serves ``flwr run .`` (Flower's
simulation or deployment engine): on a real federation there is no truth store, so the
referee attacks but scores nothing, and records go to stdout. With the run config key
``reconstructions`` (a folder on the SuperLink's machine) every reconstruction is written
there as ``ATTACK-round-R-client-C.npz`` (images, labels), for scoring by whoever holds the
clients' data.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import simulator.run.builtins  # noqa: F401  (registers every built-in plugin)
from simulator.core.config import DEFAULT_SCENARIO
from simulator.core.records import NoteRecord
from simulator.run.driver import FederationDriver, connected_nodes
from simulator.run.folder import print_record, write_atomic
from simulator.run.privacy import PrivacyLedger
from simulator.run.referee import AttackedRound, Judge, Referee, RefereedRound, Tap
from simulator.scenario import load, with_overrides


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
        scenario = with_overrides(scenario, {"federation.clients": nodes})
    folder = context.run_config.get("reconstructions")
    taps = [reconstruction_writer(Path(str(folder)))] if folder else []
    referee = Referee(scenario, print_record, PrivacyLedger(scenario), unscored(taps))
    FederationDriver(scenario, print_record, referee).main(grid, context)


def unscored(taps: Sequence[Tap]) -> Judge:
    """Hand ``taps`` each round's reconstructions, with no truths (there is no truth store)."""

    def judge(attacked: AttackedRound) -> None:
        reconstructions = tuple(r for rs in attacked.per_attack for r in rs)
        for tap in taps:
            if attacked.traffic is not None:
                tap(RefereedRound(attacked.traffic, (), reconstructions))

    return judge


def reconstruction_writer(folder: Path) -> Tap:
    """A tap writing each round's reconstructions to ``folder`` (atomically, one npz each)."""

    def write(refereed: RefereedRound) -> None:
        for reconstruction in refereed.reconstructions:
            buffer = io.BytesIO()
            labels = reconstruction.labels
            np.savez(
                buffer,
                images=reconstruction.images.detach().cpu().numpy(),
                labels=np.array([]) if labels is None else labels.cpu().numpy(),
            )
            name = (
                f"{reconstruction.attack}-round-{reconstruction.round}"
                f"-client-{reconstruction.client_id}.npz"
            )
            write_atomic(folder / name, buffer.getvalue())

    return write
