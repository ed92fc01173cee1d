"""The KKT benchmark's odd/even records: the paper regime runs end to end, and the two victim
regimes share the ``mnist_odd_even`` key by what they recover."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_kkt import bench_odd_even_paper, place_odd_even


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _record(regime: str, selected: int, recovered: int) -> dict[str, object]:
    return {"regime": regime, "images_leaked_selected": selected, "recovered": recovered}


def test_better_regime_takes_the_key_and_the_other_keeps_its_own() -> None:
    old = {"train_images": 500, "recovered": 0}  # written before regimes were told apart
    results: dict[str, object] = {"toy": {}, "mnist_odd_even": old}
    paper = _record("paper: ...", 0, 0)
    place_odd_even(results, paper)
    assert results["mnist_odd_even"] is paper  # a tie goes to the paper's regime
    decay = results["mnist_odd_even_weight_decay"]
    assert isinstance(decay, dict) and decay["regime"] == "weight decay 0.03"
    assert decay["device"] == "cpu" and "toy" in results
    better = _record("weight decay 0.03", 3, 5)
    place_odd_even(results, better)
    assert results["mnist_odd_even"] is better and results["mnist_odd_even_paper"] is paper
    assert "mnist_odd_even_weight_decay" not in results
    place_odd_even(results, _record("paper: ...", 4, 1))  # selection counts first
    assert results["mnist_odd_even"]["images_leaked_selected"] == 4  # type: ignore[index]
    assert set(results) == {"toy", "mnist_odd_even", "mnist_odd_even_weight_decay"}


def test_paper_regime_record_runs_on_a_tiny_budget() -> None:
    record = bench_odd_even_paper(epochs=2, iterations=2, runs=None, device="cpu", subspace=False)
    assert record["train_images"] == 500 and record["device"] == "cpu"
    assert record["candidates"] == 1000 and record["train_steps"] == 2
    for key in ("recovered", "recovered_paper", "selected", "images_leaked_selected"):
        assert isinstance(record[key], int)
    assert "no GPU" in str(record["note"]) and "paper" in str(record["regime"])
