"""How much knowing the noise scale helps the analytic attack under Gaussian noise.

FedSGD gradients of a 784-256-10 ReLU MLP (the quickstart model, seeded init) on batches of 8
MNIST test digits, each with Gaussian noise of std ``sigma`` added to every coordinate (the
gaussian-noise defense). The analytic attack runs blind (``noise_std = 0``) and noise-aware
(``noise_std = sigma``); both are scored like the referee scores them (30 dB threshold).

    python -m benchmarks.bench_noise_aware        # writes benchmarks/results/noise_aware.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attacks  # noqa: F401  (registers the attacks)
from simulator.core.models import build_model, model_spec, task_loss
from simulator.core.protocol import Observation, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.data.datasets import load_split, to_tensor
from simulator.run.folder import write_atomic
from simulator.scoring.metrics import leak_summary

RESULTS = Path(__file__).parent / "results" / "noise_aware.json"
SPEC = model_spec("mlp", widths=(256,), activation="relu")
SIGMAS = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def observation(batch: int, index: int, sigma: float) -> tuple[Observation, torch.Tensor]:
    images, labels = load_split("mnist", "test")
    x = to_tensor(images[index * batch : (index + 1) * batch])
    y = torch.tensor(labels[index * batch : (index + 1) * batch], dtype=torch.int64)
    model = build_model(SPEC, seed=index)
    task_loss(SPEC, model(x), y).backward()
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    generator = torch.Generator().manual_seed(1000 + index)
    noisy = {
        k: v.grad.detach() + sigma * torch.randn(v.shape, generator=generator)
        for k, v in model.named_parameters()
    }
    meta = PublicMeta("fedsgd", batch, 0.1, 1, batch)
    return Observation(1, index, SPEC, weights, noisy, meta), x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for sigma in SIGMAS:
        row: dict[str, float] = {"sigma": sigma}
        for mode, assumed in (("blind", 0.0), ("aware", sigma)):
            attack = ATTACKS.create("analytic", {"noise_std": assumed})
            leaked, psnr, started = 0.0, 0.0, time.perf_counter()
            for index in range(args.batches):
                obs, truth = observation(args.batch_size, index, sigma)
                (rec,) = attack.run([obs])
                summary = leak_summary(rec.images, truth, None, None, 30.0)
                leaked += summary.fraction_leaked / args.batches
                psnr += float(summary.psnr.clamp(max=100).mean()) / args.batches
            row[f"{mode}_leaked"] = leaked
            row[f"{mode}_mean_psnr"] = psnr
            row[f"{mode}_seconds_per_update"] = (time.perf_counter() - started) / args.batches
        rows.append(row)
        print(json.dumps(row))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, json.dumps({"batch_size": args.batch_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
