"""simulator.federation.client_app: what an honest client's reply holds, and its client mods.

The reply is built by the real ``train`` function from a real train message (no Ray): it must
hold the update and the protocol's metadata, and nothing of the client's data, which goes to
the simulation's truth store instead.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from simulator.core.config import Scenario
from simulator.core.models import build_model
from simulator.core.protocol import (
    ARRAYS_KEY,
    CLIENT_ID_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    SCENARIO_KEY,
)
from simulator.core.registry import DEFENSES
from simulator.federation.client_app import app, train
from simulator.federation.messages import from_record, to_record
from simulator.federation.truth import (
    TRUTH_DIR_ENV,
    TRUTH_KEY_ENV,
    TRUTH_TAG_KEY_ENV,
    TruthKey,
    TruthStore,
)
from simulator.scenario import load, with_overrides

Update = dict[str, torch.Tensor]


def fedavg_scenario(**defense: float) -> Scenario:
    overrides: dict[str, object] = {
        "federation.protocol": "fedavg",
        "federation.clients": 2,
        "federation.batch_size": 5,
        "federation.lr": 0.1,
        "data.examples_per_client": 10,
        "model.widths": [32],
        "defenses": [{"name": "local-dp", **defense}] if defense else [],
    }
    return load("quickstart", overrides)


def train_reply(scenario: Scenario, with_mod: bool) -> tuple[Update, Update, Message]:
    """(sent weights, replied weights, reply) of client 0 in round 1, through the real train."""
    sent = build_model(scenario.model, seed=scenario.seed).state_dict()
    content = RecordDict(
        {
            ARRAYS_KEY: to_record(sent),
            CONFIG_KEY: ConfigRecord({SCENARIO_KEY: scenario.to_json(), ROUND_KEY: 1}),
        }
    )
    metadata = Metadata(1, "m1", 0, 1, "", "1", time.time(), 3600.0, MessageType.TRAIN)
    msg = Message(content, metadata=metadata)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    # with_mod: the ClientApp itself, as Ray runs it (its train function inside its mods)
    reply = app(msg, context) if with_mod else train(msg, context)
    return dict(sent), from_record(reply.content[ARRAYS_KEY]), reply


def flat(update: Update) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in update.values()])


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_a_reply_holds_only_the_update_and_the_protocols_metadata(
    protocol: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = TruthKey.generate()
    monkeypatch.setenv(TRUTH_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(TRUTH_KEY_ENV, key.public.hex())
    monkeypatch.setenv(TRUTH_TAG_KEY_ENV, key.tags.hex())
    scenario = with_overrides(fedavg_scenario(), {"federation.protocol": protocol})
    sent, update, reply = train_reply(scenario, with_mod=False)
    content = reply.content
    assert set(content.keys()) == {ARRAYS_KEY, METRICS_KEY, CONFIG_KEY}
    assert list(content[ARRAYS_KEY].keys()) == list(sent)  # one tensor per parameter
    expected_metrics = {NUM_EXAMPLES_KEY} | ({"train-loss"} if protocol == "fedavg" else set())
    assert set(content[METRICS_KEY].keys()) == expected_metrics
    assert dict(content[CONFIG_KEY]) == {CLIENT_ID_KEY: 0}
    # The client's batch went to the truth store, and not one of its images is in the reply.
    truth = TruthStore(tmp_path, key=key).get(1, 0)
    assert truth is not None and len(truth.labels) == content[METRICS_KEY][NUM_EXAMPLES_KEY]
    # Sealed: the file holds not one of the batch's images (the key is this process's).
    sealed = (tmp_path / "round-1" / "client-0.sealed").read_bytes()
    assert all(image.numpy().tobytes()[:64] not in sealed for image in truth.inputs)
    wire = pickle.dumps(reply.content)
    for image in truth.inputs:
        assert image.numpy().tobytes() not in wire
    # The serialised reply is the update plus a small envelope.
    update_bytes = sum(t.numel() * t.element_size() for t in update.values())
    assert len(wire) < update_bytes + 4096


def test_without_a_truth_store_the_client_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TRUTH_DIR_ENV, raising=False)
    monkeypatch.delenv(TRUTH_KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    train_reply(fedavg_scenario(), with_mod=False)
    assert list(tmp_path.iterdir()) == []


def test_local_dp_mod_clips_the_weight_change_then_adds_the_documented_noise() -> None:
    params = {"clipping_norm": 0.05, "sensitivity": 0.5, "epsilon": 2.0, "delta": 1e-4}
    scenario = fedavg_scenario(**params)
    sent, clean, _ = train_reply(scenario, with_mod=False)
    _, noisy, reply = train_reply(scenario, with_mod=True)
    change = flat({k: clean[k] - sent[k] for k in sent}).double()
    assert change.norm() > 0.05  # so clipping acts
    clipped = change * (0.05 / change.norm())
    noise = flat({k: noisy[k] - sent[k] for k in sent}).double() - clipped
    std = 0.5 * math.sqrt(2 * math.log(1.25 / 1e-4)) / 2.0
    assert DEFENSES.create("local-dp", params).noise_std == pytest.approx(std)
    # ~25k coordinates: the sample std is within 2 % of the std and the mean near 0
    assert float(noise.std()) == pytest.approx(std, rel=0.02)
    assert abs(float(noise.mean())) < 4 * std / math.sqrt(noise.numel())
    # seeded from (seed, round, client): the same reply twice
    _, again, _ = train_reply(scenario, with_mod=True)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)
    assert set(reply.content.keys()) == {ARRAYS_KEY, METRICS_KEY, CONFIG_KEY}


def test_local_dp_mod_without_noise_leaves_a_change_of_exactly_the_clipping_norm() -> None:
    scenario = fedavg_scenario(clipping_norm=0.05, sensitivity=0.0)
    sent, clipped, _ = train_reply(scenario, with_mod=True)
    change = flat({k: clipped[k] - sent[k] for k in sent}).double()
    assert float(change.norm()) == pytest.approx(0.05, rel=1e-4)


CLIENT_PROCESS = """
import sys, time
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from simulator.core.models import build_model
from simulator.core.protocol import ARRAYS_KEY, CONFIG_KEY, ROUND_KEY, SCENARIO_KEY
from simulator.federation.client_app import app
from simulator.federation.messages import to_record
from simulator.scenario import from_message

text = open(sys.argv[1]).read()
scenario = from_message(text)
sent = build_model(scenario.model, seed=scenario.seed).state_dict()
config = ConfigRecord({SCENARIO_KEY: text, ROUND_KEY: 1})
metadata = Metadata(1, "m1", 0, 1, "", "1", time.time(), 3600.0, MessageType.TRAIN)
msg = Message(RecordDict({ARRAYS_KEY: to_record(sent), CONFIG_KEY: config}), metadata=metadata)
app(msg, Context(1, 1, {"partition-id": 0}, RecordDict(), {}))
print(scenario.attack.name, sorted(m for m in sys.modules if m.split(".")[0] == "attacks"))
"""


def test_an_honest_client_trains_without_importing_an_attack(tmp_path: Path) -> None:
    """A fresh process that imports the ClientApp, decodes a train message's scenario (an
    attack with parameters, a defense) and trains imports no module of ``attacks``: the
    server validated the scenario, and the client never looks the attack up."""
    scenario = with_overrides(
        fedavg_scenario(),
        {
            "attack.name": "idlg",
            "attack.params.iterations": 3,
            "defenses": [{"name": "gaussian-noise", "std": 0.01}],
            # numpy's partitioner: Flower's ("iid") would import flwr-datasets, seconds of
            # start-up in the fresh process that have nothing to do with attacks
            "data.partition": "label-skew",
        },
    )
    path = tmp_path / "scenario.json"
    path.write_text(scenario.to_json())
    key = TruthKey.generate()
    env = {
        **os.environ,
        TRUTH_DIR_ENV: str(tmp_path / "truth"),
        TRUTH_KEY_ENV: key.public.hex(),
        TRUTH_TAG_KEY_ENV: key.tags.hex(),
    }
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_PROCESS, str(path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[3],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["idlg", "[]"]
    assert TruthStore(tmp_path / "truth", key=key).get(1, 0) is not None  # it did train
