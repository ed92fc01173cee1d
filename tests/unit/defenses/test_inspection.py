"""The client-side inspection defense: honest models pass, manipulated ones are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from attacks.active.imprint import Imprint, ImprintParams
from attacks.active.trap_weights import TrapWeights, TrapWeightsParams
from defenses import inspection
from defenses.inspection import Inspection, InspectionParams, ModelRejected
from simulator.core.models import build_model, model_with_weights
from simulator.core.registry import DEFENSES
from simulator.federation.training import batch_gradient
from simulator.scenario import load
from tests.unit.attacks.active.helpers import LABELS, PRIVATE, armed, plan

SCENARIO = load("quickstart", {"model.widths": [64]})


def arrays(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in weights.items()}


def honest_rounds(count: int, lr: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """The global models of ``count`` FedSGD rounds on batches of 8 digits."""
    spec = SCENARIO.model
    weights = build_model(spec, seed=0).state_dict()
    models = [weights]
    for r in range(count - 1):
        model = model_with_weights(spec, weights)
        grad = batch_gradient(model, spec, PRIVATE[8 * r : 8 * r + 8], LABELS[8 * r : 8 * r + 8])
        weights = {k: v - lr * grad[k] for k, v in weights.items()}
        models.append(weights)
    return models


def test_honest_rounds_pass_and_become_the_reference() -> None:
    defense, state = Inspection(InspectionParams()), RecordDict()
    for weights in honest_rounds(12):
        defense.inspect(arrays(weights), state, SCENARIO)
    stored = state.array_records[inspection.REFERENCE_KEY]
    assert np.array_equal(stored["1.weight"].numpy(), arrays(weights)["1.weight"])


@pytest.mark.parametrize("attack", ["imprint", "trap-weights"])
def test_manipulated_models_are_refused_first_round_or_later(attack: str) -> None:
    made = Imprint(ImprintParams(bins=32)) if attack == "imprint" else TrapWeights()
    offer = armed(made).manipulate(plan(spec=SCENARIO.model))[0]
    for history in (0, 3):  # no reference yet (the zoo's architecture), or honest rounds
        defense, state = Inspection(InspectionParams()), RecordDict()
        for weights in honest_rounds(history):
            defense.inspect(arrays(weights), state, SCENARIO)
        with pytest.raises(ModelRejected, match="inspection rejected the model") as error:
            defense.inspect(arrays(offer.weights), state, SCENARIO)
        assert "\n" not in str(error.value)
        reason = "structure differs" if attack == "imprint" else "RMS"
        assert reason in str(error.value)


def test_bad_params_get_one_line_errors() -> None:
    with pytest.raises(ValueError, match="'max_ratio'") as error:
        DEFENSES.create("inspection", {"max_ratio": 1.0})
    assert "\n" not in str(error.value)


def test_a_tensor_shrunk_five_times_is_refused_for_its_rms() -> None:
    reference = {"w": np.full((4, 4), 0.5), "b": np.full(4, 0.1)}
    shrunk = {"w": reference["w"] / 5, "b": reference["b"]}
    reason = inspection.difference(shrunk, reference, max_ratio=4.0)
    assert reason is not None and reason.startswith("w: RMS 0.1 against 0.5")
    with pytest.raises(ModelRejected, match="RMS"):
        Inspection(InspectionParams(max_ratio=4.0)).inspect(shrunk, state_with(reference), SCENARIO)


@pytest.mark.parametrize("factor", [4.0, 0.25])
def test_a_change_of_exactly_max_ratio_either_way_passes(factor: float) -> None:
    reference = {"w": np.full((4, 4), 0.5), "b": np.full(4, 0.125)}
    changed = {k: v * factor for k, v in reference.items()}
    assert inspection.difference(changed, reference, max_ratio=4.0) is None
    beyond = {k: v * factor * (1.01 if factor > 1 else 0.99) for k, v in reference.items()}
    assert inspection.difference(beyond, reference, max_ratio=4.0) is not None


def state_with(reference: dict[str, np.ndarray]) -> RecordDict:
    """A client state whose inspection reference is ``reference``."""
    state = RecordDict()
    state.array_records[inspection.REFERENCE_KEY] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in reference.items()}
    )
    return state


QUICKSTART = load("quickstart")  # the MLP 784-256-10, FedSGD on 3 batches of 8, lr 0.5


def quickstart_rounds(count: int) -> list[dict[str, torch.Tensor]]:
    """The global models of ``count`` honest FedSGD rounds of the quickstart federation: each
    round averages 3 clients' gradients on batches of 8 digits."""
    spec, federation = QUICKSTART.model, QUICKSTART.federation
    weights = build_model(spec, seed=0).state_dict()
    models = [weights]
    for r in range(count - 1):
        grads = []
        for c in range(3):
            batch = slice(24 * r + 8 * c, 24 * r + 8 * c + 8)
            model = model_with_weights(spec, weights)
            grads.append(batch_gradient(model, spec, PRIVATE[batch], LABELS[batch]))
        step = {k: sum(g[k] for g in grads) / 3 for k in weights}
        weights = {k: v - federation.lr * step[k] for k, v in weights.items()}
        models.append(weights)
    return models


def test_row_inspection_passes_a_whole_honest_run_and_refuses_disguised_models() -> None:
    """30 honest rounds pass the row check, inspected every round or only every 7th (a client
    that is rarely sampled); the disguised trap weights and folded imprint sent at round 1
    or 30 pass the tensor-wide check and are refused by the row check."""
    rounds = quickstart_rounds(30)
    strict = Inspection(InspectionParams(rows=True))
    for every in (1, 7):
        state = RecordDict()
        for weights in rounds[::every]:
            strict.inspect(arrays(weights), state, QUICKSTART)  # raises on a false positive
    attacks = [
        armed(TrapWeights(TrapWeightsParams(row_scale="honest", honest_rows=0.5))),
        armed(Imprint(ImprintParams(bins=128, placement="first-layer"))),
    ]
    for attack in attacks:
        for index in (0, 29):
            honest = rounds[index]
            sent = plan(samples=32, spec=QUICKSTART.model)
            sent = dataclasses.replace(sent, weights=honest)
            offer = attack.manipulate(sent)[0]
            lenient, state = Inspection(InspectionParams()), state_with(arrays(honest))
            lenient.inspect(arrays(offer.weights), state, QUICKSTART)  # passes today's check
            with pytest.raises(ModelRejected, match="median row norm"):
                strict.inspect(arrays(offer.weights), state_with(arrays(honest)), QUICKSTART)


def test_row_inspection_refuses_one_row_scaled_or_two_rows_parallel() -> None:
    generator = np.random.default_rng(0)
    honest = {"w": generator.uniform(-1, 1, (16, 64)), "b": generator.uniform(-1, 1, 16)}
    assert inspection.row_outlier(honest, 4.0, 0.99) is None
    scaled = {"w": honest["w"].copy(), "b": honest["b"]}
    scaled["w"][3] *= 5
    assert "row 3 has" in str(inspection.row_outlier(scaled, 4.0, 0.99))
    parallel = {"w": honest["w"].copy(), "b": honest["b"]}
    parallel["w"][7] = -2 * parallel["w"][2]
    assert "rows 2 and 7 are parallel" in str(inspection.row_outlier(parallel, 4.0, 0.99))
