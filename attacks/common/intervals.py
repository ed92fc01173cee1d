"""What a server that knows the clients' update defense knows about each true coordinate.

The server hands out the protocol, so it knows the configuration of the defense each client
applies to its update before sending it. A lossy defense then leaves every true coordinate in
a known interval around what arrived:

* ``"pruning"`` (magnitude pruning, global threshold): a coordinate that arrived non-zero was
  sent as it was; one that arrived as zero was pruned, so its true magnitude is at most the
  smallest magnitude that was kept (the threshold is global, so one bound serves every
  tensor). The fraction need not be known: the zeros say which coordinates were pruned.
* ``"int8"`` (per-tensor symmetric quantization): the scale is the largest received magnitude
  over 127, and each coordinate was rounded to the nearest level, so it lies within half a
  scale of what arrived.
* ``"fp16"``: within half a unit in the last place of half precision.

The intervals are given in the frame the defense acted in, the update as sent (FedSGD's
gradient, FedAvg's weight change ``new - global``), and mapped to the gradient frame an attack
reads with :func:`update_intervals`. Under FedAvg the server recomputes the change from float32
weights, so each bound widens by the rounding of that subtraction.

Two attacks use them: gradient matching minimises the distance of its dummies' update to the
box of intervals (zero inside) instead of to the received point, and the first-layer subspace
completes the low-rank first-layer change inside its box (:func:`low_rank_completion`) before
it takes the row space. ``"none"`` leaves the attacks as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.common.updates import GradientScale, gradient_factor
from simulator.core.knowledge import KnownDefense
from simulator.core.protocol import Observation

Weights = dict[str, torch.Tensor]
INT8_LEVELS = 127  # the quantization defense's levels: scale = max|x| / 127
FP16_SMALLEST_NORMAL = 2.0**-14


@dataclass(frozen=True)
class Intervals:
    """Per coordinate, the true value lies in ``[low, high]`` (tensors named as the update)."""

    low: Weights
    high: Weights

    def centre(self) -> Weights:
        return {k: (self.low[k] + self.high[k]) / 2 for k in self.low}

    def radius(self) -> Weights:
        return {k: (self.high[k] - self.low[k]) / 2 for k in self.low}


def _pruning(sent: Weights) -> Weights:
    """Half-widths under pruning: 0 where a coordinate was kept, the threshold where pruned."""
    kept = [v[v != 0].abs() for v in sent.values()]
    magnitudes = torch.cat([k.flatten() for k in kept]) if kept else torch.empty(0)
    threshold = magnitudes.min() if magnitudes.numel() else torch.zeros(())
    return {
        k: torch.where(v == 0, threshold.to(v.dtype), torch.zeros_like(v)) for k, v in sent.items()
    }


def _int8(sent: Weights) -> Weights:
    """Half a quantization step of each tensor (its scale is max|x| / 127)."""
    return {
        k: torch.full_like(v, float(v.abs().max()) / INT8_LEVELS / 2 if v.numel() else 0.0)
        for k, v in sent.items()
    }


def _fp16(sent: Weights) -> Weights:
    """Half a unit in the last place of half precision at each value (the larger neighbour's)."""
    widths = {}
    for k, v in sent.items():
        magnitude = v.abs().double()
        exponent = torch.floor(torch.log2(magnitude.clamp(min=FP16_SMALLEST_NORMAL)))
        widths[k] = torch.pow(2.0, exponent - 11).to(v.dtype)  # ulp 2^(e - 10), halved
    return widths


def sent_intervals(sent: Weights, known: KnownDefense, slack: Weights | None = None) -> Intervals:
    """Intervals of the true coordinates of ``sent`` (the defended update, in the frame the
    defense acted in), widened by ``slack`` per coordinate."""
    if known == "pruning":
        radius = _pruning(sent)
    elif known == "int8":
        radius = _int8(sent)
    elif known == "fp16":
        radius = _fp16(sent)
    else:
        radius = {k: torch.zeros_like(v) for k, v in sent.items()}
    if slack is not None:
        radius = {k: r + slack[k] for k, r in radius.items()}
    low = {k: v - radius[k] for k, v in sent.items()}
    return Intervals(low, {k: v + radius[k] for k, v in sent.items()})


def defended_update(obs: Observation) -> tuple[Weights, Weights | None]:
    """What the defense produced (FedSGD: the gradient; FedAvg: ``new - global``) and, under
    FedAvg, the float32 rounding the server's subtraction may add to each coordinate."""
    if obs.meta.protocol == "fedsgd":
        return dict(obs.update), None
    change = {k: v - obs.global_weights[k] for k, v in obs.update.items()}
    eps = torch.finfo(torch.float32).eps
    slack = {k: eps * (v.abs() + obs.global_weights[k].abs()) for k, v in obs.update.items()}
    return change, slack


def update_intervals(obs: Observation, known: KnownDefense, scale: GradientScale) -> Intervals:
    """The intervals in the gradient frame :func:`~attacks.common.updates.as_gradient` reads
    at ``scale``: FedAvg's ``global - new`` is the negated change, times the scale's factor."""
    sent, slack = defended_update(obs)
    found = sent_intervals(sent, known, slack)
    if obs.meta.protocol == "fedsgd":
        return found
    factor = gradient_factor(obs, scale)
    return Intervals(
        {k: -v * factor for k, v in found.high.items()},
        {k: -v * factor for k, v in found.low.items()},
    )


def low_rank_completion(
    low: torch.Tensor, high: torch.Tensor, rank: int, iterations: int = 100
) -> torch.Tensor:
    """A rank-``rank`` matrix that lies (nearly) inside the box ``[low, high]``.

    Alternating projections: onto rank ``rank``, then onto the box. The rank-``rank`` subspace
    is tracked by orthogonal iteration warm-started from the last one (one product and a QR a
    step; the iterate moves little between steps), after one eigendecomposition of the smaller
    Gram matrix at the start. A first-layer change is a sum of ``n`` outer products, so its
    rank is at most ``n``; what pruning zeroed or quantization rounded is filled in where the
    rank and the box leave room only for the truth.
    """
    low, high = low.double(), high.double()
    current = (low + high) / 2
    wide = current.shape[0] > current.shape[1]
    if wide:  # work on the side with fewer rows: the Gram matrix is the smaller one
        low, high, current = low.T, high.T, current.T
    rank = max(1, min(rank, *current.shape))
    top = torch.linalg.eigh(current @ current.T).eigenvectors[:, -rank:]
    projected = current
    for _ in range(iterations):
        top = torch.linalg.qr(current @ (current.T @ top)).Q
        projected = top @ (top.T @ current)
        current = torch.minimum(torch.maximum(projected, low), high)
    return projected.T if wide else projected
