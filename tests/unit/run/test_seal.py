"""simulator.run.seal, .handoff and the supervisor's side of the pipe: what crosses from the
attack process is data only, scores come from the scorer alone, and the worker gets no data
folder setting."""

from __future__ import annotations

import base64
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator.core.protocol import Reconstruction
from simulator.data.datasets import DATA_DIR_ENV
from simulator.federation.truth import TRUTH_DIR_ENV, TRUTH_KEY_ENV, TruthKey
from simulator.run.engine import open_folder
from simulator.run.folder import RunFolder
from simulator.run.handoff import Handoff, without_data_settings
from simulator.run.referee import AttackedRound
from simulator.run.seal import from_wire, point_store, to_wire
from simulator.run.supervisor import Supervisor, WorkerError, rebuilt
from simulator.scenario import expand, load
from tests.unit.report.synthetic_run import attack_record


def reconstruction(client: int) -> Reconstruction:
    generator = torch.Generator().manual_seed(client)
    return Reconstruction(
        1,
        client,
        torch.rand((2, 1, 28, 28), generator=generator),
        torch.tensor([3, 4]) if client else None,
        trace=[{"iteration": 0, "seconds": 0.5, "gradient_distance": 1 / 3}],
        snapshots=[(5, torch.rand((2, 1, 28, 28), generator=generator))],
        status="converged",
        attack="dlg",
        notes="a note",
        confident=torch.tensor([True, False]),
        objective_value=math.nan,
        predicted_share=0.25 if client else None,
        seconds=1.5,
    )


def test_a_round_crosses_the_pipe_bit_for_bit() -> None:
    sent = AttackedRound(1, (0, 1), (0, 1, 2), ((reconstruction(0), reconstruction(1)), ()))
    point, back = from_wire(to_wire(7, sent))
    assert point == 7 and (back.round, back.observed, back.participants) == (1, (0, 1), (0, 1, 2))
    assert [len(rs) for rs in back.per_attack] == [2, 0]
    for mine, theirs in zip(sent.per_attack[0], back.per_attack[0], strict=True):
        assert torch.equal(mine.images, theirs.images) and mine.images.dtype == theirs.images.dtype
        assert (mine.labels is None) == (theirs.labels is None)
        assert mine.trace == theirs.trace and type(theirs.trace[0]["iteration"]) is int
        assert torch.equal(mine.snapshots[0][1], theirs.snapshots[0][1])
        assert mine.confident is not None and theirs.confident is not None
        assert torch.equal(mine.confident, theirs.confident)
        assert math.isnan(theirs.objective_value) and theirs.seconds == 1.5
        assert (mine.predicted_share, mine.notes) == (theirs.predicted_share, theirs.notes)


class Payload:
    """What a plugin would send to run code in the supervisor."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_the_workers_error_is_rebuilt_from_exceptions_only() -> None:
    honest = base64.b64encode(pickle.dumps(ValueError("bad point"))).decode()
    error = rebuilt({"pickle": honest, "type": "ValueError", "message": "bad", "trace": ""})
    assert isinstance(error, ValueError) and str(error) == "bad point"
    hostile = base64.b64encode(pickle.dumps(Payload())).decode()
    error = rebuilt({"pickle": hostile, "type": "ValueError", "message": "bad", "trace": ""})
    assert isinstance(error, WorkerError) and "ValueError: bad" in str(error)


def test_a_score_sent_by_the_worker_is_refused(tmp_path: Path) -> None:
    taken: list[object] = []
    supervisor = Supervisor(tmp_path, taken.append, print, print, print)
    forged = attack_record("analytic", [100.0]).to_dict()
    with pytest.raises(WorkerError, match="only the referee scores"):
        supervisor._dispatch({"record": forged})
    assert taken == []


def test_the_worker_holds_no_data_setting_and_the_handoff_is_gone_once_read(
    tmp_path: Path,
) -> None:
    environment = {DATA_DIR_ENV: "/data", TRUTH_DIR_ENV: "/t", "HOME": "/home/me"}
    assert without_data_settings(environment) == {"HOME": "/home/me"}
    key = TruthKey.generate()
    images, labels = np.zeros((3, 28, 28), np.uint8), np.arange(3)
    handoff = Handoff(tmp_path, key.public, {DATA_DIR_ENV: "/data"}, {0: (5, 6)},
                      {"mnist": (images, labels)})  # fmt: skip
    path = handoff.issue()
    assert path.parent == tmp_path and (path.stat().st_mode & 0o777) == 0o600
    back = Handoff.take(path)
    assert not path.exists()
    assert back.sizes == {0: (5, 6)} and np.array_equal(back.tests["mnist"][0], images)
    assert back.client_environment(2) == {
        DATA_DIR_ENV: "/data",
        TRUTH_DIR_ENV: str(point_store(tmp_path, 2)),
        TRUTH_KEY_ENV: key.public.hex(),
    }


def test_the_data_folder_a_scenario_names_reaches_the_clients_not_the_worker(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    """``data.dir`` is not recorded in the run folder, which the worker reads its scenario
    from (so neither the scenario it holds nor the train messages it sends name the folder);
    the clients are told the folder in their environment, from the handoff."""
    marker = tmp_path / "data-marker"
    marker.mkdir()
    (marker / "mnist").symlink_to(shared_data_dir / "mnist", target_is_directory=True)
    scenario = load("quickstart", {"data.dir": str(marker)}, plugins=())
    assert scenario.data.dir == str(marker)
    folder = RunFolder.create(scenario, path=tmp_path / "run")
    for written in (folder.path / "scenario.json", folder.path / "scenario.toml"):
        assert "data-marker" not in written.read_text()
    worker_points = expand(folder.scenario())  # what the worker runs (simulator.run.worker)
    assert all("data-marker" not in p.scenario.to_json() for p in worker_points)
    # The clients: the folder of the files, in their environment, through the handoff file.
    key = TruthKey.generate()
    handoff = Handoff.build(tmp_path / "truth", key.public, expand(scenario))
    (tmp_path / "truth").mkdir()
    back = Handoff.take(handoff.issue())
    assert back.client_environment(0)[DATA_DIR_ENV] == str(marker)
    # Resuming with the folder named again is resuming the same run.
    resumed, kept, first = open_folder(scenario, folder.path, tmp_path, resume=True)
    assert (resumed.path, kept, first) == (folder.path, [], 0)
