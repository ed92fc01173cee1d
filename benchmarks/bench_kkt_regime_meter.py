"""Regime meter: how fast each victim schedule brings MNIST odd/even weights to a KKT point.

Run with ``python -m benchmarks.bench_kkt_regime_meter`` (one thread; writes
``benchmarks/results/kkt_regime.json`` after every measurement, so a partial run leaves data).

The victim is ``kkt-mnist-odd-even-paper``'s (homogeneous ReLU MLP 784-1000-1000-1, first
layer at PyTorch's default x 1e-4, logistic loss, full-batch steps, inputs centred by the
network) on ``n`` odd/even digits (100, then 500), trained by the clients' own local training
(:mod:`simulator.federation.training`) under three schedules from the same initial weights:

* ``plain``: gradient descent at the paper's lr 0.01;
* ``loss-scaled``: Lyu and Li's ``eta_t = alpha_t / L(theta_t)``, alpha bounded by 0.01
  (``federation.lr_schedule = "loss-scaled"``);
* ``weight-decay``: gradient descent at lr 0.01 with weight decay 0.03 (Buzaglo et al.).

Each schedule trains until its wall-clock budget is spent. At log-spaced epochs the meter
records, outside the training clock: the training loss, the normalised margin
``min_i y_i f(x_i) / ||theta||^3`` (3 linear layers), the true digits' KKT stationarity residual
(:func:`benchmarks.kkt_residual.truth_residual` with ``lambda_i >= 0`` by non-negative least
squares) of the first layer and of all layers, and the test accuracy on held-out digits. It
uses the truth: a diagnostic, never part of an attack.

Extrapolation: the all-layer residual against training seconds is fitted by a line in log-log
coordinates over the measurements in the last decade of the run's epochs
(``log r = a + b log t``); when the slope is negative, the time to reach ``TARGET`` is
``exp((log TARGET - a) / b)``. It assumes the power law of the curve's tail holds on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_kkt_regimes import odd_even_test
from benchmarks.kkt_residual import truth_residual
from simulator.core.models import ModelSpec, build_model, task_loss
from simulator.core.protocol import Observation, PublicMeta
from simulator.data.shards import Shard
from simulator.federation.training import LossScaled, local_train, loss_scaled_train
from simulator.run.folder import write_atomic
from simulator.scenario import load
from tests.fixtures.trained_model import mnist_odd_even

RESULTS = Path(__file__).parent / "results" / "kkt_regime.json"
PAPER_SCENARIO = "kkt-mnist-odd-even-paper"
TARGET = 0.1  # all-layer residual at which the weights count as a KKT point
LR = 0.01  # the paper's
WEIGHT_DECAY = 0.03
ALPHA = 0.01  # loss-scaled: alpha_0 and its bound (federation.lr)
SCHEDULES = ("plain", "loss-scaled", "weight-decay")
Record = dict[str, Any]  # one schedule's curve and fits, as the JSON holds it


def checkpoints(limit: int = 10_000_000, per_decade: int = 8) -> list[int]:
    """Log-spaced epochs 1, 2, 3, 4, 5, 7, 10, ... up to ``limit``."""
    grid = np.logspace(0, math.log10(limit), int(per_decade * math.log10(limit)) + 1)
    return sorted({round(float(e)) for e in grid})


def normalised_margin(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """``min_i y_i f(x_i) / ||theta||^L`` with L the number of linear layers."""
    with torch.no_grad():
        logits = model(images)[:, 0].double()
        margins = (labels % 2 * 2 - 1).double() * logits
        params = list(model.parameters())
        norm = math.sqrt(sum(float((p.double() ** 2).sum()) for p in params))
        degree = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    return float(margins.min()) / norm**degree


def fit_extrapolation(points: list[dict[str, float]], clock: str = "seconds") -> dict[str, object]:
    """Log-log line through the all-layer residual against ``clock`` (wall ``seconds`` or
    ``cpu_seconds``) over the last decade of epochs, and the time it puts at ``TARGET``
    (None when the residual is not falling)."""
    last = points[-1]["epoch"] if points else 0
    tail = [p for p in points if p["epoch"] >= last / 10 and p[clock] > 0]
    if len(tail) < 3:
        return {"method": "too few points", "seconds_to_target": None}
    x = np.log([p[clock] for p in tail])
    y = np.log([max(p["residual_all"], 1e-12) for p in tail])
    slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
    reached = next((p[clock] for p in points if p["residual_all"] <= TARGET), None)
    # log10 of the time the line puts at TARGET (None when the residual is not falling); the
    # time itself only where it is finite in a float.
    log10 = (math.log(TARGET) - intercept) / slope / math.log(10) if slope < 0 else None
    estimate = 10**log10 if log10 is not None and log10 < 12 else None
    return {
        "method": (
            f"least-squares line log(residual_all) = a + b log({clock}) over the {len(tail)} "
            f"measurements at epochs >= {last / 10:g} (the last decade)"
        ),
        "slope": round(slope, 4),
        "intercept": round(intercept, 4),
        "log10_seconds_to_target": None if log10 is None else round(log10, 2),
        "seconds_to_target": None if estimate is None else round(estimate, 1),
        "hours_to_target": None if estimate is None else round(estimate / 3600, 2),
        "reached_target_at_seconds": reached,
    }


def measure(
    model: torch.nn.Module,
    spec: ModelSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """The meter's readings of ``model``'s current weights (see the module docstring)."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = int(images.shape[0])
    obs = Observation(
        round=0,
        client_id=0,
        model=spec,
        global_weights=weights,
        update=weights,
        meta=PublicMeta("fedavg", n, LR, 1, num_examples=n),
    )
    with torch.no_grad():
        loss = float(task_loss(spec, model(images), labels))
        test_logits = model(test[0])[:, 0]
    accuracy = float(((test_logits > 0).long() == test[1] % 2).double().mean())
    return {
        "loss": loss,
        "normalised_margin": normalised_margin(model, images, labels),
        "residual_first": truth_residual(obs, images, first_only=True, labels=labels),
        "residual_all": truth_residual(obs, images, labels=labels),
        "test_accuracy": accuracy,
    }


def warm_up() -> None:
    """One step of each kind on a tiny model: torch's first optimiser step imports and sets
    up machinery for seconds, a cost of the process, not of the schedule timed first."""
    spec = load(PAPER_SCENARIO).model
    images, labels = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    model = build_model(spec, seed=0)
    local_train(model, spec, Shard(images, labels), 1, 2, LR, torch.Generator())
    loss_scaled_train(model, spec, images, labels, 1, LossScaled(LR, LR))


def run_schedule(
    record: Record,
    per_class: int,
    budget: float,
    alpha: float,
    test: tuple[torch.Tensor, torch.Tensor],
    save: Callable[[], None],
) -> None:
    """Train ``record["schedule"]`` for ``budget`` wall seconds, measuring at
    :func:`checkpoints` into ``record`` (``save`` after each measurement)."""
    schedule = str(record["schedule"])
    scenario = load(PAPER_SCENARIO)
    spec = scenario.model
    images, labels = mnist_odd_even(per_class=per_class, seed=scenario.seed)
    n = int(images.shape[0])
    model = build_model(spec, seed=scenario.seed)
    shard = Shard(images, labels)
    generator = torch.Generator().manual_seed(scenario.seed)
    state = LossScaled(alpha=alpha, alpha_max=alpha)
    record.update(
        {
            "train_images": n,
            "lr": alpha if schedule == "loss-scaled" else LR,
            "weight_decay": WEIGHT_DECAY if schedule == "weight-decay" else 0.0,
            "budget_seconds": budget,
            "points": [],
        }
    )
    points: list[dict[str, float]] = record["points"]
    seconds = cpu = 0.0
    epoch = 0
    for target in checkpoints():
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if schedule == "loss-scaled":
            loss_scaled_train(model, spec, images, labels, target - epoch, state)
        else:
            decay = WEIGHT_DECAY if schedule == "weight-decay" else 0.0
            local_train(model, spec, shard, target - epoch, n, LR, generator, decay)
        seconds += time.perf_counter() - wall0
        cpu += time.process_time() - cpu0
        epoch = target
        point = {"epoch": epoch, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}
        point.update(
            {k: float(f"{v:.6g}") for k, v in measure(model, spec, images, labels, test).items()}
        )
        if schedule == "loss-scaled":
            point.update({"alpha": float(f"{state.alpha:.4g}"), "undone": state.undone})
        points.append(point)
        record["extrapolation"] = fit_extrapolation(points)
        record["extrapolation_cpu"] = fit_extrapolation(points, "cpu_seconds")
        record["seconds_per_epoch"] = round(seconds / epoch, 5)
        print(schedule, n, json.dumps(point), flush=True)
        save()
        if seconds >= budget:
            break


def _log10_to_target(fit: Record) -> float | None:
    """log10 of the seconds to ``TARGET``: when it was reached, else the fit's (None: the
    residual is not falling, no time is extrapolated)."""
    reached = fit.get("reached_target_at_seconds")
    if reached:
        return round(math.log10(reached), 2)
    log10: float | None = fit.get("log10_seconds_to_target")
    return log10


def summary(runs: dict[str, dict[str, Record]]) -> dict[str, Record]:
    """Per size and schedule: the last reading, when ``TARGET`` was reached or is extrapolated
    to be (wall and CPU seconds), and loss-scaled's speed-up to it against plain GD."""
    table: dict[str, Record] = {}
    for size, schedules in runs.items():
        row: Record = {}
        for name, record in schedules.items():
            points = record["points"]
            if not points:
                continue
            wall = record.get("extrapolation", {})
            cpu = record.get("extrapolation_cpu", {})
            row[name] = {
                "epochs": points[-1]["epoch"],
                "seconds": points[-1]["seconds"],
                "cpu_seconds": points[-1]["cpu_seconds"],
                "final_residual_all": points[-1]["residual_all"],
                "final_residual_first": points[-1]["residual_first"],
                "final_test_accuracy": points[-1]["test_accuracy"],
                "reached_target_at_seconds": wall.get("reached_target_at_seconds"),
                "log10_seconds_to_target": _log10_to_target(wall),
                "log10_cpu_seconds_to_target": _log10_to_target(cpu),
            }
        if "plain" in row and "loss-scaled" in row:
            for clock in ("seconds", "cpu_seconds"):
                a = row["plain"][f"log10_{clock}_to_target"]
                b = row["loss-scaled"][f"log10_{clock}_to_target"]
                speedup = None if a is None or b is None else round(10 ** (a - b), 2)
                row[f"loss_scaled_speedup_{clock}_to_target"] = speedup
        if "loss-scaled" in row:
            log10 = row["loss-scaled"]["log10_seconds_to_target"]
            row["loss_scaled_reaches_target_within_30_min"] = (
                log10 is not None and 10**log10 <= 1800
            )
        table[size] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[50, 250])
    parser.add_argument(
        "--budget", type=float, nargs="+", default=[420.0, 240.0], help="seconds, per size"
    )
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument(
        "--alpha", type=float, default=ALPHA, help="loss-scaled: alpha_0 and its bound"
    )
    parser.add_argument("--test-digits", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--refit", action="store_true", help="only redo the fits and summary of stored curves"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LEAKSIM_DATA_DIR", str(Path(__file__).parents[2] / "shared" / "data"))
    test = odd_even_test(args.test_digits)
    warm_up()
    # Other sizes' and schedules' curves from an earlier run stay; those run now are replaced.
    old = json.loads(args.output.read_text()) if args.output.exists() else {}
    runs: dict[str, dict[str, Record]] = old.get("runs", {})
    settings = {
        "model": f"{PAPER_SCENARIO}'s: homogeneous ReLU MLP 784-1000-1000-1, first layer at "
        "PyTorch's default x 1e-4, bias on the first layer only, inputs 2x - 1",
        "data": "MNIST odd/even training digits (mnist_odd_even, the scenario's seed), parity",
        "test": f"first {args.test_digits} MNIST test digits, parity",
        "training": (
            f"full-batch steps on the logistic loss by simulator.federation.training, lr {LR}: "
            f"plain = constant step; loss-scaled = alpha_t / L(theta_t) with alpha_t <= {LR}; "
            f"weight-decay = constant step with weight decay {WEIGHT_DECAY}"
        ),
        "residual": (
            "the true digits' KKT stationarity residual, lambda_i >= 0 by non-negative least "
            "squares, per-tensor normalised (0 at a KKT point; 2 = first layer unexplained, "
            "4 = all layers)"
        ),
        "seconds": "training wall seconds on a shared 2-core machine, meter time excluded; "
        "cpu_seconds: this process's CPU time",
        "target": f"all-layer residual <= {TARGET}",
    }

    def save() -> None:
        payload = {
            "device": "cpu",
            "threads": args.threads,
            "settings": settings,
            "summary": summary(runs),
            "runs": runs,
        }
        write_atomic(args.output, json.dumps(payload, indent=2) + "\n")

    if args.refit:
        for record in (r for schedules in runs.values() for r in schedules.values()):
            record["extrapolation"] = fit_extrapolation(record["points"])
            record["extrapolation_cpu"] = fit_extrapolation(record["points"], "cpu_seconds")
        save()
        return
    budgets = dict(zip(args.per_class, args.budget, strict=True))
    for per_class in args.per_class:
        size = str(2 * per_class)
        for schedule in args.schedules:
            record: Record = {"schedule": schedule, "points": []}
            runs.setdefault(size, {})[schedule] = record
            run_schedule(record, per_class, budgets[per_class], args.alpha, test, save)
            save()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
