"""The interception point: a strategy wrapper that sees every client reply before aggregation.

It owns client sampling (seeded, by client id, so reruns pick the same clients), splits each
reply into the :class:`Observation` a real server holds and the simulation-only
:class:`Oracle`, records failures, and hands the cleaned replies to the wrapped strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from attacks.observation import Observation, PublicMeta
from simulator.messages import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, from_record
from simulator.models import ModelSpec
from simulator.oracle import ORACLE_KEY, Oracle
from simulator.scenario import FederationConfig


class AllClientsFailed(RuntimeError):
    """Every sampled client of a round failed: there is nothing to aggregate."""


@dataclass(frozen=True)
class Failure:
    """A sampled client that sent an error, or nothing within the timeout."""

    round: int
    client_id: int
    reason: str


@dataclass(frozen=True)
class RoundTraffic:
    """Everything the interceptor split out of one round's replies, sorted by client id."""

    round: int
    sampled: tuple[int, ...]
    observations: tuple[Observation, ...]
    oracles: tuple[Oracle, ...]
    failures: tuple[Failure, ...]

    @property
    def participants(self) -> tuple[int, ...]:
        """Sampled clients that did not fail: whose data the round used, aggregated or not."""
        failed = {f.client_id for f in self.failures}
        return tuple(c for c in self.sampled if c not in failed)


def client_error_message(reason: str) -> str:
    """The client's own exception message out of Ray's wrapped traceback (no pids, no paths)."""
    marker = "Message: "
    if marker in reason:
        return reason.rsplit(marker, 1)[1].strip().removesuffix("'>").strip()
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown client error"


AGGREGATE_CLIENT_ID = -1


def sample_clients(
    client_ids: Iterable[int], fraction: float, seed: int, server_round: int
) -> tuple[int, ...]:
    """Client ids trained in ``server_round``: a draw seeded by (seed, round), sorted."""
    clients = sorted(client_ids)
    count = max(1, int(len(clients) * fraction))
    rng = np.random.default_rng([seed, server_round])
    return tuple(sorted(int(c) for c in rng.choice(clients, size=count, replace=False)))


def public_meta(federation: FederationConfig, num_examples: int) -> PublicMeta:
    """What the server knows about one client's update: the protocol and its example count."""
    return PublicMeta(
        protocol=federation.protocol,
        batch_size=federation.batch_size,
        lr=federation.lr,
        local_epochs=federation.local_epochs,
        num_examples=num_examples,
    )


def aggregate_meta(metas: Sequence[PublicMeta]) -> PublicMeta:
    """The metadata of the aggregate of updates with ``metas`` (of one meta: that meta).

    The example counts add up; under FedSGD the batch is the union of the clients' batches.
    """
    first = metas[0]
    fedsgd = first.protocol == "fedsgd"
    batch = sum(m.batch_size for m in metas) if fedsgd else first.batch_size
    total = sum(m.num_examples for m in metas)
    return dataclasses.replace(first, batch_size=batch, num_examples=total)


def aggregated(traffic: RoundTraffic) -> RoundTraffic:
    """What the server sees under secure aggregation: one update, the weighted mean.

    Weights are the clients' example counts, as in FedAvg/FedSGD aggregation, so for FedSGD the
    view is exactly the gradient of the union of the sampled batches. Its oracle is the union of
    the true batches; its client id is :data:`AGGREGATE_CLIENT_ID`. The SecAgg+ path
    (:mod:`simulator.secagg_app`) hands in its one aggregate, which this leaves as it is
    (only its per-client oracles are joined).
    """
    if not traffic.observations:
        return traffic
    from defenses.secure_aggregation import aggregate_view

    first = traffic.observations[0]
    counts = [o.meta.num_examples for o in traffic.observations]
    update = aggregate_view([o.update for o in traffic.observations], counts)
    view = Observation(
        round=traffic.round,
        client_id=AGGREGATE_CLIENT_ID,
        model=first.model,
        global_weights=first.global_weights,
        update=update,
        meta=aggregate_meta([o.meta for o in traffic.observations]),
    )
    oracles = ()
    if traffic.oracles:
        oracles = (
            Oracle(
                traffic.round,
                AGGREGATE_CLIENT_ID,
                torch.cat([o.inputs for o in traffic.oracles]),
                torch.cat([o.labels for o in traffic.oracles]),
            ),
        )
    return dataclasses.replace(traffic, observations=(view,), oracles=oracles)


class _SampledGrid:
    """A view of the grid that shows the inner strategy only this round's sampled nodes."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


class Interceptor(Strategy):
    """Wraps a Flower strategy; calls ``on_round`` with each round's split traffic."""

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
        self.model = model
        self.seed = seed
        self.on_round = on_round
        self._sent: dict[str, object] = {}
        self._sampled: tuple[int, ...] = ()

    def sample(self, server_round: int) -> tuple[int, ...]:
        """Client ids trained in ``server_round``: a seeded draw, sorted."""
        return sample_clients(
            self.client_to_node, self.federation.fraction, self.seed, server_round
        )

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = from_record(arrays)
        self._sampled = self.sample(server_round)
        nodes = [self.client_to_node[c] for c in self._sampled]
        return self.inner.configure_train(server_round, arrays, config, _SampledGrid(grid, nodes))  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_client = sorted((self.node_to_client[m.metadata.src_node_id], m) for m in replies)
        answered = {client for client, _ in by_client}
        failures = [
            Failure(server_round, client, client_error_message(m.error.reason))
            for client, m in by_client
            if m.has_error()
        ]
        failures += [
            Failure(server_round, c, f"no reply within {self.federation.timeout_s:g} s")
            for c in self._sampled
            if c not in answered
        ]
        good = [(client, m) for client, m in by_client if not m.has_error()]
        oracles = [self._strip_oracle(server_round, client, m) for client, m in good]
        oracles = [o for o in oracles if o is not None]
        observations = [self._observe(server_round, client, m) for client, m in good]
        self.on_round(
            RoundTraffic(
                server_round,
                self._sampled,
                tuple(observations),
                tuple(oracles),
                tuple(sorted(failures, key=lambda f: f.client_id)),
            )
        )
        if not good:
            reasons = "; ".join(f"client {f.client_id}: {f.reason}" for f in failures)
            raise AllClientsFailed(
                f"round {server_round}: all {len(self._sampled)} sampled clients failed ({reasons})"
            )
        return self.inner.aggregate_train(server_round, [m for _, m in good])

    def _strip_oracle(self, server_round: int, client_id: int, reply: Message) -> Oracle | None:
        """Remove the oracle record (absent outside simulation) from the reply."""
        record = reply.content.config_records.get(ORACLE_KEY)
        if record is None:
            return None
        del reply.content[ORACLE_KEY]
        return Oracle.from_record(record, server_round, client_id)

    def _observe(self, server_round: int, client_id: int, reply: Message) -> Observation:
        metrics = reply.content[METRICS_KEY]
        return Observation(
            round=server_round,
            client_id=client_id,
            model=self.model,
            global_weights={k: v.clone() for k, v in self._sent.items()},  # type: ignore[union-attr]
            update=from_record(reply.content[ARRAYS_KEY]),
            meta=public_meta(self.federation, int(metrics[NUM_EXAMPLES_KEY])),  # type: ignore[arg-type]
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
