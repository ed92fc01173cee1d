"""Run folders: the resolved scenario, ``results.jsonl`` appended record by record, summaries.

Each record is flushed and fsynced as it is written, so a crash or Ctrl-C loses nothing that
had finished; ``leaksim report`` redraws tables and figures from the records alone.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from simulator.core.config import Scenario
from simulator.core.records import Record

RESULTS_FILE = "results.jsonl"
ARTIFACTS_DIR = "artifacts"
SCENARIO_FILE = "scenario.json"
SCENARIO_TOML = "scenario.toml"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity; null reads as "not available"
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def print_record(record: Record, stream: TextIO = sys.stdout) -> None:
    """Write one record as a JSON line (the ``flwr run`` path, which has no run folder)."""
    stream.write(json.dumps(_jsonable(record.to_dict())) + "\n")
    stream.flush()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ "
            + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
            + " }"
        )
    return repr(value)


def scenario_toml(scenario: Scenario) -> str:
    """The resolved scenario as TOML, loadable again with ``leaksim run FILE``."""
    raw = scenario.to_dict()
    top = [key for key in ("name", "description", "seed", "plugins") if key in raw]
    lines = [f"{key} = {_toml_value(raw.pop(key))}" for key in top]
    lines.append(f"defenses = {_toml_value(raw.pop('defenses'))}")
    sweep = raw.pop("sweep")
    for section, table in raw.items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    if sweep:
        lines += ["", "[sweep]"] + [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in sweep.items()]
    return "\n".join(lines) + "\n"


@dataclass
class RunFolder:
    """A run's output folder."""

    path: Path

    @classmethod
    def create(
        cls, scenario: Scenario, root: Path | str = "runs", path: Path | str | None = None
    ) -> RunFolder:
        """A fresh folder ``root/<name>-<timestamp>`` (or ``path``) with the scenario written."""
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(root) / f"{scenario.name}-{stamp}"
            suffix = 1
            while path.exists():
                path = Path(root) / f"{scenario.name}-{stamp}-{suffix}"
                suffix += 1
        folder = cls(Path(path))
        folder.path.mkdir(parents=True, exist_ok=True)
        (folder.path / SCENARIO_FILE).write_text(json.dumps(scenario.to_dict(), indent=2) + "\n")
        (folder.path / SCENARIO_TOML).write_text(scenario_toml(scenario))
        return folder

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record durably (flush + fsync) before returning."""
        with self.results_path.open("a") as stream:
            stream.write(json.dumps(_jsonable(record)) + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def save_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write ``artifacts/<name>.npz`` atomically (images behind the figures)."""
        target = self.path / ARTIFACTS_DIR / f"{name}.npz"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.npz")
        np.savez_compressed(partial, **arrays)
        os.replace(partial, target)
        return target

    def save_attack(self, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Path:
        """Store the true batch and reconstruction behind an ``attack`` record."""
        return self.save_arrays(_attack_name(record), arrays)

    def records(self) -> list[dict[str, Any]]:
        return list(read_records(self.path))

    def scenario(self) -> Scenario:
        return Scenario.from_json((self.path / SCENARIO_FILE).read_text())


def _attack_name(record: Mapping[str, Any]) -> str:
    return f"p{record['point']}-attack-r{record['round']}-c{record['client']}"


def attack_artifact(run_dir: Path | str, record: Mapping[str, Any]) -> Path:
    """Where :meth:`RunFolder.save_attack` put the arrays behind an ``attack`` record."""
    return Path(run_dir) / ARTIFACTS_DIR / f"{_attack_name(record)}.npz"


def read_records(run_dir: Path | str) -> Iterator[dict[str, Any]]:
    """The records of a run folder; a torn last line (a crash mid-write) is skipped."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a leaksim run folder: no {RESULTS_FILE}")
    with path.open() as stream:
        for line in stream:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
