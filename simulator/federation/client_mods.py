"""Client mods of ours around Flower's: the scenario's client-mod defenses, seeded numpy.

The scenario arrives in each train message, so the ClientApp cannot pick its mods when it is
built; :func:`client_defense_mods` reads the scenario and runs the ``mod()`` of each of its
:class:`defenses.base.ClientModDefense` (Flower's LocalDpMod for "local-dp", "inspection"), in
the scenario's order, around the train function. Both clients use it: the Message-API one
around its ``train``, the SecAgg+ one inside ``secaggplus_mod`` around its ``fit`` (a legacy
fit message there). Flower's mods draw from numpy's global generator (LocalDpMod's noise,
SecAgg+'s stochastic quantization); a Ray worker handles one message at a time, so seeding that
generator from (seed, round, client) around the call and restoring it afterwards makes them
repeat across reruns without disturbing anything else in the process.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from defenses.base import ClientModDefense
from simulator.core.config import Scenario
from simulator.core.protocol import CONFIG_KEY, ROUND_KEY, SCENARIO_KEY
from simulator.core.seeding import seeded_numpy
from simulator.scenario import from_message

# Where flwr.compat puts a legacy FitIns' config (the SecAgg+ workflow's train messages).
FITINS_CONFIG_KEY = "fitins.config"


def client_id_of(context: Context) -> int:
    """This node's client id: its partition id in the simulation."""
    return int(context.node_config["partition-id"])


def message_scenario(msg: Message) -> tuple[Scenario, int] | None:
    """The scenario and round a train message carries (ours or a legacy FitIns), else None."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return None
    for key in (CONFIG_KEY, FITINS_CONFIG_KEY):
        config = msg.content.config_records.get(key)
        if config is not None and SCENARIO_KEY in config:
            return from_message(str(config[SCENARIO_KEY])), int(config[ROUND_KEY])  # type: ignore[arg-type]
    return None


def seeded_numpy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the rest of the chain with numpy seeded from (seed, round, client) when known."""
    found = message_scenario(msg)
    if found is None:
        return call_next(msg, context)
    scenario, server_round = found
    with seeded_numpy(scenario.seed, server_round, client_id_of(context)):
        return call_next(msg, context)


def client_defense_mods(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The scenario's client-mod defenses around the train function, first listed outermost."""
    found = message_scenario(msg)
    if found is None:
        return call_next(msg, context)
    scenario, server_round = found
    mods = [d.mod() for d in scenario.built_defenses if isinstance(d, ClientModDefense)]
    if not mods:
        return call_next(msg, context)

    def chain(index: int) -> ClientAppCallable:
        if index == len(mods):
            return call_next
        return lambda m, c: mods[index](m, c, chain(index + 1))

    with seeded_numpy(scenario.seed, server_round, client_id_of(context)):
        return chain(0)(msg, context)
