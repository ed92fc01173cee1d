"""Loss terms of network inversion: what a generated batch pays for not looking like training data.

Every term is a small function of a :class:`LossContext` (one generated batch and the frozen
classifier's view of it) returning a scalar; :data:`LOSSES` maps each name to that function and
a one-line description with its formula. The attack (:mod:`attacks.inversion.attack`) weights
the terms by its ``weight_<name>`` parameters and skips terms of weight 0 entirely.

Notation: ``x_i`` generated images in [0, 1] (``a_i`` their pre-sigmoid values), ``y_i`` target
classes, ``q_i`` the target soft label vector, ``f(x)`` the classifier's logits,
``p_i = softmax(f(x_i))``, ``h_i`` penultimate-layer features (the input of the last Linear
layer), ``B`` the batch size, ``theta`` the classifier's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from simulator.core.models import ModelSpec, build_model
from simulator.core.registry import INVERSION_LOSSES


class FrozenClassifier:
    """The classifier the server holds, evaluated functionally with fixed weights.

    Returns logits and penultimate features (captured by a forward pre-hook on the last
    ``nn.Linear``, which works for every architecture of :mod:`simulator.models` without
    knowing its layout). ``data_low`` / ``data_high`` map [0, 1] images to the model's input
    range. Weights never receive gradients; :meth:`trainable_copy` gives leaf copies for the
    KKT term, which differentiates with respect to them.
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights: Mapping[str, torch.Tensor],
        data_low: float = 0.0,
        data_high: float = 1.0,
    ) -> None:
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
        self.model = build_model(spec, seed=0).to(device)
        self.model.requires_grad_(False)
        names = list(self.model.state_dict())
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"weights lack parameters {missing} of model {spec.kind!r}")
        self.weights = {n: weights[n].detach().to(device, torch.float32) for n in names}
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"model {spec.kind!r} has no Linear layer to take features from")
        self.head = linears[-1]
        self.num_classes = self.head.out_features
        self.data_low = data_low
        self.data_high = data_high
        self.device = device

    def __call__(
        self, images: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (n, K), penultimate features (n, d)) of [0, 1] images."""
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            inputs = self.data_low + (self.data_high - self.data_low) * images
            logits = functional_call(self.model, dict(weights or self.weights), (inputs,))
        finally:
            handle.remove()
        return logits, captured[-1].flatten(1)

    def trainable_copy(self) -> dict[str, torch.Tensor]:
        """Leaf copies of the weights that require grad (for gradients with respect to theta)."""
        return {n: w.clone().requires_grad_(True) for n, w in self.weights.items()}


@dataclass
class LossContext:
    """One generated batch and what the loss terms need to score it.

    ``noise`` draws a standard normal tensor of a given shape from the attack's seeded stream;
    ``coefficients`` (B,) are the KKT combination weights (non-negative, summing to 1);
    ``theta`` are leaf copies of the classifier's weights (only the KKT term uses them).
    """

    images: torch.Tensor
    pre_activation: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor
    classifier: FrozenClassifier
    noise: Callable[[torch.Size], torch.Tensor]
    noise_std: float
    range_bound: float
    coefficients: torch.Tensor
    theta: dict[str, torch.Tensor]


def _same_class_mean(similarity: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of ``similarity[i, j]`` over pairs i != j of the same class (0 without pairs)."""
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    if not bool(same.any()):
        # Zero that stays in the graph, so a batch without pairs can still be back-propagated.
        return similarity.sum() * 0
    return similarity[same].mean()


def cross_entropy(ctx: LossContext) -> torch.Tensor:
    """Mean CE of the logits to the target class."""
    return nn.functional.cross_entropy(ctx.logits, ctx.labels)


def kl(ctx: LossContext) -> torch.Tensor:
    """KL(q || p): pulls the softmax to the soft target rather than to a saturated one-hot."""
    log_p = torch.log_softmax(ctx.logits, dim=1)
    return nn.functional.kl_div(log_p, ctx.soft_labels, reduction="batchmean")


def diversity(ctx: LossContext) -> torch.Tensor:
    """Mean cosine similarity of mean-removed images of the same class (mode collapse penalty).

    Mean removal matters: raw [0, 1] images are non-negative, so their cosine is high for any
    pair of mostly dark images and the penalty would push towards brightness changes instead.
    """
    flat = ctx.images.flatten(1)
    unit = nn.functional.normalize(flat - flat.mean(1, keepdim=True), dim=1)
    return _same_class_mean(unit @ unit.T, ctx.labels)


def orthogonality(ctx: LossContext) -> torch.Tensor:
    """Mean squared off-diagonal entry of the Gram matrix of unit-normalised features."""
    unit = nn.functional.normalize(ctx.features, dim=1)
    gram = unit @ unit.T
    batch = gram.shape[0]
    if batch < 2:
        return gram.sum() * 0
    off = gram - torch.diag_embed(torch.diagonal(gram))
    return (off**2).sum() / (batch * (batch - 1))


def total_variation(ctx: LossContext) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of vertically and horizontally adjacent pixels."""
    images = ctx.images
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return dx + dy


def pixel_range(ctx: LossContext) -> torch.Tensor:
    """Mean relu(|a| - bound)^2 on pre-sigmoid values: keeps pixels out of the flat tails.

    The sigmoid already confines images to [0, 1], so a range penalty on the images would be
    identically zero; saturated pixels instead stop learning (sigmoid' ~ 0), which this avoids.
    """
    return (torch.relu(ctx.pre_activation.abs() - ctx.range_bound) ** 2).mean()


def perturbation(ctx: LossContext) -> torch.Tensor:
    """KL(p(x) || p(x + eps)), eps ~ N(0, std^2): the prediction must survive small noise.

    Adversarial-noise "images" sit where the decision is brittle; training data does not.
    """
    noisy = ctx.images + ctx.noise_std * ctx.noise(ctx.images.shape)
    noisy_logits, _ = ctx.classifier(noisy)
    log_p = torch.log_softmax(ctx.logits, dim=1)
    log_noisy = torch.log_softmax(noisy_logits, dim=1)
    return (log_p.exp() * (log_p - log_noisy)).sum(1).mean()


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Smooth multiclass margin ``f_y - logsumexp_{j != y} f_j`` per sample, (n,)."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    mask = nn.functional.one_hot(labels, logits.shape[1]).bool()
    return own - logits.masked_fill(mask, float("-inf")).logsumexp(1)


def kkt(ctx: LossContext) -> torch.Tensor:
    """1 - cos(theta, sum_i c_i grad_theta m_i(x_i)), m the smooth margin (KKT stationarity).

    A classifier trained towards margin maximisation satisfies theta ~ sum_i lambda_i
    grad_theta margin(x_i) over its training points (Haim et al. 2022); generated samples that
    make this hold resemble those points. The cosine ignores the unknown global scale of the
    lambdas. The smooth margin's gradient is ``grad f_y - sum_{j != y} s_j grad f_j`` with
    ``s`` the softmax over the other classes, i.e. per-class coefficients lambda_ij that
    concentrate on the closest competitor. Differentiating this needs a double backward.
    """
    logits, _ = ctx.classifier(ctx.images, ctx.theta)
    combined = (ctx.coefficients * margins(logits, ctx.labels)).sum()
    params = list(ctx.theta.values())
    grads = torch.autograd.grad(combined, params, create_graph=True)
    flat_theta = torch.cat([p.detach().flatten() for p in params])
    flat_grad = torch.cat([g.flatten() for g in grads])
    return 1 - nn.functional.cosine_similarity(flat_theta, flat_grad, dim=0)


@dataclass(frozen=True)
class LossTerm:
    """A loss term: its function and the one-line description (with formula) docs show."""

    fn: Callable[[LossContext], torch.Tensor]
    description: str


# The built-in terms, registered in the one plugin registry (``leaksim list`` shows them).
_BUILTIN_TERMS: dict[str, LossTerm] = {
    "cross_entropy": LossTerm(cross_entropy, "CE to the target class: mean_i -log p_i[y_i]"),
    "kl": LossTerm(kl, "KL to the soft target: mean_i sum_k q_ik log(q_ik / p_ik)"),
    "diversity": LossTerm(
        diversity,
        "same-class similarity: mean_{i != j, y_i = y_j} cos(x_i - mean(x_i), x_j - mean(x_j))",
    ),
    "orthogonality": LossTerm(
        orthogonality,
        "feature orthogonality: mean_{i != j} (h_i . h_j / (|h_i| |h_j|))^2 over the batch",
    ),
    "total_variation": LossTerm(
        total_variation, "smoothness: mean |x[h+1, w] - x[h, w]| + mean |x[h, w+1] - x[h, w]|"
    ),
    "pixel_range": LossTerm(
        pixel_range, "sigmoid saturation: mean relu(|a| - range_bound)^2 on pre-sigmoid values"
    ),
    "perturbation": LossTerm(
        perturbation,
        "noise consistency: mean_i KL(p(x_i) || p(x_i + eps)), eps ~ N(0, noise_std^2)",
    ),
    "kkt": LossTerm(
        kkt,
        "KKT stationarity: 1 - cos(theta, sum_i c_i grad_theta (f_y - logsumexp_{j != y} f_j)"
        "(x_i))",
    ),
}
for _name, _term in _BUILTIN_TERMS.items():
    INVERSION_LOSSES.add(_name, _term.description, _term)
LOSSES: tuple[str, ...] = tuple(_BUILTIN_TERMS)
