"""The Flower ClientApp: an honest client training on its shard (FedSGD or FedAvg).

Settings arrive in the server's message (``run_simulation`` leaves the run config empty), so
the same app runs under ``leaksim run`` and ``flwr run .``. In simulation the reply also
carries the oracle record (the true batch); the server's interceptor strips it.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simulator.client_defenses import ClientDefenses
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


def client_id_of(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (a real server knows its clients)."""
    record = ConfigRecord({CLIENT_ID_KEY: client_id_of(context)})
    return Message(RecordDict({CONFIG_KEY: record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Compute this client's update for the round and reply with it."""
    torch.set_num_threads(1)  # bit-identical reruns, and no oversubscription of the workers
    config = msg.content[CONFIG_KEY]
    scenario = Scenario.from_json(str(config[SCENARIO_KEY]))
    server_round = int(config[ROUND_KEY])  # type: ignore[arg-type]
    client_id = client_id_of(context)
    faults = scenario.faults
    if client_id in faults.crash_clients and (
        not faults.crash_rounds or server_round in faults.crash_rounds
    ):
        raise InjectedCrash(f"injected crash of client {client_id} in round {server_round}")

    fed = scenario.federation
    spec = scenario.model_spec()
    model = load_weights(build_model(spec), from_record(msg.content[ARRAYS_KEY]))
    shard = load_shard(scenario.data, fed.clients, scenario.seed, client_id)
    generator = seeded_generator(scenario.seed, server_round, client_id)
    defenses = ClientDefenses.from_scenario(scenario)

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

    oracle = Oracle(server_round, client_id, inputs, labels)
    content = RecordDict(
        {
            ARRAYS_KEY: to_record(update),
            METRICS_KEY: MetricRecord(metrics),
            CONFIG_KEY: ConfigRecord({CLIENT_ID_KEY: client_id}),
            ORACLE_KEY: oracle.to_record(),
        }
    )
    return Message(content, reply_to=msg)
