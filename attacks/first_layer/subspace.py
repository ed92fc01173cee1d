"""First-layer subspace recovery: a client's training inputs span its first layer's change.

Every gradient step on a network whose first layer is ``Linear`` adds ``sum_i g_i x_i^T`` to
that layer's weight matrix (``g_i`` is the signal back-propagated to the layer for sample
``i``), and weight decay only shrinks what is already there. After any number of local steps,
full-batch or not, converged or not:

    W_sent_back - c W_global = sum_i g_i x_i^T,   c = prod_t (1 - lr_t wd)   (c = 1 without decay)

so the weight change has rank at most ``n``, the number of training examples, and its row
space contains every training input. This is the first-layer block of the KKT stationarity
condition ``theta = sum_i lambda_i y_i grad f(x_i)`` with free per-sample coefficients, which
is why the KKT attack uses it as its initialisation. Under FedSGD the first layer's gradient of
a batch of ``n`` is the same kind of sum, so the attack ("subspace") applies to it too.

Recovery, all batched:

1. ``c`` by golden-section search: the value that leaves the least energy outside the top
   ``n`` singular directions (``c`` need not be known; under FedSGD the gradient is used as is).
2. An orthonormal basis of that ``n``-dimensional row space, plus the constant image so that
   centred inputs (``2 x - 1``) are covered too.
3. Sparse non-negative vectors in the span: the alternating-direction method of Qu, Sun and
   Wright (2014, "Finding a sparse vector in a subspace") from every pixel's projection and
   many random starts at once, with a one-sided soft threshold because images are non-negative
   above their background.
4. Candidates ranked by how little negative mass they carry, near-duplicates dropped.

Defense-aware (``known_defense``): under pruning or quantization the received change is the
true one with coordinates zeroed or rounded, which raises its rank and hides the span. Each
true coordinate lies in a known interval (:mod:`attacks.common.intervals`), so the change is
first completed to the rank-``n`` matrix inside those intervals (alternating projections), and
the row space is taken from that. The weight-decay factor is then not fitted (taken as 1).

It needs ``n`` well below the input dimension and images that are sparse above a uniform
background (MNIST digits are; natural photographs are not). Measured on MNIST (784 pixels,
benchmarks/bench_kkt.py): every digit of a 32-image client, about half of 100, almost none of
200 or 500.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attacks.base import Attack, register_attack
from attacks.common.intervals import (
    KnownDefense,
    defended_update,
    low_rank_completion,
    sent_intervals,
)
from attacks.common.layers import first_linear
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge
from simulator.core.models import build_model
from simulator.core.protocol import Observation, Reconstruction

GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class Subspace:
    """The row space recovered from a first-layer change.

    ``basis`` (r, D) has orthonormal rows; ``decay`` is the fitted ``c``; ``outside`` the
    fraction of the change's energy beyond the top ``rank`` directions (0 when the update is
    exactly a combination of ``rank`` inputs); ``energy`` the change's squared norm.
    """

    basis: torch.Tensor
    decay: float
    outside: float
    rank: int
    energy: float


def _outside_energy(matrix: torch.Tensor, rank: int) -> float:
    values = torch.linalg.svdvals(matrix)
    total = float((values**2).sum())
    return float((values[rank:] ** 2).sum()) / total if total > 0 else 0.0


def fit_decay(sent: torch.Tensor, initial: torch.Tensor, rank: int, steps: int = 48) -> float:
    """The ``c`` in [0, 1] minimising the share of ``sent - c initial``'s energy outside rank
    ``rank``.

    A coarse grid finds the basin, golden-section search refines it to about 1e-8. Each energy
    comes from the eigenvalues of the small Gram matrix
    ``(S - cI)(S - cI)^T = SS^T - c (SI^T + IS^T) + c^2 II^T``, whose three parts are formed
    once: an (out, out) eigenvalue problem per ``c`` instead of an (out, D) SVD, 6-7 times
    faster on a 256 x 784 layer.
    """
    sent, initial = sent.double(), initial.double()
    if sent.shape[0] > sent.shape[1]:  # the Gram matrix on the smaller side
        sent, initial = sent.T, initial.T
    cross = sent @ initial.T
    parts = (sent @ sent.T, cross + cross.T, initial @ initial.T)

    def outside(decays: Sequence[float] | torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(decays, dtype=torch.float64).reshape(-1, 1, 1)
        gram = parts[0] - c * parts[1] + c * c * parts[2]
        tail = torch.linalg.eigvalsh(gram)[:, : max(gram.shape[-1] - rank, 0)]
        total = gram.diagonal(dim1=1, dim2=2).sum(1)
        share = tail.clamp_min(0).sum(1) / total.clamp_min(1e-300)
        return torch.where(total > 0, share, torch.zeros_like(share))

    grid = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)
    best = int(outside(grid).argmin())
    low, high = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)])
    for _ in range(steps):
        left, right = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
        at_left, at_right = outside([left, right]).tolist()
        if at_left <= at_right:
            high = right
        else:
            low = left
    return (low + high) / 2


def noise_edge(shape: Sequence[int], noise_std: float) -> float:
    """The largest singular value pure noise of this std per coordinate reaches in an
    (m, n) matrix: the Marchenko-Pastur edge ``noise_std (sqrt(m) + sqrt(n))``."""
    return noise_std * (math.sqrt(shape[0]) + math.sqrt(shape[1]))


def first_layer_subspace(
    sent: torch.Tensor,
    initial: torch.Tensor | None,
    rank: int,
    with_constant: bool = True,
    noise_std: float = 0.0,
) -> Subspace:
    """Row space of the first-layer change ``sent - c initial`` (``initial`` None: ``sent``).

    ``sent``/``initial`` are (out, D) weight matrices (or a gradient and None). ``rank`` is the
    number of training examples behind the update; it is capped at ``min(out, D)``. With a
    known ``noise_std`` on every coordinate of ``sent`` (a defense's public setting), only the
    directions whose singular value clears the noise's edge (:func:`noise_edge`) are kept:
    below it a direction is as likely noise as signal, and a noise direction in the span
    drowns the sparse vectors sought in it.
    """
    sent = sent.detach().double().reshape(sent.shape[0], -1)
    rank = max(1, min(rank, *sent.shape))
    decay = 0.0
    change = sent
    if initial is not None:
        initial = initial.detach().double().reshape(sent.shape)
        decay = fit_decay(sent, initial, rank)
        change = sent - decay * initial
    energy = float((change**2).sum())
    _, values, right = torch.linalg.svd(change, full_matrices=False)
    if noise_std > 0:
        rank = max(1, min(rank, int((values > noise_edge(change.shape, noise_std)).sum())))
    rows = right[:rank]
    if with_constant:
        constant = torch.full((1, rows.shape[1]), rows.shape[1] ** -0.5, dtype=rows.dtype)
        rows = torch.cat([rows, constant])
    basis = torch.linalg.qr(rows.T).Q.T.contiguous()
    return Subspace(basis, decay, _outside_energy(change, rank), rank, energy)


def sparse_vectors(
    basis: torch.Tensor,
    starts: int,
    threshold: float = 0.03,
    iterations: int = 300,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sparse non-negative unit vectors in the span of ``basis`` (r, D): (D + starts, D).

    Alternating directions: ``x = relu(q Y - lambda)``, ``q = normalise(x Y^T)`` with
    ``lambda = threshold / sqrt(D)``; each start converges to a sparse vector of the span.
    Starts: the projection of every pixel onto the span (the data-driven initialisation of Qu,
    Sun and Wright: a pixel few images use points towards those images), then ``starts``
    random directions.

    The iterations run in single precision, twice as fast as double: the shrinkage is far
    above float32's rounding. On a 100-image client of ``dlg-defenses-fedavg`` (round 1, seed
    0) the candidates leak the same number of digits as in double precision, blind and told
    the noise, undefended and under noise 0.001 and 0.01. The result comes back in ``basis``'s
    dtype.
    """
    dims = basis.shape[1]
    shrink = threshold / math.sqrt(dims)
    random = torch.randn(starts, basis.shape[0], generator=generator, dtype=torch.float64)
    work = basis.float()
    coords = torch.cat([work.T, random.float()])
    coords = coords / coords.norm(dim=1, keepdim=True).clamp_min(1e-30)
    for _ in range(iterations):
        vectors = torch.relu(coords @ work - shrink)
        coords = vectors @ work.T
        coords = coords / coords.norm(dim=1, keepdim=True).clamp_min(1e-30)
    vectors = (coords @ work).to(basis.dtype)
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)


def select_candidates(
    vectors: torch.Tensor, count: int, duplicate_cosine: float = 0.98
) -> torch.Tensor:
    """The ``count`` most non-negative distinct vectors, as images in [0, 1] (count, D).

    A true image has no mass below its background; mixtures of images do. Vectors are ranked by
    negative over positive mass (zero vectors last), a vector within ``duplicate_cosine`` of a
    better one is dropped (refilled from the dropped ones if too few remain), and each is scaled
    so its peak is 1.
    """
    positive = vectors.clamp(min=0).sum(1)
    negative = (-vectors).clamp(min=0).sum(1)
    mixed = negative / positive.clamp_min(1e-30)
    # A start the threshold killed (nothing above it) converges to zero: rank it last.
    mixed = torch.where(positive > 1e-9, mixed, torch.inf)
    order = mixed.argsort()
    ranked = vectors[order]
    unit = ranked.clamp(min=0)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-30)
    # A vector goes if any better-ranked one is too similar (kept or not: one matmul, no loop).
    kept = ~((unit @ unit.T) > duplicate_cosine).tril(-1).any(1)
    chosen = torch.cat([ranked[kept], ranked[~kept]])[:count]
    peak = chosen.amax(1, keepdim=True).clamp_min(1e-30)
    return (chosen / peak).clamp(0, 1)


def recover_inputs(
    obs: Observation,
    count: int,
    sparsity: float = 0.03,
    starts: int = 1000,
    generator: torch.Generator | None = None,
    known: KnownDefense = "none",
    completion_iterations: int = 100,
    noise_std: float = 0.0,
) -> tuple[torch.Tensor, Subspace]:
    """``count`` candidate images in [0, 1], (count, C, H, W), from one observation.

    Under FedSGD the first layer's gradient is the change itself; under FedAvg the returned
    first-layer weights are compared with the global ones and the weight-decay factor fitted.
    With a ``known`` update defense the first layer's change is completed inside its intervals
    first (the decay taken as 1). ``noise_std``: the known noise on each coordinate of the
    update (:func:`first_layer_subspace`).
    """
    layer = first_linear(obs.model)
    if isinstance(layer, str):  # convolutions mix pixels before any dense layer sees them
        raise ValueError(
            f"the first-layer subspace needs a fully-connected first layer; model "
            f"{obs.model.kind!r} starts with another parameterised layer"
        )
    first = layer.weight
    rank = obs.meta.num_examples
    if known != "none":
        sent, slack = defended_update(obs)
        box = sent_intervals(sent, known, slack)
        change = low_rank_completion(box.low[first], box.high[first], rank, completion_iterations)
        # Completed, the change is taken as it is: any weight decay is inside the intervals.
        decay = 1.0 if obs.meta.protocol == "fedavg" else 0.0
        subspace = dataclasses.replace(first_layer_subspace(change, None, rank), decay=decay)
    else:
        initial = None if obs.meta.protocol == "fedsgd" else obs.global_weights[first]
        subspace = first_layer_subspace(obs.update[first], initial, rank, noise_std=noise_std)
    vectors = sparse_vectors(subspace.basis, starts, sparsity, generator=generator)
    images = select_candidates(vectors, count).float()
    return images.reshape(-1, *obs.model.input_shape), subspace


def model_labels(obs: Observation, images: torch.Tensor) -> torch.Tensor | None:
    """The client's own model's labels for [0, 1] ``images``: argmax, or parity for one logit.

    None under FedSGD: a gradient carries no trained model to ask.
    """
    if obs.meta.protocol != "fedavg":
        return None
    model = build_model(obs.model)
    model.load_state_dict({k: v.float() for k, v in obs.update.items()})
    with torch.no_grad():
        logits = model(images.reshape(-1, *obs.model.input_shape).float())
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def span_reconstruction(
    obs: Observation,
    images: torch.Tensor,
    subspace: Subspace,
    attack: str,
    notes: str,
    start: float,
) -> Reconstruction:
    """The candidates a span attack returns for ``obs``, labelled by the client's own model,
    traced by the span's residual and timed from ``start``."""
    labels = model_labels(obs, images)
    seconds = time.perf_counter() - start
    return Reconstruction(
        round=obs.round,
        client_id=obs.client_id,
        images=images,
        labels=labels,
        trace=[{"iteration": 0.0, "span_residual": subspace.outside, "seconds": seconds}],
        objective="span-residual",
        status="converged",
        attack=attack,
        notes=notes,
        matching="nearest",
    )  # fmt: skip


@dataclass(frozen=True)
class SubspaceParams:
    """Settings of the first-layer subspace attack."""

    candidates: float = param(
        2.0, low=0.0, low_open=True, high=100.0, help="candidates per training example"
    )
    sparsity: float = param(0.03, low=0.0, low_open=True, high=100.0, help="threshold x sqrt(D)")
    starts: int = param(1000, low=0, high=1_000_000, help="random starts besides the pixel ones")
    seed: int = param(0, low=0, help="seed of the random starts")
    # The clients' update defense (pruning, int8, fp16): complete the change inside its
    # intervals before taking the span.
    known_defense: KnownDefense = "none"
    completion_iterations: int = param(
        300, low=1, high=100_000, help="alternating projections of the completion"
    )
    noise_std: float = param(
        0.0,
        low=0.0,
        help="std of the noise on each coordinate of the update the client sent (a defense's "
        "public setting); above 0, the span keeps only directions above the noise's edge",
    )


@register_attack(
    "subspace",
    "Training inputs as the sparse non-negative vectors spanning the first layer's change "
    "(FedSGD gradient or FedAvg weights); needs a fully-connected first layer.",
)
class SubspaceAttack(Attack[SubspaceParams]):
    """Candidates from :func:`recover_inputs`, scored by nearest match (``matching="nearest"``).

    Labels: under FedAvg the client's own model labels each candidate (argmax, or parity for one
    logit); a FedSGD update carries no trained model, so labels are left out.
    """

    Params = SubspaceParams

    def adapted_params(self, knowledge: DefenseKnowledge) -> dict[str, object]:
        """The span above the known noise's edge, completed inside the known intervals."""
        return {"noise_std": knowledge.noise_std, "known_defense": knowledge.intervals}

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return [self._attack(obs) for obs in observations]

    def _attack(self, obs: Observation) -> Reconstruction:
        p = self.params
        start = time.perf_counter()
        count = max(2, math.ceil(p.candidates * obs.meta.num_examples))
        generator = torch.Generator().manual_seed(p.seed)
        images, subspace = recover_inputs(
            obs, count, p.sparsity, p.starts, generator, p.known_defense,
            p.completion_iterations, p.noise_std,
        )  # fmt: skip
        notes = (
            f"{images.shape[0]} candidates; rank {subspace.rank} of "
            f"{subspace.basis.shape[1]} input dims, decay {subspace.decay:.4g}, energy "
            f"outside the span {subspace.outside:.2g}"
        )
        if p.known_defense != "none":
            notes += f"; completed inside the {p.known_defense} intervals"
        return span_reconstruction(obs, images, subspace, self.name, notes, start)
