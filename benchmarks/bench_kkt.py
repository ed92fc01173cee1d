"""Benchmark of the KKT reconstruction attack: victim training plus reconstruction, timed.

Records (written to ``benchmarks/results/kkt.json``):

* ``toy``: 10 red + 10 blue 3x16x16 images, homogeneous MLP 768-100-100-1.
* ``mnist_odd_even``: 250 odd + 250 even MNIST digits, homogeneous MLP 784-1000-1000-1 trained
  with weight decay, 2 candidates per image. The full run needs more time than a benchmark
  should take on a shared 2-core machine, so ``--odd-even-steps`` / ``--odd-even-iterations``
  cap it; the record says what was run (``train_steps``, ``iterations``) and the measured
  ``seconds_per_iteration`` so the full cost can be extrapolated.
* ``mnist_odd_even_subspace``: the same victim, candidates from the first-layer subspace.
* ``subspace_capacity``: digits the subspace init recovers for n = 32, 100, 200, 500.
* ``converged_victim``: 100 digits at a stationary point; the true digits' own residual, and
  what the KKT fit does to the subspace candidates there.
* ``fedavg_client``: one FedAvg client holding 32 MNIST digits trains the global ReLU MLP
  784-100-10 for 20 epochs of mini-batch SGD (batch 8) with weight decay; the server recovers
  the digits from the returned weights with the subspace initialisation.

Each record: ``train_images``, ``recovered`` (true images whose best candidate reaches SSIM 0.4),
``seconds`` (training + reconstruction), and details. Run with ``python -m benchmarks.bench_kkt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from attacks.kkt import KKT, KKTParams, _problem, combination
from simulator.core.models import ModelSpec
from simulator.core.protocol import Observation
from simulator.scoring.metrics import nearest_candidates
from tests.fixtures.trained_model import (
    TrainConfig,
    fedavg_client_update,
    homogeneous_spec,
    mnist_odd_even,
    toy_red_blue,
    train_victim,
)

RESULTS = Path(__file__).parent / "results" / "kkt.json"
THRESHOLD = 0.4


def _score(
    name: str,
    images: torch.Tensor,
    obs: Observation,
    params: KKTParams,
    train_seconds: float,
    extra: dict[str, object],
) -> dict[str, object]:
    start = time.perf_counter()
    rec = KKT(params).run([obs])[0]
    attack_seconds = time.perf_counter() - start
    report = nearest_candidates(images, rec.images, threshold=THRESHOLD)
    noise = nearest_candidates(
        images,
        torch.rand(rec.images.shape, generator=torch.Generator().manual_seed(0)),
        threshold=THRESHOLD,
    )
    record: dict[str, object] = {
        "train_images": int(images.shape[0]),
        "recovered": report.recovered,
        "seconds": round(train_seconds + attack_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "attack_seconds": round(attack_seconds, 2),
        "iterations": params.iterations,
        "seconds_per_iteration": round(attack_seconds / max(params.iterations, 1), 5),
        "candidates": int(rec.images.shape[0]),
        "mean_best_ssim": round(float(report.ssim.mean()), 4),
        "random_candidates_recovered": noise.recovered,
        "random_candidates_mean_best_ssim": round(float(noise.ssim.mean()), 4),
        "final_stationarity": None if math.isnan(rec.distance) else round(rec.distance, 5),
        **extra,
    }
    print(name, json.dumps(record), flush=True)
    return record


def bench_toy() -> dict[str, object]:
    """Red/blue toy set: train, reconstruct, score."""
    images, labels = toy_red_blue()
    spec = homogeneous_spec((3, 16, 16), widths=(100, 100), init_scale=1e-2)
    config = TrainConfig(steps=500, lr=0.5, weight_decay=1e-3)
    victim = train_victim(spec, images, labels, config)
    params = KKTParams(iterations=2000, init_scale=0.1, alpha=500.0)
    extra = {"train_steps": config.steps, "weight_decay": config.weight_decay}
    return _score("toy", images, victim.observation(20, config), params, victim.seconds, extra)


def bench_odd_even(steps: int, iterations: int) -> dict[str, object]:
    """MNIST odd/even, 500 images, 784-1000-1000-1 with weight decay (possibly capped)."""
    images, labels = mnist_odd_even(per_class=250, seed=0)
    spec = homogeneous_spec((1, 28, 28), widths=(1000, 1000), init_scale=0.3)
    config = TrainConfig(steps=steps, lr=0.05, weight_decay=3e-2, log_every=max(1, steps // 4))
    victim = train_victim(spec, images, labels, config)
    params = KKTParams(iterations=iterations, log_every=max(1, iterations // 5))
    extra = {
        "train_steps": steps,
        "weight_decay": config.weight_decay,
        "train_accuracy": victim.history[-1]["accuracy"],
        "train_seconds_per_step": round(victim.seconds / max(steps, 1), 4),
        "note": (
            "capped run (one shared core): the authors train 1e6 epochs and reconstruct for "
            "50000 iterations; see seconds_per_iteration to extrapolate"
        ),
    }
    return _score(
        "mnist_odd_even", images, victim.observation(500, config), params, victim.seconds, extra
    )


def bench_odd_even_subspace(steps: int) -> dict[str, object]:
    """MNIST odd/even as above, candidates from the first-layer subspace (no KKT fit)."""
    images, labels = mnist_odd_even(per_class=250, seed=0)
    spec = homogeneous_spec((1, 28, 28), widths=(1000, 1000), init_scale=0.3)
    config = TrainConfig(steps=steps, lr=0.05, weight_decay=3e-2, log_every=max(1, steps // 4))
    victim = train_victim(spec, images, labels, config)
    params = KKTParams(iterations=0, init="subspace")
    extra = {"train_steps": steps, "weight_decay": config.weight_decay, "init": "subspace"}
    return _score(
        "mnist_odd_even_subspace",
        images,
        victim.observation(500, config),
        params,
        victim.seconds,
        extra,
    )


def bench_subspace_capacity(steps: int) -> dict[str, object]:
    """Digits recovered by the subspace init against the training-set size (784 pixels).

    The odd/even victim (784-1000-1000-1, weight decay) trained ``steps`` full-batch steps on
    n = 32 ... 500 digits; the first layer's change pins the span of the digits at any step.
    """
    rows = []
    for per_class in (16, 50, 100, 250):
        images, labels = mnist_odd_even(per_class=per_class, seed=0)
        spec = homogeneous_spec((1, 28, 28), widths=(1000, 1000), init_scale=0.3)
        config = TrainConfig(steps=steps, lr=0.05, weight_decay=3e-2, log_every=steps)
        victim = train_victim(spec, images, labels, config)
        obs = victim.observation(2 * per_class, config)
        start = time.perf_counter()
        rec = KKT(KKTParams(iterations=0, init="subspace")).run([obs])[0]
        seconds = time.perf_counter() - start
        report = nearest_candidates(images, rec.images, threshold=THRESHOLD)
        rows.append(
            {
                "train_images": 2 * per_class,
                "recovered": report.recovered,
                "mean_best_ssim": round(float(report.ssim.mean()), 4),
                "attack_seconds": round(seconds, 2),
            }
        )
        print("subspace_capacity", json.dumps(rows[-1]), flush=True)
    return {"train_steps": steps, "rows": rows}


def truth_residual(obs: Observation, images: torch.Tensor) -> float:
    """Stationarity residual of the true images with least-squares coefficients (KKTParams'
    per-tensor normalisation): near 0 only when the weights sit at a KKT point."""
    problem = _problem(obs, "weights", 1.0, "layer")
    layers = [(w.double(), None if b is None else b.double()) for w, b in problem.layers]
    inputs = (images.flatten(1) * 2 - 1).double()  # the victim centres its inputs
    columns = []
    for index in range(
        inputs.shape[0]
    ):  # one per-sample gradient each: a benchmark, not a hot path
        coeff = torch.zeros(inputs.shape[0], 1, dtype=torch.double)
        coeff[index] = 1.0
        grads = combination(layers, inputs, coeff, alpha=1e6)
        columns.append(
            torch.cat([g.flatten() / n**0.5 for g, n in zip(grads, problem.norms, strict=True)])
        )
    design = torch.stack(columns, 1)
    target = torch.cat(
        [t.flatten().double() / n**0.5 for t, n in zip(problem.targets, problem.norms, strict=True)]
    )
    solution = torch.linalg.lstsq(design, target[:, None]).solution
    return float(((target - (design @ solution).squeeze(1)) ** 2).sum())


def bench_converged_victim() -> dict[str, object]:
    """100 odd/even digits, trained to a stationary point (lr 0.1, 6000 annealed epochs).

    Does the KKT fit, started from the subspace candidates, keep the digits once the weights
    really are at a KKT point? Records the true digits' own residual and both recoveries.
    """
    images, labels = mnist_odd_even(per_class=50, seed=0)
    spec = homogeneous_spec((1, 28, 28), widths=(1000, 1000), init_scale=0.3)
    config = TrainConfig(steps=6000, lr=0.1, weight_decay=3e-2, anneal=0.7, log_every=6000)
    victim = train_victim(spec, images, labels, config)
    obs = victim.observation(100, config)
    record: dict[str, object] = {
        "train_images": 100,
        "train_seconds": round(victim.seconds, 2),
        "truth_residual": round(truth_residual(obs, images), 4),
    }
    for iterations in (0, 800):
        rec = KKT(KKTParams(iterations=iterations, init="subspace")).run([obs])[0]
        report = nearest_candidates(images, rec.images, threshold=THRESHOLD)
        record[f"recovered_after_{iterations}"] = report.recovered
        record[f"residual_after_{iterations}"] = (
            None if math.isnan(rec.distance) else round(rec.distance, 4)
        )
    print("converged_victim", json.dumps(record), flush=True)
    return record


def bench_fedavg(local_epochs: int, iterations: int) -> dict[str, object]:
    """One FedAvg client with 32 digits: mini-batch SGD with weight decay, the scenario's setup.

    ``init="subspace"`` recovers the digits from the first layer's change; ``iterations`` of
    KKT refinement follow (0: none, what kkt-fedavg-client ships).
    """
    images, labels = mnist_odd_even(per_class=16, seed=1)
    spec = ModelSpec(kind="mlp", widths=(100,), activation="relu")
    start = time.perf_counter()
    obs = fedavg_client_update(images, labels, spec, local_epochs, 8, 0.05, 5e-4, seed=3)
    train_seconds = time.perf_counter() - start
    params = KKTParams(iterations=iterations, init="subspace", mode="difference")
    # The paper's method on the same update, for comparison: random candidates, 3000 iterations.
    paper = KKT(KKTParams(iterations=3000, mode="difference")).run([obs])[0]
    extra = {
        "random_init_recovered": nearest_candidates(images, paper.images, THRESHOLD).recovered,
        "local_epochs": local_epochs,
        "batch_size": 8,
        "weight_decay": 5e-4,
        "init": "subspace",
        "note": "client trains by the clients' own local_train (mini-batch SGD, weight decay)",
    }
    return _score("fedavg_client", images, obs, params, train_seconds, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--odd-even-steps", type=int, default=2000)
    parser.add_argument("--odd-even-iterations", type=int, default=1200)
    parser.add_argument("--fedavg-epochs", type=int, default=20)
    parser.add_argument("--fedavg-iterations", type=int, default=0)
    parser.add_argument(
        "--only",
        choices=[
            "toy",
            "mnist_odd_even",
            "fedavg_client",
            "mnist_odd_even_subspace",
            "subspace_capacity",
            "converged_victim",
        ],
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LEAKSIM_DATA_DIR", str(Path(__file__).parents[2] / "shared" / "data"))
    runs = {
        "toy": bench_toy,
        "fedavg_client": lambda: bench_fedavg(args.fedavg_epochs, args.fedavg_iterations),
        "mnist_odd_even": lambda: bench_odd_even(args.odd_even_steps, args.odd_even_iterations),
        "mnist_odd_even_subspace": lambda: bench_odd_even_subspace(args.odd_even_steps),
        "subspace_capacity": lambda: bench_subspace_capacity(300),
        "converged_victim": bench_converged_victim,
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name, run in runs.items():
        if args.only in (None, name):
            results[name] = {**run(), "threads": args.threads}
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
