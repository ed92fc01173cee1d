"""The ``leaksim`` command: run scenarios, list what is available, redraw reports."""

from __future__ import annotations

import os
import signal
import sys
import threading
import webbrowser
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import numpy as np
import tomllib
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import simulator.run.builtins  # noqa: F401  (registers every built-in plugin)
from simulator.api import report as write_report
from simulator.api import run as run_scenario
from simulator.core.config import Scenario, ScenarioError
from simulator.core.fields import InputError
from simulator.core.records import Record
from simulator.core.registry import REGISTRIES
from simulator.data.datasets import DataError
from simulator.report import landscape as landscapes
from simulator.report.html import HTML_FILE
from simulator.report.provenance import plugin_files, provenance_lines
from simulator.report.tables import terminal_tables
from simulator.run.cluster import RAY_ADDRESS_ENV
from simulator.run.engine import RunInterrupted
from simulator.run.folder import RunFolder, RunFolderError, check_new, read_records
from simulator.run.preflight import PreflightError, preflight, workload_warning
from simulator.run.processes import STOP_SIGNALS
from simulator.scenario import SCENARIO_DIR, expand, load
from simulator.scenario.plugins import PluginError, load_plugins

PluginOption = Annotated[
    list[Path],
    typer.Option(
        "--plugin", help="A Python file that registers attacks, defenses, models or datasets."
    ),
]

# Exit codes of `leaksim run`: 0 every point ok; 1 a point failed, or the run could not go on
# (its folder gone, its worker lost); 2 an input error, before any work; 3 every point finished
# but one or more are degraded (too many failed client updates); 128 + N stopped by signal N.
EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_DEGRADED = 3

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_show_locals=False
)
# Messages are printed with soft_wrap: an error is one line (the terminal may fold it; no
# newline is inserted), whatever width the console measured when it was made.
console = Console(stderr=True)


@app.command()
def run(
    scenario: Annotated[
        str | None, typer.Argument(help="Scenario name or TOML path (default: quickstart).")
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="Override a key: section.key=value (repeatable).")
    ] = [],  # noqa: B006
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default: runs/<name>-<time>).")
    ] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where the MNIST IDX files are.")] = None,  # noqa: UP045
    verbose: Annotated[bool, typer.Option(help="Show Flower's own logs.")] = False,
    plugin: PluginOption = [],  # noqa: B006
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue an interrupted or failed run in its folder.", metavar="RUN_DIR"
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Run on a Ray cluster you started (the address `ray start --head` prints).",
            metavar="HOST:PORT",
        ),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            min=1,
            help="Sweep points run at once, each on its own Ray head with a share of the cores.",
        ),
    ] = 1,
) -> None:
    """Run a scenario (every point of its sweep) and write its results folder.

    Ctrl-C, SIGTERM or SIGHUP stops it within seconds (exit 130, 143 or 129) with every record
    so far kept; ``--resume RUN_DIR`` continues it from its first unfinished point.
    """
    overrides = list(set_) + ([f'data.dir="{data_dir}"'] if data_dir else [])
    if ray_address is not None:
        os.environ[RAY_ADDRESS_ENV] = ray_address  # the run's worker process inherits it
    try:
        if resume is not None:
            alone = scenario is None and not (set_ or out or plugin)
            loaded = _resumable(resume, alone)
            if data_dir:  # the run folder does not record where the data files are
                loaded = replace(loaded, data=replace(loaded.data, dir=str(data_dir)))
        else:
            loaded = load(scenario, overrides, plugins=plugin)
            if out is not None:
                check_new(out)
        preflight(loaded)  # data files and data-dependent rules, before any work
        warning = workload_warning(loaded)
    except RunFolderError as error:
        console.print(f"[red]cannot run:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(EXIT_INPUT) from None
    except InputError as error:
        what = "cannot run" if isinstance(error, PreflightError) else "invalid scenario"
        console.print(f"[red]{what}:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(EXIT_INPUT) from None
    if warning is not None:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    points = expand(loaded)
    total = len(points) * loaded.federation.rounds
    stopped: Callable[[], int] | None = None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{loaded.name}: {len(points)} point(s)", total=total)

        def on_round(point: object, server_round: int) -> None:
            if server_round > 0:
                progress.advance(task)

        try:
            result = run_scenario(
                loaded,
                out_dir=resume or out,
                on_round=on_round,
                verbose=verbose,
                raise_on_failure=False,
                resume=resume is not None,
                parallel=parallel,
            )
        except RunInterrupted as stop:
            stopped = _stopping(stop)
        except Exception as error:  # data missing, bad environment: one clear line, no traceback
            console.print(f"[red]run failed:[/red] {escape(str(error))}", soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from None
    if stopped is not None:
        _exit_now(stopped())
    _print_points(result.records)
    console.print(f"results: {result.folder.path}", soft_wrap=True)
    if result.report_error:
        console.print(f"[yellow]report not drawn:[/yellow] {result.report_error}", soft_wrap=True)
    failed = [r for r in result.table() if r.status == "failed"]
    degraded = [r for r in result.table() if r.status == "degraded"]
    for record in degraded:
        line = f"[yellow]point {record.point} degraded:[/yellow] {escape(str(record.error))}"
        console.print(line, soft_wrap=True)
    for record in failed:
        console.print(
            f"[red]point {record.point} failed:[/red] {escape(str(record.error))}", soft_wrap=True
        )
    if failed or degraded:
        raise typer.Exit(EXIT_FAILED if failed else EXIT_DEGRADED)


def _stopping(stop: RunInterrupted) -> Callable[[], int]:
    """A stopped run's end: a call that prints its last line (where the results are, how to
    resume) and returns the exit status. From now on SIGINT, SIGTERM or SIGHUP prints that line
    (unless printed) and ends the process at once."""
    said: list[bool] = []

    def say() -> int:
        if not said:
            said.append(True)
            console.print(f"[yellow]{escape(str(stop))}[/yellow]", soft_wrap=True)
        return stop.exit_code

    def now(_signum: int, _frame: object) -> None:
        _exit_now(say())

    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, now)
    return say


def _exit_now(code: int) -> NoReturn:
    """End a stopped run's process now: its records are on disk and its processes gone, and
    a further Ctrl-C must not land in a half torn-down interpreter (which dies of it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _resumable(run_dir: Path, alone: bool) -> Scenario:
    """The scenario of the run in ``run_dir``, to resume (``alone``: no other choices given)."""
    if not alone:
        raise RunFolderError(
            "--resume continues a run as it was set up: drop SCENARIO, --set, --out and --plugin"
        )
    try:
        return RunFolder.open(run_dir).scenario()
    except (OSError, ValueError) as error:
        if isinstance(error, RunFolderError):
            raise
        raise RunFolderError(f"{run_dir}: cannot read its scenario: {error}") from None


def _print_points(records: list[Record]) -> None:
    """The run's key figures in tables that fit 80 columns: one row per sweep point, and the
    attack outcomes with the bar for "leaked" (every column is in summary.md and
    report.html); then the plugin files the run ran, if any, and what that means."""
    out = Console()
    for title, headings, rows in terminal_tables(records):
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for heading, numeric in headings:
            table.add_column(heading, justify="right" if numeric else "left", overflow="fold")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        out.print(table)
    files = plugin_files(records)
    if files:  # a hash is never broken across lines, so it can be checked by eye or grep
        out.print("plugin files:")
        for entry in files:
            out.print(f"  {escape(entry['path'])}\n    SHA-256 {entry['sha256']}", soft_wrap=True)
        for line in provenance_lines(records)[len(files) :]:  # changed files, then the warning
            out.print(f"[yellow]{escape(line)}[/yellow]")


@app.command("list")
def list_(plugin: PluginOption = []) -> None:  # noqa: B006
    """List scenarios and every plugin registry: models, datasets, attacks, defenses..."""
    try:
        load_plugins(plugin)
    except PluginError as error:
        console.print(f"[red]invalid plugin:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(EXIT_INPUT) from None
    out = Console()
    sections = {
        "scenarios": {p.stem: _first_comment(p) for p in sorted(SCENARIO_DIR.glob("*.toml"))},
        **{title: dict(registry) for title, registry in REGISTRIES.items()},
    }
    for title, entries in sections.items():
        table = Table("name", "description", title=title, title_justify="left")
        for name, description in entries.items():
            table.add_row(escape(name), escape(description))
        out.print(table)


def _first_comment(path: Path) -> str:
    """A scenario's one-line ``description`` (else its first comment line), unvalidated."""
    text = path.read_text()
    try:
        description = tomllib.loads(text).get("description")
    except tomllib.TOMLDecodeError:
        description = None
    if isinstance(description, str) and description:
        return description
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by leaksim run.")],
    open_: Annotated[
        bool, typer.Option("--open", help="Open report.html in a web browser afterwards.")
    ] = False,
) -> None:
    """Redraw a run's summary.md, figures and report.html from its results.jsonl."""
    try:
        summary = write_report(run_dir)
    except FileNotFoundError as error:
        console.print(f"[red]{escape(str(error))}[/red]", soft_wrap=True)
        raise typer.Exit(EXIT_INPUT) from None
    _print_points(list(read_records(run_dir)))
    page = (run_dir / HTML_FILE).resolve()
    console.print(f"summary: {escape(str(summary))}", soft_wrap=True)
    console.print(f"report: {escape(str(page))}", soft_wrap=True)
    if open_:
        try:
            opened = webbrowser.open(page.as_uri())
        except webbrowser.Error:
            opened = False
        if not opened:
            console.print(
                f"no web browser found; open {escape(page.as_uri())} yourself", soft_wrap=True
            )


@app.command()
def landscape(
    scenario: Annotated[str, typer.Argument(help="Scenario name or TOML path.")] = "binary-fc-seed",
    set_: Annotated[
        list[str], typer.Option("--set", help="Override a key: section.key=value.")
    ] = [],  # noqa: B006
    resolution: Annotated[int, typer.Option(min=3, max=401, help="Grid points per axis.")] = 41,
    radius: Annotated[float, typer.Option(min=1e-6, help="Half-width of the slice.")] = 1.0,
    out: Annotated[
        Path, typer.Option(help="PNG to write (the grid goes beside it as .npz).")
    ] = Path("landscape.png"),
) -> None:
    """Render the gradient-matching loss over a 2-D slice of input space through the true batch."""
    try:
        loaded = load(scenario, set_)
    except ScenarioError as error:
        console.print(f"[red]invalid scenario:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(EXIT_INPUT) from None
    try:
        result = landscapes.compute(loaded, resolution, radius)
    except DataError as error:
        console.print(f"[red]landscape failed:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None
    landscapes.render(result, out)
    at_truth = result.distance[resolution // 2, resolution // 2]
    median = float(np.median(result.distance))
    console.print(
        f"landscape: {out} (distance at the truth {at_truth:.3g}, median {median:.3g})",
        soft_wrap=True,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
