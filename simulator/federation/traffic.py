"""One round's traffic as the server holds it, built the same way by every strategy.

:class:`TrafficPath` is the one path from a round's replies to what the malicious server and
the referee get: the seeded client sample, the :class:`Observation` a real server holds for
each update, the failures (errors and missing replies), and :class:`RoundTraffic`. The plain
Message-API strategy (:mod:`simulator.federation.interceptor`) and the SecAgg+ strategy
(:mod:`simulator.federation.secagg`) both drive it; only what they observe differs (each
update, or the one aggregate).

A malicious server may send some clients a manipulated model (:meth:`TrafficPath.offer`): their
observations then hold the model and weights those clients were sent, and
:meth:`TrafficPath.excluded` tells the strategy to leave their replies out of aggregation.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from simulator.core.config import FederationConfig
from simulator.core.models import ModelSpec, SentModel
from simulator.core.protocol import Observation, PublicMeta

Weights = dict[str, torch.Tensor]

LOG = logging.getLogger(__name__)

# The client id of an observation that is the aggregate of several clients' updates.
AGGREGATE_CLIENT_ID = -1


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
    """What the server received in one round, sorted by client id (no ground truth)."""

    round: int
    sampled: tuple[int, ...]
    observations: tuple[Observation, ...]
    failures: tuple[Failure, ...]

    @property
    def participants(self) -> tuple[int, ...]:
        """Sampled clients that did not fail: whose data the round used, aggregated or not."""
        failed = {f.client_id for f in self.failures}
        return tuple(c for c in self.sampled if c not in failed)


# The failure reason of an update whose client's Ray actor (its worker process) had died.
# Flower's actor pool keeps a dead actor and hands it later clients too, whose updates then
# fail the same way: a point with such a failure is "degraded" (simulator.run.engine).
CLIENT_PROCESS_DIED = "the client's Ray worker process died (Ray's report: client-errors.log)"
_ACTOR_ERRORS = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError")


def client_error_message(reason: str, where: str = "a client") -> str:
    """One readable line for the error a client's reply carried: the client's own exception
    message out of Ray's wrapped traceback (no pids, no paths), or
    :data:`CLIENT_PROCESS_DIED`. The whole of Ray's text goes to this module's logger, which
    a run sends to ``client-errors.log`` in its folder, headed by ``where``."""
    LOG.debug("%s: %s", where, reason)
    # Flower's simulation writes "<class 'module.Error'>:<'text'>"; Ray names a task's error
    # after its cause, as in "ray.exceptions.RayTaskError(ClientAppException)".
    wrapped = re.fullmatch(r"<class '([^']+)'>:<'(.*)'>", reason.strip(), re.DOTALL)
    kind, body = (
        (wrapped[1].split("(")[0].rsplit(".", 1)[-1], wrapped[2]) if wrapped else ("", reason)
    )
    if wrapped and any(name in wrapped[1] for name in _ACTOR_ERRORS):
        return CLIENT_PROCESS_DIED
    marker = "Message: "
    if marker in body:  # a ClientAppException: the client's own exception's message
        return " ".join(body.rsplit(marker, 1)[1].split()) or "unknown client error"
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "unknown client error"
    return f"{kind}: {text}" if kind else text


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


class TrafficPath:
    """Samples a round's clients, builds its observations and failures, hands them on."""

    def __init__(
        self,
        client_ids: Iterable[int],
        federation: FederationConfig,
        model: ModelSpec,
        seed: int,
        on_round: Callable[[RoundTraffic], None],
    ) -> None:
        self.client_ids = tuple(sorted(client_ids))
        self.federation = federation
        self.model = model
        self.seed = seed
        self.on_round = on_round
        self.sent: Weights = {}
        self.sampled: tuple[int, ...] = ()
        self.offers: dict[int, SentModel] = {}

    def open_round(self, server_round: int, sent: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """Remember the global weights sent and draw this round's clients (seeded, sorted)."""
        self.sent = {k: v.detach().clone() for k, v in sent.items()}
        self.offers = {}
        self.sampled = sample_clients(
            self.client_ids, self.federation.fraction, self.seed, server_round
        )
        return self.sampled

    def offer(self, offers: Mapping[int, SentModel]) -> None:
        """The manipulated models this round's clients get instead of the global weights."""
        unknown = sorted(set(offers) - set(self.sampled))
        if unknown:
            raise ValueError(f"manipulated models for clients {unknown}, who were not sampled")
        self.offers = dict(offers)

    def excluded(self, client_id: int) -> bool:
        """Whether this client's reply stays out of aggregation (it trained a manipulated model)."""
        offer = self.offers.get(client_id)
        return offer is not None and not offer.aggregate

    def sent_to(
        self, client_ids: Sequence[int], weights: Sequence[float]
    ) -> tuple[ModelSpec, Weights]:
        """The model and weights the clients were sent; for several, their weighted mean.

        The aggregate of updates computed on different weights is observed against the mean
        of those weights (with the aggregate's own weights), which is what a FedAvg update's
        change is measured from. The clients must have been sent one architecture.
        """
        sent = [self.offers.get(c) for c in client_ids]
        specs = {o.spec if o is not None else self.model for o in sent}
        if len(specs) != 1:
            raise ValueError(f"clients {list(client_ids)} were sent different architectures")
        tensors = [o.weights if o is not None else self.sent for o in sent]
        if len(tensors) == 1 or all(t is tensors[0] for t in tensors):
            return specs.pop(), {k: v.clone() for k, v in tensors[0].items()}
        share = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        mixed = {
            k: torch.tensordot(share, torch.stack([t[k].double() for t in tensors]), dims=1).to(
                tensors[0][k].dtype
            )
            for k in tensors[0]
        }
        return specs.pop(), mixed

    def observe(
        self,
        server_round: int,
        client_id: int,
        update: Weights,
        metas: Sequence[PublicMeta],
        clients: Sequence[int] = (),
    ) -> Observation:
        """The observation of one update (of an aggregate when ``metas`` has several).

        ``clients``: for an aggregate, whose updates it sums (in ``metas``' order), so that it
        is observed against what they were sent.
        """
        senders = list(clients) if clients else [client_id]
        if any(c in self.offers for c in senders):
            model, sent = self.sent_to(senders, [m.num_examples for m in metas])
        else:
            model, sent = self.model, {k: v.clone() for k, v in self.sent.items()}
        return Observation(
            round=server_round,
            client_id=client_id,
            model=model,
            global_weights=sent,
            update=update,
            meta=aggregate_meta(metas),
        )

    def close_round(
        self,
        server_round: int,
        observations: Sequence[Observation],
        failures: Sequence[Failure],
        answered: Iterable[int],
    ) -> RoundTraffic:
        """Hand the round on; sampled clients neither answering nor failing timed out."""
        seen = set(answered) | {f.client_id for f in failures}
        missing = [
            Failure(server_round, c, f"no reply within {self.federation.timeout_s:g} s")
            for c in self.sampled
            if c not in seen
        ]
        traffic = RoundTraffic(
            server_round,
            self.sampled,
            tuple(sorted(observations, key=lambda o: o.client_id)),
            tuple(sorted([*failures, *missing], key=lambda f: f.client_id)),
        )
        self.on_round(traffic)
        return traffic


def all_failed(traffic: RoundTraffic) -> AllClientsFailed:
    """The error that ends a point whose round had no surviving client."""
    reasons = "; ".join(f"client {f.client_id}: {f.reason}" for f in traffic.failures)
    return AllClientsFailed(
        f"round {traffic.round}: all {len(traffic.sampled)} sampled clients failed ({reasons})"
    )
