"""Trap weights and the client-separating imprint, on updates computed as clients compute them.

The separation test aggregates the clients' updates exactly as Flower's SecAgg+ does (its own
quantization; the masks cancel), as ``benchmarks/bench_active.py`` does; the integration test
runs a real SecAgg+ round.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.active.separation import ClientSeparation, SeparationParams
from attacks.active.trap_weights import TrapWeights, TrapWeightsParams, first_layer
from benchmarks.bench_active import secagg_view
from simulator.core.models import model_spec
from simulator.core.protocol import Observation, PublicMeta
from tests.unit.attacks.active.helpers import LABELS, PRIVATE, armed, fedsgd, plan, psnrs


def test_trap_weights_recover_most_of_a_batch_of_32_with_labels() -> None:
    attack = TrapWeights(TrapWeightsParams())
    offer = armed(attack).manipulate(plan(samples=32))[0]
    assert offer.spec == plan().spec  # same architecture, re-drawn first layer
    assert "re-drawn" in offer.change
    obs = fedsgd(offer, PRIVATE[:32], LABELS[:32])
    (reconstruction,) = attack.run([obs])
    assert reconstruction.images.shape[0] <= 32
    scores = psnrs(reconstruction.images, PRIVATE[:32])
    assert float((scores >= 60).double().mean()) >= 0.8
    assert reconstruction.labels is not None and reconstruction.confident is not None
    verified = reconstruction.confident
    # verified inputs come with their labels: match each to the true digit it reproduces
    for image, label in zip(
        reconstruction.images[verified], reconstruction.labels[verified], strict=True
    ):
        distance = (PRIVATE[:32] - image).flatten(1).pow(2).mean(1)
        assert int(LABELS[:32][int(distance.argmin())]) == int(label)
    assert reconstruction.trace[-1]["seconds"] < 5.0


def test_trap_weights_refuse_a_model_without_a_dense_first_layer() -> None:
    with pytest.raises(ValueError, match="fully connected") as error:
        armed(TrapWeights()).manipulate(plan(spec=model_spec("cnn", channels=(4,))))
    assert "\n" not in str(error.value)
    assert first_layer(plan().spec).weight == "1.weight"


def test_separation_reads_each_client_out_of_a_secure_aggregate() -> None:
    clients = [0, 1, 2, 3]
    attack = ClientSeparation(SeparationParams(bins=64))
    offers = armed(attack).manipulate(plan(clients, samples=8, secure_aggregation=True))
    assert len({o.spec for o in offers.values()}) == 1  # one architecture for the secure sum
    assert offers[0].spec.imprint_bins == 64 * 4
    updates, truths = [], []
    for c in clients:
        index = torch.arange(8) + 8 * c
        obs = fedsgd(offers[c], PRIVATE[index], LABELS[index], client=c)
        updates.append(obs.update)
        truths.append(PRIVATE[index])
    np.random.seed(0)
    aggregate = secagg_view(updates, [8] * 4, 8.0)
    sent = {
        k: torch.stack([offers[c].weights[k].double() for c in clients]).mean(0).float()
        for k in offers[0].weights
    }
    meta = PublicMeta("fedsgd", 32, 0.1, 1, 32)
    observation = Observation(1, -1, offers[0].spec, sent, aggregate, meta)
    (reconstruction,) = attack.run([observation])
    found = psnrs(reconstruction.images, torch.cat(truths)) >= 60
    assert float(found.double().mean()) >= 0.75
    # an individual client's update (no secure aggregation) decodes to that client alone
    (alone,) = attack.run([fedsgd(offers[2], truths[2], LABELS[16:24], client=2)])
    assert float((psnrs(alone.images, truths[2]) >= 60).double().mean()) >= 0.75
