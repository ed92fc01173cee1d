"""The trust boundary, tested as an attacker would probe it: while an attack runs, nothing in
the server process holds the attacked clients' true images.

A user-plugin attack ("memory-probe", loaded with ``--plugin`` like any researcher's file)
searches, while it runs inside a real federation, every stack frame of every thread, every
module in ``sys.modules`` and every object ``gc.get_objects()`` reaches (and one level of
their referents: numpy arrays and bytes are not tracked by gc) for the raw bytes of the
clients' true images, as float32 tensors and as the uint8 the data files hold. The targets are
computed beforehand in a separate process, so this test's own process never holds them. A
control checks that the same probe finds an image carried the way leaksim's messages carried
the truth before the truth store existed (bytes in a reply's ConfigRecord).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from simulator.scenario.plugins import load_plugin
from tests.integration.conftest import ROOT, leaksim, read_results

PROBE = '''
"""A malicious plugin attack that searches the server process for the clients' images."""

import gc
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attacks.base import Attack, register_attack
from simulator.core.protocol import Observation, Reconstruction


def _buffer(obj):
    """The raw bytes of a tensor, array or bytes-like object (None for anything else)."""
    try:
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.device.type != "cpu" or obj.numel() < 28:
                return None
            return obj.detach().contiguous().numpy().tobytes()
        if isinstance(obj, np.ndarray):
            return None if obj.dtype == object else np.ascontiguousarray(obj).tobytes()
        if isinstance(obj, bytes | bytearray):
            return bytes(obj)
        if isinstance(obj, memoryview):
            return obj.tobytes()
    except Exception:
        return None
    return None


def search(needles):
    """(where each needle was found, how much was searched) over frames, modules and gc."""
    skip = {id(needles), *map(id, needles)}
    seen, found, counts = set(), [], {"frames": 0, "modules": 0, "objects": 0, "buffers": 0}

    def check(obj, where):
        if id(obj) in seen or id(obj) in skip:
            return
        seen.add(id(obj))
        data = _buffer(obj)
        if data is None:
            return
        counts["buffers"] += 1
        for index, needle in enumerate(needles):
            if needle in data:
                found.append({"where": where, "needle": index, "type": type(obj).__name__})

    def with_referents(obj, where, depth=4):
        # gc lists only tracked containers: follow referents into untracked ones (a dict of
        # bytes, a tuple of arrays), which gc.get_objects() never returns itself.
        check(obj, where)
        if depth:
            for ref in gc.get_referents(obj):
                if gc.is_tracked(ref):
                    check(ref, where)
                else:
                    with_referents(ref, where, depth - 1)

    for frame in list(sys._current_frames().values()):
        while frame is not None:
            counts["frames"] += 1
            for name, value in list(frame.f_locals.items()):
                with_referents(value, f"frame {frame.f_code.co_name}: {name}")
            frame = frame.f_back
    for name, module in list(sys.modules.items()):
        counts["modules"] += 1
        for value in list(getattr(module, "__dict__", {}).values()):
            with_referents(value, f"module {name}")
    for obj in gc.get_objects():
        counts["objects"] += 1
        with_referents(obj, f"gc {type(obj).__name__}")
    return found, counts


@dataclass(frozen=True)
class ProbeParams:
    targets: str = ""
    report: str = ""


@register_attack("memory-probe", "Searches the server process for the clients' true images.")
class MemoryProbe(Attack[ProbeParams]):
    Params = ProbeParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        with open(self.params.targets) as stream:
            needles = [bytes.fromhex(h) for h in json.load(stream)]
        found, counts = search(needles)
        with open(self.params.report, "a") as stream:
            stream.write(json.dumps({"found": found, "counts": counts}) + "\\n")
        return [
            Reconstruction(o.round, o.client_id, torch.zeros(o.meta.batch_size, 1, 28, 28), None)
            for o in observations
        ]
'''

SCENARIO = """
description = "trust boundary probe"
seed = 3
plugins = ["probe.py"]

[data]
test_examples = 200

[model]
kind = "mlp"
widths = [16]

[federation]
protocol = "fedsgd"
clients = 3
fraction = 1.0
rounds = 2
batch_size = 4
timeout_s = 120

[attack]
name = "memory-probe"
rounds = [1, 2]

[attack.params]
targets = "{targets}"
report = "{report}"
"""

# Run in a fresh interpreter: the true batches of every (round, client), as needles.
TARGETS = """
import json, sys
import numpy as np
from simulator.scenario import load
from simulator.core.seeding import seeded_generator
from simulator.data.datasets import load_split
from simulator.data.shards import _shard_indices

scenario = load(sys.argv[1])
fed = scenario.federation
images, _ = load_split(scenario.data.dataset, "train")
needles = []
for server_round in range(1, fed.rounds + 1):
    for client in range(fed.clients):
        indices = _shard_indices(scenario.data, fed.clients, scenario.seed)[client]
        generator = seeded_generator(scenario.seed, server_round, client)
        import torch
        batch = torch.randperm(len(indices), generator=generator)[: fed.batch_size]
        for image in images[indices[batch.numpy()]]:
            middle = image[12:17]  # five central rows: unique to one digit image
            needles.append(middle.tobytes().hex())
            needles.append((middle.astype(np.float32) / 255.0).tobytes().hex())
json.dump(needles, open(sys.argv[2], "w"))
"""


def write_probe_scenario(tmp_path: Path) -> Path:
    (tmp_path / "probe.py").write_text(PROBE)
    targets, report = tmp_path / "targets.json", tmp_path / "report.jsonl"
    path = tmp_path / "probe.toml"
    path.write_text(SCENARIO.format(targets=targets, report=report))
    return path


def test_an_attack_searching_the_server_process_finds_no_true_image(tmp_path: Path) -> None:
    scenario = write_probe_scenario(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", TARGETS, str(scenario), str(tmp_path / "targets.json")],
        check=True,
        env=env,
        timeout=120,
    )
    needles = json.loads((tmp_path / "targets.json").read_text())
    assert len(needles) == 2 * 2 * 3 * 4  # two forms of each of 4 images, 3 clients, 2 rounds
    run = leaksim("run", str(scenario), "--out", str(tmp_path / "o"))
    assert run.returncode == 0, run.stdout + run.stderr
    reports = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert len(reports) == 2  # the probe ran in both rounds
    for report in reports:
        assert report["found"] == []
        counts = report["counts"]
        assert counts["frames"] > 10 and counts["modules"] > 500
        assert counts["objects"] > 100_000 and counts["buffers"] > 100
    # The truth reached the referee afterwards: every probed update was scored against it.
    records = read_results(tmp_path / "o")
    attacks = [r for r in records if r["kind"] == "attack"]
    expected = [(server_round, client) for server_round in (1, 2) for client in (0, 1, 2)]
    assert [(r["round"], r["client"]) for r in attacks] == expected
    assert all(r["true_images"] == 4 and r["fraction_leaked"] == 0.0 for r in attacks)
    assert not list((tmp_path / "o").glob(".truth-*"))  # the truth store is gone


def test_the_probe_finds_truth_carried_in_a_reply_as_before_the_truth_store(
    tmp_path: Path,
) -> None:
    """Control: the old channel (the batch as np.savez bytes beside the update) is found."""
    probe = load_plugin(write_probe_scenario(tmp_path).parent / "probe.py")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    payload = io.BytesIO()
    np.savez(payload, inputs=image.astype(np.float32) / 255.0)  # as the data layer scales
    reply = RecordDict({"leaksim-oracle": ConfigRecord({"payload": payload.getvalue()})})
    needle = (image[12:17].astype(np.float32) / 255.0).tobytes()
    found, _ = probe.search([needle])
    assert found, "the probe missed a true image carried in a reply"
    del reply
    absent, _ = probe.search([bytes(rng.integers(0, 256, 560, dtype=np.uint8))])
    assert absent == []


@pytest.fixture(autouse=True)
def _no_truth_store_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEAKSIM_TRUTH_DIR", raising=False)
