"""leaksim from Python: what the CLI does, in a few lines.

    from simulator.api import load, run
    result = run(load("quickstart"))
    print(result.table())          # the point records, one per sweep point

``load`` validates a scenario (a shipped name or a file, with overrides and plugin files);
``run`` runs every sweep point, writes the run folder and its report, and returns the records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import simulator.run.builtins  # noqa: F401  (registers every built-in plugin)
from simulator.core.config import Scenario
from simulator.report.summary import write_report
from simulator.run.engine import RunResult, execute
from simulator.run.preflight import preflight
from simulator.scenario import load

__all__ = ["RunResult", "load", "report", "run"]


def run(scenario: Scenario, out_dir: Path | str | None = None, **options: Any) -> RunResult:
    """Check the data (:func:`simulator.run.preflight.preflight`), run every point of
    ``scenario``, then write the report.

    ``options`` are those of :func:`simulator.run.engine.execute` (``runs_root``,
    ``on_round``, ``verbose``, ``raise_on_failure``, ``taps``, ``resume``, ``isolate``).
    """
    preflight(scenario)
    return execute(scenario, out_dir, finish=report, **options)


def report(run_dir: Path | str) -> Path:
    """Redraw a run folder's summary and figures from its records; returns the summary path."""
    return write_report(run_dir)
