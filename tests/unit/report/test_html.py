"""report.html: one self-contained page with every section, every text escaped."""

from __future__ import annotations

import base64
import io
import re
from html import escape
from pathlib import Path

import matplotlib.image
import pytest

from simulator.report.html import HTML_FILE, SECTIONS, render_html, table
from simulator.report.provenance import TRUST_NOTE
from simulator.report.summary import SUMMARY_FILE, write_report
from simulator.run import folder as files
from simulator.run.folder import write_atomic
from tests.unit.report.synthetic_run import HOSTILE, PLUGIN_PATH, PLUGIN_SHA, build_run

DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def sweep(reported_sweep: Path) -> tuple[Path, str]:
    """A defense sweep with failures and hostile error messages, reported once."""
    return reported_sweep, (reported_sweep / HTML_FILE).read_text()


def test_every_section_is_present_in_order_and_linked(sweep: tuple[Path, str]) -> None:
    _, page = sweep
    positions = [page.index(f'<section id="{anchor}">') for anchor, _ in SECTIONS]
    assert positions == sorted(positions)
    for anchor, heading in SECTIONS:
        assert f'<a href="#{anchor}">{heading}</a>' in page
    assert "gaussian-noise" in page and "epsilon" in page  # the defense evaluation table
    assert escape('name = "dlg-defenses-fedavg"') in page  # the scenario, as TOML
    assert "Per-round table" in page


def test_the_plugin_files_are_named_with_their_hash_and_the_warning(
    sweep: tuple[Path, str],
) -> None:
    run_dir, page = sweep
    section = page[page.index('<section id="plugins">') :]
    assert f"{PLUGIN_SHA}  {escape(PLUGIN_PATH)}" in section
    assert escape(TRUST_NOTE) in section
    summary = (run_dir / SUMMARY_FILE).read_text()
    assert f"`{PLUGIN_SHA}  {PLUGIN_PATH}`" in summary and TRUST_NOTE in summary


def test_hostile_text_in_records_is_escaped(sweep: tuple[Path, str]) -> None:
    _, page = sweep
    assert "<script" not in page and escape(HOSTILE) in page
    assert "&lt;script&gt;" in page
    assert "[/x]" in page and "[bold]not markup[/bold]" in page and "&amp; [bold]" in page
    # all three places a message can come from
    for where in ("client crashed: &lt;script", "ValueError: &lt;script", "RuntimeError: &lt;"):
        assert where in page


def test_every_figure_is_embedded_as_a_decodable_png_and_nothing_is_fetched(
    sweep: tuple[Path, str],
) -> None:
    run_dir, page = sweep
    encoded = DATA_URI.findall(page)
    pngs = sorted((run_dir / "figures").glob("*.png"))
    assert len(encoded) == page.count("<img") == len(pngs) >= 8
    for data in encoded:
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert image.ndim == 3 and min(image.shape[:2]) > 50
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)  # no external resource
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_the_page_and_summary_are_written_together_and_atomically(
    sweep: tuple[Path, str],
) -> None:
    run_dir, _ = sweep
    assert "report.html" in (run_dir / SUMMARY_FILE).read_text()
    leftovers = [p.name for p in run_dir.rglob("*.tmp")] + [p.name for p in run_dir.rglob(".*")]
    assert leftovers == []


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.html"
    write_atomic(target, "old")

    def crash(source: str, destination: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_a_single_run_without_iterations_has_no_empty_figure_or_evaluation(
    tmp_path: Path,
) -> None:
    """Like the quickstart: one point, a one-shot attack, nothing failed."""
    run_dir = build_run(tmp_path, scenario="quickstart", points=1, iterative=False, hostile=False)
    stale = run_dir / "figures" / "convergence.png"
    stale.parent.mkdir()
    stale.write_bytes(b"an empty figure from an earlier report")
    write_report(run_dir)
    page = (run_dir / HTML_FILE).read_text()
    names = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert names == ["accuracy.png", "reconstructions-p0-r1.png"]
    assert '<section id="evaluation">' not in page and "Defense evaluation" not in page
    assert "None: every point finished" in page
    assert len(DATA_URI.findall(page)) == 2


def test_a_run_folder_without_points_or_scenario_still_renders(tmp_path: Path) -> None:
    page = render_html(tmp_path, [], [])
    assert "No point finished" in page and "No update was attacked" in page
    assert "No scenario.toml" in page


def test_table_cells_are_escaped_and_numbers_aligned() -> None:
    cells = table([{"a": "<b>&", "b": 0.5, "status": "failed"}], ["a", "b", "status"])
    assert "<td>&lt;b&gt;&amp;</td>" in cells
    assert '<td class="num">0.5</td>' in cells and '<td class="failed">failed</td>' in cells
