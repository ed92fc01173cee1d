"""The strongest attack per image: several attacks' scores of one update, combined.

A defense looks strong when the attack is weak, so an evaluation attacks each update with
several attacks and reports, per true image, the best any of them achieved: the highest PSNR
and SSIM, and "leaked" when any attack leaked it by its own criterion (PSNR at or above the
dB threshold for one-to-one reconstructions, SSIM at or above the SSIM threshold for candidate
sets). The per-attack records are kept beside the combined one, a ``best`` record.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from simulator.core.records import AttackRecord, BestRecord


def leaked_images(record: AttackRecord) -> list[bool]:
    """Per true image, whether this attack leaked it by its own criterion."""
    if record.matching == "nearest":
        threshold = record.leak_threshold_ssim
        return [value >= threshold for value in record.ssim]
    threshold = record.leak_threshold_db
    return [value >= threshold for value in record.psnr]


def comparable(record: AttackRecord) -> bool:
    """Records scored per true image (not class samples against the training set)."""
    return record.matching != "training" and bool(record.psnr)


def best_of(records: Sequence[AttackRecord]) -> BestRecord | None:
    """The per-image best of several attacks' records of one update (None if fewer than two
    are comparable). ``best_attack`` names, per image, the attack with the highest PSNR."""
    usable = [r for r in records if comparable(r)]
    if len(usable) < 2:
        return None
    first = usable[0]
    counts = {len(r.psnr) for r in usable}
    if len(counts) != 1:
        raise ValueError(f"attacks scored different numbers of images: {sorted(counts)}")
    psnr_columns = [r.psnr for r in usable]
    ssim_columns = [r.ssim for r in usable]
    leaked_columns = [leaked_images(r) for r in usable]
    images = range(counts.pop())
    best_psnr = [max(column[i] for column in psnr_columns) for i in images]
    best_ssim = [max(column[i] for column in ssim_columns) for i in images]
    leaked = [any(column[i] for column in leaked_columns) for i in images]
    winner = [max(range(len(usable)), key=lambda a, i=i: psnr_columns[a][i]) for i in images]
    status = "converged" if any(r.status == "converged" for r in usable) else first.status
    return BestRecord(
        round=first.round,
        client=first.client,
        status=status,
        notes="per-image best of " + ", ".join(r.attack for r in usable),
        attacks=[r.attack for r in usable],
        true_images=first.true_images,
        mean_psnr=statistics.fmean(best_psnr),
        median_psnr=statistics.median(best_psnr),
        mean_ssim=statistics.fmean(best_ssim),
        fraction_leaked=sum(leaked) / len(leaked),
        leak_threshold_db=_first(r.leak_threshold_db for r in usable),
        leak_threshold_ssim=_first(r.leak_threshold_ssim for r in usable),
        psnr=best_psnr,
        ssim=best_ssim,
        leaked=leaked,
        best_attack=[usable[a].attack for a in winner],
        seconds=sum(math.nan if r.seconds is None else r.seconds for r in usable),
    )


def _first(values: Iterable[float | None]) -> float | None:
    """The first value that is not None (the attacks of one run share their thresholds)."""
    return next((v for v in values if v is not None), None)
