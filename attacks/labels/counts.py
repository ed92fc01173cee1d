"""The "label-counts" attack: only the label multiset of each update, from its last layer.

What the gradient-matching attacks do first (:func:`attacks.labels.recovery.recover_labels`), as an
attack of its own, so that label leakage can be measured per batch size and training stage
(``label_counts_right`` in the record: the share of the batch whose label the recovered
multiset accounts for). The images it returns are blank (mid-grey): it reconstructs none.
With the server's public data (the referee always provides it) batch counts use the model's
confusion on it; ``public = false`` forces the random-probe rule for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attacks.base import Attack, register_attack
from attacks.labels.recovery import num_samples, recover_labels
from simulator.core.fields import param
from simulator.core.protocol import Observation, Reconstruction


@dataclass(frozen=True)
class LabelCountParams:
    """Settings of the label-count attack."""

    public: bool = True
    probes: int = param(64, low=1, high=100_000, help="random images for the probe rule")
    seed: int = param(0, low=0, help="seed of the probe images")


@register_attack(
    "label-counts",
    "Batch label multiset from the last layer's update (bias-gradient counts, with the "
    "model's confusion on the server's public data); no images.",
)
class LabelCounts(Attack[LabelCountParams]):
    """One labels-only reconstruction per observation, status "converged" (a closed form)."""

    Params = LabelCountParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        public = self.public if self.params.public else None
        found = []
        for obs in observations:
            recovered = recover_labels(obs, self.params.probes, self.params.seed, public)
            blank = torch.full((num_samples(obs), *obs.model.input_shape), 0.5)
            notes = f"labels only, by {recovered.method}: {recovered.reason}"
            found.append(
                Reconstruction(
                    obs.round,
                    obs.client_id,
                    blank,
                    recovered.labels,
                    status="converged",
                    notes=notes,
                    objective="none",
                )
            )
        return found
