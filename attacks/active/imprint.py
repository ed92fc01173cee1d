"""The imprint attack (Fowl et al. 2022, "Robbing the Fed"): an added block that bins the data.

The server puts an :class:`~simulator.core.models.ImprintBlock` of ``bins`` neurons in front of
the model it sends. Its neurons are cut along one or more principal directions of public data
(the test split the server holds) at the public quantiles, so each bin holds the same share of
the data; the decoder feeds every neuron back into the image with the same small weight, so the
model behind it sees its input nearly unchanged and every neuron gets the same gradient from a
given input. :mod:`attacks.active.decoding` then reads each input that is alone in its bin out
of the block's gradient, exactly, and peels collisions apart across directions.

One direction is the paper's attack, whose expected recovery is ``(1 - 1/k)^(n - 1)`` for
``n`` inputs and ``k`` bins. Splitting the same ``k`` neurons over two or three directions
recovers more while the load ``n / k`` is low (measured on MNIST, FedSGD: 95% instead of 78%
at ``k`` = 256, ``n`` = 64), and less at loads near 1, so ``directions = 0`` picks by the
expected load: three directions up to 1/8, two up to 0.8, one above.

FedAvg: the update is ``lr`` times the sum of the local steps' gradients, read as the change
of float32 weights. With one local step it is FedSGD's gradient on the client's whole local
dataset (``n`` is the dataset, not the batch), and the tiny encoder (``scale``) keeps the change
of its biases well above float32 rounding. Each further step trains the block: its rows move
and inputs change bins between steps, so a bin's difference mixes inputs of several steps.
Measured (MNIST, 64 digits, k = 256): 98% at one step, 16% at 4, 5% at 16; a smaller ``gain``
moves the block less but drowns the change in rounding. Holding the block still for many steps
and reading it exactly ask for opposite scales; the attack favours one step.

Disguise: ``placement = "first-layer"`` adds no block and folds the bins into the model's own
first layer instead, at ``fold_scale`` times an honest row's norm (:mod:`attacks.active.folded`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from attacks.active.base import (
    ActiveAttack,
    ActiveParams,
    Plan,
    Weights,
    examples_behind,
    imprint_block,
    predicted_share,
    principal_directions,
    quantile_thresholds,
    with_block,
)
from attacks.active.decoding import chains_of, decode
from attacks.active.folded import bin_rows, fold, layers
from attacks.base import register_attack
from attacks.common.updates import as_gradient
from simulator.core.fields import param
from simulator.core.models import IMPRINT, ModelSpec, SentModel
from simulator.core.protocol import Observation, Reconstruction


@dataclass(frozen=True)
class ImprintParams(ActiveParams):
    """Settings of the imprint attack."""

    bins: int = param(256, low=2, high=65536, help="neurons (bins) of the imprint block")
    directions: int = param(
        0, low=0, high=8, help="principal directions the bins are split over (0: by load)"
    )
    gain: float = param(
        0.01, low=0.0, low_open=True, help="decoder weight times bins: the gradient's scale"
    )
    scale: float = param(
        1e-6, low=0.0, low_open=True, help="encoder rows and thresholds are multiplied by this"
    )
    placement: Literal["block", "first-layer"] = param(
        "block", help="an added block (the paper), or bins folded into the model's first layer"
    )
    fold_scale: float = param(
        0.2, low=0.0, low_open=True, help="first-layer placement: bin rows' norm / honest rows'"
    )
    seed: int = param(0, low=0, help="first-layer placement: seed of the rows that hold the bins")


def auto_directions(bins: int, samples: int) -> int:
    """Directions for ``samples`` inputs in ``bins`` bins (measured on MNIST, FedSGD)."""
    if samples <= 0:
        return 1  # unknown load: the paper's single direction
    load = samples / bins
    count = 3 if load <= 1 / 8 else 2 if load <= 0.8 else 1
    return max(1, min(count, bins // 2))


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal positive counts."""
    return [total // parts + (1 if j < total % parts else 0) for j in range(parts)]


def binning(public: torch.Tensor, bins: int, directions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (bins, d), thresholds (bins,)): ``bins`` neurons over ``directions`` principal
    directions of ``public``, each chain cut at its public quantiles."""
    flat = public.flatten(1).double()
    units = principal_directions(public, directions)
    rows, cuts = [], []
    for unit, count in zip(units, split(bins, directions), strict=True):
        rows.append(unit.expand(count, -1))
        cuts.append(quantile_thresholds(flat @ unit, count))
    return torch.cat(rows), torch.cat(cuts)


def read_imprint(
    obs: Observation,
    rows: torch.Tensor,
    samples: int,
    names: tuple[str, str] = (f"{IMPRINT}.encoder.weight", f"{IMPRINT}.encoder.bias"),
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Decode the imprint neurons ``rows`` of one observation (of the layer whose weight and
    bias are ``names``: the block's encoder, or a folded first layer): images (m, C, H, W),
    which are confirmed, how many inputs were peeled, and how many directions there were."""
    weight_name, bias_name = names
    chains = chains_of(obs.global_weights[weight_name], obs.global_weights[bias_name], rows)
    # Any positive multiple of the summed gradients: the decoder divides rows by each other.
    gradient = {k: v.detach().double() for k, v in as_gradient(obs, "change").items()}
    decoded = decode(gradient[weight_name], gradient[bias_name], chains, samples)
    images = decoded.images.reshape(-1, *obs.model.input_shape).clamp(0, 1).float()
    return images, decoded.confirmed, decoded.peeled, len(chains)


def reconstruction(
    obs: Observation,
    images: torch.Tensor,
    confirmed: torch.Tensor,
    predicted: float,
    start: float,
    notes: str,
) -> Reconstruction:
    """A closed-form reconstruction; its ``predicted_share`` tells the scorer to report the
    shares recovered at 60 and 30 dB beside the guarantee."""
    if images.shape[0] == 0:  # nothing found: one grey image keeps scoring defined
        images = torch.full((1, *obs.model.input_shape), 0.5)
        confirmed = torch.zeros(1, dtype=torch.bool)
    trace = {"iteration": 0.0, "seconds": time.perf_counter() - start}
    return Reconstruction(
        round=obs.round,
        client_id=obs.client_id,
        images=images,
        labels=None,
        trace=[trace],
        status="converged",
        notes=notes,
        confident=confirmed,
        objective="none",
        predicted_share=predicted,
    )


def require_block(obs: Observation, attack: str) -> int:
    """The imprint bins of the observed model; ValueError when the server sent none."""
    if not obs.model.imprint_bins:
        raise ValueError(
            f"attack {attack!r} reads an imprint block, but client {obs.client_id}'s model in "
            f"round {obs.round} has none (it was not sent a manipulated model)"
        )
    return obs.model.imprint_bins


@register_attack(
    "imprint",
    "Active: an imprint block in front of the model bins the inputs; each alone in a bin "
    "is read exactly (Fowl et al. 2022).",
)
class Imprint(ActiveAttack[ImprintParams]):
    """Sends an imprint block, reads the inputs out of its gradient; labels are not recovered."""

    Params = ImprintParams

    def __init__(self, params: ImprintParams | None = None) -> None:
        super().__init__(params)
        self._binning: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def block(self, plan: Plan, bins: int, directions: int) -> tuple[ModelSpec, Weights]:
        """The manipulated spec and weights for ``bins`` neurons over ``directions``."""
        rows, cuts = self.binned(bins, directions)
        spec = dataclasses.replace(plan.spec, imprint_bins=bins)
        block = imprint_block(spec, rows, cuts, self.params.gain, self.params.scale)
        return spec, with_block(spec, plan.weights, block)

    def binned(self, bins: int, directions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bins' rows and thresholds (the public statistics do not change between rounds)."""
        key = (bins, directions)
        if key not in self._binning:
            self._binning[key] = binning(self.public_images(), bins, directions)
        return self._binning[key]

    def manipulate(self, plan: Plan) -> dict[int, SentModel]:
        offers = {}
        bins = self.params.bins
        for client in plan.clients:
            directions = self.params.directions or auto_directions(bins, plan.samples[client])
            if self.params.placement == "first-layer":
                first, _ = layers(plan.spec)
                bin_rows(plan.weights[first.weight].shape[0], bins, self.params.seed)  # fits?
                rows, cuts = self.binned(bins, directions)
                p = self.params
                weights = fold(plan.spec, dict(plan.weights), rows, cuts, p.fold_scale, p.seed)
                change = (
                    f"imprint folded into the first layer: {bins} bins over {directions} "
                    f"direction(s) at {p.fold_scale:g} x an honest row's norm"
                )
                offers[client] = SentModel(plan.spec, weights, change, self.params.aggregate)
                continue
            spec, weights = self.block(plan, bins, directions)
            change = f"imprint block added: {bins} bins over {directions} direction(s)"
            offers[client] = SentModel(spec, weights, change, self.params.aggregate)
        return offers

    def read(self, obs: Observation, n: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Decode one observation: the block's neurons, or the folded first layer's bin rows."""
        if self.params.placement == "block":
            bins = require_block(obs, self.name)
            return read_imprint(obs, torch.arange(bins), n)
        first, _ = layers(obs.model)
        width = obs.global_weights[first.weight].shape[0]
        rows = bin_rows(width, self.params.bins, self.params.seed)
        return read_imprint(obs, rows, n, (first.weight, first.bias or ""))

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        start = time.perf_counter()
        results = []
        for obs in observations:
            bins = self.params.bins if self.params.placement != "block" else obs.model.imprint_bins
            n = examples_behind(obs)
            images, confirmed, peeled, chains = self.read(obs, n)
            predicted = predicted_share(bins, n)
            notes = (
                f"{peeled} of {n} inputs peeled from {bins} bins over {chains} direction(s), "
                f"{int(confirmed.sum())} confirmed in two; one-direction guarantee "
                f"{predicted:.3f}"
            )
            results.append(reconstruction(obs, images, confirmed, predicted, start, notes))
        return results
