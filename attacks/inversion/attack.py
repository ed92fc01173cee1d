"""Network inversion (Training-Like Data Reconstruction): a generator trained against the model.

The server holds the classifier's weights (the global model it sent, or under FedAvg a client's
returned weights). It trains a :class:`~attacks.inversion.generator.ConditionalGenerator` so that,
for every class ``y``, ``G(z, y)`` is confidently classified as ``y`` by the *frozen* classifier,
while regularisers steer the samples away from adversarial noise and towards training-like images:
diversity within a class, orthogonal features, smoothness, stability under input noise and KKT
stationarity (see :mod:`attacks.inversion.losses`, whose :data:`LOSSES` lists every term with its
formula). The total loss is ``sum_t weight_t * term_t`` over the terms of
non-zero weight; a term of weight 0 is not computed at all.

Each step draws a fresh batch of ``batch_size`` latent vectors with classes round-robin, so
every class is trained equally. After the budget, ``samples_per_class`` images per class are
generated from latent vectors fixed at the start (so snapshots show the same samples evolving)
and returned class-major with their target classes as labels.

Determinism: the generator's initial weights, every latent batch and the perturbation noise
come from ``torch.Generator`` objects seeded by ``seed``; the global RNG is never touched, and
reruns with the same seed give identical images (on the same device and thread count).

The classifier's confidence in each returned image (softmax probability of its target class) is
what :func:`classifier_confidence` computes; the attack reports its mean, minimum and per-class
means in ``notes`` and in the last trace entry ("confidence", "confidence_min",
"confidence_class_<k>"), and the per-step batch mean as "confidence" in every trace entry.
"""

from __future__ import annotations

import copy
import math
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from attacks.base import Attack, register_attack
from attacks.inversion.generator import ConditionalGenerator, soft_labels
from attacks.inversion.losses import LOSSES, FrozenClassifier, LossContext
from attacks.optim.tracker import snapshot_steps
from simulator.core.fields import param
from simulator.core.models import ModelSpec, is_binary
from simulator.core.protocol import Observation, Reconstruction, Status
from simulator.core.registry import INVERSION_LOSSES

SUBJECT = "attack 'inversion'"


def _weight(default: float, term: str) -> float:
    return param(default, low=0.0, high=1e6, help=f"weight of the {term} loss (0: off)")


@dataclass(frozen=True)
class InversionParams:
    """Settings of the network-inversion attack; ``weight_<term>`` for every term of LOSSES."""

    steps: int = param(300, low=1, high=10_000_000, help="generator optimiser steps")
    lr: float = param(2e-3, low=0.0, low_open=True, high=10.0, help="Adam step of the generator")
    batch_size: int = param(64, low=2, high=100_000, help="generated samples per step")
    samples_per_class: int = param(8, low=1, high=100_000, help="images returned per class")
    latent_dim: int = param(32, low=1, high=4096, help="latent noise size")
    width: int = param(32, low=1, high=1024, help="generator channel width")
    sharpness: float = param(
        5.0, low=0.0, high=100.0, help="soft label = softmax(sharpness * one_hot)"
    )
    target: Literal["global", "client"] = "global"
    weight_cross_entropy: float = _weight(1.0, "cross_entropy")
    weight_kl: float = _weight(1.0, "kl")
    weight_diversity: float = _weight(0.5, "diversity")
    weight_orthogonality: float = _weight(0.5, "orthogonality")
    weight_total_variation: float = _weight(2.0, "total_variation")
    weight_pixel_range: float = _weight(0.1, "pixel_range")
    weight_perturbation: float = _weight(1.0, "perturbation")
    weight_kkt: float = _weight(2.0, "kkt")
    # One term switched off by name, so that an ablation study is one sweep over this key.
    ablate: Literal[
        "none", "cross_entropy", "kl", "diversity", "orthogonality", "total_variation",
        "pixel_range", "perturbation", "kkt",
    ] = "none"  # fmt: skip
    noise_std: float = param(0.1, low=0.0, high=10.0, help="input noise std, perturbation loss")
    range_bound: float = param(
        6.0, low=0.0, high=100.0, help="pre-sigmoid magnitude free of the pixel_range loss"
    )
    kkt_coefficients: Literal["uniform", "learned"] = "uniform"
    data_low: float = param(0.0, low=-1e6, high=1e6, help="model input of a black pixel")
    data_high: float = param(1.0, low=-1e6, high=1e6, help="model input of a white pixel")
    stop_confidence: float | None = param(
        None, low=0.0, high=1.0, help="stop once the batch's mean confidence reaches this"
    )
    seed: int = param(0, low=0, help="seed of generator weights, latents and noise")
    log_every: int = param(25, low=1, help="steps between trace records")
    snapshots: int = param(0, low=0, high=1000, help="evenly spaced image snapshots to keep")

    def __post_init__(self) -> None:
        # Also checked here, not only by the declared ranges, so that direct construction
        # (not through make_attack) cannot slip a negative weight past validation.
        weights = self.loss_weights()
        for term, value in weights.items():
            if not value >= 0.0:
                raise ValueError(
                    f"{SUBJECT}: parameter 'weight_{term}' = {value!r} is out of range; "
                    "loss weights must be >= 0 (0 switches the term off)"
                )
        if not any(value > 0 for value in weights.values()):
            raise ValueError(
                f"{SUBJECT}: every loss weight is 0 ({', '.join(f'weight_{t}' for t in weights)});"
                " set at least one to a positive value"
            )
        if self.data_high <= self.data_low:
            raise ValueError(
                f"{SUBJECT}: data_high = {self.data_high} must exceed data_low = {self.data_low}"
            )

    def loss_weights(self) -> dict[str, float]:
        """Weight of every term of LOSSES, by term name (0 for terms switched off)."""
        return {
            term: 0.0 if term == self.ablate else float(getattr(self, f"weight_{term}"))
            for term in LOSSES
        }


# Every loss has a weight field and every weight field a loss: checked at import.
assert {f.name for f in fields(InversionParams) if f.name.startswith("weight_")} == {
    f"weight_{t}" for t in LOSSES
}
assert set(typing.get_args(typing.get_type_hints(InversionParams)["ablate"])) == {"none", *LOSSES}


def classifier_confidence(
    spec: ModelSpec,
    weights: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    data_low: float = 0.0,
    data_high: float = 1.0,
) -> torch.Tensor:
    """Softmax probability the classifier ``(spec, weights)`` gives each image's label, (n,).

    ``images`` (n, C, H, W) in [0, 1], mapped to ``[data_low, data_high]`` as the attack does.
    """
    classifier = FrozenClassifier(spec, weights, data_low, data_high)
    with torch.no_grad():
        logits, _ = classifier(images.to(classifier.device, torch.float32))
        probs = torch.softmax(logits, dim=1)
    return probs.gather(1, labels.to(probs.device).long()[:, None]).squeeze(1)


def target_weights(obs: Observation, target: str) -> dict[str, torch.Tensor]:
    """The weights to invert: the global model, or (FedAvg only) the client's returned weights."""
    if target == "global":
        return dict(obs.global_weights)
    if obs.meta.protocol != "fedavg":
        raise ValueError(
            f"{SUBJECT}: target 'client' inverts the client's returned weights, which only "
            f"FedAvg sends; this observation (round {obs.round}, client {obs.client_id}) is "
            f"{obs.meta.protocol!r}, whose update is a gradient -- use target 'global'"
        )
    return dict(obs.update)


@dataclass
class _Evaluation:
    """Loss terms, weighted total and per-sample confidence of one generated batch."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    confidence: torch.Tensor
    images: torch.Tensor


class _Problem:
    """The frozen classifier, the generator being trained and the seeded random streams."""

    def __init__(self, obs: Observation, params: InversionParams) -> None:
        spec = obs.model
        if is_binary(spec):
            raise ValueError(
                f"{SUBJECT} needs a multi-class softmax classifier; model {spec.kind!r} is binary"
            )
        self.params = params
        self.classifier = FrozenClassifier(
            spec, target_weights(obs, params.target), params.data_low, params.data_high
        )
        device = self.classifier.device
        self.classes = self.classifier.num_classes
        # The generator's weights come from their own CPU stream so that they do not depend on
        # the device; latents and noise from a stream on the device, in a fixed order.
        self.generator = ConditionalGenerator(
            params.latent_dim,
            self.classes,
            tuple(spec.input_shape),  # type: ignore[arg-type]
            params.width,
            params.sharpness,
            generator=torch.Generator().manual_seed(params.seed),
        ).to(device)
        self.stream = torch.Generator(device=device).manual_seed(params.seed + 1)
        self.class_logits = torch.zeros(self.classes, device=device, requires_grad=True)
        self.weights = {t: w for t, w in params.loss_weights().items() if w > 0}
        self.theta = self.classifier.trainable_copy() if "kkt" in self.weights else {}
        self.device = device

    def latent(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.params.latent_dim, generator=self.stream, device=self.device)

    def noise(self, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=self.stream, device=self.device)

    def coefficients(self, labels: torch.Tensor) -> torch.Tensor:
        """KKT combination weights: uniform, or softmax over the batch of a learned class logit."""
        if self.params.kkt_coefficients == "uniform":
            return torch.full(labels.shape, 1.0 / labels.numel(), device=self.device)
        return torch.softmax(self.class_logits[labels], dim=0)

    def evaluate(self, latent: torch.Tensor, labels: torch.Tensor) -> _Evaluation:
        p = self.params
        pre = self.generator.pre_activation(latent, labels)
        images = torch.sigmoid(pre)
        logits, features = self.classifier(images)
        ctx = LossContext(
            images=images,
            pre_activation=pre,
            logits=logits,
            features=features,
            labels=labels,
            soft_labels=soft_labels(labels, self.classes, p.sharpness).to(self.device),
            classifier=self.classifier,
            noise=self.noise,
            noise_std=p.noise_std,
            range_bound=p.range_bound,
            coefficients=self.coefficients(labels),
            theta=self.theta,
        )
        terms = {t: INVERSION_LOSSES.entry(t).value.fn(ctx) for t in self.weights}
        total = sum(w * terms[t] for t, w in self.weights.items())
        confidence = torch.softmax(logits.detach(), 1).gather(1, labels[:, None]).squeeze(1)
        return _Evaluation(total, terms, confidence, images.detach())  # type: ignore[arg-type]


def _record(iteration: int, ev: _Evaluation, seconds: float) -> dict[str, float]:
    value = float(ev.total.detach())
    return {
        "iteration": float(iteration),
        "generator_loss": value,
        "loss": value,
        **{f"loss_{t}": float(v.detach()) for t, v in ev.terms.items()},
        "confidence": float(ev.confidence.mean()),
        "seconds": seconds,
    }


@register_attack(
    "inversion",
    "Network inversion: train a conditional generator until the frozen model confidently "
    "classifies its samples, regularised towards training-like data (TLDR).",
)
class Inversion(Attack[InversionParams]):
    """Train a generator against the frozen classifier; return its samples for every class.

    ``objective_value`` and the trace's "generator_loss" hold the weighted total loss (of the
    returned images for ``objective_value``). ``status``: "converged" when
    ``stop_confidence`` was reached, "budget" when the steps ran out, "diverged" when the loss
    became non-finite (the generator of the last finite trace record is used).
    """

    Params = InversionParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return [self._attack(obs) for obs in observations]

    def _attack(self, obs: Observation) -> Reconstruction:
        p = self.params
        start = time.perf_counter()
        problem = _Problem(obs, p)
        classes, device = problem.classes, problem.device
        eval_labels = torch.arange(classes, device=device).repeat_interleave(p.samples_per_class)
        eval_latent = problem.latent(eval_labels.numel())
        train_labels = torch.arange(p.batch_size, device=device) % classes
        learned = [problem.class_logits] if p.kkt_coefficients == "learned" else []
        trained = [*problem.generator.parameters(), *learned]
        optimizer = torch.optim.Adam(trained, lr=p.lr)
        snap_at = snapshot_steps(p.steps, p.snapshots, start=False)
        trace: list[dict[str, float]] = []
        snapshots: list[tuple[int, torch.Tensor]] = []
        status: Status = "budget"
        last_good = copy.deepcopy(problem.generator.state_dict())
        for step in range(p.steps + 1):
            ev = problem.evaluate(problem.latent(p.batch_size), train_labels)
            if not math.isfinite(float(ev.total.detach())):
                status = "diverged"
                problem.generator.load_state_dict(last_good)
                break
            reached = p.stop_confidence is not None and float(ev.confidence.mean()) >= (
                p.stop_confidence
            )
            if step % p.log_every == 0 or step == p.steps or reached:
                trace.append(_record(step, ev, time.perf_counter() - start))
                last_good = copy.deepcopy(problem.generator.state_dict())
            if step in snap_at:
                with torch.no_grad():
                    snapshots.append((step, problem.generator(eval_latent, eval_labels).cpu()))
            if reached:
                status = "converged"
                break
            if step == p.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            # inputs=: the KKT term's theta copies are leaves too; they must not be trained.
            ev.total.backward(inputs=trained)
            optimizer.step()
        final = problem.evaluate(eval_latent, eval_labels)
        images = final.images
        confidence = final.confidence
        per_class = confidence.view(classes, p.samples_per_class).mean(1)
        summary = _record(step, final, 0.0)
        summary.update(
            {
                "seconds": time.perf_counter() - start,
                "final": 1.0,
                "confidence_min": float(confidence.min()),
                **{f"confidence_class_{k}": float(v) for k, v in enumerate(per_class)},
            }
        )
        trace.append(summary)
        return Reconstruction(
            round=obs.round,
            client_id=obs.client_id,
            images=images.cpu(),
            labels=eval_labels.cpu(),
            trace=trace,
            snapshots=snapshots,
            status=status,
            attack=self.name,
            matching="training",
            notes=(
                f"{images.shape[0]} generated images ({p.samples_per_class} per class), target "
                f"{p.target}, terms {', '.join(problem.weights)}; classifier confidence mean "
                f"{float(confidence.mean()):.3f}, min {float(confidence.min()):.3f}; per class "
                + " ".join(f"{k}:{float(v):.2f}" for k, v in enumerate(per_class))
            ),
            objective="generator-loss",
            objective_value=float(final.total.detach()),
        )
