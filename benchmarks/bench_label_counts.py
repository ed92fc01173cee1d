"""Batch label counts from the last layer's update, per batch size and per training stage.

FedSGD gradients of two models on random batches of MNIST training images: the quickstart's
784-256-10 ReLU MLP and the small CNN (``ModelSpec("cnn")``). Each model is trained
as the FedSGD studies train it (mean gradient of 5 clients x 32 images a round, plain SGD) and
attacked at rounds 1, 10 and 50. Two count rules, both from the bias gradient: ``probes``
(the model's mean softmax on random images stands in for the batch's) and ``public`` (the
model's confusion on the server's labelled test split,
:func:`attacks.labels.recovery.public_confusion`).
Per setting: the share of batches whose label multiset is exact, and the share of labels
right (sum over classes of min(true, recovered) count, over the batch size).

    python -m benchmarks.bench_label_counts
    # writes benchmarks/results/label_counts.json (every row) and labels.json (the summary:
    # per batch size B, ``batch_<B>.round_1`` and ``round_20``, the share of batches whose
    # label multiset the public rule recovers exactly, for the MLP and under ``cnn`` the CNN)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attacks.labels.recovery import recover_labels
from simulator.core.models import ModelSpec, build_model, model_spec, task_loss
from simulator.core.protocol import Observation, PublicData, PublicMeta
from simulator.data.datasets import load_split, to_tensor
from simulator.run.folder import write_atomic

RESULTS = Path(__file__).parent / "results" / "label_counts.json"
SUMMARY = Path(__file__).parent / "results" / "labels.json"
MODELS = {
    "mlp": (model_spec("mlp", widths=(256,), activation="relu"), 0.8),
    "cnn": (ModelSpec("cnn"), 0.3),
}
ROUNDS = (1, 10, 20, 50)
BATCH_SIZES = (1, 8, 16, 32, 64, 128, 256)
ROUND_BATCH = 160  # 5 clients x 32 images: the FedSGD studies' round


def labels_right(recovered: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """Share of the batch whose label the recovered multiset accounts for."""
    found = torch.bincount(recovered, minlength=classes)
    true = torch.bincount(truth, minlength=classes)
    return float(torch.minimum(found, true).sum()) / truth.numel()


def snapshots(
    spec: ModelSpec, lr: float, x: torch.Tensor, y: torch.Tensor
) -> dict[int, dict[str, torch.Tensor]]:
    """The global weights at the start of each round in :data:`ROUNDS` (seeded SGD)."""
    model = build_model(spec, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    found = {}
    for server_round in range(1, max(ROUNDS) + 1):
        if server_round in ROUNDS:
            found[server_round] = {k: v.detach().clone() for k, v in model.named_parameters()}
        batch = torch.randint(0, len(y), (ROUND_BATCH,), generator=generator)
        optimizer.zero_grad()
        task_loss(spec, model(x[batch]), y[batch]).backward()
        optimizer.step()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=20, help="batches per setting")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--summary", type=Path, default=SUMMARY)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, labels = load_split("mnist", "train")
    x, y = to_tensor(images), torch.tensor(labels, dtype=torch.int64)
    test_images, test_labels = load_split("mnist", "test")
    public = PublicData(to_tensor(test_images), torch.tensor(test_labels, dtype=torch.int64))
    rows = []
    for name, (spec, lr) in MODELS.items():
        for server_round, weights in snapshots(spec, lr, x, y).items():
            model = build_model(spec, seed=0)
            model.load_state_dict(weights)
            with torch.no_grad():
                predicted = model(public.images[:2000]).argmax(-1)
            accuracy = float((predicted == public.labels[:2000]).double().mean())
            for batch_size in BATCH_SIZES:
                generator = torch.Generator().manual_seed(batch_size)
                row: dict[str, object] = {"model": name, "round": server_round,
                                          "test_accuracy": accuracy,
                                          "batch_size": batch_size}  # fmt: skip
                scores: dict[str, list[float]] = {"probes": [], "public": []}
                seconds: dict[str, float] = {"probes": 0.0, "public": 0.0}
                for _ in range(args.batches):
                    chosen = torch.randperm(len(y), generator=generator)[:batch_size]
                    model.zero_grad()
                    task_loss(spec, model(x[chosen]), y[chosen]).backward()
                    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
                    meta = PublicMeta("fedsgd", batch_size, lr, 1, batch_size)
                    obs = Observation(server_round, 0, spec, weights, grads, meta)
                    for rule, data in (("probes", None), ("public", public)):
                        started = time.perf_counter()
                        found = recover_labels(obs, public=data).labels
                        seconds[rule] += time.perf_counter() - started
                        assert found is not None
                        scores[rule].append(labels_right(found, y[chosen], spec.num_classes))
                for rule, values in scores.items():
                    row[f"{rule}_exact"] = sum(v == 1.0 for v in values) / len(values)
                    row[f"{rule}_labels_right"] = sum(values) / len(values)
                    row[f"{rule}_seconds"] = seconds[rule] / len(values)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, json.dumps({"batches": args.batches, "rows": rows}, indent=1))
    summary: dict[str, object] = {"batches": args.batches, "rule": "public", "model": "mlp"}
    summary.update(summarise(rows, "mlp"))
    summary["cnn"] = summarise(rows, "cnn")
    write_atomic(args.summary, json.dumps(summary, indent=1))


def summarise(rows: list[dict[str, object]], model: str) -> dict[str, dict[str, float]]:
    """``batch_<B>: {round_<R>: exact share}`` for one model, with the public rule."""
    found: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["model"] == model:
            entry = found.setdefault(f"batch_{row['batch_size']}", {})
            entry[f"round_{row['round']}"] = float(row["public_exact"])  # type: ignore[arg-type]
    return found


if __name__ == "__main__":
    main()
