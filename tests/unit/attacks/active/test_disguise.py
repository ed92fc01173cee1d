"""Disguised active models (trap neurons at honest scale beside honest rows, an imprint folded
into the first layer) against both inspections: they pass the tensor-wide one and still leak;
the per-row one refuses them."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from attacks.active.base import ActiveAttack
from attacks.active.imprint import Imprint, ImprintParams
from attacks.active.trap_weights import TrapWeights, TrapWeightsParams
from defenses.inspection import difference, row_outlier
from simulator.core.models import SentModel, build_model, model_spec
from tests.unit.attacks.active.helpers import LABELS, PRIVATE, armed, fedsgd, plan, psnrs

QUICKSTART = model_spec("mlp", widths=(256,), activation="relu")  # the quickstart's MLP


def arrays(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in weights.items()}


@cache
def disguised(name: str) -> tuple[ActiveAttack, SentModel]:  # type: ignore[type-arg]
    """The disguised attack and the model it sends a client of 32 samples (made once)."""
    attack: ActiveAttack  # type: ignore[type-arg]
    if name == "trap-weights":
        attack = armed(TrapWeights(TrapWeightsParams(row_scale="honest", honest_rows=0.5)))
    else:
        attack = armed(Imprint(ImprintParams(bins=128, placement="first-layer")))
    return attack, attack.manipulate(plan(samples=32, spec=QUICKSTART))[0]


@pytest.mark.parametrize("name", ["trap-weights", "imprint"])
def test_a_disguised_model_passes_the_tensor_check_leaks_and_fails_the_row_check(
    name: str,
) -> None:
    attack, offer = disguised(name)
    honest = build_model(QUICKSTART, seed=0).state_dict()
    assert offer.spec == QUICKSTART and set(offer.weights) == set(honest)  # nothing added
    assert "disguised" in offer.change or "folded" in offer.change
    assert difference(arrays(offer.weights), arrays(honest), 4.0) is None  # today's check
    (reconstruction,) = attack.run([fedsgd(offer, PRIVATE[:32], LABELS[:32])])
    leaked = float((psnrs(reconstruction.images, PRIVATE[:32]) >= 60).double().mean())
    assert leaked >= 0.9  # measured: 31 of 32 (trap weights), 32 of 32 (folded imprint)
    reason = row_outlier(arrays(offer.weights), 4.0, 0.99)
    assert reason is not None and reason.startswith("1.weight: row")


def test_folded_bins_are_refused_as_parallel_rows_whatever_their_scale() -> None:
    _, offer = disguised("imprint")
    reason = row_outlier(arrays(offer.weights), 1e6, 0.99)  # scale check out of the way
    assert reason is not None and "are parallel" in reason


def test_undisguised_defaults_send_what_they_sent() -> None:
    trap = armed(TrapWeights()).manipulate(plan(samples=32, spec=QUICKSTART))[0]
    assert (
        trap.change
        == "first layer re-drawn: 256 trap neurons, each firing for 0.0625 of public inputs"
    )


def test_a_folded_imprint_needs_enough_first_layer_neurons() -> None:
    attack = armed(Imprint(ImprintParams(bins=512, placement="first-layer")))
    with pytest.raises(ValueError, match="512 bins") as error:
        attack.manipulate(plan(spec=QUICKSTART))
    assert "\n" not in str(error.value)
