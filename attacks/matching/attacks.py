"""Optimisation attacks that make dummy images reproduce an observed update.

DLG (Zhu et al. 2019), iDLG (Zhao et al. 2020) and Inverting Gradients (Geiping et al. 2020)
share one engine and differ in their defaults:

* ``dlg``: dummy images and soft labels (softmax of free logits) optimised jointly; squared-L2
  gradient distance; L-BFGS with step 1 as in the paper.
* ``idlg``: labels recovered analytically first (:mod:`attacks.labels.recovery`), images only.
* ``inverting-gradients``: recovered labels, cosine distance ``1 - cos(g, g*)`` over all
  parameters, total-variation prior, Adam on signed gradients, projection onto [0, 1] after
  every step, step decay x0.1 at 3/8, 5/8 and 7/8 of the budget.

A known noise (a defense's public setting): ``distance="gaussian"`` matches with the Gaussian
negative log-likelihood ``|g - g*|^2 / (2 noise_scale^2)`` (weighted L2) and
``distance="laplace"`` with the Laplace one ``|g - g*|_1 / noise_scale`` (L1), in nats, so that
``tv_weight`` and ``box`` act as the image prior of a MAP estimate.

Dummies start uniform in [0, 1] (the data range) by default; ``init="randn"`` gives the DLG
paper's Gaussian start, which on small networks often saturates the softmax and stalls;
``"dark"`` (uniform in [0, 0.1]) starts near the background of digit images (iDLG's default:
on the iDLG LeNet, with 100 L-BFGS pairs, 30 dB at batch 1 takes ~50 iterations instead of
~150 from a uniform start with 30 pairs); ``"zeros"`` and
``"half"`` are constant starts (identical dummies stay identical under shared labels, so use
them for single images only).
The TV weight is absolute, as in the paper, but the cosine distance of these small MNIST
networks can be as small as 1e-6 at initialisation (LeNet: the head's gradient dominates), so
the default is 1e-6: the paper's 1e-2..0.2 (tuned for natural images) swamps it and blurs
strokes. ``box`` keeps images in [0, 1]: Adam projects after each step; L-BFGS freezes pixels
that sit on a bound the gradient pushes against and projects its line search path (without it,
L-BFGS results are clamped to [0, 1] only when reported). The box matters for batches of
digits (most pixels are exactly 0), little for single images.

Stopping: a problem stops below ``tolerance`` (absolute) or ``rel_tolerance`` times the
distance a zero update would have (``|g*|^2`` for L2, 1 for the normalised distances) per
private sample, which is scale-free across models and batch sizes (on the iDLG LeNet 1e-6 is
about 40 dB at batch 1 and 35-40 dB at batch 8); stopped (converged) problems cost nothing more:
the L-BFGS line search evaluates only the problems still running. ``distance="l2-layer"``
averages per-parameter L2 distances, each normalised by the target's norm. ``precision=
"float64"`` solves in double precision. A single problem is evaluated with plain autograd
(same numbers as the vectorised path, less dispatch).

The engine is batched: every observation passed to one ``run`` call, times ``restarts`` random
initialisations, becomes one problem in a tensor (problems, samples, C, H, W). Per-problem
updates are computed with ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``) and
differentiated by one plain autograd pass over their summed distances, so K clients cost one
vectorised double-backward per iteration instead of K. Problems never
interact: Adam is element-wise and the L-BFGS (:mod:`attacks.optim.lbfgs`) keeps a separate
history, step size and line search per problem, so a batched run follows the same path as
separate runs (up to floating-point summation order). Observations whose model or protocol
shapes differ are solved as separate batches. The reported iterate is each problem's best
(lowest distance) one, and the restart with the lowest distance wins.

Label candidates: with ``label_candidates`` > 1, a batch whose label counts came from the
bias-count rule (uncertain, see :func:`attacks.labels.recovery.label_candidates`) is solved once per
candidate multiset (times ``restarts``), and the lowest distance picks the multiset: a wrong
multiset cannot reproduce the update. ``prune_after`` / ``prune_factor`` stop an observation's
problems that lag its best by that factor (checked every ``prune_after`` iterations), and as
soon as one of its problems reaches the tolerance the others stop, so the extra candidates
cost little once they separate (on the iDLG LeNet, batch 8: after ~100 iterations).

L-BFGS keeps its curvature pairs in the compact form of Byrd, Nocedal and Schnabel (a few
batched matrix products per iteration instead of a Python two-loop over the memory), and only
problems still running get directions, line searches and evaluations.

Defense-aware: with ``known_defense`` (the clients' pruning or quantization, whose
configuration the server hands out) the L2 distance becomes the squared distance to the box of
intervals the true update lies in (:mod:`attacks.common.intervals`): a pruned coordinate only
has to stay under the pruning threshold, not match the zero that arrived, and a quantized one
only has to round to the level that arrived.

FedAvg updates are attacked by replaying the client's local SGD (epochs, batch size, lr; all
``num_examples`` dummies) differentiably and matching ``(w_global - w_client) / lr``. The
client's shuffling is unknown: the first epoch uses slot order (no loss of generality, as
dummies are exchangeable), later epochs use seeded permutations, an approximation. Which
recovered labels shared a mini-batch is unknown too, so every restart spreads them over the
slots in its own random order and the best restart wins: use several restarts for FedAvg.

Layout: this module holds the front-ends (the settings dataclasses, :func:`match_gradients`,
which groups observations into batches and keeps the best restart of each, and the registered
attacks); :mod:`attacks.matching.objective` builds the batched problem (labels, targets,
starting points, the vectorised objective) and :mod:`attacks.optim` holds the optimisers
(Adam, L-BFGS) and the tracker of best iterates, split so that every module stays small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from attacks.base import Attack, register_attack
from attacks.common.intervals import KnownDefense
from attacks.matching.objective import (
    NOISE_LIKELIHOODS,
    Batch,
    batch_key,
    evaluator,
    initial,
    make_batch,
    make_plan,
)
from attacks.optim.adam import adam
from attacks.optim.lbfgs import lbfgs
from attacks.optim.tracker import Tracker, status_of
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge
from simulator.core.models import is_binary
from simulator.core.protocol import Observation, PublicData, Reconstruction


@dataclass(frozen=True)
class GradientMatchingParams:
    """Settings shared by the gradient-matching attacks (defaults: DLG)."""

    iterations: int = param(300, low=1, high=1_000_000, help="optimiser iterations")
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float = param(1.0, low=0.0, low_open=True, high=1e3, help="step size")
    distance: Literal["l2", "cosine", "l2-layer", "gaussian", "laplace"] = "l2"
    noise_scale: float = param(
        0.0,
        low=0.0,
        help="the noise on each coordinate of the update the client sent (a defense's public "
        "setting): its std for distance 'gaussian', its scale b for 'laplace'",
    )
    labels: Literal["learn", "recover"] = "learn"
    tv_weight: float = param(0.0, low=0.0, high=1e3, help="total-variation prior weight")
    signed: bool = False
    lr_decay: bool = False
    box: bool = False  # keep images in [0, 1] (Adam: projection; L-BFGS: active set)
    init: Literal["randn", "uniform", "zeros", "half", "dark"] = "uniform"
    precision: Literal["float32", "float64"] = "float32"
    restarts: int = param(1, low=1, high=256, help="random restarts per observation")
    label_candidates: int = param(
        1, low=1, high=64, help="recovered label multisets tried per batch observation"
    )
    prune_after: int = param(
        0, low=0, help="every this many iterations, stop lagging problems; 0: never"
    )
    prune_factor: float = param(
        100.0, low=1.0, help="lagging: distance above this multiple of the observation's best"
    )
    history: int = param(30, low=1, high=1000, help="L-BFGS memory")
    max_step: float = param(1.0, low=0.0, help="L-BFGS cap on any variable's change; 0: none")
    tolerance: float = param(1e-9, low=0.0, help="stop a problem below this distance")
    rel_tolerance: float = param(
        0.0, low=0.0, high=1.0, help="stop below this fraction of the target's own distance"
    )
    stall_restarts: int = param(
        0,
        low=0,
        high=1000,
        help="L-BFGS: a problem that stalls above the tolerance starts again from a new draw, "
        "up to this many times, inside the same batched solve",
    )
    seed: int = param(0, low=0, help="seed of the dummy initialisation")
    log_every: int = param(10, low=1, help="trace every this many iterations")
    snapshots: int = param(4, low=0, high=1000, help="intermediate image batches kept")
    # The clients' update defense (pruning, int8, fp16): match the intervals it leaves
    # (needs distance l2).
    known_defense: KnownDefense = "none"


@dataclass(frozen=True)
class DLGParams(GradientMatchingParams):
    """DLG: joint images + soft labels, L2 distance, L-BFGS step 1."""


@dataclass(frozen=True)
class IDLGParams(GradientMatchingParams):
    """iDLG: labels recovered from the last layer, images optimised with L-BFGS.

    Tuned on the paper's setting (MNIST, sigmoid LeNet, U(-0.5, 0.5) weights): a dark start
    (most of a digit is background), a long L-BFGS memory and a stop at a relative distance of
    1e-6 (about 40 dB at batch 1) take ~75 iterations per image where a uniform start with
    30 pairs needed 150+ and never stopped.
    """

    labels: Literal["learn", "recover"] = "recover"
    init: Literal["randn", "uniform", "zeros", "half", "dark"] = "dark"
    history: int = param(100, low=1, high=1000, help="L-BFGS memory")
    rel_tolerance: float = param(
        1e-6, low=0.0, high=1.0, help="stop below this fraction of the target's own distance"
    )


@dataclass(frozen=True)
class InvertingGradientsParams(GradientMatchingParams):
    """Inverting Gradients: cosine distance, TV prior, signed Adam, box, step decay."""

    iterations: int = param(2000, low=1, high=1_000_000, help="optimiser iterations")
    optimizer: Literal["lbfgs", "adam"] = "adam"
    lr: float = param(0.1, low=0.0, low_open=True, high=1e3, help="step size")
    distance: Literal["l2", "cosine", "gaussian", "laplace"] = "cosine"
    labels: Literal["learn", "recover"] = "recover"
    tv_weight: float = param(1e-6, low=0.0, high=1e3, help="total-variation prior weight")
    signed: bool = True
    lr_decay: bool = True
    box: bool = True


# --------------------------------------------------------------------------------------------
# Running an attack


def _solve(
    batch: Batch, params: GradientMatchingParams, attack: str, start: float
) -> list[Reconstruction]:
    """Optimise all problems of ``batch`` together; keep the best restart per observation."""
    device = next(iter(batch.target.values())).device
    z = initial(batch, params, device)
    if params.precision == "float64":
        z = z.double()
        batch.weights = {k: v.double() for k, v in batch.weights.items()}
        batch.target = {k: v.double() for k, v in batch.target.items()}
        batch.radius = {k: v.double() for k, v in batch.radius.items()}
        batch.lr = batch.lr.double()
    evaluate = evaluator(batch, params)
    tracker = Tracker(z, params, start, group=batch.slots)
    # Distance of a dummy whose update is zero: |g*|^2 (L2), 1 for the normalised distances;
    # per private sample, as a batch's images share the distance.
    if params.distance == "l2":
        reference = sum((v.flatten(1) ** 2).sum(1) for v in batch.target.values())
    else:
        reference = torch.ones_like(batch.lr)
    reference = reference / batch.samples
    tracker.threshold = torch.clamp(params.rel_tolerance * reference, min=params.tolerance)
    if params.optimizer == "lbfgs":
        draws = [0] * z.shape[0]

        def redraw(rows: torch.Tensor) -> torch.Tensor:
            for row in rows.tolist():
                draws[row] += 1
            return initial(batch, params, device, draws)[rows]

        lbfgs(evaluate, z, batch, params, tracker, redraw)
    else:
        adam(evaluate, z, batch, params, tracker)

    images, label_vars = batch.split(tracker.best)
    distance = torch.nan_to_num(tracker.best_distance, nan=math.inf)
    results = []
    for k, obs in enumerate(batch.observations):
        block = slice(k * batch.slots, (k + 1) * batch.slots)
        p = k * batch.slots + int(distance[block].argmin())
        plan = batch.plans[k]
        labels: torch.Tensor | None
        notes = plan.notes
        if batch.candidates > 1:
            chosen = (p - k * batch.slots) // batch.restarts
            notes += f"; label multiset {chosen + 1} of {batch.candidates} candidates"
        if is_binary(batch.spec):
            labels, notes = None, notes + "; binary model: learned targets are parity bits"
        else:
            labels = label_vars[p].argmax(-1).to(torch.int64)
        trace = [
            {
                "iteration": float(it),
                "gradient_distance": float(d[p]),
                "objective": float(o[p]),
                "seconds": sec,
            }
            for it, sec, d, o in tracker.rows
        ]
        results.append(
            Reconstruction(
                round=obs.round,
                client_id=obs.client_id,
                images=images[p].clamp(0, 1).detach().float().clone(),
                labels=labels,
                trace=trace,
                snapshots=[(it, snap[p]) for it, snap in tracker.snapshots],
                status=status_of(tracker, p),
                attack=attack,
                notes=f"{notes}; best of {batch.restarts} restart(s)",
                objective_value=float(distance[p]),
            )
        )
    return results


def match_gradients(
    observations: Sequence[Observation],
    params: GradientMatchingParams,
    attack: str = "",
    public: PublicData | None = None,
) -> list[Reconstruction]:
    """Run a gradient-matching attack on all ``observations`` as few batched problems
    (``public``: the server's labelled data, for batch label counts)."""
    if params.distance in NOISE_LIKELIHOODS and params.noise_scale <= 0:
        raise ValueError(
            f"distance {params.distance!r} is the noise's likelihood: set noise_scale to the "
            "noise on each coordinate of the update (the defense's std or scale)"
        )
    start = time.perf_counter()
    if params.known_defense != "none" and params.distance != "l2":
        raise ValueError(
            f"known_defense = {params.known_defense!r} matches intervals in squared L2; got "
            f'distance = {params.distance!r} (set distance = "l2")'
        )
    plans = [make_plan(obs, params, public) for obs in observations]
    groups: dict[tuple[object, ...], list[int]] = {}
    for index, (obs, plan) in enumerate(zip(observations, plans, strict=True)):
        groups.setdefault(batch_key(obs, plan), []).append(index)
    results: list[Reconstruction | None] = [None] * len(observations)
    for indices in groups.values():
        batch = make_batch([observations[i] for i in indices], [plans[i] for i in indices], params)
        solved = _solve(batch, params, attack, start)
        for index, reconstruction in zip(indices, solved, strict=True):
            results[index] = reconstruction
    return [r for r in results if r is not None]


class GradientMatchingAttack(Attack[GradientMatchingParams]):
    """Shared ``run`` of the gradient-matching attacks."""

    Params = GradientMatchingParams

    def adapted_params(self, knowledge: DefenseKnowledge) -> dict[str, object]:
        """The noise's likelihood as the distance; without noise, the known intervals (which
        squared L2 matches)."""
        if knowledge.noise != "none":
            return {"distance": knowledge.noise, "noise_scale": knowledge.noise_scale}
        if knowledge.intervals != "none":
            return {"distance": "l2", "known_defense": knowledge.intervals}
        return {}

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return match_gradients(observations, self.params, self.name, self.public)


@register_attack("dlg", "Deep Leakage from Gradients: images + soft labels, L2, L-BFGS.")
class DLG(GradientMatchingAttack):
    Params = DLGParams


@register_attack("idlg", "iDLG: labels from the last layer's gradient, then images by L-BFGS.")
class IDLG(GradientMatchingAttack):
    Params = IDLGParams


@register_attack(
    "inverting-gradients",
    "Inverting Gradients: cosine distance, total variation, signed Adam in [0, 1].",
)
class InvertingGradients(GradientMatchingAttack):
    Params = InvertingGradientsParams
