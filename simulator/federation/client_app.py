"""The Flower ClientApp: an honest client training on its shard (FedSGD or FedAvg).

Settings arrive in the server's message (``run_simulation`` leaves the run config empty), so
the same app runs under ``leaksim run`` and ``flwr run .``. The reply holds the update, the
example count and the client id, and nothing else: the truth behind the update goes to the
simulation's truth store (:mod:`simulator.federation.truth`), never into a message.
:func:`simulator.federation.client.compute_update` is the client's whole computation; the
SecAgg+ client (:mod:`simulator.federation.secagg`) calls it too.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simulator.core.protocol import (
    ARRAYS_KEY,
    CLIENT_ID_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    ROUND_KEY,
    SCENARIO_KEY,
)
from simulator.federation.client import compute_update
from simulator.federation.client_mods import client_defense_mods, client_id_of
from simulator.federation.messages import from_record, to_record
from simulator.scenario import from_message

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (a real server knows its clients)."""
    record = ConfigRecord({CLIENT_ID_KEY: client_id_of(context)})
    return Message(RecordDict({CONFIG_KEY: record}), reply_to=msg)


@app.train(mods=[client_defense_mods])
def train(msg: Message, context: Context) -> Message:
    """Compute this client's update for the round and reply with it.

    The reply holds exactly one ArrayRecord (the update), so Flower's LocalDpMod can wrap it.
    """
    config = msg.content[CONFIG_KEY]
    scenario = from_message(str(config[SCENARIO_KEY]))
    server_round = int(config[ROUND_KEY])  # type: ignore[arg-type]
    client_id = client_id_of(context)
    result = compute_update(scenario, server_round, client_id, from_record(msg.content[ARRAYS_KEY]))
    content = RecordDict(
        {
            ARRAYS_KEY: to_record(result.update),
            METRICS_KEY: MetricRecord(result.metrics),  # type: ignore[arg-type]
            CONFIG_KEY: ConfigRecord({CLIENT_ID_KEY: client_id}),
        }
    )
    return Message(content, reply_to=msg)
