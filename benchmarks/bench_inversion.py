"""Benchmark of network inversion: classifier training, generator training, scoring, timed.

For each configuration, trains a classifier on ``--train`` MNIST training digits (Adam, batch 64,
``--train-steps`` steps), runs the ``inversion`` attack on it as the global model of a FedAvg
observation, and scores the generated images against those training digits (nearest same-class
training image by SSIM, see :mod:`simulator.scoring.inversion`) next to a uniform-noise
baseline. Configurations:

* ``mlp``: MLP 784-100-10, default attack settings (every loss term on).
* ``mlp_ce_only``: same classifier, cross-entropy only (plain inversion, for comparison).
* ``cnn``: CNN (8, 16 channels, avg pooling), default settings.

Each record: ``test_accuracy`` (first 2000 test digits), ``train_seconds``, ``attack_seconds``,
``seconds_per_step``, ``mean_confidence`` / ``min_confidence`` of the classifier on the returned
images, ``mean_nn_ssim`` / ``top_k_nn_ssim`` / ``above_threshold`` and the noise baseline's
``noise_mean_nn_ssim`` / ``noise_above_threshold``, ``diversity``. Writes
``benchmarks/results/inversion.json``. Run with ``python -m benchmarks.bench_inversion``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from attacks.inversion.attack import classifier_confidence
from attacks.inversion.losses import LOSSES
from simulator.core.models import ModelSpec, build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.data.datasets import load_split, to_tensor
from simulator.run.folder import write_atomic
from simulator.scoring.inversion import random_noise_baseline, score_inversion

RESULTS = Path(__file__).parent / "results" / "inversion.json"

CONFIGS: dict[str, tuple[ModelSpec, dict[str, Any]]] = {
    "mlp": (model_spec(kind="mlp", widths=(100,)), {}),
    "mlp_ce_only": (
        model_spec(kind="mlp", widths=(100,)),
        {f"weight_{t}": 0.0 for t in LOSSES if t != "cross_entropy"},
    ),
    "cnn": (model_spec(kind="cnn", channels=(8, 16)), {}),
}


def train_classifier(
    spec: ModelSpec, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> dict[str, torch.Tensor]:
    """Weights of ``spec`` after ``steps`` Adam steps on random batches of 64 (seeded)."""
    model = build_model(spec, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, images.shape[0], (64,), generator=order)
        loss = torch.nn.functional.cross_entropy(model(images[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def accuracy(spec: ModelSpec, weights: dict[str, torch.Tensor], test: int) -> float:
    """Accuracy on the first ``test`` MNIST test digits."""
    images, labels = load_split("mnist", "test")
    model = build_model(spec, seed=0)
    model.load_state_dict(weights)
    with torch.no_grad():
        predicted = model(to_tensor(images[:test])).argmax(1)
    return float((predicted == torch.from_numpy(labels[:test].copy())).double().mean())


def bench(
    name: str,
    spec: ModelSpec,
    attack_params: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    start = time.perf_counter()
    weights = train_classifier(spec, images, labels, args.train_steps)
    train_seconds = time.perf_counter() - start
    meta = PublicMeta("fedavg", batch_size=64, lr=0.1, local_epochs=1, num_examples=64)
    obs = Observation(0, 0, spec, weights, weights, meta)
    params = {"steps": args.steps, **attack_params}
    start = time.perf_counter()
    rec = ATTACKS.create("inversion", params).run([obs])[0]
    attack_seconds = time.perf_counter() - start
    assert rec.labels is not None
    confidence = classifier_confidence(spec, weights, rec.images, rec.labels)
    start = time.perf_counter()
    scores = score_inversion(rec.images, rec.labels, images, labels)
    score_seconds = time.perf_counter() - start
    noise = random_noise_baseline(rec.labels, images, labels)
    record: dict[str, Any] = {
        "model": spec.kind,
        "train_images": int(images.shape[0]),
        "train_steps": args.train_steps,
        "test_accuracy": round(accuracy(spec, weights, 2000), 4),
        "attack_params": params,
        "generated": int(rec.images.shape[0]),
        "status": rec.status,
        "train_seconds": round(train_seconds, 2),
        "attack_seconds": round(attack_seconds, 2),
        "seconds_per_step": round(attack_seconds / args.steps, 4),
        "score_seconds": round(score_seconds, 2),
        "final_loss": round(rec.objective_value, 4),
        "mean_confidence": round(float(confidence.mean()), 4),
        "min_confidence": round(float(confidence.min()), 4),
        "mean_nn_ssim": round(scores["mean_nn_ssim"], 4),
        "top_k_nn_ssim": round(scores["top_k_nn_ssim"], 4),
        "top_k": scores["top_k"],
        "max_nn_ssim": round(scores["max_nn_ssim"], 4),
        "mean_nn_psnr": round(scores["mean_nn_psnr"], 2),
        "above_threshold": scores["above_threshold"],
        "threshold": scores["threshold"],
        "diversity": round(scores["diversity"], 4),
        "noise_mean_nn_ssim": round(noise["mean_nn_ssim"], 4),
        "noise_above_threshold": noise["above_threshold"],
        "per_class_mean_nn_ssim": {
            k: round(v["mean_nn_ssim"], 4) for k, v in scores["per_class"].items()
        },
    }
    print(name, json.dumps({k: v for k, v in record.items() if k != "attack_params"}), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10_000, help="MNIST training digits")
    parser.add_argument("--train-steps", type=int, default=600, help="classifier Adam steps")
    parser.add_argument("--steps", type=int, default=300, help="generator steps")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw_images, raw_labels = load_split("mnist", "train")
    images = to_tensor(raw_images[: args.train])
    labels = torch.from_numpy(raw_labels[: args.train].copy())
    records = {name: bench(name, *CONFIGS[name], images, labels, args) for name in args.configs}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
        },
        "records": records,
    }
    write_atomic(RESULTS, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
