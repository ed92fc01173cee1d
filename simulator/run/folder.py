"""Run folders: the resolved scenario, ``results.jsonl`` appended record by record, summaries.

Each record is flushed and fsynced as it is written, so a crash or Ctrl-C loses nothing that
had finished; ``leaksim report`` redraws tables and figures from the records alone. Every
other file is written whole or not at all (a temporary file renamed over the target).

A folder made for a scenario is named ``<root>/<name>-<time>`` with the name reduced to safe
characters, so it is always a direct child of the runs root. ``leaksim run --resume`` reopens
a folder: :meth:`RunFolder.rewind` moves the records of every point from the first unfinished
one on (and the ``interrupted`` records) to ``interrupted.jsonl`` and the run goes on from
there, so the finished folder holds the records an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from simulator.core.config import Scenario, drop_unread
from simulator.core.fields import InputError
from simulator.core.records import (
    AttackRecord,
    InterruptedRecord,
    PointRecord,
    Record,
    RecordError,
    read,
)
from simulator.scenario import from_dict

RESULTS_FILE = "results.jsonl"
INTERRUPTED_FILE = "interrupted.jsonl"
ARTIFACTS_DIR = "artifacts"
SCENARIO_FILE = "scenario.json"
SCENARIO_TOML = "scenario.toml"
TEMPORARY_SUFFIX = ".tmp"
TRUTH_PREFIX = ".truth-"  # a run's sealed truth folder (simulator.run.seal.truth_folder)
CLIENT_ERRORS_FILE = "client-errors.log"  # Ray's whole text of each client error
MAX_NAME = 80


class RunFolderError(InputError):
    """A run folder cannot be used as asked (not empty, not a run folder): one line."""


class RunFolderLost(RuntimeError):
    """The run folder disappeared or became unwritable during the run: the run stops, and
    nothing re-creates the folder (it would hold only the later records)."""


class CorruptRecordsWarning(UserWarning):
    """Lines of results.jsonl that are not records (not JSON objects, or of no known kind)
    were skipped."""


def safe_name(name: str) -> str:
    """``name`` as one harmless path component: letters, digits, ``.``, ``_`` and ``-``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return cleaned[:MAX_NAME].rstrip(".-") or "run"


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``path`` whole or not at all: a temporary file beside it, fsynced, renamed."""
    payload = data.encode() if isinstance(data, str) else data
    with _temporary(path) as stream:
        stream.write(payload)
    return path


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[BinaryIO]:
    """A binary stream on a temporary file beside ``path``, renamed over it on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent
    )
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


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


def recorded(scenario: Scenario) -> Scenario:
    """``scenario`` as a run folder records it: without ``data.dir``.

    Where the data files are is the machine's setting, as ``LEAKSIM_DATA_DIR`` is: the files
    are verified by their MD5, so no number depends on the folder. And the run's worker, which
    runs the attacks, reads the run folder: a path written there would lead its plugins to the
    clients' training files (the clients are told the folder in their environment,
    :mod:`simulator.run.handoff`). Resuming takes ``--data-dir`` again.
    """
    return dataclasses.replace(scenario, data=dataclasses.replace(scenario.data, dir=""))


def scenario_toml(scenario: Scenario) -> str:
    """The resolved scenario as TOML, loadable again with ``leaksim run FILE``."""
    # Only keys some kind of the scenario reads: a model kind's and a partitioner's keys are
    # their params, which hold no other.
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
    # Inside synced_together(): appends wait for its one fsync at the end of the block.
    _together: bool = field(default=False, init=False, repr=False, compare=False)
    _unsynced: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def create(
        cls, scenario: Scenario, root: Path | str = "runs", path: Path | str | None = None
    ) -> RunFolder:
        """A fresh folder ``root/<name>-<timestamp>`` (or ``path``) with the scenario written
        (:func:`recorded`).

        ``path`` must not exist or be an empty folder (RunFolderError otherwise): records are
        never appended to another run's.
        """
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = f"{safe_name(scenario.name)}-{stamp}"
            path = Path(root) / base
            suffix = 1
            while path.exists():
                path = Path(root) / f"{base}-{suffix}"
                suffix += 1
        else:
            check_new(path)
        folder = cls(Path(path))
        folder.path.mkdir(parents=True, exist_ok=True)
        scenario = recorded(scenario)
        write_atomic(folder.path / SCENARIO_FILE, json.dumps(scenario.to_dict(), indent=2) + "\n")
        write_atomic(folder.path / SCENARIO_TOML, scenario_toml(scenario))
        return folder

    @classmethod
    def open(cls, path: Path | str) -> RunFolder:
        """An existing run folder (one holding scenario.json), to resume or read."""
        folder = cls(Path(path))
        if not (folder.path / SCENARIO_FILE).is_file():
            raise RunFolderError(f"{path} is not a leaksim run folder: no {SCENARIO_FILE}")
        return folder

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    def append(self, record: Record) -> None:
        """Append one record durably (flush + fsync) before returning, or, inside
        :meth:`synced_together`, at the end of that block; RunFolderLost when the folder (its
        scenario) is gone or cannot be written."""
        self.check_writable()
        try:
            with self.results_path.open("a") as stream:
                stream.write(json.dumps(_jsonable(record.to_dict())) + "\n")
                stream.flush()
                if self._together:
                    self._unsynced = True
                else:
                    os.fsync(stream.fileno())
        except OSError as error:
            raise self._lost(error.strerror or type(error).__name__) from None

    @contextlib.contextmanager
    def synced_together(self) -> Iterator[None]:
        """Records appended in the block reach the disk with one fsync as it ends.

        The supervisor takes each read of its workers' pipe in one such block: the records
        that arrived together (a round's update records, one per client) cost one fsync
        instead of one each, which at 100 clients was a third of a round's time.
        """
        self._together = True
        try:
            yield
        finally:
            self._together = False
            if self._unsynced:
                self._unsynced = False
                try:
                    with self.results_path.open("a") as stream:
                        os.fsync(stream.fileno())
                except OSError as error:
                    raise self._lost(error.strerror or type(error).__name__) from None

    def check_writable(self) -> None:
        """RunFolderLost unless the folder still holds its scenario and can be written."""
        if not (self.path / SCENARIO_FILE).is_file():
            raise self._lost("it is gone")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise self._lost("it cannot be written")

    def _lost(self, why: str) -> RunFolderLost:
        return RunFolderLost(
            f"the run folder {self.path} disappeared or cannot be written ({why}); "
            "the run stopped and wrote nothing more"
        )

    def save_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write ``artifacts/<name>.npz`` atomically (images behind the figures); the run
        folder must still exist (RunFolderLost otherwise: it is never made again here)."""
        try:
            (self.path / ARTIFACTS_DIR).mkdir(exist_ok=True)
        except OSError as error:
            raise self._lost(error.strerror or type(error).__name__) from None
        target = self.path / ARTIFACTS_DIR / f"{name}.npz"
        with _temporary(target) as stream:
            np.savez_compressed(stream, **arrays)
        return target

    def save_attack(self, record: AttackRecord, arrays: Mapping[str, np.ndarray]) -> Path:
        """Store the true batch and reconstruction behind an ``attack`` record."""
        return self.save_arrays(_attack_name(record), arrays)

    def records(self) -> list[Record]:
        return list(read_records(self.path))

    def scenario(self) -> Scenario:
        raw = json.loads((self.path / SCENARIO_FILE).read_text())
        # Folders written before a kind's keys were its params list every kind's defaults.
        drop_unread(raw)
        return from_dict(raw)

    def tidy(self) -> None:
        """Remove what a killed run leaves behind: truth stores and half-written files."""
        for stray in self.path.glob(f"{TRUTH_PREFIX}*"):
            shutil.rmtree(stray, ignore_errors=True)
        for folder in (self.path, self.path / ARTIFACTS_DIR):
            for partial in folder.glob(f".*{TEMPORARY_SUFFIX}"):
                partial.unlink(missing_ok=True)

    def rewind(self, points: int) -> tuple[list[Record], int]:
        """Prepare to resume: (the records kept, the first point to run again).

        Points 0, 1, ... that ended ``ok`` are kept up to the first that did not (never run,
        interrupted, failed); the records of that point and every later one, ``interrupted``
        records and unreadable lines are appended to interrupted.jsonl, then results.jsonl is
        rewritten atomically with the kept lines as they were.
        """
        lines = [(n, line, _typed(r)) for n, line, r in _lines(self.results_path)]
        done = {r.point for _, _, r in lines if isinstance(r, PointRecord) and r.status == "ok"}
        first = next((index for index in range(points) if index not in done), points)
        kept: list[tuple[str, Record]] = []
        moved: list[str] = []
        for _, line, record in lines:
            point = record.point if record is not None else None
            if (
                record is not None
                and not isinstance(record, InterruptedRecord)
                and point is not None
                and point < first
            ):
                kept.append((line, record))
            else:
                moved.append(line if line.endswith("\n") else line + "\n")
        if moved:
            earlier = self.path / INTERRUPTED_FILE
            before = earlier.read_text() if earlier.is_file() else ""
            write_atomic(earlier, before + "".join(moved))
            write_atomic(self.results_path, "".join(line for line, _ in kept))
        self.tidy()
        return [record for _, record in kept], first


def check_new(path: Path | str) -> None:
    """RunFolderError unless ``path`` is free for a new run: absent, or an empty folder."""
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RunFolderError(
            f"--out {path} is not empty; choose a new folder, or continue the run in it with "
            f"leaksim run --resume {path}"
        )


def _attack_name(record: AttackRecord) -> str:
    return f"p{record.point}-attack-r{record.round}-c{record.client}"


def attack_artifact(run_dir: Path | str, record: AttackRecord) -> Path:
    """Where :meth:`RunFolder.save_attack` put the arrays behind an ``attack`` record."""
    return Path(run_dir) / ARTIFACTS_DIR / f"{_attack_name(record)}.npz"


def _lines(path: Path) -> list[tuple[int, str, dict[str, Any] | None]]:
    """(line number, text, the JSON object or None) for each line of a results file."""
    if not path.is_file():
        return []
    found = []
    with path.open(newline="") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            if line.strip():
                found.append((number, line, value if isinstance(value, dict) else None))
    return found


def _typed(written: dict[str, Any] | None) -> Record | None:
    """The typed record of a line's JSON object; None when it is no record."""
    if written is None:
        return None
    try:
        return read(written)
    except RecordError:
        return None


def read_records(run_dir: Path | str) -> Iterator[Record]:
    """The typed records of a run folder, in order (those of older formats read as today's:
    :func:`simulator.core.records.read`).

    Lines that are not records (a torn last line after a crash, a damaged file, a kind this
    version does not know) are skipped with a :class:`CorruptRecordsWarning` that says how
    many and where.
    """
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a leaksim run folder: no {RESULTS_FILE}")
    lines = [(number, line, _typed(record)) for number, line, record in _lines(path)]
    skipped = [number for number, _, record in lines if record is None]
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(
            f"{path}: skipped {len(skipped)} unreadable line(s) (line {shown})",
            CorruptRecordsWarning,
            stacklevel=1,  # one place: shown once per process however many readers
        )
    for _, _, record in lines:
        if record is not None:
            yield record
