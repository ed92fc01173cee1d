"""A run folder written without Ray: a real scenario, typed records and attack artifacts.

It has what a report draws: rounds, attacks with iterative traces and images, a defense sweep
(noise and pruning against an undefended point), a privacy record, failed client updates, an
attack error and a failed point, with hostile text in the error messages.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulator.core.records import (
    AttackErrorRecord,
    AttackRecord,
    BestRecord,
    FailureRecord,
    PointRecord,
    PrivacyRecord,
    Record,
    RoundRecord,
    StartupRecord,
)
from simulator.run.folder import RunFolder
from simulator.scenario import expand, load

# Single-seed defense sweeps (the shipped studies' earlier form), so that the figures and
# tables tested here keep a fixed set of points whatever the shipped studies become.
FIXTURE_SCENARIOS = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"
HOSTILE = "<script>alert('x')</script> [/x] & [bold]not markup[/bold]"
PLUGIN_PATH = f"/home/me/{HOSTILE}.py"
PLUGIN_SHA = "5e" * 32


def digits(count: int, seed: int = 0) -> np.ndarray:
    """``count`` digit-like 28x28 images in [0, 1]: rings and bars of random sizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((count, 1, 28, 28), dtype=np.float32)
    for index in range(count):
        cy, cx = rng.uniform(10, 18, size=2)
        radius = rng.uniform(5, 9)
        ring = np.abs(np.hypot(yy - cy, xx - cx) - radius) < 1.6
        bar = (np.abs(xx - cx - rng.uniform(-4, 4)) < 1.5) & (np.abs(yy - cy) < 10)
        images[index, 0] = (ring | (bar if index % 2 else False)).astype(np.float32)
    return images


def _psnr(truth: np.ndarray, guess: np.ndarray) -> list[float]:
    mse = ((truth - guess) ** 2).reshape(truth.shape[0], -1).mean(axis=1)
    return [min(100.0, -10 * math.log10(max(float(m), 1e-12))) for m in mse]


def attack_record(
    attack: str = "analytic",
    psnr: Sequence[float] = (100.0,),
    *,
    ssim: Sequence[float] | None = None,
    matching: str = "hungarian",
    **fields: Any,
) -> AttackRecord:
    """An attack record of round 1, client 0, scored from ``psnr`` (and ``ssim``, 1 each by
    default) at the default thresholds; ``fields`` set any other field."""
    ssim = [1.0] * len(psnr) if ssim is None else list(ssim)
    count = {"generated" if matching == "training" else "true_images": len(psnr)}
    bar = {} if matching == "hungarian" else {"leak_threshold_ssim": 0.4}
    values: dict[str, Any] = {
        "round": 1, "client": 0, "attack": attack, "status": "converged", "notes": "synthetic",
        "matching": matching, "objective": "gradient-distance", **count,
        "recovered": len(psnr),
        "mean_psnr": statistics.fmean(psnr), "median_psnr": statistics.median(psnr),
        "mean_ssim": statistics.fmean(ssim), "label_accuracy": None,
        "fraction_leaked": statistics.fmean(p >= 30 for p in psnr),
        "leak_threshold_db": 30.0 if matching == "hungarian" else None, **bar,
        "psnr": list(psnr), "ssim": ssim, "iterations": 0, "seconds": 1.0,
        "iterations_to_threshold": None, "seconds_to_threshold": None, "trace": [],
        "psnr_curve": [],
    }  # fmt: skip
    return AttackRecord(**(values | fields))


def best_record(psnr: Sequence[float] = (100.0,), **fields: Any) -> BestRecord:
    """The per-image best of two attacks ("a", "b") of round 1, client 0, at 30 dB; ``fields``
    set any other field."""
    leaked = [p >= 30 for p in psnr]
    values: dict[str, Any] = {
        "round": 1, "client": 0, "status": "converged", "notes": "synthetic",
        "attacks": ["a", "b"], "true_images": len(psnr), "mean_psnr": statistics.fmean(psnr),
        "median_psnr": statistics.median(psnr), "mean_ssim": 1.0,
        "fraction_leaked": statistics.fmean(leaked), "leak_threshold_db": 30.0,
        "psnr": list(psnr), "ssim": [1.0] * len(psnr), "leaked": leaked,
        "best_attack": ["a"] * len(psnr), "seconds": 2.0,
    }  # fmt: skip
    return BestRecord(**(values | fields))


def point_record(index: int, swept: dict[str, Any], **fields: Any) -> PointRecord:
    """A finished sweep point that set ``swept``, with its defense and strength read from a
    swept defense list as the engine reads them; ``fields`` set any other field."""
    defense, strength = _defense(swept)
    values: dict[str, Any] = {
        "point": index, "swept": swept, "status": "ok", "rounds_completed": 1,
        "defense": defense, "strength": strength, "final_accuracy": 0.9, "failed_updates": 0,
        "seconds": 1.0,
    }  # fmt: skip
    return PointRecord(**(values | fields))


def _defense(values: dict[str, Any]) -> tuple[str, Any]:
    defenses = values.get("defenses") or []
    if not defenses:
        return "none", None
    numbers = [v for k, v in defenses[-1].items() if k != "name" and isinstance(v, int | float)]
    return "+".join(d["name"] for d in defenses), (numbers[0] if numbers else None)


def build_run(
    root: Path,
    scenario: str = "dlg-defenses-fedavg",
    points: int = 8,
    batch: int = 4,
    iterative: bool = True,
    hostile: bool = True,
) -> Path:
    """Write a run folder under ``root`` with ``points`` sweep points; returns its path.

    Point 1 has a failed client update, point 2 an attack error and (with ``hostile``) the
    last point failed; their messages carry :data:`HOSTILE`.
    """
    fixture = FIXTURE_SCENARIOS / f"{scenario}.toml"
    loaded = load(fixture if fixture.is_file() else scenario, ["federation.rounds=2"])
    folder = RunFolder.create(loaded, path=root / "run")
    truth = {client: digits(batch, seed=client) for client in (3, 7)}
    noise = np.random.default_rng(1)
    selected = expand(loaded)[:points]
    for point in selected:

        def emit(record: Record, index: int = point.index) -> Record:
            written = dataclasses.replace(record, point=index)
            folder.append(written)
            return written

        if hostile:  # a plugin file, its path hostile text too
            emit(StartupRecord(1.0, plugins=[{"path": PLUGIN_PATH, "sha256": PLUGIN_SHA}]))
        defense, strength = _defense(point.values)
        # Leakage falls with the defense's strength; pruning's two weakest points coincide.
        level = 0.0 if strength is None else min(0.45, 0.15 * max(0.0, 3 + math.log10(strength)))
        if defense == "pruning":
            level = 0.02 if strength is not None and strength <= 0.1 else level
        failed = hostile and point.index == selected[-1].index
        accuracy = 0.9 - 0.5 * level
        for round_ in range(0, 1 if failed else 3):
            emit(RoundRecord(round_, accuracy * round_ / 2 + 0.1, 2.3 - round_, 0.5, 0))
        if point.index == 1:
            emit(FailureRecord(2, 5, f"client crashed: {HOSTILE}" if hostile else "timeout"))
        if point.index == 2:
            emit(AttackErrorRecord(1, "analytic", f"ValueError: {HOSTILE}" if hostile else "x"))
        for client, images in truth.items():
            guess = np.clip(images + noise.normal(0, level, images.shape), 0, 1).astype("f4")
            psnr = _psnr(images, guess)
            trace = [
                {"iteration": i, "gradient_distance": 10 ** (-i / 40) + level}
                for i in range(0, 201, 20)
            ]
            curve = [(i, min(psnr) * (1 - math.exp(-i / 50))) for i in range(0, 201, 40)]
            record = attack_record(
                "analytic", psnr, client=client,
                mean_psnr=float(np.mean(psnr)), median_psnr=float(np.median(psnr)),
                mean_ssim=max(0.0, 1 - 2 * level), label_accuracy=1.0,
                fraction_leaked=float(np.mean([p >= 30 for p in psnr])),
                ssim=[1 - level] * batch, iterations=200 if iterative else 0, seconds=1.5,
                iterations_to_threshold=80 if iterative and level < 0.05 else None,
                seconds_to_threshold=0.6 if iterative and level < 0.05 else None,
                trace=trace if iterative else trace[:1],
                psnr_curve=curve if iterative else [],
            )  # fmt: skip
            written = emit(record)
            assert isinstance(written, AttackRecord)
            folder.save_attack(written, {"truth": images, "reconstruction": guess})
        if defense == "gaussian-noise":
            emit(PrivacyRecord(epsilon=1 / strength, delta=1e-5, client=3, mean_epsilon=0.5))
        emit(
            PointRecord(
                point=point.index,
                swept=point.values,
                status="failed" if failed else "ok",
                rounds_completed=0 if failed else 2,
                defense=defense,
                strength=strength,
                final_accuracy=None if failed else accuracy,
                failed_updates=int(point.index == 1),
                seconds=12.5,
                error=f"RuntimeError: {HOSTILE}" if failed else None,
            )
        )
    return folder.path
