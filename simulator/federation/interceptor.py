"""The interception point: a strategy wrapper that sees every client reply before aggregation.

Client sampling, observations and failures go through the one :class:`TrafficPath`; the
cleaned replies go on to the wrapped Flower strategy. Replies carry the update and its public
metadata only (the truth never travels in a message), so nothing needs stripping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from simulator.core.config import FederationConfig
from simulator.core.models import ModelSpec
from simulator.federation.messages import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, from_record
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
    ) -> None:
        self.inner = inner
        self.node_to_client = dict(node_to_client)
        self.client_to_node = {c: n for n, c in self.node_to_client.items()}
        self.federation = federation
        self.path = TrafficPath(self.client_to_node, federation, model, seed, on_round)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampled = self.path.open_round(server_round, from_record(arrays))
        nodes = [self.client_to_node[c] for c in sampled]
        return self.inner.configure_train(server_round, arrays, config, _SampledGrid(grid, nodes))  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_client = sorted((self.node_to_client[m.metadata.src_node_id], m) for m in replies)
        failures = [
            Failure(server_round, client, client_error_message(m.error.reason))
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
        if not good:
            raise all_failed(traffic)
        return self.inner.aggregate_train(server_round, [m for _, m in good])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
