"""Victim regimes for KKT / subspace reconstruction: where do the digits stay in the weights?

Run with ``python -m benchmarks.bench_kkt_regimes`` (one process, ``--threads 1`` by default).

The odd/even MNIST victim of :mod:`benchmarks.bench_kkt` (homogeneous ReLU MLP 784-W-W-1,
logistic loss, full-batch gradient descent, inputs mapped to ``2 x - 1`` by the network) is
trained on ``n`` digits over a grid of weight decay and initial first-layer scale; the paper's
regime (Haim et al. 2022) is weight decay 0 with the first layer initialised at PyTorch's
default times 1e-4 and the other layers at their default. Per setting it records:

* ``train_accuracy`` / ``test_accuracy`` (held-out odd/even MNIST test digits);
* ``alive_units``: first-layer (and second-layer) units with a positive pre-activation on at
  least one training digit;
* ``ranks``: per weight matrix, the singular values above ``1e-3`` of the largest, and the top
  three singular values divided by the Frobenius norm (their squares: the share of energy),
  plus the same for the first layer's change ``W1 - W1_initial``;
* ``truth_residual``: the true digits' KKT stationarity residual
  (:func:`benchmarks.kkt_residual.truth_residual`; near 0 only at a KKT point);
* ``recovered`` / ``recovered_paper``: training digits whose best candidate of the first-layer
  subspace attack (:class:`attacks.first_layer.subspace.SubspaceAttack`, 2 candidates per
  digit) reaches
  SSIM 0.4 with our 11x11 window / the paper's 3x3 window (:func:`nearest_candidates`);
* ``seconds`` (training + measurements).

It writes ``benchmarks/results/kkt_regimes.json`` after every setting, cheapest settings
first, so a partial run leaves data. What it cuts to fit a shared core (W, steps, lr) is in the
file's ``settings``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from attacks.common.layers import first_linear
from attacks.first_layer.subspace import SubspaceAttack
from benchmarks.bench_kkt import THRESHOLD
from benchmarks.kkt_residual import truth_residual
from simulator.core.models import ModelSpec, build_model
from simulator.data.datasets import load_split, to_tensor
from simulator.run.folder import write_atomic
from simulator.scoring.metrics import nearest_candidates
from tests.fixtures.trained_model import (
    TrainConfig,
    homogeneous_spec,
    mnist_odd_even,
    train_victim,
)

RESULTS = Path(__file__).parent / "results" / "kkt_regimes.json"
RANK_TOLERANCE = 1e-3


def alive_units(pre_activations: torch.Tensor) -> int:
    """Units (columns of ``(n, W)`` pre-activations) positive on at least one example."""
    return int((pre_activations > 0).any(0).sum())


def effective_rank(matrix: torch.Tensor, tolerance: float = RANK_TOLERANCE) -> dict[str, object]:
    """Singular values above ``tolerance`` times the largest, and the top three over the
    Frobenius norm (0 for an all-zero matrix)."""
    values = torch.linalg.svdvals(matrix.detach().double().reshape(matrix.shape[0], -1))
    top = float(values[0]) if values.numel() else 0.0
    norm = float(values.norm())
    return {
        "rank": int((values > tolerance * top).sum()) if top > 0 else 0,
        "top3": [round(float(v) / norm, 4) if norm > 0 else 0.0 for v in values[:3]],
    }


def first_layer_initial(spec: ModelSpec, first_scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Default initial weights of ``spec`` with the first layer (weight and bias) scaled."""
    model = build_model(spec, seed=seed)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = first_linear(spec)
    assert not isinstance(first, str), first
    weights[first.weight] *= first_scale
    if first.bias is not None:
        weights[first.bias] *= first_scale
    return weights


def odd_even_test(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` MNIST test digits and their labels (parity is ``label % 2``)."""
    raw, labels = load_split("mnist", "test")
    return to_tensor(raw[:count]), torch.as_tensor(labels[:count], dtype=torch.int64)


def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(images)[:, 0]
    return float(((logits > 0).long() == labels % 2).double().mean())


def _pre_activations(
    weights: dict[str, torch.Tensor], images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """First- and second-layer pre-activations on [0, 1] images (the victim centres them)."""
    linear = [k for k in weights if k.endswith("weight")]
    first, second = linear[0], linear[1]
    with torch.no_grad():
        inputs = images.flatten(1) * 2 - 1
        pre1 = inputs @ weights[first].T + weights[first.removesuffix("weight") + "bias"]
        pre2 = pre1.clamp_min(0) @ weights[second].T
    return pre1, pre2


def run_setting(
    per_class: int,
    weight_decay: float,
    first_scale: float,
    args: argparse.Namespace,
    test: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, object]:
    """Train one victim and measure it (see the module docstring)."""
    start = time.perf_counter()
    images, labels = mnist_odd_even(per_class=per_class, seed=0)
    n = 2 * per_class
    spec = homogeneous_spec((1, 28, 28), widths=(args.width, args.width), init_scale=1.0)
    initial = first_layer_initial(spec, first_scale, seed=0)
    config = TrainConfig(
        steps=args.steps, lr=args.lr, weight_decay=weight_decay, log_every=args.steps
    )
    victim = train_victim(spec, images, labels, config, initial=initial)
    model = build_model(spec)
    model.load_state_dict(victim.weights)
    pre1, pre2 = _pre_activations(victim.weights, images)
    linear = [k for k in victim.weights if k.endswith("weight")]
    ranks = {k: effective_rank(victim.weights[k]) for k in linear}
    ranks["first_change"] = effective_rank(victim.weights[linear[0]] - initial[linear[0]])
    obs = victim.observation(n, config)
    residual = truth_residual(obs, images)
    rec = SubspaceAttack().run([obs])[0]
    report = nearest_candidates(images, rec.images, threshold=THRESHOLD)
    noise = torch.rand(rec.images.shape, generator=torch.Generator().manual_seed(0))
    baseline = nearest_candidates(images, noise, threshold=THRESHOLD)
    record: dict[str, object] = {
        "train_images": n,
        "weight_decay": weight_decay,
        "first_layer_init_scale": first_scale,
        "train_accuracy": round(victim.history[-1]["accuracy"], 4),
        "train_loss": round(victim.history[-1]["loss"], 5),
        "min_margin": round(victim.history[-1]["min_margin"], 4),
        "test_accuracy": round(_accuracy(model, *test), 4),
        "alive_units": alive_units(pre1),
        "alive_units_second": alive_units(pre2),
        "ranks": ranks,
        "truth_residual": round(residual, 5),
        "recovered": report.recovered,
        "recovered_paper": report.recovered_paper,
        "mean_best_ssim": round(float(report.ssim.mean()), 4),
        "mean_best_ssim_paper": round(float(report.ssim_paper.mean()), 4),
        "random_candidates_recovered": baseline.recovered,
        "random_candidates_recovered_paper": baseline.recovered_paper,
        "subspace_notes": rec.notes,
        "train_seconds": round(victim.seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 3e-2])
    parser.add_argument("--first-scale", type=float, nargs="+", default=[1e-4, 1.0])
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--test-digits", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LEAKSIM_DATA_DIR", str(Path(__file__).parents[2] / "shared" / "data"))
    test = odd_even_test(args.test_digits)
    settings = {
        "model": f"homogeneous ReLU MLP 784-{args.width}-{args.width}-1, bias on layer 1 only",
        "data": "MNIST odd/even training digits (mnist_odd_even, seed 0), label = parity",
        "test": f"first {args.test_digits} MNIST test digits, parity",
        "training": (
            f"full-batch GD, logistic loss, lr {args.lr}, {args.steps} steps, last half "
            "cosine-annealed (TrainConfig default anneal 0.5), inputs 2x-1 (not minus the "
            "training mean)"
        ),
        "first_layer_init": "PyTorch default x first_layer_init_scale (weight and bias); "
        "other layers default",
        "attack": "SubspaceAttack defaults (2 candidates per digit, 1000 starts), no KKT fit",
        "recovered": f"SSIM >= {THRESHOLD}: ours 11x11 window; recovered_paper 3x3 window",
        "rank": f"singular values > {RANK_TOLERANCE} x largest; top3 = s_i / ||W||_F",
        "grid": {
            "train_images": [2 * p for p in args.per_class],
            "weight_decay": args.weight_decay,
            "first_layer_init_scale": args.first_scale,
        },
    }
    rows: list[dict[str, object]] = []
    for per_class in args.per_class:
        for first_scale in args.first_scale:
            for weight_decay in args.weight_decay:
                rows.append(run_setting(per_class, weight_decay, first_scale, args, test))
                payload = {"device": "cpu", "threads": args.threads, "settings": settings}
                write_atomic(args.output, json.dumps({**payload, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
