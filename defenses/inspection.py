"""Model inspection: a client refuses a received model that differs implausibly from the last.

Against an actively malicious server (:mod:`attacks.active`), a client looks at the model it is
asked to train before training it, and compares it with the last model it accepted (in the
first round it trains, with a fresh initialisation of the architecture it joined: the model
zoo's, without any block a server may add). It rejects the model when

* its structure differs: a tensor added, missing or reshaped (an imprint block), or
* the root mean square of some tensor changed by more than a factor ``max_ratio`` either way
  (re-drawn trap weights: biases tens of times larger than trained ones).

Those checks look at whole tensors, and a server can keep every tensor's scale while it
changes a part of it: trap neurons scaled down to honest-looking biases beside honest rows,
or imprint bins folded into the existing first layer (the ``row_scale``/``honest_rows`` and
``placement`` disguises of ``trap-weights`` and ``imprint``). With ``rows = true`` the client
also checks every weight matrix row by row, against what an honest initialisation looks like
(every row of a layer drawn alike, so at the same scale, and in general position):

* a row whose RMS lies more than ``max_ratio`` either way from the layer's median row, and
* two rows more nearly parallel than ``max_row_cosine`` (imprint bins share their direction)

are refused. Neither needs a reference, so they hold in the first round a client is sampled.
Honest training moves rows slowly and apart (``tests/unit/defenses/test_inspection.py`` runs
a whole honest training run through it without a refusal).

A rejection raises :class:`ModelRejected` in the client, which the server sees as a failed
update ("failure" record, reason beginning "inspection rejected the model"); the client keeps
its reference. Honest training moves a tensor's scale slowly, so the false-positive rate on
honest rounds is the share of such failures where no model was manipulated (measured in
``scenarios/active-defenses.toml``).

A client-mod defense: it wraps the train function like local DP does, in both clients
(:mod:`simulator.federation.client_mods`; under SecAgg+ it reads Flower's legacy fit message),
and keeps its reference in the node's ``context.state``. It does not change the update a
client sends, only whether it sends one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict

from defenses.base import ClientMod, ClientModDefense, register_defense
from simulator.core.config import Scenario
from simulator.core.fields import param
from simulator.core.models import build_model
from simulator.core.protocol import SCENARIO_KEY

REFERENCE_KEY = "inspection-reference"
# Where flwr.compat puts a legacy FitIns' weights (the SecAgg+ client's train message).
LEGACY_PARAMETERS_KEY = "fitins.parameters"

Arrays = Mapping[str, np.ndarray]


class ModelRejected(RuntimeError):
    """The client's inspection refused the model it was sent."""


@dataclass(frozen=True)
class InspectionParams:
    """Parameters of "inspection"."""

    max_ratio: float = param(
        4.0,
        low=1.0,
        low_open=True,
        help="largest factor by which a tensor's RMS may change from the reference, either way",
    )
    rows: bool = param(
        False, help="also check each weight matrix row by row (row scales, parallel rows)"
    )
    max_row_cosine: float = param(
        0.99, low=0.0, high=1.0, low_open=True, help="rows: largest |cosine| of two rows"
    )


# Rows shorter than this are not checked for parallels: in few dimensions random rows are
# often nearly parallel (a 10-class head's 256 columns reach |cosine| 0.95 by chance).
MIN_ROW_LENGTH = 32


def honest_reference(scenario: Scenario) -> dict[str, np.ndarray]:
    """A fresh initialisation of the architecture the client joined (no added block)."""
    spec = dataclasses.replace(scenario.model, imprint_bins=0)
    return {k: v.detach().numpy() for k, v in build_model(spec).state_dict().items()}


def _rms(array: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(array, dtype=np.float64)))) if array.size else 0.0


def difference(received: Arrays, reference: Arrays, max_ratio: float) -> str | None:
    """Why ``received`` is implausible next to ``reference``, or None when it is not."""
    added = sorted(set(received) - set(reference))
    missing = sorted(set(reference) - set(received))
    if added or missing:
        parts = [f"added {added}" if added else "", f"missing {missing}" if missing else ""]
        return "structure differs: " + "; ".join(p for p in parts if p)
    for name, before in reference.items():
        after = received[name]
        if tuple(after.shape) != tuple(before.shape):
            return f"structure differs: {name} is {tuple(after.shape)}, was {tuple(before.shape)}"
        old, new = max(_rms(before), 1e-12), max(_rms(after), 1e-12)
        if abs(math.log(new / old)) > math.log(max_ratio):
            return f"{name}: RMS {new:.3g} against {old:.3g} (more than x{max_ratio:g} apart)"
    return None


def row_outlier(received: Arrays, max_ratio: float, max_cosine: float) -> str | None:
    """Why some weight matrix of ``received`` has rows no honest initialisation draws, or None.

    Honest rows of a layer are drawn alike (one scale) and in general position; a row whose RMS
    is more than ``max_ratio`` from the layer's median row, or two rows with ``|cosine|`` above
    ``max_cosine``, are not.
    """
    for name, array in received.items():
        if array.ndim != 2 or array.shape[0] < 2:
            continue
        matrix = array.astype(np.float64)
        norms = np.linalg.norm(matrix, axis=1)
        median = max(float(np.median(norms)), 1e-12)
        ratios = np.maximum(norms, 1e-12) / median
        worst = int(np.argmax(np.abs(np.log(ratios))))
        if abs(math.log(ratios[worst])) > math.log(max_ratio):
            return (
                f"{name}: row {worst} has {ratios[worst]:.3g} x the layer's median row norm "
                f"(more than x{max_ratio:g} apart)"
            )
        if matrix.shape[1] < MIN_ROW_LENGTH:
            continue
        units = matrix / np.maximum(norms, 1e-12)[:, None]
        cosines = np.abs(units @ units.T)
        np.fill_diagonal(cosines, 0.0)
        first, second = np.unravel_index(int(np.argmax(cosines)), cosines.shape)
        if cosines[first, second] > max_cosine:
            return (
                f"{name}: rows {min(first, second)} and {max(first, second)} are parallel "
                f"(|cosine| {cosines[first, second]:.4g} > {max_cosine:g})"
            )
    return None


def _received(msg: Message, scenario: Scenario) -> dict[str, np.ndarray]:
    """The weights a train message carries (its one ArrayRecord), by parameter name.

    A legacy fit message (the SecAgg+ client's) carries them unnamed, in the state-dict order
    of the model its scenario describes.
    """
    (record,) = msg.content.array_records.values()
    arrays = {name: array.numpy() for name, array in record.items()}
    if LEGACY_PARAMETERS_KEY not in msg.content.array_records:
        return arrays
    # Seeded only so that naming draws nothing from torch's global generator.
    names = list(build_model(scenario.model, seed=0).state_dict())
    return dict(zip(names, arrays.values(), strict=True))


def _scenario(msg: Message) -> Scenario:
    for config in msg.content.config_records.values():
        if SCENARIO_KEY in config:
            return Scenario.from_json(str(config[SCENARIO_KEY]))
    raise ModelRejected("inspection: the train message carries no scenario")


@register_defense(
    "inspection",
    "Client-side: refuses a model whose structure or weight scales differ implausibly from "
    "the last one it accepted (with rows = true: also rows no honest layer has).",
)
class Inspection(ClientModDefense):
    """Rejects manipulated models before training; changes no update it lets through."""

    Params = InspectionParams
    params: InspectionParams

    def inspect(self, received: Arrays, state: RecordDict, scenario: Scenario) -> None:
        """Raise :class:`ModelRejected`, or accept ``received`` as the new reference."""
        stored = state.array_records.get(REFERENCE_KEY)
        reference = (
            {k: v.numpy() for k, v in stored.items()}
            if stored is not None
            else honest_reference(scenario)
        )
        reason = difference(received, reference, self.params.max_ratio)
        if reason is None and self.params.rows:
            reason = row_outlier(received, self.params.max_ratio, self.params.max_row_cosine)
        if reason is not None:
            raise ModelRejected(f"inspection rejected the model: {reason}")
        state.array_records[REFERENCE_KEY] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in received.items()}
        )

    def mod(self) -> ClientMod:
        """The Flower mod that inspects each train message before the client trains."""

        def inspection_mod(msg: Message, context: Context, call_next: Any) -> Message:
            if msg.metadata.message_type == MessageType.TRAIN:
                scenario = _scenario(msg)
                self.inspect(_received(msg, scenario), context.state, scenario)
            return call_next(msg, context)  # type: ignore[no-any-return]

        return inspection_mod
