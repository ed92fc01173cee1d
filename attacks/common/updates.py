"""The update a client sent, read as gradients.

Under FedSGD the update is the gradient of the batch's mean loss, as sent. Under FedAvg it is
the client's new weights: ``E`` epochs of plain SGD moved them by ``-lr`` times the sum of the
gradients of its :attr:`~simulator.core.protocol.PublicMeta.local_steps` steps, so the weight
change, read backwards, is a positive multiple of those gradients. Each attack picks the
multiple it needs with :func:`as_gradient`'s ``scale``:

* ``"change"``: ``sent - returned`` as it is, ``lr`` times the step sum (the active attacks
  divide one row by another, so any positive multiple serves);
* ``"step-sum"``: divided by ``lr``, the sum of every step's gradient (what a replay of the
  local training reproduces);
* ``"mean-step"``: divided by ``lr * steps``, the mean step direction (what the one-step rules
  of label recovery and the analytic attack read; exact for one local step).

The divisions are written as the attacks always computed them (``/ lr`` for the step sum, ``*
1 / (lr * steps)`` for the mean step), so their numbers stay bit for bit what they were.
"""

from __future__ import annotations

from typing import Literal

import torch

from simulator.core.protocol import Observation

Weights = dict[str, torch.Tensor]
GradientScale = Literal["change", "step-sum", "mean-step"]


def num_samples(obs: Observation) -> int:
    """How many private images produced the update: the batch (FedSGD) or the local dataset."""
    return obs.meta.batch_size if obs.meta.protocol == "fedsgd" else obs.meta.num_examples


def epoch_batches(samples: int, batch_size: int) -> list[slice]:
    """One epoch's mini-batches over ``samples`` ordered slots: consecutive, the last partial
    batch kept, as the client's local training splits its shuffled order."""
    return [slice(s, min(s + batch_size, samples)) for s in range(0, samples, batch_size)]


def weight_change(obs: Observation) -> Weights:
    """``returned - sent`` of a FedAvg update: what local training added to each weight."""
    return {k: v - obs.global_weights[k] for k, v in obs.update.items()}


def gradient_factor(obs: Observation, scale: GradientScale) -> float:
    """What :func:`as_gradient` multiplies ``sent - returned`` by (1 under FedSGD)."""
    if obs.meta.protocol == "fedsgd" or scale == "change":
        return 1.0
    if scale == "step-sum":
        return 1.0 / obs.meta.lr
    return 1.0 / (obs.meta.lr * obs.meta.local_steps)


def as_gradient(obs: Observation, scale: GradientScale) -> Weights:
    """The update as gradients: as sent under FedSGD; under FedAvg ``sent - returned`` at
    ``scale`` (see the module docstring). The tensors keep the update's dtype and device."""
    if obs.meta.protocol == "fedsgd":
        return dict(obs.update)
    change = {k: obs.global_weights[k] - v for k, v in obs.update.items()}
    if scale == "change":
        return change
    if scale == "step-sum":
        return {k: v / obs.meta.lr for k, v in change.items()}
    factor = gradient_factor(obs, scale)
    return {k: v * factor for k, v in change.items()}
