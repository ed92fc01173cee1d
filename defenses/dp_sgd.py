"""DP-SGD (Abadi et al. 2016) for the client's local training, with a real privacy accountant.

Each step: per-sample gradients (``torch.func``: ``vmap`` of ``grad`` over a
``functional_call``, no Python loop over samples), each clipped to L2 norm ``max_grad_norm``,
summed, plus Gaussian noise of std ``noise_multiplier * max_grad_norm`` per coordinate, divided
by the (expected) batch size.

Batches are drawn by Poisson sampling: every example joins each step's batch independently with
probability ``q = batch_size / n``, for ``ceil(n / batch_size)`` steps per epoch. That is the
sampling the accountant assumes (``PoissonSampledDpEvent`` of a Gaussian, add-or-remove-one
neighbouring datasets), so the reported epsilon holds for this training; shuffled fixed-size
batches would need a different, less favourable analysis. The noisy sum is divided by the
expected batch size ``q * n``, not the realised one, whose value depends on the data.

The guarantee is example-level for one client's shard; across federated rounds the same shard is
trained on again, so pass the client's total number of steps to :func:`epsilon`. A training
defense; it changes what the server observes (the update comes from noisy clipped gradients).
Epsilon comes from Google's ``dp-accounting`` RDP accountant (the backend of Flower's
``flwr[dp]`` accounting), never from a hand-written formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from defenses.base import Defense, TrainingDefense, register_defense
from simulator.core.config import FederationConfig
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge
from simulator.core.models import ModelSpec, task_loss
from simulator.core.protocol import local_steps


@dataclass(frozen=True)
class DpSgdParams:
    """Parameters of "dp-sgd"."""

    noise_multiplier: float = param(
        1.0, low=0.0, help="noise std as a multiple of max_grad_norm (0: clipping only)"
    )
    max_grad_norm: float = param(
        1.0, low=0.0, low_open=True, help="L2 bound on every per-sample gradient"
    )
    delta: float = param(
        1e-5, low=0.0, high=1.0, low_open=True, high_open=True, help="delta epsilon is reported at"
    )


def _per_sample_step(
    model: nn.Module,
    spec: ModelSpec,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    params: DpSgdParams,
    generator: torch.Generator,
    denominator: float | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(private gradient, per-sample losses) of one batch; see :func:`private_gradient`."""
    weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    batch = len(labels)
    if batch:

        def sample_loss(
            w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            logits = functional_call(model, (w, buffers), (x.unsqueeze(0),))
            return task_loss(spec, logits, y.unsqueeze(0))

        per_sample: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]] = vmap(
            grad_and_value(sample_loss), in_dims=(None, 0, 0)
        )
        grads, losses = per_sample(weights, inputs, labels)
        squared = sum(g.reshape(batch, -1).pow(2).sum(dim=1) for g in grads.values())
        norms = torch.as_tensor(squared).sqrt()
        # A zero gradient gives inf here, which the clamp turns into factor 1.
        factors = (params.max_grad_norm / norms).clamp(max=1.0)
        summed = {name: torch.tensordot(factors, g, dims=1) for name, g in grads.items()}
    else:  # a Poisson batch may be empty: the release is then the noise alone
        summed = {name: torch.zeros_like(w) for name, w in weights.items()}
        losses = torch.empty(0)
    std = params.noise_multiplier * params.max_grad_norm
    scale = float(batch if denominator is None else denominator)
    private: dict[str, torch.Tensor] = {}
    for name, total in summed.items():
        if std > 0:
            noise = torch.randn(
                total.shape, generator=generator, dtype=total.dtype, device=generator.device
            )
            total = total + std * noise.to(total.device)
        private[name] = total / scale
    return private, losses.detach()


def private_gradient(
    model: nn.Module,
    spec: ModelSpec,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    params: DpSgdParams,
    generator: torch.Generator,
    *,
    denominator: float | None = None,
) -> dict[str, torch.Tensor]:
    """DP-SGD gradient of one batch, per parameter name.

    ``(sum_i clip(g_i, max_grad_norm) + N(0, (noise_multiplier * max_grad_norm)^2)) / B``,
    where ``g_i`` is sample i's gradient of the training loss and ``B`` is ``denominator``
    (the expected batch size under Poisson sampling) or, by default, ``len(labels)``.
    The model is not modified.
    """
    if len(labels) == 0 and denominator is None:
        raise ValueError("an empty batch needs an explicit denominator (the expected batch size)")
    gradient, _ = _per_sample_step(model, spec, inputs, labels, params, generator, denominator)
    return gradient


def dp_sgd_schedule(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, number of steps) of :func:`private_local_train` on ``num_examples``.

    q = min(1, batch_size / num_examples); ceil(num_examples / batch_size) steps per epoch.
    Pass both to :func:`epsilon`.
    """
    if num_examples < 1 or batch_size < 1 or epochs < 0:
        raise ValueError(
            f"need num_examples >= 1, batch_size >= 1, epochs >= 0; got "
            f"{num_examples}, {batch_size}, {epochs}"
        )
    rate = min(1.0, batch_size / num_examples)
    return rate, local_steps(num_examples, batch_size, epochs)


def poisson_batch(num_examples: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson-sampled batch: each example kept independently with prob. ``rate``."""
    keep = torch.rand(num_examples, generator=generator, device=generator.device) < rate
    return keep.nonzero().squeeze(1).cpu()


def private_local_train(
    model: nn.Module,
    spec: ModelSpec,
    shard_inputs: torch.Tensor,
    shard_labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    params: DpSgdParams,
    generator: torch.Generator,
) -> float:
    """DP-SGD local training (FedAvg under DP) on Poisson-sampled batches; updates ``model``.

    Plain SGD steps with :func:`private_gradient`; the schedule is :func:`dp_sgd_schedule`.
    Returns the mean per-sample training loss over the last epoch's batches (NaN if all were
    empty); the loss is a local statistic and is not part of what the client sends.
    """
    rate, steps = dp_sgd_schedule(len(shard_labels), batch_size, epochs)
    steps_per_epoch = steps // epochs if epochs else 0
    expected = rate * len(shard_labels)
    named = dict(model.named_parameters())
    last_epoch: list[torch.Tensor] = []
    for step in range(steps):
        if step % steps_per_epoch == 0:
            last_epoch = []
        batch = poisson_batch(len(shard_labels), rate, generator)
        gradient, losses = _per_sample_step(
            model,
            spec,
            shard_inputs[batch],
            shard_labels[batch],
            params,
            generator,
            expected,
        )
        with torch.no_grad():
            for name, g in gradient.items():
                named[name].sub_(lr * g)
        last_epoch.append(losses)
    seen = torch.cat(last_epoch) if last_epoch else torch.empty(0)
    return float(seen.mean()) if seen.numel() else float(np.nan)


def _accountant(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    """dp-accounting's RDP accountant after ``steps`` Poisson-sampled Gaussian steps
    (add-or-remove-one neighbours)."""
    # Imported here: dp-accounting takes about a second to import and only this needs it.
    from dp_accounting import dp_event, privacy_accountant, rdp

    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    event: dp_event.DpEvent = gaussian
    if sample_rate < 1.0:
        event = dp_event.PoissonSampledDpEvent(sample_rate, gaussian)
    accountant = rdp.RdpAccountant(
        neighboring_relation=privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(event, steps)
    return accountant


def _check_schedule(sample_rate: float, steps: int) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate = {sample_rate!r} is out of range; allowed: (0, 1]")
    if steps < 0:
        raise ValueError(f"steps = {steps!r} is out of range; allowed: [0, inf)")


def gaussian_epsilon(
    noise_multiplier: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-sampled Gaussian steps of this noise
    multiplier (RDP accountant); 0 for no steps, infinite without noise."""
    _check_schedule(sample_rate, steps)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    return float(_accountant(noise_multiplier, sample_rate, steps).get_epsilon(delta))


def gaussian_rdp_curve(
    noise_multiplier: float, sample_rate: float, steps: int
) -> list[tuple[float, float]]:
    """The composed RDP curve, (order, RDP epsilon) for the accountant's orders; empty without
    noise (no finite order), zeros for no steps."""
    _check_schedule(sample_rate, steps)
    if noise_multiplier == 0.0:
        return []
    accountant = _accountant(noise_multiplier, sample_rate, steps)
    return [(float(a), float(r)) for a, r in zip(accountant._orders, accountant._rdp, strict=True)]


def epsilon(params: DpSgdParams, sample_rate: float, steps: int) -> float:
    """Epsilon at ``params.delta`` after ``steps`` Poisson-sampled Gaussian steps (RDP accountant).

    0 for no steps; infinite without noise.
    """
    return gaussian_epsilon(params.noise_multiplier, params.delta, sample_rate, steps)


@register_defense(
    "dp-sgd", "DP-SGD local training: per-sample clipping, Gaussian noise, RDP accounting."
)
class DpSgd(TrainingDefense):
    """DP-SGD; replaces local training and changes the observation (a noisy, clipped update)."""

    Params = DpSgdParams
    params: DpSgdParams

    def fedsgd_batch(
        self, shard_size: int, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """A Poisson batch: the accountant assumes each example joins a step independently
        with probability batch_size / shard size, so the batch must be drawn that way."""
        return poisson_batch(shard_size, min(1.0, batch_size / shard_size), generator)

    @property
    def delta(self) -> float:
        return self.params.delta

    def check_scenario(self, federation: FederationConfig, defenses: Sequence[Defense]) -> None:
        super().check_scenario(federation, defenses)
        if federation.weight_decay:
            raise ValueError("federation.weight_decay is not supported with the dp-sgd defense")

    def gradient(
        self,
        model: nn.Module,
        spec: ModelSpec,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        *,
        denominator: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """FedSGD under DP: :func:`private_gradient` with this defense's parameters."""
        return private_gradient(
            model, spec, inputs, labels, self.params, generator, denominator=denominator
        )

    def local_train(
        self,
        model: nn.Module,
        spec: ModelSpec,
        shard_inputs: torch.Tensor,
        shard_labels: torch.Tensor,
        epochs: int,
        batch_size: int,
        lr: float,
        generator: torch.Generator,
    ) -> float:
        """FedAvg under DP: :func:`private_local_train` with this defense's parameters."""
        return private_local_train(
            model, spec, shard_inputs, shard_labels, epochs, batch_size, lr, self.params, generator
        )

    def known_to_server(
        self, federation: FederationConfig, shard_size: int = 0
    ) -> DefenseKnowledge | None:
        """The Gaussian noise per coordinate of the update the client sends.

        Each step adds noise of std ``noise_multiplier * max_grad_norm`` to the clipped sum
        and divides by the expected batch ``q n`` (the batch size, for a shard at least that
        large). FedSGD sends that gradient; FedAvg sends ``-lr`` times the sum of
        ``steps`` of them, whose independent noises add in quadrature. FedAvg needs the
        shard size for ``steps`` and a constant learning rate: without them, None.
        """
        std = self.params.noise_multiplier * self.params.max_grad_norm
        batch = federation.batch_size
        if std == 0.0 or (federation.protocol == "fedavg" and not shard_size):
            return None
        if federation.protocol == "fedsgd":
            expected = min(batch, shard_size) if shard_size else batch
            return DefenseKnowledge((self.name,), noise="gaussian", noise_scale=std / expected)
        if federation.lr_schedule != "constant":
            return None
        rate, steps = dp_sgd_schedule(shard_size, batch, federation.local_epochs)
        per_step = std / (rate * shard_size)
        scale = federation.lr * per_step * math.sqrt(steps)
        return DefenseKnowledge((self.name,), noise="gaussian", noise_scale=scale)

    def epsilon(self, sample_rate: float, steps: int) -> float:
        """:func:`epsilon` with this defense's parameters."""
        return epsilon(self.params, sample_rate, steps)

    def rdp_curve(self, sample_rate: float, steps: int) -> list[tuple[float, float]]:
        """:func:`gaussian_rdp_curve` with this defense's noise multiplier."""
        return gaussian_rdp_curve(self.params.noise_multiplier, sample_rate, steps)
