"""simulator.run.folder: safe names, no appending to another run, atomic files, resume."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from simulator.core.records import (
    InterruptedRecord,
    PointRecord,
    Record,
    RoundRecord,
    StartupRecord,
)
from simulator.run.folder import (
    INTERRUPTED_FILE,
    CorruptRecordsWarning,
    RunFolder,
    RunFolderError,
    check_new,
    read_records,
    safe_name,
    write_atomic,
)
from simulator.scenario import load, with_sweep
from tests.unit.report.synthetic_run import point_record

ROUND = RoundRecord(0, 0.1, 2.3, point=0)


def named(name: str):
    return dataclasses.replace(load("quickstart"), name=name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("quickstart", "quickstart"),
        ("../../x", "x"),
        ("a b/c\\d", "a-b-c-d"),
        ("..", "run"),
        ("/", "run"),
        ("", "run"),
        (".hidden", "hidden"),
        ("ünïcode run", "n-code-run"),
    ],
)
def test_names_become_one_harmless_path_component(name: str, expected: str) -> None:
    assert safe_name(name) == expected


def test_a_long_name_is_cut() -> None:
    assert len(safe_name("x" * 500)) <= 80


@pytest.mark.parametrize("name", ["../../escaped", "/abs/olute", "..", "a/../../b"])
def test_a_scenario_name_never_leaves_the_runs_root(tmp_path: Path, name: str) -> None:
    root = tmp_path / "deep" / "runs"
    folder = RunFolder.create(named(name), root=root)
    assert folder.path.parent == root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["runs"]
    assert (folder.path / "scenario.json").is_file()


def test_two_runs_in_the_same_second_get_two_folders(tmp_path: Path) -> None:
    first = RunFolder.create(named("q"), root=tmp_path)
    second = RunFolder.create(named("q"), root=tmp_path)
    assert first.path != second.path and second.path.parent == tmp_path


def test_out_onto_a_non_empty_folder_or_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "results.jsonl").write_text("{}\n")
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "used", tmp_path / "file"):
        with pytest.raises(RunFolderError, match="not empty"):
            RunFolder.create(named("q"), path=path)
    assert (tmp_path / "used" / "results.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["results.jsonl"]


def test_out_onto_an_empty_or_new_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    check_new(tmp_path / "empty")
    check_new(tmp_path / "new")
    assert RunFolder.create(named("q"), path=tmp_path / "empty").path == tmp_path / "empty"


def test_open_needs_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="not a leaksim run folder"):
        RunFolder.open(tmp_path)
    folder = RunFolder.create(named("q"), path=tmp_path / "run")
    assert RunFolder.open(folder.path).scenario() == named("q")


def test_files_are_written_whole_with_nothing_left_beside_them(tmp_path: Path) -> None:
    folder = RunFolder.create(named("q"), path=tmp_path / "run")
    write_atomic(folder.path / "note.txt", "hello")
    folder.save_arrays("a", {"x": np.arange(3)})
    assert (folder.path / "note.txt").read_text() == "hello"
    with np.load(folder.path / "artifacts" / "a.npz") as arrays:
        assert arrays["x"].tolist() == [0, 1, 2]
    every = [p.name for p in folder.path.rglob("*")]
    assert not [name for name in every if name.endswith(".tmp")]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    def no_rename(_source: str, _target: Path) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_unreadable_and_non_object_lines_are_skipped_with_their_line_numbers(
    tmp_path: Path,
) -> None:
    lines = [
        json.dumps(ROUND.to_dict()), "[1, 2]", "garbage", "", '"text"', '{"kind": "ro',
        '{"kind": "no such kind"}', '{"kind": "round", "round": 1}',  # unknown; fields missing
    ]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("\n".join(lines))
    with pytest.warns(
        CorruptRecordsWarning, match=r"skipped 6 unreadable line\(s\) \(line 2, 3, 5, 6, 7, 8\)"
    ):
        records = list(read_records(tmp_path))
    assert records == [ROUND]


def test_a_clean_file_reads_without_a_warning(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    (tmp_path / "results.jsonl").write_text(json.dumps(ROUND.to_dict()) + "\n")
    assert list(read_records(tmp_path)) == [ROUND]
    assert not [w for w in recwarn if w.category is CorruptRecordsWarning]


def write_run(path: Path, records: list[Record], tail: str = "") -> list[str]:
    lines = [json.dumps(r.to_dict()) + "\n" for r in records]
    (path / "results.jsonl").write_text("".join(lines) + tail)
    return lines


def point(index: int, status: str = "ok") -> PointRecord:
    return point_record(index, {}, status=status)


def test_rewind_keeps_finished_points_and_moves_the_rest_nothing_lost(tmp_path: Path) -> None:
    folder = RunFolder.create(
        with_sweep(named("q"), {"federation.lr": [0.1, 0.2, 0.3]}), path=tmp_path / "r"
    )
    lines = write_run(
        folder.path,
        [
            ROUND,
            point(0),
            StartupRecord(1.5, point=1),
            dataclasses.replace(ROUND, point=1),
            InterruptedRecord(1, "SIGINT", 0),
        ],
        tail='{"point": 1, "ki',  # torn by a crash
    )
    (folder.path / ".truth-abc").mkdir()
    (folder.path / ".scenario.json.x.tmp").write_text("half")
    kept, first = folder.rewind(3)
    assert first == 1
    assert kept == [ROUND, point(0)]
    assert (folder.path / "results.jsonl").read_text() == "".join(lines[:2])
    moved = (folder.path / INTERRUPTED_FILE).read_text()
    assert moved == "".join(lines[2:]) + '{"point": 1, "ki\n'
    assert sorted(p.name for p in folder.path.iterdir()) == [
        "interrupted.jsonl", "results.jsonl", "scenario.json", "scenario.toml"
    ]  # fmt: skip

    # a second stop and rewind adds to interrupted.jsonl
    with (folder.path / "results.jsonl").open("a") as stream:
        stream.write(json.dumps(StartupRecord(1.5, point=1).to_dict()) + "\n")
    assert folder.rewind(3)[1] == 1
    assert (folder.path / INTERRUPTED_FILE).read_text().count("\n") == 5


@pytest.mark.parametrize("status", ["failed", "degraded"])
def test_rewind_reruns_a_failed_or_degraded_point_and_every_later_one(
    tmp_path: Path, status: str
) -> None:
    folder = RunFolder.create(named("q"), path=tmp_path / "r")
    write_run(folder.path, [point(0), point(1, status), point(2)])
    kept, first = folder.rewind(3)
    assert (kept, first) == ([point(0)], 1)
    assert (folder.path / INTERRUPTED_FILE).read_text().count("\n") == 2


def test_rewind_of_a_finished_or_empty_run(tmp_path: Path) -> None:
    folder = RunFolder.create(named("q"), path=tmp_path / "r")
    assert folder.rewind(2) == ([], 0)
    write_run(folder.path, [point(0), point(1)])
    assert folder.rewind(2) == ([point(0), point(1)], 2)
    assert not (folder.path / INTERRUPTED_FILE).exists()


def test_records_appended_together_are_written_at_once_and_synced_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = RunFolder.create(named("q"), path=tmp_path / "r")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    folder.append(ROUND)
    assert len(synced) == 1  # alone: synced before append returns
    with folder.synced_together():
        for index in range(5):
            folder.append(dataclasses.replace(ROUND, point=index))
            assert (folder.path / "results.jsonl").read_text().count("\n") == index + 2
        assert len(synced) == 1  # none yet: the block's one fsync comes at its end
    assert len(synced) == 2
    with folder.synced_together():
        pass
    assert len(synced) == 2  # nothing appended, nothing to sync
