"""The strongest attack per image: several attacks' scores of one update, combined.

A defense looks strong when the attack is weak, so an evaluation attacks each update with
several attacks and reports, per true image, the best any of them achieved: the highest PSNR
and SSIM, and "leaked" when any attack leaked it by its own criterion (PSNR at or above the
dB threshold for one-to-one reconstructions, SSIM at or above the SSIM threshold for candidate
sets). The per-attack records are kept beside the combined one.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from simulator.core.records import AttackRecord

BEST = "best"


def leaked_images(scores: dict[str, Any]) -> list[bool]:
    """Per true image, whether this attack leaked it by its own criterion."""
    if scores.get("matching") == "nearest":
        threshold = scores["leak_threshold_ssim"]
        return [value >= threshold for value in scores["ssim"]]
    threshold = scores["leak_threshold_db"]
    return [value >= threshold for value in scores["psnr"]]


def comparable(record: AttackRecord) -> bool:
    """Records scored per true image (not class samples against the training set)."""
    return record.scores.get("matching") != "training" and bool(record.scores.get("psnr"))


def best_of(records: Sequence[AttackRecord]) -> AttackRecord | None:
    """The per-image best of several attacks' records of one update (None if fewer than two
    are comparable). ``best_attack`` names, per image, the attack with the highest PSNR."""
    usable = [r for r in records if comparable(r)]
    if len(usable) < 2:
        return None
    first = usable[0]
    counts = {len(r.scores["psnr"]) for r in usable}
    if len(counts) != 1:
        raise ValueError(f"attacks scored different numbers of images: {sorted(counts)}")
    psnr_columns = [r.scores["psnr"] for r in usable]
    ssim_columns = [r.scores["ssim"] for r in usable]
    leaked_columns = [leaked_images(r.scores) for r in usable]
    images = range(counts.pop())
    best_psnr = [max(column[i] for column in psnr_columns) for i in images]
    best_ssim = [max(column[i] for column in ssim_columns) for i in images]
    leaked = [any(column[i] for column in leaked_columns) for i in images]
    winner = [max(range(len(usable)), key=lambda a, i=i: psnr_columns[a][i]) for i in images]
    scores = {
        "attacks": [r.attack for r in usable],
        "batch_size": first.scores["batch_size"],
        "mean_psnr": statistics.fmean(best_psnr),
        "median_psnr": statistics.median(best_psnr),
        "mean_ssim": statistics.fmean(best_ssim),
        "fraction_leaked": sum(leaked) / len(leaked),
        "psnr": best_psnr,
        "ssim": best_ssim,
        "leaked": leaked,
        "best_attack": [usable[a].attack for a in winner],
        "label_accuracy": None,
        "seconds": sum(r.scores.get("seconds", 0.0) for r in usable),
        "iterations_to_threshold": None,
        "seconds_to_threshold": None,
        "trace": [],
        "psnr_curve": [],
    }
    status = "converged" if any(r.status == "converged" for r in usable) else first.status
    notes = "per-image best of " + ", ".join(r.attack for r in usable)
    return AttackRecord(first.round, first.client, BEST, status, notes, scores)
