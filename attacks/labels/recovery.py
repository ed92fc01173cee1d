"""Label recovery from the last layer's gradient (iDLG and its batch extensions).

For cross-entropy and a final linear layer ``z = W h + b`` the per-sample gradients are
``dL/db = p - y`` and ``dL/dW = (p - y) h^T`` where ``p`` is the softmax and ``y`` the one-hot
label. Hence, for the mean loss over a batch of n samples:

* batch size 1 (iDLG, Zhao et al. 2020): ``db`` has exactly one negative entry, the label. Without
  a bias, every row of ``dW`` is a multiple ``(p_c - y_c) h`` of the same vector; the label's
  row is the one whose coefficient has the opposite sign to all the others.
* batches, with a bias: ``db_c = mean_i p_ic - count_c / n``. A negative entry proves class c is
  present, and ``count_c = n (pbar_c - db_c)`` where ``pbar`` (the batch's mean softmax) is
  estimated by the model's mean softmax on random probe images (as in Geng et al. 2021). Counts
  are rounded by largest remainder so that they sum to n and every negative class keeps >= 1.
* batches, no bias, non-negative features (ReLU/sigmoid, or raw pixels): row sums of ``dW``
  behave like ``db`` scaled by the unknown feature mass ``s``; classes with negative row sums
  are present, absent classes have row sum ~ ``s * pbar_c``, which calibrates ``s``, and then
  counts follow as above (a heuristic, as per-sample feature masses differ: on untrained
  MNIST MLPs the multiset was exact at n = 4 in 39 of 40 trials, 87-93% of labels right at
  n = 8 and 77-81% at n = 16).

The probe estimate of ``pbar`` suits models near initialisation (early rounds): on an MLP
trained to 86% accuracy the batch counts drop to 67-77% of labels right (the batch's softmax
then follows its labels, which probes cannot know). The bs=1 rules stay exact.

With the server's labelled public data (:class:`PublicData`, the test split) the batch's mean
softmax is modelled from the labels themselves: ``pbar = M^T f`` where ``f = counts / n`` and
``M[k]`` is the model's mean softmax on public images of class k (its confusion in
probabilities). Then ``db = (M^T - I) f``, a 10 x 10 system solved for ``f`` on the simplex
(non-negative least squares, with the sum-to-one row weighted heavily). At initialisation
every row of M is the same ``pbar`` and this is the probe rule; on a trained model M is
nearly the identity scaled by the confidence, and the rule follows the labels
(``benchmarks/bench_label_counts.py`` measures both).

Under FedAvg the same rules run on the mean step direction ``(w_global - w_client) / (lr *
steps)`` (:func:`attacks.common.updates.as_gradient`), which is exact for one local step and an
approximation otherwise (the model drifts).

The binary model (one logit trained with BCE on parity) reveals parity, not digits: with a
bias, ``db = mean_i sigmoid(z_i) - t_i`` gives the number of odd images ``n (sbar - db)``
(``sbar`` estimated by probes as above; at n = 1 the sign of ``db`` is exact). Its labels are
returned as parity classes 0 (even) and 1 (odd), which is all the training loss depends on.

When the counts are uncertain, :func:`label_candidates` ranks alternative multisets: on the
iDLG LeNet with U(-0.5, 0.5) weights the network's softmax concentrates on two or three
classes, whose probe estimates are off by ~0.1, so one sample is often moved between them
(2 of 8 batches of 8 and 4 of 4 batches of 16 of the first MNIST training images); the true
multiset was the best single move in half of those cases. Gradient matching tries the first
few candidates and keeps the one whose images reproduce the update.

Recovery is impossible (returns ``labels=None`` with a reason) for batches without a final
bias whose features can be negative (tanh), and for the binary model without a bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import nnls as scipy_nnls
from torch.func import functional_call

from attacks.common.layers import final_layer
from attacks.common.updates import as_gradient, num_samples
from simulator.core.models import ModelSpec, build_model, is_binary
from simulator.core.protocol import Observation, PublicData


@dataclass(frozen=True)
class LabelRecovery:
    """Recovered label multiset (sorted, (n,) int64) or None, with how and why."""

    labels: torch.Tensor | None
    method: str
    reason: str
    exact: bool = False


def features_nonnegative(spec: ModelSpec) -> bool:
    """Whether the head's input features are >= 0 for images in [0, 1], from the spec alone."""
    if spec.kind == "lenet":
        return True  # sigmoid body
    if spec.kind == "mlp" and not spec.params.widths:
        return True  # the head sees raw pixels
    # Kinds without an activation key are ReLU networks or have no hidden layer.
    return getattr(spec.params, "activation", "relu") in ("relu", "sigmoid")


def _probe_mean_softmax(obs: Observation, probes: int, seed: int) -> torch.Tensor:
    """Mean softmax of the global model on random probe images: the estimate of pbar."""
    model = build_model(obs.model, seed=0)
    generator = torch.Generator().manual_seed(seed)
    # Sparse, dim probes resemble digit images (mostly background) better than uniform noise.
    shape = (probes, *obs.model.input_shape)
    images = torch.rand(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.2)
    weights = {k: v.detach().cpu() for k, v in obs.global_weights.items()}
    with torch.no_grad():
        logits = functional_call(model, weights, (images,))
    if is_binary(obs.model):
        return torch.sigmoid(logits.squeeze(-1)).mean().double()
    return logits.softmax(-1).mean(0).double()


COUNT_METHODS = ("bias-counts", "public-counts")  # the uncertain rules, with alternatives
PUBLIC_PER_CLASS = 200  # public images per class for the confusion statistics


def public_confusion(obs: Observation, public: PublicData) -> torch.Tensor:
    """(C, C) float64: row k is the global model's mean softmax on public images of class k
    (the first :data:`PUBLIC_PER_CLASS` of each; a class absent from the data keeps the
    overall mean)."""
    classes = obs.model.num_classes
    chosen = torch.cat(
        [torch.nonzero(public.labels == k).flatten()[:PUBLIC_PER_CLASS] for k in range(classes)]
    )
    model = build_model(obs.model, seed=0)
    weights = {k: v.detach().cpu() for k, v in obs.global_weights.items()}
    with torch.no_grad():
        soft = functional_call(model, weights, (public.images[chosen].float(),)).softmax(-1)
    soft, labels = soft.double(), public.labels[chosen]
    confusion = soft.mean(0).expand(classes, classes).clone()
    present = torch.bincount(labels, minlength=classes) > 0
    sums = torch.zeros(classes, classes, dtype=torch.float64).index_add_(0, labels, soft)
    counts = torch.bincount(labels, minlength=classes).clamp(min=1).double()
    confusion[present] = (sums / counts[:, None])[present]
    return confusion


def _public_fractions(bias: torch.Tensor, confusion: torch.Tensor) -> torch.Tensor:
    """The label fractions f >= 0, sum 1, that best explain ``db = (M^T - I) f``."""
    classes = confusion.shape[0]
    system = confusion.T - torch.eye(classes, dtype=torch.float64)
    # The sum-to-one row, weighted so that it holds to about 1e-6 of the bias gradient's scale.
    weight = 1e3 * max(float(system.abs().max()), 1e-12)
    matrix = torch.cat([system, torch.full((1, classes), weight, dtype=torch.float64)])
    target = torch.cat([bias, torch.tensor([weight], dtype=torch.float64)])
    fractions, _ = scipy_nnls(matrix.numpy(), target.numpy())
    fractions = torch.from_numpy(fractions)
    return fractions / fractions.sum().clamp(min=1e-12)


def _recover_parity(
    obs: Observation, bias: torch.Tensor | None, n: int, probes: int, seed: int, exact: bool
) -> LabelRecovery:
    """Parity classes (0 even, 1 odd) of a binary model's batch from its bias gradient."""
    if bias is None:
        return LabelRecovery(None, "none", "binary model without a bias: parity counts unknown")
    if n == 1:
        odd = int(float(bias.sum()) < 0)
        parity = torch.tensor([odd])
        return LabelRecovery(parity, "binary-bias-sign", "sign of the bias gradient", exact)
    odd = round(n * float(_probe_mean_softmax(obs, probes, seed) - bias.sum()))
    odd = min(max(odd, 0), n)
    parity = torch.cat([torch.zeros(n - odd), torch.ones(odd)]).to(torch.int64)
    return LabelRecovery(parity, "binary-bias-count", "odd count from the bias gradient", False)


def _largest_remainder(estimate: torch.Tensor, minimum: torch.Tensor, total: int) -> torch.Tensor:
    """Round non-negative ``estimate`` to integers >= ``minimum`` summing to ``total``."""
    estimate = estimate.clamp(min=0)
    if int(minimum.sum()) > total:
        # More "certainly present" classes than samples: keep the strongest ones.
        keep = torch.topk(estimate * minimum, total).indices
        minimum = torch.zeros_like(minimum)
        minimum[keep] = 1
    counts = torch.maximum(estimate.floor(), minimum).long()
    while int(counts.sum()) > total:
        # Take from the class whose count most exceeds its estimate and its minimum.
        slack = torch.where(counts > minimum, counts - estimate, torch.tensor(-math.inf).double())
        counts[int(slack.argmax())] -= 1
    remainder = estimate - counts
    while int(counts.sum()) < total:
        index = int(remainder.argmax())
        counts[index] += 1
        remainder[index] -= 1
    return counts


def _expand(counts: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(counts.numel()), counts).to(torch.int64)


def recover_labels(
    obs: Observation, probes: int = 64, seed: int = 0, public: PublicData | None = None
) -> LabelRecovery:
    """Recover the label multiset of the images behind ``obs`` from its last layer.

    With ``public`` data, batch counts come from the model's confusion on it (exact on
    trained models too); without, from random probes (near initialisation only). Returns
    sorted labels (n,) and the method used, or ``labels=None`` and why not.
    """
    spec = obs.model
    n = num_samples(obs)
    layer = final_layer(spec)
    if layer is None:
        return LabelRecovery(None, "none", "no final linear layer onto the classes")
    grads = as_gradient(obs, "mean-step")
    weight = grads[layer.weight].detach().double().cpu()
    bias = grads[layer.bias].detach().double().cpu() if layer.bias is not None else None
    exact = obs.meta.protocol == "fedsgd" or obs.meta.local_steps == 1
    if is_binary(spec):
        return _recover_parity(obs, bias, n, probes, seed, exact)

    if n == 1:
        if bias is not None:
            return LabelRecovery(bias.argmin().reshape(1), "bias-sign", "one negative entry", exact)
        # Rows are (p_c - y_c) h: project on the largest row; the label has the minority sign.
        reference = weight[weight.norm(dim=1).argmax()]
        coefficient = weight @ reference
        negative = coefficient < 0
        label = coefficient.argmin() if int(negative.sum()) == 1 else coefficient.argmax()
        if int(negative.sum()) not in (1, weight.shape[0] - 1):
            return LabelRecovery(None, "none", "row coefficients have no odd-one-out sign")
        return LabelRecovery(label.reshape(1), "weight-sign", "odd-one-out row sign", exact)

    if bias is not None:
        estimate, minimum = _count_estimate(obs, probes, seed, public)
        counts = _largest_remainder(estimate, minimum, n)
        if public is not None:
            return LabelRecovery(
                _expand(counts), "public-counts", "counts from the bias gradient and the "
                "model's confusion on public data", False,
            )  # fmt: skip
        return LabelRecovery(_expand(counts), "bias-counts", "counts from bias gradient", False)

    if not features_nonnegative(spec):
        return LabelRecovery(
            None,
            "none",
            "no final-layer bias and head features can be negative (tanh): row sums of the "
            "weight gradient do not reveal label counts for batches",
        )
    row_sums = weight.sum(dim=1)
    positive = row_sums > 0
    if not bool((row_sums < 0).any()) or not bool(positive.any()):
        return LabelRecovery(None, "none", "weight-gradient row sums have a single sign")
    pbar = _probe_mean_softmax(obs, probes, seed)
    # Absent classes have row sum ~ mass * pbar_c, which calibrates the unknown feature mass.
    mass = row_sums[positive].sum() / pbar[positive].sum()
    counts = _largest_remainder(n * (pbar - row_sums / mass), (row_sums < 0).long(), n)
    return LabelRecovery(_expand(counts), "weight-rowsum", "row-sum heuristic", False)


def _count_estimate(
    obs: Observation, probes: int, seed: int, public: PublicData | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-valued count estimates and the per-class minimum of the bias-count rules."""
    n = num_samples(obs)
    layer = final_layer(obs.model)
    assert layer is not None and layer.bias is not None
    bias = as_gradient(obs, "mean-step")[layer.bias].detach().double().cpu()
    if public is not None:
        return n * _public_fractions(bias, public_confusion(obs, public)), (bias < 0).long()
    return n * (_probe_mean_softmax(obs, probes, seed) - bias), (bias < 0).long()


def label_candidates(
    obs: Observation,
    count: int,
    probes: int = 64,
    seed: int = 0,
    public: PublicData | None = None,
) -> list[torch.Tensor]:
    """Up to ``count`` label multisets (sorted (n,) int64), most likely first.

    The first is :func:`recover_labels`' answer. Only the bias-count rule is uncertain enough
    to have alternatives: single moves of one sample between classes, ranked by how much they
    increase the squared deviation of the counts from their real-valued estimates.
    """
    first = recover_labels(obs, probes, seed, public)
    if first.labels is None:
        return []
    if count <= 1 or first.method not in COUNT_METHODS:
        return [first.labels]
    estimate, minimum = _count_estimate(obs, probes, seed, public)
    base = torch.bincount(first.labels, minlength=estimate.numel())
    moves = []
    for source in range(base.numel()):
        if int(base[source]) <= max(int(minimum[source]), 0) or int(base[source]) == 0:
            continue
        for sink in range(base.numel()):
            if sink == source:
                continue
            counts = base.clone()
            counts[source] -= 1
            counts[sink] += 1
            cost = float(((counts - estimate) ** 2).sum() - ((base - estimate) ** 2).sum())
            moves.append((cost, source, sink, counts))
    moves.sort(key=lambda move: (move[0], move[1], move[2]))
    return [first.labels] + [_expand(move[3]) for move in moves[: count - 1]]
