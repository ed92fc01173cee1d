"""The evaluation's conclusions drawn: the privacy-utility frontier over every defense, and
leakage across the training rounds.

Each figure is drawn only where it has data (else None is returned).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from simulator.report import figures
from simulator.report.figures import BASELINE, plt
from simulator.report.frontier import Setting, frontier


def frontier_figure(settings: Sequence[Setting], path: Path) -> Path | None:
    """Images leaked (%) against final test accuracy (%), every defense's settings with their
    spread over seeds, and the frontier no setting beats on both."""
    if len(settings) < 2:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    curves = sorted({s.curve for s in settings}, key=lambda c: (c != "none", c))
    for curve in curves:
        members = [s for s in settings if s.curve == curve]
        axis.errorbar(
            [100 * s.accuracy for s in members],
            [100 * s.leakage for s in members],
            xerr=[100 * s.accuracy_spread for s in members],
            yerr=[100 * s.leakage_spread for s in members],
            fmt="*" if curve == "none" else "o",
            color="black" if curve == "none" else None,
            markersize=11 if curve == "none" else 5,
            capsize=2,
            label=BASELINE if curve == "none" else curve,
        )
    best = frontier(settings)
    axis.step(
        [100 * s.accuracy for s in best],
        [100 * s.leakage for s in best],
        where="post",
        color="grey",
        linestyle="--",
        linewidth=1,
        label="frontier",
    )
    axis.set_xlabel("final test accuracy (%)")
    axis.set_ylabel("images leaked (%)")
    axis.set_title("Privacy-utility frontier (mean and spread over seeds)", fontsize=9)
    axis.legend(fontsize=7)
    return figures.save(figure, path)


def leakage_by_round_figure(
    curves: Mapping[int, Mapping[int, float]], labels: Mapping[int, str], path: Path
) -> Path | None:
    """Images leaked (%) in each attacked round, one line per sweep point; drawn only when
    some point was attacked in more than one round."""
    if not any(len(rounds) > 1 for rounds in curves.values()):
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for point, rounds in sorted(curves.items()):
        xs = sorted(rounds)
        axis.plot(xs, [100 * rounds[x] for x in xs], marker="o", label=labels.get(point, ""))
    axis.set_xlabel("round attacked")
    axis.set_ylabel("images leaked (%)")
    axis.set_title("Leakage across training", fontsize=9)
    axis.legend(fontsize=6, ncol=2)
    return figures.save(figure, path)
