"""The `leaksim` command: clear errors, listings, and reports redrawn from records."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from simulator.cli import app

runner = CliRunner(env={"COLUMNS": "300"})


def output(result: object) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())  # type: ignore[attr-defined]


def test_bad_scenario_override_is_a_clear_error_not_a_traceback() -> None:
    result = runner.invoke(app, ["run", "quickstart", "--set", "federation.batch_size=-1"])
    assert result.exit_code == 2
    assert "federation.batch_size = -1 is out of range; allowed: [1, inf)" in output(result)
    assert "Traceback" not in output(result)


def test_unknown_scenario_lists_the_shipped_ones() -> None:
    result = runner.invoke(app, ["run", "nope"])
    assert result.exit_code == 2
    assert "shipped scenarios" in output(result) and "quickstart" in output(result)


def test_missing_data_says_which_files_to_put_where(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEAKSIM_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LEAKSIM_MIRRORS", "http://127.0.0.1:9/")  # discard port: refused at once
    result = runner.invoke(app, ["run", "quickstart", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2  # checked before work: no run folder, no Ray
    assert "t10k-images-idx3-ubyte.gz" in output(result) and str(tmp_path / "empty") in output(
        result
    )
    assert "Traceback" not in output(result) and not (tmp_path / "run").exists()


def test_list_shows_scenarios_models_partitions_and_attacks() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for name in (
        "quickstart",
        "mlp",
        "lenet",
        "cnn",
        "binary-fc",
        "dirichlet",
        "label-skew",
        "none",
    ):
        assert name in output(result)


def test_report_redraws_summary_and_figures_from_records(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [
        {"point": 0, "kind": "round", "round": 0, "test_accuracy": 0.1, "test_loss": 2.3},
        {"point": 0, "kind": "round", "round": 1, "test_accuracy": 0.5, "test_loss": 1.0},
        {"point": 0, "kind": "failure", "round": 1, "client": 3, "reason": "boom"},
        {
            "kind": "point",
            "point": 0,
            "status": "ok",
            "rounds_completed": 1,
            "defense": "none",
            "strength": None,
            "final_accuracy": 0.5,
            "failed_updates": 1,
            "seconds": 3.0,
        },
    ]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"kind": "ro'  # torn last line
    (run_dir / "results.jsonl").write_text(text)
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    summary = (run_dir / "summary.md").read_text()
    assert "| 0 | ok |" in summary and "Failed client updates (1)" in summary and "boom" in summary
    assert (run_dir / "figures" / "accuracy.png").stat().st_size > 1000


def test_report_on_a_folder_without_results_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a leaksim run folder" in output(result)
