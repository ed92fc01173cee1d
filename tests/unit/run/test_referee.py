"""simulator.run.referee and .seal: attacks first, truth afterwards (opened by the scorer
alone), every failure recorded."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from benchmarks.bench_noise_aware import observation as noised_observation
from simulator.core.models import build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta, Truth
from simulator.core.records import Record
from simulator.federation.traffic import AGGREGATE_CLIENT_ID, RoundTraffic
from simulator.federation.truth import TruthKey, TruthStore
from simulator.run.privacy import PrivacyLedger
from simulator.run.referee import Referee, RefereedRound, Tap
from simulator.run.seal import Scorer, point_store
from simulator.scenario import load


def batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


def referee(
    overrides: dict, store: TruthStore | None, records: list[Record], taps: Sequence[Tap] = ()
) -> Referee:
    """A referee whose judge is a scorer holding ``store``'s key (point 0)."""
    scenario = load("quickstart", overrides)
    ledger = PrivacyLedger(scenario)
    if store is None:
        return Referee(scenario, records.append, ledger)
    assert store.key is not None and store.root.name == "point-0"
    scorer = Scorer({0: scenario}, store.key, store.root.parent, records.append, taps=taps)
    return Referee(scenario, records.append, ledger, scorer.take_in_point(0))


def sealed_store(tmp_path: Path) -> TruthStore:
    """Point 0's store in a run's truth folder under ``tmp_path``, with a fresh key."""
    return TruthStore(point_store(tmp_path, 0), key=TruthKey.generate())


def poisoned_observation(client: int = 0) -> Observation:
    spec = model_spec("mlp", widths=(16,), activation="sigmoid")
    weights = {k: v.detach() for k, v in build_model(spec, seed=0).named_parameters()}
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
    return Observation(1, client, spec, weights, poisoned, PublicMeta("fedsgd", 1, 0.1, 1, 1))


def test_a_crashing_attack_is_recorded_and_the_federation_goes_on() -> None:
    records: list[Record] = []
    judge = referee({"attack.name": "analytic"}, None, records)

    def explode(_observations: object) -> list:
        raise RuntimeError("attack blew up")

    judge.servers[0].observe = explode  # type: ignore[method-assign]
    judge.on_round(RoundTraffic(3, (), (), ()))
    assert [r.to_dict() for r in records] == [
        {
            "kind": "attack_error",
            "round": 3,
            "attack": "analytic",
            "error": "RuntimeError: attack blew up",
        }
    ]


@pytest.mark.needs_data  # the referee loads the public test split
def test_a_diverging_attack_is_recorded_as_failed_without_stopping_the_run(
    tmp_path: Path,
) -> None:
    store = sealed_store(tmp_path)
    store.put(Truth(1, 0, batch(1), torch.tensor([2])))
    records: list[Record] = []
    judge = referee({"attack.name": "dlg", "attack.params.iterations": 3}, store, records)
    judge.on_round(RoundTraffic(1, (0,), (poisoned_observation(),), ()))
    (attack,) = [r.to_dict() for r in records if r.kind == "attack"]
    assert attack["status"] == "diverged" and attack["fraction_leaked"] == 0.0
    assert "diverged" in attack["notes"] and math.isfinite(attack["mean_psnr"])
    assert not (store.root / "round-1").exists()  # the round's truth is gone


def test_truth_is_read_only_after_the_attack_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    store = sealed_store(tmp_path)
    real_get = TruthStore.get

    def get(self: TruthStore, server_round: int, client_id: int) -> Truth | None:
        log.append(f"truth {client_id}")
        return real_get(self, server_round, client_id)

    monkeypatch.setattr(TruthStore, "get", get)
    store.put(Truth(1, 0, batch(1), torch.tensor([2])))
    records: list[Record] = []
    judge = referee({"attack.name": "dlg", "attack.params.iterations": 2}, store, records)
    real_observe = judge.servers[0].observe

    def observe(observations: list[Observation]) -> list:
        log.append("attack starts")
        try:
            return real_observe(observations)
        finally:
            log.append("attack returned")

    judge.servers[0].observe = observe  # type: ignore[method-assign]
    judge.on_round(RoundTraffic(1, (0,), (poisoned_observation(),), ()))
    assert log == ["attack starts", "attack returned", "truth 0"]


def test_the_aggregate_is_scored_against_the_union_of_its_participants(tmp_path: Path) -> None:
    store = sealed_store(tmp_path)
    truths = [Truth(1, c, batch(2, seed=c), torch.tensor([c, c])) for c in (0, 1, 3)]
    for truth in truths:
        store.put(truth)
    seen: list[RefereedRound] = []
    judge = referee({}, store, [], taps=[seen.append])
    observation = poisoned_observation(AGGREGATE_CLIENT_ID)
    judge.on_round(RoundTraffic(1, (0, 1, 3), (observation,), ()))
    ((union,),) = [r.truths for r in seen]
    assert union.client_id == AGGREGATE_CLIENT_ID
    assert torch.equal(union.inputs, torch.cat([t.inputs for t in truths]))
    assert union.labels.tolist() == [0, 0, 1, 1, 3, 3]
    assert judge.privacy.participations == {0: 1, 1: 1, 3: 1}


@pytest.mark.needs_data  # the referee loads the public test split
def test_a_noised_update_is_attacked_blind_and_by_the_twin_told_the_noise(
    tmp_path: Path,
) -> None:
    """Under gaussian-noise the referee runs the analytic attack and its twin told the std on
    the same update (a FedSGD batch of 8 at std 1e-5); both are scored, and so is their
    per-image best, and the twin leaks more."""
    std = 1e-5
    observation, images = noised_observation(8, 7, std)  # client 7: 8 of 8 told, 0 blind
    labels = torch.zeros(8, dtype=torch.int64)  # the truth's labels are not scored here
    store = sealed_store(tmp_path)
    store.put(Truth(1, 7, images, labels))
    records: list[Record] = []
    judge = referee({"defenses": [{"name": "gaussian-noise", "std": std}]}, store, records)
    judge.on_round(RoundTraffic(1, (7,), (observation,), ()))
    scored = {r.to_dict()["attack"]: r.to_dict() for r in records if r.kind == "attack"}
    assert sorted(scored) == ["analytic", "analytic knowing gaussian-noise"]
    (best,) = [r.to_dict() for r in records if r.kind == "best"]
    assert best["attacks"] == ["analytic", "analytic knowing gaussian-noise"]
    blind, aware = scored["analytic"], scored["analytic knowing gaussian-noise"]
    assert aware["fraction_leaked"] > blind["fraction_leaked"]
    assert best["fraction_leaked"] >= aware["fraction_leaked"]
