"""The malicious server: one kind of attack, one route for the public data, "none" a no-op."""

from __future__ import annotations

import time

import pytest
import torch

from attacks.active.base import ActiveAttack
from attacks.active.imprint import Imprint
from attacks.base import Attack
from attacks.none import NoAttack
from attacks.server import MaliciousServer
from simulator.core.config import FederationConfig
from simulator.core.models import build_model, model_spec
from simulator.core.protocol import Observation, PublicData, PublicMeta, Reconstruction
from simulator.core.registry import ATTACKS

SPEC = model_spec("mlp", widths=(16,))
HONEST = build_model(SPEC, seed=0).state_dict()
PUBLIC = PublicData(torch.rand(64, 1, 28, 28), torch.arange(64) % 10)


def observation(client: int) -> Observation:
    return Observation(1, client, SPEC, HONEST, HONEST, PublicMeta("fedsgd", 4, 0.1, 1, 4))


def test_active_attacks_are_attacks_in_the_one_registry() -> None:
    assert issubclass(ActiveAttack, Attack)
    for name in ("imprint", "trap-weights", "client-separation"):
        assert issubclass(ATTACKS.entry(name).value, ActiveAttack)
    assert not issubclass(ATTACKS.entry("analytic").value, ActiveAttack)


def test_none_is_the_registered_no_op_and_selects_nothing() -> None:
    loads: list[int] = []

    def public() -> PublicData:
        loads.append(1)
        return PUBLIC

    assert ATTACKS.entry("none").value is NoAttack
    server = MaliciousServer("none", ATTACKS.create("none", {}), public=public)
    assert not server.active
    assert server.targets([observation(0), observation(1)]) == []
    assert server.observe([observation(0)]) == [] and server.seen == [(1, 0)]
    assert loads == []  # nothing attacked: the public data is never loaded


def test_the_server_hands_its_public_data_to_an_active_attack_before_it_plans() -> None:
    server = MaliciousServer(
        "imprint", ATTACKS.create("imprint", {"bins": 8}), public=lambda: PUBLIC
    )
    federation = FederationConfig(clients=2, fraction=1.0, batch_size=4)
    offers = server.manipulate(1, (0, 1), SPEC, HONEST, federation, False)
    attack = server.attack
    assert isinstance(attack, Imprint) and attack.public is not None
    assert attack.public.images is PUBLIC.images  # on the CPU, where the plan is made
    assert sorted(offers) == [0, 1]
    blind = MaliciousServer("imprint", ATTACKS.create("imprint", {"bins": 8}))
    with pytest.raises(ValueError, match="needs the server's public data"):
        blind.manipulate(1, (0,), SPEC, HONEST, federation, False)


def test_an_attack_is_timed_around_its_call_whatever_its_trace_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    analytic = ATTACKS.entry("analytic").value
    honest_run = analytic.run

    def slow_run(self: Attack, observations: list[Observation]) -> list[Reconstruction]:
        reconstructions = honest_run(self, observations)
        time.sleep(0.3)
        for reconstruction in reconstructions:
            reconstruction.trace = [{**row, "seconds": 0.001} for row in reconstruction.trace]
            reconstruction.seconds = 0.001  # a claim of its own is replaced too
        return reconstructions

    monkeypatch.setattr(analytic, "run", slow_run)
    server = MaliciousServer("analytic", ATTACKS.create("analytic", {}))
    (reconstruction,) = server.observe([observation(0)])
    assert reconstruction.seconds >= 0.3


def test_an_attack_that_keeps_history_sees_every_round_and_attacks_on_schedule() -> None:
    """One instance for the run: it remembers rounds 1-3 of both clients, attacked or not, and
    reconstructs round 3's updates from all three of each client's."""
    torch.set_num_threads(1)  # many small products: threads cost more than they give
    attack = ATTACKS.create("subspace-rounds", {"starts": 10})
    server = MaliciousServer("subspace-rounds", attack, rounds=(3,))
    small = model_spec("mlp", widths=(16,), input_shape=(1, 8, 8))  # 64 pixels: fast
    honest = build_model(small, seed=0).state_dict()
    generator = torch.Generator().manual_seed(0)
    for server_round in (1, 2, 3):
        observations = [
            Observation(
                server_round, client, small, honest,
                {k: v + torch.randn(v.shape, generator=generator) for k, v in honest.items()},
                PublicMeta("fedsgd", 4, 0.1, 1, 4),
            )
            for client in (0, 1)
        ]  # fmt: skip
        reconstructions = server.observe(observations)
        assert len(reconstructions) == (2 if server_round == 3 else 0)
    assert {c: [s.round for s in seen] for c, seen in attack.history.items()} == {  # type: ignore[attr-defined]
        0: [1, 2, 3],
        1: [1, 2, 3],
    }
    assert all("from 3 update(s)" in r.notes for r in reconstructions)
