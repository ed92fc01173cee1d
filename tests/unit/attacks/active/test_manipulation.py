"""The manipulation hook: who gets a manipulated model, what is observed, what is aggregated.

The malicious server picks rounds and clients; the traffic path observes each update against
what its client was sent and tells the strategy which replies stay out of aggregation. Every
other client's observation is the honest global model's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attacks.server import MaliciousServer
from simulator.core.config import FederationConfig
from simulator.core.models import SentModel, build_model
from simulator.core.protocol import Observation, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.federation.traffic import AGGREGATE_CLIENT_ID, TrafficPath
from tests.unit.attacks.active.helpers import PUBLIC_DATA, SPEC

FEDERATION = FederationConfig(clients=5, fraction=1.0, batch_size=4)
HONEST = build_model(SPEC, seed=0).state_dict()


def server(**params: object) -> MaliciousServer:
    return MaliciousServer(
        "imprint",
        ATTACKS.create("imprint", {"bins": 16, **params}),
        rounds=(2,),
        public=lambda: PUBLIC_DATA,
    )


def manipulate(malicious: MaliciousServer, server_round: int, secagg: bool = False) -> dict:
    return malicious.manipulate(server_round, (0, 1, 3), SPEC, HONEST, FEDERATION, secagg)


def observation(client: int, server_round: int = 2) -> Observation:
    meta = PublicMeta("fedsgd", 4, 0.1, 1, 4)
    return Observation(server_round, client, SPEC, HONEST, HONEST, meta)


def test_only_the_named_rounds_and_clients_get_a_manipulated_model() -> None:
    malicious = server(clients=[1, 3, 4])
    assert malicious.active
    assert manipulate(malicious, 1) == {}
    offers = manipulate(malicious, 2)
    assert sorted(offers) == [1, 3]  # client 4 was not sampled
    for offer in offers.values():
        assert offer.spec.imprint_bins == 16 and not offer.aggregate
        assert "imprint block added" in offer.change
        body = {k: v for k, v in offer.weights.items() if not k.startswith("imprint.")}
        assert all(torch.equal(body[k], HONEST[k]) for k in HONEST)
    assert malicious.manipulated == {2: frozenset({1, 3})}
    # only updates computed on manipulated models are attacked
    targets = malicious.targets([observation(0), observation(1), observation(3)])
    assert [o.client_id for o in targets] == [1, 3]
    assert malicious.targets([observation(1, server_round=1)]) == []


def test_a_passive_attack_manipulates_nothing() -> None:
    malicious = MaliciousServer("analytic", ATTACKS.create("analytic", {}), rounds=(2,))
    assert not malicious.active
    assert manipulate(malicious, 2) == {}
    assert len(malicious.targets([observation(0), observation(1)])) == 2


def test_under_secure_aggregation_a_new_architecture_must_go_to_everyone() -> None:
    with pytest.raises(ValueError, match="every sampled client") as error:
        manipulate(server(clients=[1]), 2, secagg=True)
    assert "\n" not in str(error.value)
    assert sorted(manipulate(server(), 2, secagg=True)) == [0, 1, 3]


def test_observations_hold_what_each_client_was_sent() -> None:
    path = TrafficPath(range(5), FEDERATION, SPEC, seed=0, on_round=lambda _t: None)
    assert path.open_round(1, HONEST) == (0, 1, 2, 3, 4)
    block = dataclasses.replace(SPEC, imprint_bins=16)
    sent = SentModel(block, build_model(block, seed=1).state_dict(), "test")
    path.offer({2: sent})
    meta = PublicMeta("fedsgd", 4, 0.1, 1, 4)
    honest = path.observe(1, 1, HONEST, [meta])
    manipulated = path.observe(1, 2, sent.weights, [meta])
    assert honest.model == SPEC
    assert all(torch.equal(honest.global_weights[k], HONEST[k]) for k in HONEST)
    assert manipulated.model == block
    assert all(torch.equal(manipulated.global_weights[k], v) for k, v in sent.weights.items())
    assert path.excluded(2) and not path.excluded(1)
    with pytest.raises(ValueError, match="not sampled"):
        path.offer({7: sent})
    path.open_round(2, HONEST)
    assert path.offers == {} and not path.excluded(2)


def test_an_aggregate_is_observed_against_the_mean_of_what_was_sent() -> None:
    path = TrafficPath(range(5), FEDERATION, SPEC, seed=0, on_round=lambda _t: None)
    path.open_round(1, HONEST)
    block = dataclasses.replace(SPEC, imprint_bins=8)
    first, second = (build_model(block, seed=s).state_dict() for s in (1, 2))
    path.offer({0: SentModel(block, first, "a"), 1: SentModel(block, second, "b")})
    metas = [PublicMeta("fedsgd", 4, 0.1, 1, 4), PublicMeta("fedsgd", 4, 0.1, 1, 12)]
    aggregate = path.observe(1, AGGREGATE_CLIENT_ID, first, metas, clients=[0, 1])
    name = "imprint.encoder.weight"
    expected = 0.25 * first[name].double() + 0.75 * second[name].double()
    assert torch.allclose(aggregate.global_weights[name].double(), expected, atol=1e-6)
    assert aggregate.meta.num_examples == 16
