"""Batched attacks: cost of attacking K clients of one round together vs one at a time.

For each configuration and K in (1, 2, 4, 8), builds K FedSGD observations of different MNIST
test digits under the same global model (one round), then times one ``run`` on all K
(batched) against K separate ``run`` calls (K x single) at the same iteration budget, and
reports the mean PSNR each reaches. Best of ``--repeats`` timings, since the CPU is shared.
Writes ``benchmarks/results/attacks.json``.

    python -m benchmarks.bench_attacks                # the three default configurations
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from simulator.core.models import ModelSpec, build_model, model_spec, task_loss
from simulator.core.protocol import Observation, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.data.datasets import load_split
from simulator.run.folder import write_atomic
from simulator.scoring.metrics import leak_summary

RESULTS = Path(__file__).parent / "results" / "attacks.json"

# (label, attack, params, model spec, batch size); Adam runs exactly `iterations` steps,
# L-BFGS may stop a problem early (converged or stalled), batched or not.
CONFIGS: list[tuple[str, str, dict[str, object], ModelSpec, int]] = [
    (
        "inverting-gradients / lenet / bs 1",
        "inverting-gradients",
        {"iterations": 200, "tolerance": 0.0},
        ModelSpec("lenet"),
        1,
    ),
    (
        "inverting-gradients / cnn(8,16) relu / bs 4",
        "inverting-gradients",
        {"iterations": 100, "tolerance": 0.0},
        model_spec("cnn", channels=(8, 16), activation="relu"),
        4,
    ),
    (
        "dlg (L-BFGS) / mlp(32) sigmoid / bs 1",
        "dlg",
        {"iterations": 100, "tolerance": 0.0},
        model_spec("mlp", widths=(32,), activation="sigmoid"),
        1,
    ),
]


def digits(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` MNIST test digits in [0, 1] and their labels (the data layer).

    Scaled in float64 before the cast, as the recorded results were.
    """
    images, labels = load_split("mnist", "test")
    pixels = images[:count, None]
    return torch.tensor(pixels / 255.0, dtype=torch.float32), torch.tensor(labels[:count]).long()


def observations(
    spec: ModelSpec, batch: int, clients: int, images: torch.Tensor, labels: torch.Tensor
) -> list[Observation]:
    """One round: every client sends the gradient of its own batch at the same global model."""
    model = build_model(spec, seed=0)
    weights = dict(model.named_parameters())
    result = []
    for client in range(clients):
        x, y = (
            images[client * batch : (client + 1) * batch],
            labels[client * batch : (client + 1) * batch],
        )
        grads = torch.autograd.grad(task_loss(spec, model(x), y), list(weights.values()))
        result.append(
            Observation(
                round=1,
                client_id=client,
                model=spec,
                global_weights={k: v.detach().clone() for k, v in weights.items()},
                update={k: g.detach() for k, g in zip(weights, grads, strict=True)},
                meta=PublicMeta("fedsgd", batch, 0.1, 1, batch),
            )
        )
    return result


def mean_psnr(reconstructions: list, images: torch.Tensor, batch: int) -> float:
    scores = [
        leak_summary(r.images, images[k * batch : (k + 1) * batch]).psnr.clamp(max=100)
        for k, r in enumerate(reconstructions)
    ]
    return float(torch.cat(scores).mean())


def measure(
    label: str,
    name: str,
    params: dict[str, object],
    spec: ModelSpec,
    batch: int,
    counts: list[int],
    repeats: int,
) -> list[dict[str, object]]:
    images, labels = digits(max(counts) * batch)
    attack = ATTACKS.create(name, params)
    attack.run(observations(spec, batch, 1, images, labels))  # warm-up (allocations, caches)
    rows = []
    for clients in counts:
        obs = observations(spec, batch, clients, images, labels)
        batched_s, single_s = float("inf"), float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            together = attack.run(obs)
            batched_s = min(batched_s, time.perf_counter() - started)
            started = time.perf_counter()
            alone = [attack.run([o])[0] for o in obs]
            single_s = min(single_s, time.perf_counter() - started)
        row = {
            "config": label,
            "attack": name,
            "params": params,
            "clients": clients,
            "batched_s": round(batched_s, 3),
            "k_x_single_s": round(single_s, 3),
            "speedup": round(single_s / batched_s, 2),
            "batched_vs_one_client": round(batched_s / rows[0]["batched_s"], 2) if rows else 1.0,
            "psnr_batched": round(mean_psnr(together, images, batch), 2),
            "psnr_single": round(mean_psnr(alone, images, batch), 2),
            "iterations_logged": int(together[0].trace[-1]["iteration"]),
        }
        rows.append(row)
        print(
            f"{label:46s} K={clients}: batched {batched_s:7.2f}s  K x single {single_s:7.2f}s"
            f"  speedup {row['speedup']:5.2f}  PSNR {row['psnr_batched']:6.2f} / "
            f"{row['psnr_single']:6.2f} dB",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = []
    for config in CONFIGS:
        runs += measure(*config, counts=args.clients, repeats=args.repeats)
    report = {
        "machine": f"{os.cpu_count()} CPU cores (shared), {platform.machine()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average_at_start": list(os.getloadavg()),
        "note": "seconds are best of repeats; PSNR capped at 100 dB per image before averaging",
        "total_s": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS, json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
