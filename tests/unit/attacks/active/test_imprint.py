"""The imprint attack and its block: exact recovery where the guarantee says, on real digits.

Updates are computed as a client computes them, on the model the attack's ``manipulate`` sends
(MNIST training digits private, test digits public).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attacks.active.base import predicted_share, principal_directions, quantile_thresholds
from attacks.active.decoding import chains_of
from attacks.active.imprint import Imprint, ImprintParams, auto_directions
from simulator.core.models import IMPRINT, build_model, model_spec
from simulator.core.registry import ATTACKS
from tests.unit.attacks.active.helpers import (
    LABELS,
    PRIVATE,
    PUBLIC,
    SPEC,
    armed,
    fedavg,
    fedsgd,
    plan,
    psnrs,
)


def bins_of(attack: Imprint, images: torch.Tensor) -> torch.Tensor:
    """Each image's bin in the single chain of a one-direction block."""
    offer = armed(attack).manipulate(plan())[0]
    weight = offer.weights[f"{IMPRINT}.encoder.weight"]
    bias = offer.weights[f"{IMPRINT}.encoder.bias"]
    (chain,) = chains_of(weight, bias, torch.arange(weight.shape[0]))
    return chain.bin_of(images.flatten(1).double())


def one_per_bin(attack: Imprint, count: int) -> torch.Tensor:
    """Indices of ``count`` private digits that all fall in different bins."""
    bins = bins_of(attack, PRIVATE)
    chosen: dict[int, int] = {}
    for index, b in enumerate(bins.tolist()):
        chosen.setdefault(b, index)
        if len(chosen) == count:
            break
    return torch.tensor(list(chosen.values()))


def test_the_block_is_the_identity_until_the_server_sets_it() -> None:
    spec = dataclasses.replace(SPEC, imprint_bins=32)
    model = build_model(spec, seed=3)
    honest = build_model(SPEC, seed=3)
    names = list(model.state_dict())
    block = [f"{IMPRINT}.{part}" for part in ("encoder.weight", "encoder.bias")]
    block += [f"{IMPRINT}.{part}" for part in ("decoder.weight", "decoder.bias")]
    assert names[:4] == block
    # the model behind keeps its names and (seeded) weights
    for name, value in honest.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
    assert torch.allclose(model(PRIVATE[:4]), honest(PRIVATE[:4]))


def test_a_planted_batch_with_one_input_per_bin_is_recovered_exactly() -> None:
    attack = Imprint(ImprintParams(bins=64, directions=1))
    index = one_per_bin(attack, 24)
    offer = armed(attack).manipulate(plan(samples=24))[0]
    obs = fedsgd(offer, PRIVATE[index], LABELS[index])
    (reconstruction,) = attack.run([obs])
    assert reconstruction.images.shape[0] == 24
    assert bool((psnrs(reconstruction.images, PRIVATE[index]) >= 60).all())
    assert reconstruction.predicted_share == pytest.approx(predicted_share(64, 24))


def test_inputs_sharing_a_bin_are_lost_with_one_direction_and_peeled_with_two() -> None:
    single = Imprint(ImprintParams(bins=64, directions=1))
    bins = bins_of(single, PRIVATE)
    first = int(torch.nonzero(bins == bins[0]).flatten()[1])  # another digit in digit 0's bin
    others = one_per_bin(single, 40)
    others = others[(bins[others] != bins[0])][:14]
    index = torch.cat([torch.tensor([0, first]), others])
    truth = PRIVATE[index]
    offer = armed(single).manipulate(plan(samples=16))[0]
    found = psnrs(single.run([fedsgd(offer, truth, LABELS[index])])[0].images, truth) >= 60
    assert found.tolist() == [False, False] + [True] * 14  # exactly the guarantee's cases
    double = Imprint(ImprintParams(bins=64, directions=2))
    offer = armed(double).manipulate(plan(samples=16))[0]
    recovered = psnrs(double.run([fedsgd(offer, truth, LABELS[index])])[0].images, truth) >= 60
    assert int(recovered.sum()) >= 15


def test_a_random_batch_beats_the_guarantee_and_stays_quick() -> None:
    attack = Imprint(ImprintParams(bins=256))
    offer = armed(attack).manipulate(plan(samples=64))[0]
    assert "2 direction(s)" in offer.change
    shares = []
    for start in range(0, 256, 64):
        obs = fedsgd(offer, PRIVATE[start : start + 64], LABELS[start : start + 64])
        (reconstruction,) = attack.run([obs])
        assert reconstruction.trace[-1]["seconds"] < 5.0
        found = psnrs(reconstruction.images, PRIVATE[start : start + 64]) >= 60
        shares.append(float(found.double().mean()))
    assert sum(shares) / len(shares) >= predicted_share(256, 64) - 0.02


def test_fedavg_with_one_local_step_reads_the_whole_local_dataset() -> None:
    attack = Imprint(ImprintParams(bins=256))
    offer = armed(attack).manipulate(plan(samples=32, protocol="fedavg"))[0]
    obs = fedavg(offer, PRIVATE[:32], LABELS[:32], batch=32)
    found = psnrs(attack.run([obs])[0].images, PRIVATE[:32]) >= 60
    assert float(found.float().mean()) >= 0.8


def test_public_bins_have_equal_mass_and_directions_follow_the_load() -> None:
    units = principal_directions(PUBLIC, 2)
    assert torch.allclose(units @ units.T, torch.eye(2, dtype=torch.float64), atol=1e-9)
    cuts = quantile_thresholds(PUBLIC.flatten(1).double() @ units[0], 8)
    assert bool((cuts[1:] > cuts[:-1]).all())
    mass = torch.bincount(
        torch.searchsorted(cuts, (PUBLIC.flatten(1).double() @ units[0]).contiguous(), right=True)
        - 1,
        minlength=8,
    )
    assert int(mass.min()) >= len(PUBLIC) // 8 - 1
    assert [auto_directions(256, n) for n in (8, 64, 256, 0)] == [3, 2, 1, 1]


def test_an_unmanipulated_observation_is_refused_in_one_line() -> None:
    offer = armed(Imprint(ImprintParams(bins=16))).manipulate(plan())[0]
    honest = dataclasses.replace(fedsgd(offer, PRIVATE[:4], LABELS[:4]), model=SPEC)
    with pytest.raises(ValueError, match="has none") as error:
        Imprint().run([honest])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "params", "fragments"),
    [
        ("imprint", {"bins": 1}, ["'bins'", "1", "[2"]),
        ("imprint", {"bins": 2.5}, ["'bins'", "2.5", "int"]),
        ("imprint", {"directions": 9}, ["'directions'", "9", "8]"]),
        ("imprint", {"gain": 0}, ["'gain'", "(0.0"]),
        ("imprint", {"bns": 64}, ["'bns'", "allowed parameters", "'bins'"]),
        ("imprint", {"clients": 3}, ["'clients'", "list"]),
        ("trap-weights", {"activation": 0.9}, ["'activation'", "0.9", "0.5]"]),
        ("client-separation", {"strength": -1.0}, ["'strength'", "-1.0"]),
        ("client-separation", {"aggregate": "yes"}, ["'aggregate'", "'yes'", "bool"]),
    ],
)
def test_bad_attack_params_get_one_line_errors(
    name: str, params: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as error:
        ATTACKS.create(name, params)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_an_imprint_block_fits_any_model_in_front() -> None:
    spec = model_spec("cnn", channels=(4,))
    attack = Imprint(ImprintParams(bins=32, directions=1))
    offer = armed(attack).manipulate(plan(spec=spec, samples=4))[0]
    assert "model.0.weight" not in offer.weights and "0.weight" in offer.weights
    index = one_per_bin(Imprint(ImprintParams(bins=32, directions=1)), 4)
    obs = fedsgd(offer, PRIVATE[index], LABELS[index])
    assert bool((psnrs(attack.run([obs])[0].images, PRIVATE[index]) >= 60).all())
