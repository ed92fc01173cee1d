"""PrivacyLedger: a client's epsilon is the accountant's for every DP-SGD step it took.

The reference is written out by hand from the DP-SGD schedule (Poisson rate ``b / n``; one
step per FedSGD participation, ``epochs * ceil(n / b)`` per FedAvg participation) and
dp-accounting's RDP accountant, not from the ledger's own arithmetic.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from dp_accounting import dp_event, privacy_accountant, rdp

from simulator.core.config import Scenario
from simulator.core.protocol import PublicData
from simulator.data.shards import load_test_set, shard_size
from simulator.run.privacy import PrivacyLedger
from simulator.scenario import load
from simulator.scoring.dp_bound import eps_delta_bound, reconstruction_bound

NOISE, DELTA, BATCH = 2.0, 1e-5, 8


def scenario(protocol: str, epochs: int = 1) -> Scenario:
    return load(
        "quickstart",
        {
            "federation.protocol": protocol,
            "federation.local_epochs": epochs,
            "federation.batch_size": BATCH,
            "data.examples_per_client": 100,
            "defenses": [{"name": "dp-sgd", "noise_multiplier": NOISE, "delta": DELTA}],
        },
    )


def accountant_epsilon(rate: float, steps: int) -> float:
    gaussian = dp_event.GaussianDpEvent(NOISE)
    accountant = rdp.RdpAccountant(
        neighboring_relation=privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(dp_event.PoissonSampledDpEvent(rate, gaussian), steps)
    return float(accountant.get_epsilon(DELTA))


@pytest.fixture(scope="module", autouse=True)
def shards_cut() -> None:
    """Cut the shards once (it reads MNIST's 60,000 training labels)."""
    point = scenario("fedsgd")
    shard_size(point.data, point.federation.clients, point.seed, 0)


@pytest.mark.parametrize(("protocol", "epochs"), [("fedsgd", 1), ("fedavg", 1), ("fedavg", 2)])
def test_epsilon_after_k_participations_is_the_accountants_for_the_schedules_steps(
    protocol: str, epochs: int
) -> None:
    point = scenario(protocol, epochs)
    ledger = PrivacyLedger(point)
    participations = {0: 3, 4: 1}
    for client, times in participations.items():
        for _ in range(times):
            ledger.count([client])
    spent = ledger.spent()
    assert spent is not None
    n = shard_size(point.data, point.federation.clients, point.seed, 0)
    assert n == 100
    steps_each = 1 if protocol == "fedsgd" else epochs * math.ceil(n / BATCH)  # 13 an epoch
    expected = {c: accountant_epsilon(BATCH / n, k * steps_each) for c, k in participations.items()}
    assert spent.client == 0 and spent.delta == DELTA
    assert spent.epsilon == pytest.approx(expected[0], rel=1e-12)
    assert spent.mean_epsilon == pytest.approx(sum(expected.values()) / 2, rel=1e-12)


def test_no_epsilon_without_dp_training_or_without_participations() -> None:
    assert PrivacyLedger(load("quickstart")).spent() is None
    assert PrivacyLedger(scenario("fedavg")).spent() is None


def test_the_record_holds_the_reconstruction_bound_its_epsilon_implies() -> None:
    """Against MNIST's test split: the prior baseline is measured, and the bound is the
    smaller of the (epsilon, delta) and RDP bounds for that prior."""
    point = scenario("fedsgd")
    ledger = PrivacyLedger(point)
    for _ in range(3):
        ledger.count([0])
    test = load_test_set(dataclasses.replace(point.data, test_examples=0))
    spent = ledger.spent(lambda: PublicData(test.inputs, test.labels))
    assert spent is not None and spent.prior_baseline is not None and spent.rdp_curve
    assert 0 < spent.prior_baseline < 0.2 and spent.prior_guess
    expected = reconstruction_bound(spent.epsilon, DELTA, spent.rdp_curve, spent.prior_baseline)
    assert spent.reconstruction_bound == pytest.approx(expected)
    assert spent.reconstruction_bound < eps_delta_bound(spent.epsilon, DELTA, spent.prior_baseline)
    assert ledger.spent().reconstruction_bound is None  # no public data, no bound


def test_local_dp_is_charged_one_release_per_participation() -> None:
    point = load(
        "quickstart",
        {
            "federation.protocol": "fedavg",
            "defenses": [{"name": "local-dp", "epsilon": 2.0, "delta": DELTA}],
        },
    )
    ledger = PrivacyLedger(point)
    for _ in range(4):
        ledger.count([1])
    spent = ledger.spent()
    assert spent is not None and spent.client == 1
    multiplier = math.sqrt(2 * math.log(1.25 / DELTA)) / 2.0
    accountant = rdp.RdpAccountant(
        neighboring_relation=privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(dp_event.GaussianDpEvent(multiplier), 4)
    assert spent.epsilon == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-12)
