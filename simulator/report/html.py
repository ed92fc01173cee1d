"""``report.html``: a run's whole report on one self-contained page.

Figures are embedded as base64 PNG data URIs and the style sheet is inline, so the page needs
no network, no JavaScript and no other file: it can be mailed or archived on its own. Every
piece of text from the records (error messages, scenario values) is escaped.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from simulator.core.records import (
    AttackErrorRecord,
    AttackRecord,
    FailureRecord,
    PointRecord,
    Record,
    RoundRecord,
    of_kind,
)
from simulator.report import evaluation
from simulator.report.figures import FigureFile
from simulator.report.tables import (
    ATTACK_ERROR_COLUMNS,
    FAILURE_COLUMNS,
    MANIPULATION_COLUMNS,
    ROUND_COLUMNS,
    Row,
    attack_table,
    column_name,
    format_value,
    inversion_table,
    manipulation_table,
    point_table,
    rows_of,
)
from simulator.run.folder import SCENARIO_FILE, SCENARIO_TOML, write_atomic

HTML_FILE = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (anchor, heading) of the page's sections, in order; "evaluation" only for defense sweeps.
SECTIONS = (
    ("scenario", "Scenario"),
    ("points", "Points"),
    ("accuracy", "Accuracy by round"),
    ("evaluation", "Defense evaluation"),
    ("attacks", "Attacks"),
    ("failures", "Failures"),
)

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1b1b1b; background: #fff; margin: 0 auto; max-width: 1280px; padding: 1.5em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
.lead { color: #555; margin-top: 0; }
nav { background: #f4f6f8; padding: 0.6em 1em; border-radius: 6px; }
nav a { margin-right: 1.2em; }
a { color: #0b5cad; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; border-radius: 6px; padding: 0.8em;
      font-size: 13px; white-space: pre-wrap; overflow-wrap: anywhere; }
pre.scenario { column-width: 30em; column-gap: 2em; }
.table { overflow-x: auto; margin: 0.6em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.55em; text-align: left;
         vertical-align: top; white-space: nowrap; }
td.long { white-space: normal; min-width: 20em; }
th { background: #f0f3f6; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.failed, .error { color: #b00020; }
.figures { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
figure { margin: 1em 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 13px; margin-top: 0.3em; max-width: 40em; }
details summary { cursor: pointer; color: #0b5cad; }
.none { color: #666; font-style: italic; }
ul.errors li { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; }
"""


def write_html(run_dir: Path, records: Sequence[Record], drawn: Sequence[FigureFile]) -> Path:
    """Write ``report.html`` into the run folder atomically; returns its path."""
    return write_atomic(run_dir / HTML_FILE, render_html(run_dir, records, drawn))


def render_html(run_dir: Path, records: Sequence[Record], drawn: Sequence[FigureFile]) -> str:
    """The page: scenario, points, accuracy, attacks, defense evaluation (sweeps), failures."""
    scenario = _scenario(run_dir)
    title = f"leaksim run {run_dir.name}"
    sections = {
        "scenario": _scenario_section(run_dir),
        "points": _points_section(records),
        "accuracy": _accuracy_section(records, drawn),
        "attacks": _attacks_section(records, drawn),
        "failures": _failures_section(records),
    }
    if evaluation.is_evaluation(records):
        sections["evaluation"] = _evaluation_section(records, drawn)
    present = [(anchor, heading) for anchor, heading in SECTIONS if anchor in sections]
    nav = " ".join(f'<a href="#{a}">{escape(h)}</a>' for a, h in present)
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="lead">{escape(_lead(scenario, records))}</p>',
        f"<nav>{nav}</nav>",
    ]
    for anchor, heading in present:
        body += [
            f'<section id="{anchor}">',
            f"<h2>{escape(heading)}</h2>",
            sections[anchor],
            "</section>",
        ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )


def _scenario(run_dir: Path) -> dict[str, Any]:
    try:
        loaded = json.loads((run_dir / SCENARIO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _lead(scenario: dict[str, Any], records: Sequence[Record]) -> str:
    """One line under the title: the scenario, its description, and how the points ended."""
    points = of_kind(records, PointRecord)
    failed = sum(r.status == "failed" for r in points)
    attacked = len(of_kind(records, AttackRecord))
    parts = [str(scenario.get("name", "unnamed scenario"))]
    if scenario.get("description"):
        parts[0] += f": {scenario['description']}"
    parts.append(f"{len(points)} point(s), {failed} failed; {attacked} update(s) attacked.")
    return " ".join(parts)


def _scenario_section(run_dir: Path) -> str:
    path = run_dir / SCENARIO_TOML
    if not path.is_file():
        return _none(f"No {SCENARIO_TOML} in this run folder.")
    return (
        f"<p>The resolved scenario, as run (<code>leaksim run {escape(SCENARIO_TOML)}</code> "
        "runs it again):</p>\n"
        f'<pre class="scenario">{escape(path.read_text(errors="replace"))}</pre>'
    )


def _points_section(records: Sequence[Record]) -> str:
    rows, columns = point_table(records)
    if not rows:
        return _none("No point finished (the run was interrupted before its first point ended).")
    return table(rows, columns)


def _accuracy_section(records: Sequence[Record], drawn: Sequence[FigureFile]) -> str:
    rounds = rows_of(of_kind(records, RoundRecord))
    if not rounds:
        return _none("No round was evaluated.")
    return "\n".join(
        [
            *_figures(drawn, "accuracy"),
            "<details><summary>Per-round table</summary>",
            table(rounds, ROUND_COLUMNS),
            "</details>",
        ]
    )


def _attacks_section(records: Sequence[Record], drawn: Sequence[FigureFile]) -> str:
    attacks = of_kind(records, AttackRecord)
    if not attacks:
        return _none("No update was attacked.")
    parts = []
    if any(r.matching == "training" for r in attacks):
        parts += ["<h3>Network inversion (generated samples against the training data)</h3>"]
        parts += [table(*inversion_table(records))]
    if any(r.matching != "training" for r in attacks):
        parts += ["<h3>Reconstruction per point (mean over attacked updates)</h3>"]
        parts += [table(*attack_table(records))]
    manipulated = manipulation_table(records)
    if manipulated:
        parts += ["<h3>Manipulated models: to whom, and the round's cost to accuracy</h3>"]
        parts += [table(manipulated, MANIPULATION_COLUMNS)]
    return "\n".join(parts + _figures(drawn, "attacks"))


def _evaluation_section(records: Sequence[Record], drawn: Sequence[FigureFile]) -> str:
    parts = [
        "<p>Leakage and utility of every point, the undefended run (curve <code>none</code>) "
        "as the baseline; <code>accuracy_loss</code> is its accuracy minus the point's.</p>",
        table(evaluation.defense_table(records), list(evaluation.COLUMNS)),
        "<h3>Settings over seeds: mean, spread, and whether on the privacy-utility frontier</h3>",
        table(evaluation.settings_table(records), evaluation.SETTING_COLUMNS),
        "<h3>Cheapest setting that keeps the leaked share under a bound</h3>",
        table(evaluation.cheapest_table(records), evaluation.CHEAPEST_COLUMNS),
    ]
    return "\n".join(parts + _figures(drawn, evaluation.SECTION))


def _failures_section(records: Sequence[Record]) -> str:
    failed_points = [r for r in of_kind(records, PointRecord) if r.error]
    failures = rows_of(of_kind(records, FailureRecord))
    attack_errors = rows_of(of_kind(records, AttackErrorRecord))
    if not (failed_points or failures or attack_errors):
        return _none("None: every point finished, every client answered, every attack ran.")
    parts = []
    if failed_points:
        parts += [
            f"<h3>Points that failed or are degraded ({len(failed_points)})</h3>",
            '<ul class="errors">',
        ]
        parts += [
            f"<li>point {escape(str(r.point))} ({escape(r.status)}): "
            f'<span class="error">{escape(str(r.error))}</span></li>'
            for r in failed_points
        ]
        parts += ["</ul>"]
    if failures:
        parts += [f"<h3>Failed client updates ({len(failures)})</h3>"]
        parts += [table(failures, FAILURE_COLUMNS)]
    if attack_errors:
        parts += [f"<h3>Attack errors ({len(attack_errors)})</h3>"]
        parts += [table(attack_errors, ATTACK_ERROR_COLUMNS)]
    return "\n".join(parts)


def table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """An HTML table of ``rows`` (every cell escaped; numbers right-aligned)."""
    head = "".join(f"<th>{escape(column_name(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            css = ' class="num"' if numeric else ""
            if column == "status" and value == "failed":
                css = ' class="failed"'
            text = format_value(value)
            if len(text) > 40:
                css = ' class="long"'
            cells.append(f"<td{css}>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="table"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _figures(drawn: Sequence[FigureFile], section: str) -> list[str]:
    """The section's figures, side by side where the page is wide enough."""
    embedded = [block for f in drawn if f.section == section and (block := figure(f))]
    return ['<div class="figures">', *embedded, "</div>"] if embedded else []


def figure(drawn: FigureFile) -> str:
    """A ``<figure>`` with the PNG inlined as a data URI; empty if the file is not a PNG."""
    try:
        data = drawn.path.read_bytes()
    except OSError:
        return ""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24:
        return ""
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    source = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    caption = escape(drawn.caption)
    return (
        f'<figure><img src="{source}" width="{width}" height="{height}" alt="{caption}">'
        f"<figcaption>{caption} <code>{escape(drawn.path.name)}</code></figcaption></figure>"
    )


def _none(text: str) -> str:
    return f'<p class="none">{escape(text)}</p>'
