"""Flower's SecAgg+ in the simulation: the server receives only the clients' weighted mean.

Chosen by the federation driver (:mod:`simulator.run.driver`) when a scenario lists an
aggregation defense.
Server: the federation driver's discovery, then Flower's legacy ``DefaultWorkflow`` with the
aggregation defense's fit workflow (:meth:`defenses.base.AggregationDefense.workflow`, Flower's
``SecAggPlusWorkflow``) around :class:`SecAggStrategy`, which reveals nothing for fewer than
the defense's ``min_clients`` updates. Clients: a NumPyClient that runs
:func:`simulator.federation.client.compute_update`, the Message-API client's own computation,
behind ``secaggplus_mod``, which quantizes, masks and sends its update; the client-mod defenses
wrap that computation as they wrap the Message-API client's.

What the strategy receives (flwr 1.41, ``SecAggPlusWorkflow.unmask_stage``): one FitRes per
client that sent a masked vector, with that client's ``num_examples`` and metrics, but with
``parameters`` replaced by the unmasked aggregate, the same object for all of them. So
``aggregate_fit`` is the only place the server sees update data, and it is the aggregate.

Ground truth: the clients write it to the simulation's truth store, as under the Message API
(:mod:`simulator.federation.truth`); nothing but the masked update and its example count
travels, so the server's only view of update data is the aggregate.

A malicious server may send manipulated models (``manipulate``, as in the Interceptor): each
client's FitIns then carries its own weights and a scenario describing them. The aggregate of
such a round is observed against the weighted mean of what was sent and, unless the
manipulation says otherwise, not applied to the global model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow

from defenses.base import AggregationDefense
from simulator.core.config import Scenario
from simulator.core.models import ModelSpec, SentModel, build_model
from simulator.core.protocol import ROUND_KEY, SCENARIO_KEY
from simulator.data.shards import shard_size
from simulator.federation.client import compute_update
from simulator.federation.client_app import identify
from simulator.federation.client_mods import (
    client_defense_mods,
    client_id_of,
    seeded_numpy_mod,
)
from simulator.federation.interceptor import Manipulate, honest_part, manipulated_scenario
from simulator.federation.strategies import sgd_step
from simulator.federation.traffic import (
    AGGREGATE_CLIENT_ID,
    Failure,
    RoundTraffic,
    TrafficPath,
    all_failed,
    client_error_message,
    public_meta,
)
from simulator.scenario import from_message

Weights = dict[str, torch.Tensor]


class SecAggHalted(RuntimeError):
    """SecAgg+ stopped before unmasking a round (too few clients stayed for the threshold)."""


def parameter_names(spec: ModelSpec) -> list[str]:
    """The model's weight names in state-dict order: legacy Parameters carry no names."""
    return list(build_model(spec).state_dict())


def aggregation_defense(scenario: Scenario) -> AggregationDefense:
    """The scenario's aggregation defense (its check allows one per scenario)."""
    (defense,) = [d for d in scenario.built_defenses if isinstance(d, AggregationDefense)]
    return defense


def largest_weight(scenario: Scenario) -> float:
    """The largest example count a client reports, which SecAgg+ quantizes weights against.

    FedSGD: the batch size (DP-SGD's Poisson batches may exceed it slightly, which Flower
    warns about); FedAvg: the largest shard.
    """
    fed = scenario.federation
    if fed.protocol == "fedsgd":
        return float(fed.batch_size)
    return float(
        max(shard_size(scenario.data, fed.clients, scenario.seed, c) for c in range(fed.clients))
    )


def secagg_workflow(scenario: Scenario) -> SecAggPlusWorkflow:
    """The fit workflow of the scenario's aggregation defense."""
    return aggregation_defense(scenario).workflow(scenario.federation, largest_weight(scenario))


class SecAggStrategy(Strategy):
    """The legacy strategy under SecAgg+: samples clients, observes the aggregate, steps.

    ``aggregate_fit`` turns the unmasked aggregate into ONE :class:`Observation` (client id
    :data:`AGGREGATE_CLIENT_ID`) and hands it through the one :class:`TrafficPath` to
    ``on_round``; ``evaluate`` calls ``evaluate_fn`` (the driver's global test).
    """

    def __init__(
        self,
        scenario: Scenario,
        node_to_client: Mapping[int, int],
        initial: Mapping[str, torch.Tensor],
        on_round: Callable[[RoundTraffic], None],
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord],
        manipulate: Manipulate | None = None,
    ) -> None:
        self.scenario = scenario
        self.manipulate = manipulate
        self.node_to_client = dict(node_to_client)
        self.client_to_node = {c: n for n, c in self.node_to_client.items()}
        self.initial = {k: v.detach().clone() for k, v in initial.items()}
        self.evaluate_fn = evaluate_fn
        self.min_clients = aggregation_defense(scenario).min_clients
        self.path = TrafficPath(
            self.client_to_node,
            scenario.federation,
            scenario.model,
            scenario.seed,
            on_round,
        )
        self._unmasked: set[int] = set()
        # Rounds with manipulated models: if clients refuse them and SecAgg+ never unmasks,
        # the round is lost (the global model stays), not the point.
        self._manipulated: set[int] = set()

    def _named(
        self, arrays: Sequence[np.ndarray], like: Mapping[str, torch.Tensor] | None = None
    ) -> Weights:
        """Legacy (unnamed) arrays as named tensors typed like the model's weights (or ``like``)."""
        reference = self.initial if like is None else like
        return {
            name: torch.from_numpy(np.asarray(array)).to(template.dtype)
            for (name, template), array in zip(reference.items(), arrays, strict=True)
        }

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([t.numpy() for t in self.initial.values()])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The seeded sample of clients (as the Interceptor draws it), each sent the scenario."""
        sent = self._named(parameters_to_ndarrays(parameters))
        sampled = self.path.open_round(server_round, sent)
        offers = dict(self.manipulate(server_round, sampled, sent)) if self.manipulate else {}
        self.path.offer(offers)
        if offers:
            self._manipulated.add(server_round)
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        config: dict[str, Scalar] = {
            SCENARIO_KEY: self.scenario.to_json(),
            ROUND_KEY: server_round,
        }
        fit_ins = FitIns(parameters, config)
        return [
            (
                proxies[self.client_to_node[c]],
                self._fit_ins(offers[c], server_round) if c in offers else fit_ins,
            )
            for c in sampled
        ]

    def _fit_ins(self, offer: SentModel, server_round: int) -> FitIns:
        """The FitIns of a client sent a manipulated model: its weights and its scenario."""
        scenario = manipulated_scenario(self.scenario.to_json(), offer.spec)
        config: dict[str, Scalar] = {SCENARIO_KEY: scenario, ROUND_KEY: server_round}
        arrays = [t.detach().cpu().numpy() for t in offer.weights.values()]
        return FitIns(ndarrays_to_parameters(arrays), config)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Observe the aggregate once, score it against the union of the true batches, step."""
        self._unmasked.add(server_round)
        by_client = sorted(
            ((self.node_to_client[proxy.node_id], res) for proxy, res in results),
            key=lambda pair: pair[0],
        )
        answered = [c for c, _ in by_client]
        dropped = self._failures(server_round, set(answered), failures)
        if len(by_client) < max(self.min_clients, 1):
            # Too few updates: nothing may be revealed, and the global model stays as it was.
            traffic = self.path.close_round(server_round, (), dropped, answered)
            if not by_client:
                raise all_failed(traffic)
            return None, {}
        offers = [self.path.offers[c] for c in answered if c in self.path.offers]
        like = offers[0].weights if offers else None
        aggregate = self._aggregate(by_client, like)
        metas = [public_meta(self.scenario.federation, res.num_examples) for _, res in by_client]
        observation = self.path.observe(
            server_round, AGGREGATE_CLIENT_ID, aggregate, metas, clients=answered
        )
        self.path.close_round(server_round, (observation,), dropped, answered)
        if any(self.path.excluded(c) for c in answered):
            return None, {}  # a manipulated round: the global model stays as it was
        if offers:  # manipulated but aggregated: only the honest model's tensors
            names = honest_part(offers[0], list(self.initial))
            aggregate = {h: aggregate[b] for h, b in zip(self.initial, names, strict=True)}
        sent = {k: v.numpy() for k, v in self.path.sent.items()}
        values = {k: v.numpy() for k, v in aggregate.items()}
        fed = self.scenario.federation
        stepped = sgd_step(sent, values, fed.lr) if fed.protocol == "fedsgd" else values
        return ndarrays_to_parameters(list(stepped.values())), {}

    def _aggregate(
        self, by_client: Sequence[tuple[int, FitRes]], like: Mapping[str, torch.Tensor] | None
    ) -> Weights:
        """The unmasked weighted mean the workflow put into every FitRes."""
        first = by_client[0][1].parameters
        if any(res.parameters.tensors != first.tensors for _, res in by_client):
            raise RuntimeError("SecAgg+ handed the strategy differing (individual) parameters")
        return self._named(parameters_to_ndarrays(first), like)

    def _failures(
        self,
        server_round: int,
        answered: set[int],
        failures: Sequence[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Failure, ...]:
        """Sampled clients whose masked update is missing from the aggregate.

        The workflow reports errors without their node, so a reason is paired with a client
        only when one client dropped out; otherwise all reasons are listed for each.
        """
        missing = [c for c in self.path.sampled if c not in answered]
        reasons = [
            client_error_message(
                getattr(error.args[0], "reason", str(error)), f"round {server_round}"
            )
            for error in failures
            if isinstance(error, BaseException) and error.args
        ]
        reason = "; ".join(reasons) or "no masked update within the SecAgg+ round"
        return tuple(Failure(server_round, c, reason) for c in missing)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # the global model is tested centrally (evaluate)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Test the global model; a round SecAgg+ never unmasked ends the point instead."""
        if server_round > 0 and server_round not in self._unmasked | self._manipulated:
            raise SecAggHalted(
                f"round {server_round}: SecAgg+ halted before unmasking (fewer than 2 clients "
                "sampled, or too few stayed for the reconstruction threshold)"
            )
        weights = self._named(parameters_to_ndarrays(parameters))
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()})
        metrics = self.evaluate_fn(server_round, arrays)
        return float(metrics["test-loss"]), dict(metrics)  # type: ignore[arg-type]


class SecAggClient(NumPyClient):
    """One client under SecAgg+: the Message-API client's computation, legacy types around it.

    Its client-mod defenses run as the Message-API client's do (:func:`client_defense_mods`),
    inside ``secaggplus_mod``, around this ``fit``.
    """

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """The update (masked by secaggplus_mod afterwards), its weight and its metrics."""
        scenario = from_message(str(config[SCENARIO_KEY]))
        names = parameter_names(scenario.model)
        sent = {n: torch.from_numpy(np.array(a)) for n, a in zip(names, parameters, strict=True)}
        result = compute_update(scenario, int(config[ROUND_KEY]), self.client_id, sent)
        metrics: dict[str, Scalar] = dict(result.metrics)
        return [result.update[n].numpy() for n in names], result.num_examples, metrics


def client_fn(context: Context) -> Client:
    return SecAggClient(client_id_of(context)).to_client()


def answer_queries(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer the server's identification query, which a legacy client cannot handle."""
    if msg.metadata.message_type == MessageType.QUERY:
        return identify(msg, context)
    return call_next(msg, context)


# seeded_numpy_mod sits outside secaggplus_mod so that its stochastic rounding repeats; the
# defenses' mods sit inside it, where it passes on only the train message with the model.
app = ClientApp(
    client_fn=client_fn,
    mods=[answer_queries, seeded_numpy_mod, secaggplus_mod, client_defense_mods],
)
