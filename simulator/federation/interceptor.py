"""The interception point: a strategy wrapper that sees every client reply before aggregation.

Client sampling, observations and failures go through the one :class:`TrafficPath`; the
cleaned replies go on to the wrapped Flower strategy. Replies carry the update and its public
metadata only (the truth never travels in a message), so nothing needs stripping.

A malicious server (``manipulate``) may send chosen clients a manipulated model instead of the
global one: their train message then carries those weights and a scenario whose ``[model]``
describes them, so the client builds and trains that model. Their replies are observed like any
other and, unless the manipulation says otherwise, left out of aggregation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from simulator.core.config import FederationConfig, Scenario
from simulator.core.models import IMPRINT, ModelSpec, SentModel
from simulator.core.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SCENARIO_KEY,
)
from simulator.federation.messages import from_record, to_record
from simulator.federation.traffic import (
    Failure,
    RoundTraffic,
    TrafficPath,
    all_failed,
    client_error_message,
    public_meta,
)


class _SampledGrid:
    """A view of the grid that shows the inner strategy only this round's sampled nodes."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


# (round, sampled clients, global weights) -> the manipulated model of each client that gets one.
Manipulate = Callable[[int, tuple[int, ...], Mapping[str, torch.Tensor]], Mapping[int, SentModel]]


def manipulated_scenario(scenario_json: str, spec: ModelSpec) -> str:
    """The scenario a manipulated client is sent: the same, with ``[model]`` the sent spec."""
    return dataclasses.replace(Scenario.from_json(scenario_json), model=spec).to_json()


def honest_part(offer: SentModel, honest: Sequence[str]) -> list[str]:
    """The names, in a reply trained on ``offer``, of the honest model's parameters (in order)."""
    body = [name for name in offer.weights if not name.startswith(f"{IMPRINT}.")]
    if len(body) != len(honest):
        raise ValueError(f"a manipulated model has {len(body)} honest tensors, not {len(honest)}")
    return body


class Interceptor(Strategy):
    """Wraps a Flower strategy; calls ``on_round`` with each round's traffic."""

    def __init__(
        self,
        inner: FedAvg,
        node_to_client: Mapping[int, int],
        federation: FederationConfig,
        model: ModelSpec,
        seed: int,
        on_round: Callable[[RoundTraffic], None],
        manipulate: Manipulate | None = None,
    ) -> None:
        self.inner = inner
        self.node_to_client = dict(node_to_client)
        self.client_to_node = {c: n for n, c in self.node_to_client.items()}
        self.federation = federation
        self.path = TrafficPath(self.client_to_node, federation, model, seed, on_round)
        self.manipulate = manipulate

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sent = from_record(arrays)
        sampled = self.path.open_round(server_round, sent)
        nodes = [self.client_to_node[c] for c in sampled]
        messages = list(
            self.inner.configure_train(server_round, arrays, config, _SampledGrid(grid, nodes))  # type: ignore[arg-type]
        )
        offers = dict(self.manipulate(server_round, sampled, sent)) if self.manipulate else {}
        self.path.offer(offers)
        if not offers:
            return messages
        return [self._sent(m, offers, config) for m in messages]

    def _sent(
        self, message: Message, offers: Mapping[int, SentModel], config: ConfigRecord
    ) -> Message:
        """The train message for this node: as the strategy made it, or the manipulated model."""
        offer = offers.get(self.node_to_client[message.metadata.dst_node_id])
        if offer is None:
            return message
        settings = ConfigRecord(dict(config))
        settings[SCENARIO_KEY] = manipulated_scenario(str(config[SCENARIO_KEY]), offer.spec)
        content = RecordDict({ARRAYS_KEY: to_record(offer.weights), CONFIG_KEY: settings})
        return Message(
            content=content,
            message_type=MessageType.TRAIN,
            dst_node_id=message.metadata.dst_node_id,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_client = sorted((self.node_to_client[m.metadata.src_node_id], m) for m in replies)
        failures = [
            Failure(
                server_round,
                client,
                client_error_message(m.error.reason, f"round {server_round}, client {client}"),
            )
            for client, m in by_client
            if m.has_error()
        ]
        good = [(client, m) for client, m in by_client if not m.has_error()]
        observations = [
            self.path.observe(
                server_round,
                client,
                from_record(m.content[ARRAYS_KEY]),
                [public_meta(self.federation, int(m.content[METRICS_KEY][NUM_EXAMPLES_KEY]))],  # type: ignore[arg-type]
            )
            for client, m in good
        ]
        traffic = self.path.close_round(
            server_round, observations, failures, [client for client, _ in by_client]
        )
        if not good and not self.path.offers:
            raise all_failed(traffic)
        # Clients that refused a manipulated model leave the round without update (the global
        # model stays); only an honest round where everyone failed ends the point.
        kept = [self._aggregated(c, m) for c, m in good if not self.path.excluded(c)]
        return self.inner.aggregate_train(server_round, kept)

    def _aggregated(self, client: int, reply: Message) -> Message:
        """A reply as aggregation takes it: a manipulated one keeps only the honest tensors."""
        offer = self.path.offers.get(client)
        if offer is None:
            return reply
        honest = list(self.path.sent)
        arrays = reply.content[ARRAYS_KEY]
        names = honest_part(offer, honest)
        reply.content[ARRAYS_KEY] = ArrayRecord(
            {h: arrays[b] for h, b in zip(honest, names, strict=True)}
        )
        return reply

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
