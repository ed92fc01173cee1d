"""Dataset reconstruction from trained weights through the KKT conditions of margin maximisation.

Gradient descent on a logistic loss drives a ReLU network towards a KKT point of
``min ||theta||^2 s.t. y_i f(theta; x_i) >= 1`` (Haim et al. 2022), and with weight decay every
stationary point of the regularised loss has the same form (Buzaglo et al. 2023):

    theta = sum_i lambda_i y_i grad_theta f(theta; x_i),   lambda_i >= 0.

Given only theta, we optimise ``m`` candidates ``x_i`` and coefficients so that the right-hand
side reproduces theta. Loss terms (each scaled by its weight in :class:`KKTParams`):

* stationarity: ``sum_p ||theta_p - s g_p||^2 / ||theta_p||^2`` over parameter tensors p
  (normalised per tensor so that the wide hidden layers do not drown the first layer, which
  carries the image; ``normalise="global"`` divides by ``||theta||^2`` instead), where
  ``g = sum_i u_i y_i grad f(x_i)``. The global scale ``s`` of the
  coefficients is solved in closed form every iteration (the loss is quadratic in it), so the
  optimiser only learns the *relative* lambdas ``u`` and needs no knowledge of theta's scale;
  the reported lambdas are ``s u``.
* lambda: ``sum_i relu(lambda_min - u_i)^2``, keeping every candidate in play (a candidate
  whose lambda falls to 0 is unconstrained and drifts away from the data).
* range: squared distance of every pixel outside the model's input range (``[-1, 1]`` for
  ``centre_inputs`` models, else ``[0, 1]``), per candidate.

Multiclass models use margins ``f_y - f_j`` with coefficients ``lambda_ij`` (``j != y``).
Candidates get labels round-robin (binary: half +1, half -1). ReLU's derivative is replaced by
``sigmoid(alpha z)`` in every backward pass (forward values stay exact ReLU), as in the paper:
without it the candidates' activation pattern receives no gradient.

Hot path: for an MLP, ``sum_i c_i grad_theta f(x_i)`` is ordinary back-propagation of the
output weights ``c`` through one batched forward pass -- a handful of matmuls over all
candidates at once, no per-sample gradients. Autograd then differentiates that closed form with
respect to the candidates and coefficients. Only ReLU MLPs (Linear/ReLU/Flatten stacks) are
supported; other architectures raise ValueError.

Optimisation: candidates start at ``centre + init_scale * N(0, 1)`` (small, so they share one
activation pattern), relative lambdas at 1; Adam (or SGD with momentum) with separate steps for
candidates and lambdas, cosine-annealed to 0 when ``lr_decay``. The tensor work and the loop
are in :mod:`attacks.kkt.runs`, on the device of the observation's tensors.

Runs: ``runs = R`` fits R independent runs as one batched problem (the paper's random
hyper-parameter sweep): run 0 with the given settings, the others with lr, alpha and init_scale
drawn log-uniformly within a factor ``run_spread`` and lambda_min within ``lambda_min_spread``,
each from its own seed; the candidates of every run are returned pooled (run-major) and the
agreement selection sees them all. ``fit = "first"`` fits the first layer's stationarity only:
a victim trained briefly from the paper's small first layer has its deeper layers still at
their initialisation, where no KKT sum can explain them.

Known limits (measured, see benchmarks/bench_kkt.py): the toy set is recovered exactly, but on
MNIST the fit does not find the data: from random candidates few digits reach SSIM 0.4, and
started from the subspace candidates of a model at a stationary point it loses digits (51 to
37 of 100) while its residual stays above that of the true digits. The subspace start alone
recovers every digit of a 32-image FedAvg client.

Modes: ``"weights"`` takes ``update`` as theta (a trained model, or a FedAvg client's returned
weights); ``"difference"`` fits ``update - global_weights`` with gradients taken at the client's
weights and free-signed per-sample coefficients (the lambda loss acts on ``|u|``).
``init="subspace"`` starts the candidates from the training inputs recovered from the first layer's
change (:mod:`attacks.first_layer.subspace`: that block of the stationarity condition is linear in
the inputs) and labels them with the model's own predictions; with ``iterations = 0`` those
candidates are returned as they are. A final stationarity residual above ``stationarity_tolerance``
is reported in ``notes``: such weights are not at a KKT point.
Returned images are candidates mapped from the model's input range to ``[0, 1]`` and clamped.

Selection: with ``select = "agreement"`` the attack also says, without the truth, which
candidates it reports as reconstructions (:func:`attacks.kkt.selection.select_candidates`:
clusters of near-duplicate candidates, weighted by their stationarity contribution
``||lambda_i y_i grad f(x_i)||`` and by how little noise they hold). The ``select_top`` best
(0: as many as the client's examples) come first among the returned candidates, best first,
flagged in ``Reconstruction.confident``; every candidate is still returned, so the scorer can
compare the selection with matching by the truth. ``notes`` says how many were selected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from attacks.base import Attack, register_attack
from attacks.common.intervals import KnownDefense
from attacks.common.updates import weight_change
from attacks.first_layer.subspace import model_labels, recover_inputs
from attacks.kkt.runs import (
    Layer,
    LossWeights,
    RunSettings,
    batched_losses,
    combination,
    contributions,
    draw_settings,
    optimise,
    output_weights,
)
from attacks.kkt.runs import Problem as _Problem
from attacks.kkt.selection import select_candidates
from attacks.optim.tracker import snapshot_steps
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge
from simulator.core.models import Centre, ModelSpec, build_model, is_binary
from simulator.core.protocol import Observation, Reconstruction, Status

# The closed form lives in attacks.kkt.runs (with the run dimension); these names stay here.
__all__ = ["KKT", "KKTParams", "combination", "contributions", "kkt_losses", "mlp_layers"]


@dataclass(frozen=True)
class KKTParams:
    """Settings of the KKT reconstruction attack.

    Defaults follow the paper authors' published MNIST settings where ours map onto theirs
    (ReLU surrogate slope ~150, candidate init std ~0.035, lambda floor ~0.45, here relative to
    the fitted lambda scale); the red/blue toy set needs ``alpha`` ~500 and ``init_scale`` 0.1.
    """

    iterations: int = param(3000, low=0, high=10_000_000, help="optimiser iterations")
    lr: float = param(0.01, low=0.0, low_open=True, high=10.0, help="Adam step for candidates")
    lambda_lr: float = param(0.01, low=0.0, low_open=True, high=10.0, help="Adam step, lambdas")
    lr_decay: bool = True
    optimizer: Literal["adam", "sgd"] = "adam"
    candidates: float = param(
        2.0, low=0.0, low_open=True, high=100.0, help="candidates per training example"
    )
    init_scale: float = param(0.035, low=0.0, high=10.0, help="std of the initial candidates")
    init_centre: float | None = param(
        None, low=-1e6, high=1e6, help="mean of the initial candidates (None: mid-range)"
    )
    lambda_min: float = param(0.5, low=0.0, high=1e3, help="relative lambda floor")
    alpha: float = param(150.0, low=0.0, low_open=True, high=1e6, help="ReLU surrogate slope")
    stationarity_weight: float = param(1.0, low=0.0, high=1e9, help="weight of stationarity")
    lambda_weight: float = param(1.0, low=0.0, high=1e9, help="weight of the lambda loss")
    range_weight: float = param(1.0, low=0.0, high=1e9, help="weight of the range loss")
    mode: Literal["weights", "difference"] = "weights"
    init: Literal["random", "subspace"] = "random"
    sparsity: float = param(
        0.03, low=0.0, low_open=True, high=100.0, help="subspace init: threshold x sqrt(D)"
    )
    subspace_starts: int = param(
        1000, low=0, high=1_000_000, help="subspace init: random starts besides the pixel ones"
    )
    # The clients' defense, for the subspace init (the subspace attack's own parameters): the
    # change completed inside the intervals pruning or quantization leave, the span kept above
    # the known noise's edge.
    known_defense: KnownDefense = "none"
    noise_std: float = param(
        0.0, low=0.0, help="subspace init: std of the noise on each coordinate of the update"
    )
    stationarity_tolerance: float = param(
        0.5, low=0.0, low_open=True, high=1e9, help="residual above which theta is not a KKT point"
    )
    normalise: Literal["layer", "global"] = "layer"
    seed: int = param(0, low=0, help="candidate initialisation seed")
    log_every: int = param(100, low=1, help="iterations between trace records")
    snapshots: int = param(0, low=0, high=1000, help="evenly spaced image snapshots to keep")
    select: Literal["none", "agreement"] = "none"
    select_top: int = param(
        0, low=0, high=10_000_000, help="candidates to select (0: the client's example count)"
    )
    select_similarity: float = param(
        0.9, low=0.0, high=1.0, help="selection: cross-correlation of near-duplicates"
    )
    runs: int = param(1, low=1, high=1000, help="independent runs fitted as one batched problem")
    run_spread: float = param(
        1.0, low=1.0, high=1e3, help="other runs: lr, alpha, init_scale in [x/spread, x*spread]"
    )
    lambda_min_spread: float = param(
        0.0, low=0.0, high=1e3, help="other runs: lambda_min within +- this"
    )
    fit: Literal["all", "first"] = "all"


def mlp_parameter_names(spec: ModelSpec) -> list[tuple[str, str | None]]:
    """(weight, bias or None) parameter names of every Linear layer of a ReLU MLP, in order.

    ValueError for any other architecture: the closed-form stationarity needs Linear/ReLU only.
    """
    model = build_model(spec, seed=0)
    modules = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    names: list[tuple[str, str | None]] = []
    for index, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            names.append((f"{index}.weight", f"{index}.bias" if module.bias is not None else None))
        elif not isinstance(module, (nn.Flatten, nn.ReLU, Centre)):
            raise ValueError(
                f"attack 'kkt' needs a ReLU MLP (Linear/ReLU layers); model {spec.kind!r} has "
                f"{type(module).__name__}"
            )
    if not names:
        raise ValueError(f"attack 'kkt': model {spec.kind!r} has no linear layer")
    return names


def input_range(spec: ModelSpec) -> tuple[float, float]:
    """Model-side values of a black and a white pixel: the units candidates live in."""
    return (-1.0, 1.0) if spec.centre_inputs else (0.0, 1.0)


def mlp_layers(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> list[Layer]:
    """(weight, bias or None) tensors of every Linear layer of a ReLU MLP, in order."""
    return [(weights[w], None if b is None else weights[b]) for w, b in mlp_parameter_names(spec)]


def candidate_labels(count: int, classes: int) -> torch.Tensor:
    """Labels assigned to candidates: round-robin classes (binary: +1 / -1 alternating)."""
    return torch.arange(count) % max(classes, 2)


def _problem(obs: Observation, mode: str, candidates: float, normalise: str) -> _Problem:
    spec = obs.model
    # The attack runs where the observation's tensors are (attack.device moves them there).
    weights = {k: v.detach().float() for k, v in obs.update.items()}
    layers = mlp_layers(spec, weights)
    names = [n for pair in mlp_parameter_names(spec) for n in pair if n is not None]
    targets = [weights[n] for n in names]
    if mode == "difference":
        change = weight_change(obs)
        targets = [change[n].detach().float() for n in names]
    norms = [max(float((t**2).sum()), 1e-30) for t in targets]
    if normalise == "global":
        norms = [sum(norms)] * len(norms)
    classes = 1 if is_binary(spec) else layers[-1][0].shape[0]
    return _Problem(
        layers=layers,
        targets=targets,
        norms=norms,
        classes=classes,
        dims=layers[0][0].shape[1],
        count=max(2, math.ceil(candidates * obs.meta.num_examples)),
        low=input_range(spec)[0],
        high=input_range(spec)[1],
    )


def loss_weights(params: KKTParams) -> LossWeights:
    """The loss-term weights and modes of ``params``."""
    return LossWeights(
        stationarity=params.stationarity_weight,
        lambda_=params.lambda_weight,
        range=params.range_weight,
        signed=params.mode == "difference",
        first_only=params.fit == "first",
    )


def kkt_losses(
    problem: _Problem,
    inputs: torch.Tensor,
    relative: torch.Tensor,
    labels: torch.Tensor,
    params: KKTParams,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Weighted total loss, the unweighted terms, and the fitted lambda scale ``s`` of one run
    (``inputs`` (m, D)): :func:`attacks.kkt.runs.batched_losses` with R = 1."""
    one = torch.ones(1, dtype=inputs.dtype, device=inputs.device)
    total, terms, scale = batched_losses(
        problem,
        inputs[None],
        relative[None],
        labels[None],
        one * params.alpha,
        one * params.lambda_min,
        loss_weights(params),
    )
    return total[0], {k: v[0] for k, v in terms.items()}, scale[0]


def run_params(params: KKTParams) -> list[KKTParams]:
    """The single-run settings of each of ``params.runs`` runs (run 0: ``params`` itself):
    what :class:`KKT` fits as one batched problem, and what R separate runs would use."""
    drawn = _settings(params)
    return [
        dataclasses.replace(
            params,
            runs=1,
            seed=drawn.seeds[r],
            lr=float(drawn.lr[r]),
            alpha=float(drawn.alpha[r]),
            init_scale=float(drawn.init_scale[r]),
            lambda_min=float(drawn.lambda_min[r]),
        )
        for r in range(params.runs)
    ]


def _settings(params: KKTParams) -> RunSettings:
    return draw_settings(
        params.runs,
        params.seed,
        params.lr,
        params.lambda_lr,
        params.alpha,
        params.init_scale,
        params.lambda_min,
        params.run_spread,
        params.lambda_min_spread,
    )


@register_attack(
    "kkt",
    "Reconstruct training sets from trained weights via the KKT conditions of margin "
    "maximisation (Haim et al. 2022; Buzaglo et al. 2023), ReLU MLPs.",
)
class KKT(Attack[KKTParams]):
    """Fit candidates and lambdas so that sum_i lambda_i y_i grad f(x_i) reproduces theta.

    ``status`` is "diverged" if the loss became non-finite (the best finite iterate is
    returned), else "budget". ``objective_value`` and the trace's "kkt_stationarity" hold
    the unweighted stationarity loss of the reported candidates.
    """

    Params = KKTParams

    def adapted_params(self, knowledge: DefenseKnowledge) -> dict[str, object]:
        """A subspace start told the defense (the fit itself is the same)."""
        if self.params.init != "subspace":
            return {}
        return {"noise_std": knowledge.noise_std, "known_defense": knowledge.intervals}

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return [self._attack(obs) for obs in observations]

    def _images(self, obs: Observation, inputs: torch.Tensor) -> torch.Tensor:
        low, high = input_range(obs.model)
        unit = (inputs.detach() - low) / (high - low)
        return unit.clamp(0, 1).reshape(-1, *obs.model.input_shape).clone()

    def _start(
        self, obs: Observation, problem: _Problem, settings: RunSettings, notes: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial candidates (R, m, D), relative lambdas and labels (R, m) of every run.

        Random init: run r draws from its own seed (the draws of a single run with that seed,
        on the CPU, so that they do not depend on the device). Subspace init: every run starts
        from the same subspace candidates, labelled by the model (runs then differ only in
        their hyper-parameters).
        """
        p = self.params
        device = problem.layers[0][0].device
        runs = settings.runs
        if p.init == "subspace":
            generator = torch.Generator().manual_seed(p.seed)
            unit, subspace = recover_inputs(
                obs, problem.count, p.sparsity, p.subspace_starts, generator,
                known=p.known_defense, noise_std=p.noise_std,
            )  # fmt: skip
            inputs = problem.low + (problem.high - problem.low) * unit.flatten(1).to(device)
            problem.count = inputs.shape[0]  # fewer when the span has fewer distinct vectors
            labels = model_labels(obs, unit)
            notes.append(
                f"subspace init: rank {subspace.rank} of {problem.dims} input dims, decay "
                f"{subspace.decay:.4g}, energy outside the span {subspace.outside:.2g}"
            )
            if subspace.rank + 1 >= problem.dims:
                notes.append("subspace uninformative: as many examples as input dimensions")
            starts = inputs[None].repeat(runs, 1, 1)
            # Run 0 goes on with the subspace's generator (as a single run always has).
            generators = [generator] + [
                torch.Generator().manual_seed(s) for s in settings.seeds[1:]
            ]
        else:
            labels = None
            centre = (problem.low + problem.high) / 2 if p.init_centre is None else p.init_centre
            generators = [torch.Generator().manual_seed(s) for s in settings.seeds]
            starts = torch.stack(
                [
                    centre + float(scale) * torch.randn(problem.count, problem.dims, generator=g)
                    for scale, g in zip(settings.init_scale, generators, strict=True)
                ]
            ).to(device)
        shape = (problem.count,) if problem.classes == 1 else (problem.count, problem.classes)
        relative = torch.ones(runs, *shape)
        if p.mode == "difference":
            relative = torch.stack(
                [torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0) for g in generators]
            )
        if labels is None:
            labels = candidate_labels(problem.count, problem.classes)
        labels = labels.to(device)[None].repeat(runs, 1)
        return starts.contiguous(), relative.to(device), labels

    def _attack(self, obs: Observation) -> Reconstruction:
        p = self.params
        problem = _problem(obs, p.mode, p.candidates, p.normalise)
        settings = _settings(p)
        notes: list[str] = []
        inputs, relative, labels = self._start(obs, problem, settings, notes)
        runs, count = inputs.shape[0], inputs.shape[1]
        snap_at = snapshot_steps(p.iterations, p.snapshots, start=False)
        result = optimise(
            problem,
            inputs,
            relative,
            labels,
            settings,
            loss_weights(p),
            p.optimizer,
            p.iterations,
            p.lr_decay,
            p.log_every,
            set(snap_at),
            lambda x: self._images(obs, x.reshape(-1, problem.dims)),
        )
        status: Status = "diverged" if bool(result.diverged.all()) else "budget"
        alpha = settings.alpha.to(inputs.device, inputs.dtype)
        with torch.no_grad():
            _, terms, _ = batched_losses(
                problem,
                result.inputs,
                result.relative,
                labels,
                alpha,
                settings.lambda_min.to(inputs.device, inputs.dtype),
                loss_weights(p),
            )
        residuals = [float(v) for v in terms["stationarity"]]
        finished = [r for r in range(runs) if not bool(result.diverged[r])] or list(range(runs))
        best_run = min(finished, key=lambda r: residuals[r])
        # Without a fit the residual says nothing about theta (the lambdas were never solved).
        residual = residuals[best_run] if p.iterations else math.nan
        if residual > p.stationarity_tolerance:
            notes.append(
                f"theta is far from a KKT point: stationarity residual {residual:.3g} > "
                f"{p.stationarity_tolerance:g}, so the KKT conditions do not explain these weights"
            )
        scale = result.scale.view(-1, *[1] * (result.relative.dim() - 1))
        lambdas = result.relative * scale
        fitted = (
            f"; lambda scale {float(result.scale[best_run]):.3g}, "
            f"{int((lambdas[best_run].abs() > 0).sum())} nonzero lambdas"
            if p.iterations
            else "; no KKT fit (iterations = 0)"
        )
        notes.insert(0, f"{count} candidates, mode {p.mode}{fitted}")
        if runs > 1:
            notes.insert(1, self._runs_note(settings, residuals, result.diverged, best_run))
        if problem.classes == 1:
            notes.append("binary model: candidate labels are parity only")
        images = self._images(obs, result.inputs.reshape(-1, problem.dims))
        labels = labels.reshape(-1).clone()
        confident = None
        if p.select == "agreement":
            weights = None
            if p.iterations:
                coeff = output_weights(result.relative, labels.view(runs, count), problem.classes)
                with torch.no_grad():
                    weights = contributions(
                        problem.layers,
                        result.inputs,
                        coeff * result.scale.view(-1, 1, 1),
                        alpha[:, None, None],
                    ).reshape(-1)
            top = p.select_top or obs.meta.num_examples
            chosen = select_candidates(images, weights, top=top, similarity=p.select_similarity)
            rest = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
            rest[chosen.index.to(images.device)] = False
            order = torch.cat([chosen.index.to(images.device), rest.nonzero().squeeze(1)])
            images, labels = images[order], labels[order]
            confident = torch.arange(images.shape[0], device=images.device) < chosen.index.numel()
            notes.append(
                f"agreement selection: {chosen.index.numel()} of {images.shape[0]} candidates "
                f"selected (first), {chosen.clusters} clusters, largest "
                f"{int(chosen.support.max()) if chosen.support.numel() else 0}"
                + (self._agreement_note(chosen.cluster, chosen.index, count) if runs > 1 else "")
            )
        return Reconstruction(
            round=obs.round,
            client_id=obs.client_id,
            images=images,
            labels=labels,
            confident=confident,
            trace=result.trace,
            snapshots=result.snapshots,
            status=status,
            attack=self.name,
            notes="; ".join(notes),
            objective="kkt-stationarity",
            objective_value=residual,
            matching="nearest",
        )

    @staticmethod
    def _runs_note(
        settings: RunSettings, residuals: list[float], diverged: torch.Tensor, best: int
    ) -> str:
        """One line per run: its hyper-parameters and final residual, for the record."""
        rows = [
            f"run {r} (seed {settings.seeds[r]}, lr {float(settings.lr[r]):.3g}, alpha "
            f"{float(settings.alpha[r]):.3g}, init {float(settings.init_scale[r]):.3g}, "
            f"lambda_min {float(settings.lambda_min[r]):.3g}): residual {residuals[r]:.3g}"
            + (" diverged" if bool(diverged[r]) else "")
            for r in range(settings.runs)
        ]
        return (
            f"{settings.runs} runs batched, candidates pooled (run-major), best run {best}: "
            + ", ".join(rows)
        )

    @staticmethod
    def _agreement_note(cluster: torch.Tensor, index: torch.Tensor, count: int) -> str:
        """How many selected clusters hold candidates of two or more runs."""
        run_of = torch.arange(cluster.numel()) // count
        shared = sum(
            int(run_of[cluster == cluster[i]].unique().numel() >= 2) for i in index.tolist()
        )
        return f", {shared} of them found by >= 2 runs"
