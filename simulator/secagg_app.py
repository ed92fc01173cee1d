"""Flower's SecAgg+ in the simulation: the server receives only the clients' weighted mean.

Chosen by :func:`simulator.engine.run_point` when a scenario lists "secure-aggregation".
Server: :class:`ServerRun`'s discovery, then Flower's legacy ``DefaultWorkflow`` with
``SecAggPlusWorkflow`` as its fit workflow, around :class:`SecAggStrategy`. Clients: a
NumPyClient that runs :func:`simulator.client_app.compute_update`, the Message-API client's
own computation, behind ``secaggplus_mod``, which quantizes, masks and sends its update.

What the strategy receives (flwr 1.41, ``SecAggPlusWorkflow.unmask_stage``): one FitRes per
client that sent a masked vector, with that client's ``num_examples`` and metrics, but with
``parameters`` replaced by the unmasked aggregate, the same object for all of them. So
``aggregate_fit`` is the only place the server sees update data, and it is the aggregate.

Ground truth channel: the FitRes metrics. ``secaggplus_mod`` masks only the parameters; the
metrics travel in the clear in a ConfigRecord (bytes allowed) and the workflow forwards them
to ``aggregate_fit``, which pops the oracle before anything else reads the results, just as
the Message-API interceptor strips its oracle record. It is simulation-only ground truth for
the scorer, never part of what the protocol exposes as the update; a temp-file side channel
would add cleanup and cross-process paths for no gain.
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
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from attacks.observation import Observation
from defenses.secure_aggregation import SecureAggregationParams
from simulator.client_app import compute_update, identify
from simulator.client_defenses import build_defenses
from simulator.client_mods import client_id_of, seeded_numpy_mod
from simulator.interceptor import (
    AGGREGATE_CLIENT_ID,
    AllClientsFailed,
    Failure,
    RoundTraffic,
    aggregate_meta,
    client_error_message,
    public_meta,
    sample_clients,
)
from simulator.messages import ROUND_KEY, SCENARIO_KEY
from simulator.models import ModelSpec, build_model
from simulator.oracle import ORACLE_KEY, Oracle
from simulator.scenario import Scenario
from simulator.server_app import ServerRun
from simulator.strategies import sgd_step
from simulator.task import shard_size

Weights = dict[str, torch.Tensor]


class SecAggHalted(RuntimeError):
    """SecAgg+ stopped before unmasking a round (too few clients stayed for the threshold)."""


def parameter_names(spec: ModelSpec) -> list[str]:
    """The model's weight names in state-dict order: legacy Parameters carry no names."""
    return list(build_model(spec).state_dict())


def secagg_params(scenario: Scenario) -> SecureAggregationParams:
    """The scenario's "secure-aggregation" parameters."""
    (defense,) = [d for d in build_defenses(scenario) if d.name == "secure-aggregation"]
    return defense.params  # type: ignore[no-any-return]


def max_weight(scenario: Scenario) -> float:
    """The largest example count a client reports, unless the defense sets it.

    SecAgg+ quantizes each weight relative to it: too large costs precision, too small
    overflows. FedSGD: the batch size (DP-SGD's Poisson batches may exceed it slightly, which
    Flower warns about); FedAvg: the largest shard.
    """
    fed, params = scenario.federation, secagg_params(scenario)
    if params.max_weight is not None:
        return params.max_weight
    if fed.protocol == "fedsgd":
        return float(fed.batch_size)
    return float(
        max(shard_size(scenario.data, fed.clients, scenario.seed, c) for c in range(fed.clients))
    )


def secagg_workflow(scenario: Scenario) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the defense's parameters (shares as fractions)."""
    params = secagg_params(scenario)
    return SecAggPlusWorkflow(
        num_shares=params.num_shares,
        reconstruction_threshold=params.reconstruction_threshold,
        max_weight=max_weight(scenario),
        clipping_range=params.clipping_range,
        quantization_range=params.quantization_range,
        timeout=scenario.federation.timeout_s,
    )


class SecAggStrategy(Strategy):
    """The legacy strategy under SecAgg+: samples clients, observes the aggregate, steps.

    ``aggregate_fit`` turns the unmasked aggregate into ONE :class:`Observation` (client id
    :data:`AGGREGATE_CLIENT_ID`) and hands it with the clients' oracles to ``on_round``
    (``ServerRun.intercept``); ``evaluate`` calls ``evaluate_fn`` (``ServerRun.evaluate_round``).
    """

    def __init__(
        self,
        scenario: Scenario,
        node_to_client: Mapping[int, int],
        initial: Mapping[str, torch.Tensor],
        on_round: Callable[[RoundTraffic], None],
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord],
    ) -> None:
        self.scenario = scenario
        self.node_to_client = dict(node_to_client)
        self.client_to_node = {c: n for n, c in self.node_to_client.items()}
        self.initial = {k: v.detach().clone() for k, v in initial.items()}
        self.on_round = on_round
        self.evaluate_fn = evaluate_fn
        self.min_clients = secagg_params(scenario).min_clients
        self._sent: Weights = {}
        self._sampled: tuple[int, ...] = ()
        self._unmasked: set[int] = set()

    def _named(self, arrays: Sequence[np.ndarray]) -> Weights:
        """Legacy (unnamed) arrays as named tensors typed like the model's weights."""
        return {
            name: torch.from_numpy(np.asarray(array)).to(like.dtype)
            for (name, like), array in zip(self.initial.items(), arrays, strict=True)
        }

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([t.numpy() for t in self.initial.values()])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The seeded sample of clients (as the Interceptor draws it), each sent the scenario."""
        fed = self.scenario.federation
        self._sent = self._named(parameters_to_ndarrays(parameters))
        self._sampled = sample_clients(
            self.client_to_node, fed.fraction, self.scenario.seed, server_round
        )
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        config: dict[str, Scalar] = {
            SCENARIO_KEY: self.scenario.to_json(),
            ROUND_KEY: server_round,
        }
        fit_ins = FitIns(parameters, config)
        return [(proxies[self.client_to_node[c]], fit_ins) for c in self._sampled]

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
        oracles = tuple(self._strip_oracle(server_round, c, res) for c, res in by_client)
        dropped = self._failures(server_round, {c for c, _ in by_client}, failures)
        if len(by_client) < max(self.min_clients, 1):
            # Too few updates: nothing may be revealed, and the global model stays as it was.
            self.on_round(RoundTraffic(server_round, self._sampled, (), (), dropped))
            if not by_client:
                reasons = "; ".join(f"client {f.client_id}: {f.reason}" for f in dropped)
                raise AllClientsFailed(
                    f"round {server_round}: all {len(self._sampled)} sampled clients failed "
                    f"({reasons})"
                )
            return None, {}
        aggregate = self._aggregate(by_client)
        metas = [public_meta(self.scenario.federation, res.num_examples) for _, res in by_client]
        observation = Observation(
            round=server_round,
            client_id=AGGREGATE_CLIENT_ID,
            model=self.scenario.model_spec(),
            global_weights={k: v.clone() for k, v in self._sent.items()},
            update=aggregate,
            meta=aggregate_meta(metas),
        )
        self.on_round(RoundTraffic(server_round, self._sampled, (observation,), oracles, dropped))
        sent = {k: v.numpy() for k, v in self._sent.items()}
        values = {k: v.numpy() for k, v in aggregate.items()}
        fed = self.scenario.federation
        stepped = sgd_step(sent, values, fed.lr) if fed.protocol == "fedsgd" else values
        return ndarrays_to_parameters(list(stepped.values())), {}

    def _aggregate(self, by_client: Sequence[tuple[int, FitRes]]) -> Weights:
        """The unmasked weighted mean the workflow put into every FitRes."""
        first = by_client[0][1].parameters
        if any(res.parameters.tensors != first.tensors for _, res in by_client):
            raise RuntimeError("SecAgg+ handed the strategy differing (individual) parameters")
        return self._named(parameters_to_ndarrays(first))

    def _strip_oracle(self, server_round: int, client_id: int, res: FitRes) -> Oracle:
        payload = res.metrics.pop(ORACLE_KEY)
        return Oracle.from_bytes(bytes(payload), server_round, client_id)  # type: ignore[arg-type]

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
        missing = [c for c in self._sampled if c not in answered]
        reasons = [
            client_error_message(getattr(error.args[0], "reason", str(error)))
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
        if server_round > 0 and server_round not in self._unmasked:
            raise SecAggHalted(
                f"round {server_round}: SecAgg+ halted before unmasking (fewer than 2 clients "
                "sampled, or too few stayed for the reconstruction threshold)"
            )
        weights = self._named(parameters_to_ndarrays(parameters))
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()})
        metrics = self.evaluate_fn(server_round, arrays)
        return float(metrics["test-loss"]), dict(metrics)  # type: ignore[arg-type]


def make_secagg_server_app(run: ServerRun) -> ServerApp:
    """A ServerApp running ``run``'s scenario through Flower's SecAgg+ legacy workflow."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        scenario = run.scenario
        strategy = SecAggStrategy(
            scenario, run.discover(grid), run.initial_weights(), run.intercept, run.evaluate_round
        )
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=scenario.federation.rounds), strategy=strategy
        )
        DefaultWorkflow(fit_workflow=secagg_workflow(scenario))(grid, legacy)
        run.finish()

    return server_app


class SecAggClient(NumPyClient):
    """One client under SecAgg+: the Message-API client's computation, legacy types around it."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """The update (masked by secaggplus_mod afterwards), its weight, metrics and oracle."""
        scenario = Scenario.from_json(str(config[SCENARIO_KEY]))
        names = parameter_names(scenario.model_spec())
        sent = {n: torch.from_numpy(np.array(a)) for n, a in zip(names, parameters, strict=True)}
        result = compute_update(scenario, int(config[ROUND_KEY]), self.client_id, sent)
        metrics: dict[str, Scalar] = {**result.metrics, ORACLE_KEY: result.oracle.to_bytes()}
        return [result.update[n].numpy() for n in names], result.num_examples, metrics


def client_fn(context: Context) -> Client:
    return SecAggClient(client_id_of(context)).to_client()


def answer_queries(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer the server's identification query, which a legacy client cannot handle."""
    if msg.metadata.message_type == MessageType.QUERY:
        return identify(msg, context)
    return call_next(msg, context)


# seeded_numpy_mod sits outside secaggplus_mod so that its stochastic rounding repeats.
app = ClientApp(client_fn=client_fn, mods=[answer_queries, seeded_numpy_mod, secaggplus_mod])
