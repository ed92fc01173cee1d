"""`leaksim report`: key columns that fit 80 columns, and --open."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator import cli
from simulator.report import summary
from simulator.report.tables import terminal_tables
from simulator.run.folder import read_records
from tests.unit.report.synthetic_run import PLUGIN_SHA, build_run, point_record


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("terminal"))


@pytest.fixture(autouse=True)
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """What is tested here is what the command prints: the figures (seconds of drawing for
    every call) are left out of the pages it writes; test_html.py and test_figures.py test
    them."""
    monkeypatch.setattr(summary, "write_figures", lambda _run_dir, _records: [])


def test_report_tables_fit_80_columns_without_cutting_a_cell(run_dir: Path) -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(cli.app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output
    text = " ".join(result.output.split())
    for heading in ("defenses", "accuracy", "leaked", "PSNR dB", "SSIM", "PSNR >= 30 dB"):
        assert heading in text
    assert "gaussian-noise 0.0316" in text and "82.5%" in text
    assert f"report: {(run_dir / 'report.html').resolve()}" in text
    assert f"\n    SHA-256 {PLUGIN_SHA}\n" in result.output  # the plugin file, whole
    assert "only as trustworthy as these files" in text


def test_terminal_tables_keep_the_key_columns_only(run_dir: Path) -> None:
    tables = {title: (headings, rows) for title, headings, rows in terminal_tables(
        list(read_records(run_dir))
    )}  # fmt: skip
    headings, rows = tables["points"]
    assert [h for h, _ in headings] == [
        "point", "defenses", "status", "rounds", "accuracy", "failures", "time s",
    ]  # fmt: skip
    assert rows[0][:3] == ["0", "none", "ok"] and rows[-1][2] == "failed"
    headings, rows = tables["attacks (leaked: PSNR >= 30 dB)"]
    assert [h for h, numeric in headings if numeric] == [
        "leaked", "PSNR dB", "SSIM", "labels",
    ]  # fmt: skip


def test_open_shows_the_page_in_a_browser(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    monkeypatch.setattr(cli.webbrowser, "open", lambda uri: opened.append(uri) or True)
    result = CliRunner().invoke(cli.app, ["report", str(run_dir), "--open"])
    assert result.exit_code == 0, result.output
    assert opened == [(run_dir / "report.html").resolve().as_uri()]


def test_open_without_a_browser_says_where_the_page_is(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.webbrowser, "open", lambda uri: False)
    result = CliRunner(env={"COLUMNS": "300"}).invoke(cli.app, ["report", str(run_dir), "--open"])
    assert result.exit_code == 0, result.output
    assert "no web browser found" in result.output


def test_cells_are_printed_as_text_not_rich_markup(capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_points([point_record(0, {"data.dataset": "[/x][bold]"})])
    assert "[/x][bold]" in capsys.readouterr().out
