"""Client-mod defenses run the same way in both clients: the Message-API one and SecAgg+'s.

:func:`client_defense_mods` wraps the Message-API client's ``train`` and, inside
``secaggplus_mod``, the SecAgg+ client's ``fit``, whose train message is Flower's legacy FitIns.
"Inspection" must refuse a manipulated model and pass an honest one in either format, keeping
its reference by parameter name in the node's state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from defenses.inspection import REFERENCE_KEY, ModelRejected
from simulator.core.config import Scenario
from simulator.core.models import build_model
from simulator.core.protocol import ARRAYS_KEY, CONFIG_KEY, ROUND_KEY, SCENARIO_KEY
from simulator.federation import secagg
from simulator.federation.client_mods import client_defense_mods
from simulator.federation.messages import to_record
from simulator.scenario import load

SCENARIO = load("quickstart", {"model.widths": [8], "defenses": [{"name": "inspection"}]})
HONEST = build_model(SCENARIO.model, seed=0).state_dict()
NAMES = list(HONEST)


def message_api(weights: Mapping[str, torch.Tensor], scenario: Scenario) -> RecordDict:
    """The Message-API client's train message content."""
    config = ConfigRecord({SCENARIO_KEY: scenario.to_json(), ROUND_KEY: 1})
    return RecordDict({ARRAYS_KEY: to_record(weights), CONFIG_KEY: config})


def legacy(weights: Mapping[str, torch.Tensor], scenario: Scenario) -> RecordDict:
    """The SecAgg+ client's train message content, as secaggplus_mod passes it to ``fit``."""
    parameters = ndarrays_to_parameters([t.numpy() for t in weights.values()])
    fit_ins = FitIns(parameters, {SCENARIO_KEY: scenario.to_json(), ROUND_KEY: 1})
    return compat.fitins_to_recorddict(fit_ins, keep_input=True)


def received(content: RecordDict, state: RecordDict) -> bool:
    """Run the client's defense mods on a train message; whether training was reached."""
    metadata = Metadata(1, "m1", 0, 1, "", "1", time.time(), 3600.0, MessageType.TRAIN)
    context = Context(1, 1, {"partition-id": 0}, state, {})
    trained: list[Message] = []

    def train(msg: Message, _context: Context) -> Message:
        trained.append(msg)
        return msg

    client_defense_mods(Message(content, metadata=metadata), context, train)
    return bool(trained)


@pytest.mark.parametrize("format_", [message_api, legacy], ids=["message-api", "secagg"])
def test_inspection_passes_the_honest_model_and_keeps_it_by_name(format_: object) -> None:
    state = RecordDict()
    assert received(format_(HONEST, SCENARIO), state)  # type: ignore[operator]
    reference = state.array_records[REFERENCE_KEY]
    assert list(reference) == NAMES
    assert all(torch.equal(torch.from_numpy(reference[k].numpy()), v) for k, v in HONEST.items())


@pytest.mark.parametrize("format_", [message_api, legacy], ids=["message-api", "secagg"])
def test_inspection_refuses_a_manipulated_model_before_training(format_: object) -> None:
    # an imprint block in front of the honest model, with the scenario that describes it
    spec = dataclasses.replace(SCENARIO.model, imprint_bins=4)
    manipulated = dataclasses.replace(SCENARIO, model=spec)
    weights = build_model(spec, seed=0).state_dict()
    with pytest.raises(ModelRejected, match="inspection rejected the model: structure differs"):
        received(format_(weights, manipulated), RecordDict())  # type: ignore[operator]
    # blown-up weights of the honest architecture: refused on their scale
    scaled = {k: 100 * v for k, v in HONEST.items()}
    with pytest.raises(ModelRejected, match="RMS"):
        received(format_(scaled, SCENARIO), RecordDict())  # type: ignore[operator]


def test_the_secagg_client_runs_the_defense_mods_inside_secaggplus_mod() -> None:
    """Inside: secaggplus_mod passes on only the train message that carries the model."""
    assert secagg.app._mods[-2:] == [secaggplus_mod, client_defense_mods]
