"""The Flower ClientApp: an honest client training on its shard (FedSGD or FedAvg).

Settings arrive in the server's message (``run_simulation`` leaves the run config empty), so
the same app runs under ``leaksim run`` and ``flwr run .``. In simulation the reply also
carries the oracle (the true batch, as bytes in a ConfigRecord); the server's interceptor
strips it. :func:`compute_update` is the client's whole computation; the SecAgg+ client
(:mod:`simulator.secagg_app`) calls it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simulator.client_defenses import ClientDefenses
from simulator.client_mods import client_id_of, local_dp_mod
from simulator.messages import (
    ARRAYS_KEY,
    CLIENT_ID_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    SCENARIO_KEY,
    from_record,
    to_record,
)
from simulator.models import build_model
from simulator.oracle import ORACLE_KEY, Oracle
from simulator.scenario import Scenario
from simulator.task import load_shard, load_weights, seeded_generator

app = ClientApp()


class InjectedCrash(RuntimeError):
    """A crash the scenario's ``[faults]`` table asked for."""


@dataclass(frozen=True)
class ClientUpdate:
    """What one client computed in one round: the update, its public metrics, the truth."""

    update: dict[str, torch.Tensor]
    metrics: dict[str, int | float]
    oracle: Oracle

    @property
    def num_examples(self) -> int:
        return int(self.metrics[NUM_EXAMPLES_KEY])


def compute_update(
    scenario: Scenario,
    server_round: int,
    client_id: int,
    global_weights: Mapping[str, torch.Tensor],
) -> ClientUpdate:
    """This client's defended update for ``server_round`` from the global weights it was sent.

    FedSGD: the gradient of one seeded batch; FedAvg: the weights after local training. Raises
    :class:`InjectedCrash` where the scenario's faults say so.
    """
    torch.set_num_threads(1)  # bit-identical reruns, and no oversubscription of the workers
    faults = scenario.faults
    if client_id in faults.crash_clients and (
        not faults.crash_rounds or server_round in faults.crash_rounds
    ):
        raise InjectedCrash(f"injected crash of client {client_id} in round {server_round}")

    fed = scenario.federation
    spec = scenario.model_spec()
    model = load_weights(build_model(spec), global_weights)
    shard = load_shard(scenario.data, fed.clients, scenario.seed, client_id)
    generator = seeded_generator(scenario.seed, server_round, client_id)
    defenses = ClientDefenses.from_scenario(scenario)

    metrics: dict[str, int | float]
    if fed.protocol == "fedsgd":
        batch = defenses.batch(len(shard.labels), fed.batch_size, generator)
        inputs, labels = shard.inputs[batch], shard.labels[batch]
        expected = min(fed.batch_size, len(shard.labels))
        update = defenses.gradient(model, spec, inputs, labels, generator, expected)
        metrics = {NUM_EXAMPLES_KEY: len(labels)}
    else:
        inputs, labels = shard.inputs, shard.labels
        sent = {name: p.detach().clone() for name, p in model.named_parameters()}
        loss = defenses.train(model, spec, shard, fed, generator)
        update = defenses.weights(sent, model, generator)
        metrics = {NUM_EXAMPLES_KEY: len(labels), "train-loss": loss}
    return ClientUpdate(update, metrics, Oracle(server_round, client_id, inputs, labels))


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (a real server knows its clients)."""
    record = ConfigRecord({CLIENT_ID_KEY: client_id_of(context)})
    return Message(RecordDict({CONFIG_KEY: record}), reply_to=msg)


@app.train(mods=[local_dp_mod])
def train(msg: Message, context: Context) -> Message:
    """Compute this client's update for the round and reply with it.

    The reply holds exactly one ArrayRecord (the update), so Flower's LocalDpMod can wrap it.
    """
    config = msg.content[CONFIG_KEY]
    scenario = Scenario.from_json(str(config[SCENARIO_KEY]))
    server_round = int(config[ROUND_KEY])  # type: ignore[arg-type]
    client_id = client_id_of(context)
    result = compute_update(scenario, server_round, client_id, from_record(msg.content[ARRAYS_KEY]))
    content = RecordDict(
        {
            ARRAYS_KEY: to_record(result.update),
            METRICS_KEY: MetricRecord(result.metrics),  # type: ignore[arg-type]
            CONFIG_KEY: ConfigRecord({CLIENT_ID_KEY: client_id}),
            ORACLE_KEY: result.oracle.to_record(),
        }
    )
    return Message(content, reply_to=msg)
