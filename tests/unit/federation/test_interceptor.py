"""Interceptor.aggregate_train on mock client replies, without Ray (as Flower tests strategies).

Each test prepares a round the way the ServerApp does (``configure_train`` on a grid that only
lists node ids), builds the clients' replies to the train messages it produced, and checks what
came out: the aggregate handed back to Flower, and the observations and failures of the round
handed to the malicious server and the referee.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from simulator.core.config import Scenario
from simulator.core.models import IMPRINT, SentModel, build_model
from simulator.core.protocol import (
    ARRAYS_KEY,
    CLIENT_ID_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SCENARIO_KEY,
)
from simulator.federation.interceptor import Interceptor, Manipulate
from simulator.federation.messages import from_record, to_record
from simulator.federation.strategies import make_strategy
from simulator.federation.traffic import AllClientsFailed, RoundTraffic
from simulator.scenario import with_overrides
from tests.unit.federation.helpers import small_scenario

Weights = dict[str, torch.Tensor]

# Node ids out of step with the client ids, so that sorting by either gives a different order.
NODE_TO_CLIENT = {41: 2, 17: 0, 93: 3, 58: 1}
CLIENT_TO_NODE = {c: n for n, c in NODE_TO_CLIENT.items()}
# What a Ray worker's error reply holds when the client raised (Flower's wrapping, shortened).
RAY_ERROR = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
    '(pid=4242, ip=10.0.0.1)\n  File "/x/flwr/client.py", line 1\nException ClientAppException '
    "occurred. Message: injected crash of client {client} in round 1'>"
)


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower stamps instruction messages with the running task's identity; give it one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    yield


class NodesOnly:
    """A grid of which the strategies read only the connected node ids."""

    def get_node_ids(self) -> list[int]:
        return sorted(NODE_TO_CLIENT)


def scenario(protocol: str = "fedsgd") -> Scenario:
    return small_scenario(protocol)


def update_of(client: int, like: Mapping[str, torch.Tensor], seed: int = 0) -> Weights:
    """A distinct, seeded update per client, shaped like the model's weights."""
    generator = torch.Generator().manual_seed(1000 * seed + client)
    return {k: torch.randn(v.shape, generator=generator) for k, v in like.items()}


class Round:
    """One round of an Interceptor around the scenario's inner strategy; records its traffic."""

    def __init__(self, scenario: Scenario, manipulate: Manipulate | None = None) -> None:
        fed = scenario.federation
        self.scenario = scenario
        self.traffic: list[RoundTraffic] = []
        self.sent = build_model(scenario.model, seed=scenario.seed).state_dict()
        self.interceptor = Interceptor(
            make_strategy(fed.protocol, fed.lr),
            NODE_TO_CLIENT,
            fed,
            scenario.model,
            scenario.seed,
            self.traffic.append,
            manipulate,
        )
        config = ConfigRecord({SCENARIO_KEY: scenario.to_json()})
        messages = self.interceptor.configure_train(1, to_record(self.sent), config, NodesOnly())  # type: ignore[arg-type]
        self.train = {NODE_TO_CLIENT[m.metadata.dst_node_id]: m for m in messages}

    def reply(self, client: int, update: Mapping[str, torch.Tensor], examples: int) -> Message:
        """Client ``client``'s reply to its train message, as the ClientApp builds it."""
        content = RecordDict(
            {
                ARRAYS_KEY: to_record(update),
                METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: examples}),
                CONFIG_KEY: ConfigRecord({CLIENT_ID_KEY: client}),
            }
        )
        return Message(content, reply_to=self.train[client])

    def error(self, client: int) -> Message:
        """Client ``client``'s error reply (it raised while training)."""
        reason = RAY_ERROR.format(client=client)
        return Message(Error(code=0, reason=reason), reply_to=self.train[client])

    def aggregate(self, replies: Sequence[Message]) -> Weights | None:
        arrays, _ = self.interceptor.aggregate_train(1, replies)
        return None if arrays is None else from_record(arrays)


def weighted_mean(updates: Sequence[Weights], weights: Sequence[float]) -> Weights:
    share = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return {
        k: sum(s * u[k].double() for s, u in zip(share, updates, strict=True)).float()  # type: ignore[misc]
        for k in updates[0]
    }


def test_each_reply_is_observed_against_the_sent_weights_in_client_order() -> None:
    # Prepare: every client replies, in node-id order (not client order)
    federation = Round(scenario())
    updates = {c: update_of(c, federation.sent) for c in range(4)}
    replies = [
        federation.reply(NODE_TO_CLIENT[n], updates[NODE_TO_CLIENT[n]], 2) for n in (93, 17, 58, 41)
    ]
    # Execute
    federation.aggregate(replies)
    # Assert: one observation per client, sorted, each the client's own update and the sent model
    (traffic,) = federation.traffic
    assert traffic.round == 1 and traffic.sampled == (0, 1, 2, 3) and traffic.failures == ()
    assert [o.client_id for o in traffic.observations] == [0, 1, 2, 3]
    for observation in traffic.observations:
        assert observation.round == 1 and observation.model == federation.scenario.model
        own = updates[observation.client_id]
        assert all(torch.equal(observation.update[k], own[k]) for k in own)
        sent = federation.sent
        assert all(torch.equal(observation.global_weights[k], sent[k]) for k in sent)
        meta = observation.meta
        assert (meta.protocol, meta.batch_size, meta.lr, meta.num_examples) == ("fedsgd", 2, 0.5, 2)


def test_fedsgd_steps_the_global_model_by_the_example_weighted_mean_gradient() -> None:
    federation = Round(scenario("fedsgd"))
    updates = [update_of(c, federation.sent) for c in range(4)]
    examples = [1, 2, 3, 2]
    replies = [federation.reply(c, updates[c], examples[c]) for c in (3, 1, 0, 2)]
    stepped = federation.aggregate(replies)
    mean = weighted_mean(updates, examples)
    assert stepped is not None and list(stepped) == list(federation.sent)
    for name, weights in federation.sent.items():
        torch.testing.assert_close(stepped[name], weights - 0.5 * mean[name])


def test_the_aggregate_is_the_same_bits_whatever_order_the_replies_arrive_in() -> None:
    aggregates = []
    for order in ((0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)):
        federation = Round(scenario("fedavg"))
        replies = [federation.reply(c, update_of(c, federation.sent), 3 + c) for c in order]
        aggregates.append(federation.aggregate(replies))
    first = aggregates[0]
    assert first is not None
    for other in aggregates[1:]:
        assert other is not None and all(torch.equal(other[k], first[k]) for k in first)


def test_fedavg_returns_the_example_weighted_mean_of_the_replied_weights() -> None:
    federation = Round(scenario("fedavg"))
    trained = [update_of(c, federation.sent) for c in range(4)]
    replies = [federation.reply(c, trained[c], 10 * (c + 1)) for c in range(4)]
    averaged = federation.aggregate(replies)
    expected = weighted_mean(trained, [10, 20, 30, 40])
    assert averaged is not None
    for name in expected:
        torch.testing.assert_close(averaged[name], expected[name])


def test_an_error_reply_and_a_missing_reply_are_failures_left_out_of_the_aggregate() -> None:
    # Prepare: client 1 raised, client 3 never answered
    federation = Round(scenario("fedavg"))
    trained = {c: update_of(c, federation.sent) for c in (0, 2)}
    replies = [
        federation.reply(2, trained[2], 10),
        federation.error(1),
        federation.reply(0, trained[0], 30),
    ]
    # Execute
    averaged = federation.aggregate(replies)
    # Assert: the failures name the client and the cause, and only 0 and 2 were averaged
    (traffic,) = federation.traffic
    assert [(f.round, f.client_id) for f in traffic.failures] == [(1, 1), (1, 3)]
    crash, silence = traffic.failures
    assert crash.reason == "injected crash of client 1 in round 1"
    assert silence.reason == "no reply within 30 s"
    assert [o.client_id for o in traffic.observations] == [0, 2]
    assert traffic.participants == (0, 2)
    expected = weighted_mean([trained[0], trained[2]], [30, 10])
    assert averaged is not None
    for name in expected:
        torch.testing.assert_close(averaged[name], expected[name])


def test_a_round_where_every_client_failed_ends_the_point_with_their_reasons() -> None:
    federation = Round(scenario())
    with pytest.raises(AllClientsFailed) as info:
        federation.aggregate([federation.error(c) for c in (2, 0, 3)])
    assert str(info.value) == (
        "round 1: all 4 sampled clients failed (client 0: injected crash of client 0 in round 1; "
        "client 1: no reply within 30 s; client 2: injected crash of client 2 in round 1; "
        "client 3: injected crash of client 3 in round 1)"
    )
    # the referee still got the round: its failures are records
    (traffic,) = federation.traffic
    assert [f.client_id for f in traffic.failures] == [0, 1, 2, 3]
    assert traffic.observations == ()


def imprinted(scenario: Scenario, sent: Mapping[str, torch.Tensor], aggregate: bool) -> SentModel:
    """A manipulated model: an imprint block in front of the honest weights."""
    spec = dataclasses.replace(scenario.model, imprint_bins=3)
    block = {
        k: v for k, v in build_model(spec, seed=7).state_dict().items() if k.startswith(IMPRINT)
    }
    weights = {**block, **{k: 3 * v for k, v in sent.items()}}
    return SentModel(spec, weights, "imprint block of 3 bins", aggregate)


def manipulating(client: int, aggregate: bool = False) -> Manipulate:
    def manipulate(
        server_round: int, sampled: tuple[int, ...], sent: Mapping[str, torch.Tensor]
    ) -> dict[int, SentModel]:
        assert (server_round, sampled) == (1, (0, 1, 2, 3))
        return {client: imprinted(scenario("fedavg"), sent, aggregate)}

    return manipulate


def test_a_manipulated_client_is_sent_its_model_and_observed_against_it() -> None:
    federation = Round(scenario("fedavg"), manipulating(1))
    offer = federation.interceptor.path.offers[1]
    # the train message carries the manipulated weights and a scenario describing them
    sent_to_1 = federation.train[1].content
    assert list(from_record(sent_to_1[ARRAYS_KEY])) == list(offer.weights)
    told = Scenario.from_json(str(sent_to_1[CONFIG_KEY][SCENARIO_KEY]))
    assert told.model == offer.spec and told.model.imprint_bins == 3
    # the others get the honest global model
    honest = from_record(federation.train[0].content[ARRAYS_KEY])
    assert all(torch.equal(honest[k], v) for k, v in federation.sent.items())
    trained = {c: update_of(c, offer.weights if c == 1 else federation.sent) for c in range(4)}
    federation.aggregate([federation.reply(c, trained[c], 10) for c in range(4)])
    observed = {o.client_id: o for o in federation.traffic[0].observations}
    assert observed[1].model == offer.spec
    assert all(torch.equal(observed[1].global_weights[k], v) for k, v in offer.weights.items())
    assert observed[0].model == federation.scenario.model


def test_a_manipulated_reply_is_kept_out_of_aggregation() -> None:
    federation = Round(scenario("fedavg"), manipulating(1))
    offer = federation.interceptor.path.offers[1]
    trained = {c: update_of(c, offer.weights if c == 1 else federation.sent) for c in range(4)}
    averaged = federation.aggregate([federation.reply(c, trained[c], 10) for c in range(4)])
    expected = weighted_mean([trained[c] for c in (0, 2, 3)], [10, 10, 10])
    assert averaged is not None and list(averaged) == list(federation.sent)
    for name in expected:
        torch.testing.assert_close(averaged[name], expected[name])


def test_a_manipulated_reply_that_may_join_adds_only_the_honest_models_tensors() -> None:
    federation = Round(scenario("fedavg"), manipulating(1, aggregate=True))
    offer = federation.interceptor.path.offers[1]
    trained = {c: update_of(c, offer.weights if c == 1 else federation.sent) for c in range(4)}
    averaged = federation.aggregate([federation.reply(c, trained[c], 10) for c in range(4)])
    honest_of_1 = {k: trained[1][k] for k in federation.sent}
    expected = weighted_mean([trained[0], honest_of_1, trained[2], trained[3]], [10] * 4)
    assert averaged is not None and list(averaged) == list(federation.sent)
    for name in expected:
        torch.testing.assert_close(averaged[name], expected[name])


def test_when_every_sampled_client_refuses_its_manipulated_model_the_round_passes() -> None:
    one = with_overrides(scenario(), {"federation.fraction": 0.25})

    def manipulate(
        _round: int, sampled: tuple[int, ...], sent: Mapping[str, torch.Tensor]
    ) -> dict[int, SentModel]:
        return {c: imprinted(one, sent, aggregate=False) for c in sampled}

    federation = Round(one, manipulate)
    (client,) = federation.train
    # no update, and no error: the global model stays, the point goes on
    assert federation.aggregate([federation.error(client)]) is None
    (traffic,) = federation.traffic
    assert [f.client_id for f in traffic.failures] == [client] and traffic.observations == ()
