"""simulator.scoring.best: the per-image best of several attacks, against the obvious reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.core.models import build_model, model_spec, task_loss
from simulator.core.protocol import Observation, PublicMeta, Truth
from simulator.core.records import AttackRecord, BestRecord, Record
from simulator.federation.traffic import RoundTraffic
from simulator.federation.truth import TruthKey, TruthStore
from simulator.run.privacy import PrivacyLedger
from simulator.run.referee import Referee
from simulator.run.seal import Scorer, point_store
from simulator.scenario import load
from simulator.scoring.best import best_of
from tests.unit.report.synthetic_run import attack_record


def record(attack: str, psnr: list[float], ssim: list[float], nearest: bool) -> AttackRecord:
    bar = {"leak_threshold_ssim": 0.4} if nearest else {"leak_threshold_db": 30.0}
    matching = "nearest" if nearest else "hungarian"
    return attack_record(attack, psnr, ssim=ssim, matching=matching, status="budget", **bar)


values = st.floats(0.0, 100.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.lists(
            st.tuples(
                st.lists(values, min_size=n, max_size=n),
                st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n),
                st.booleans(),
            ),
            min_size=2,
            max_size=4,
        )
    )
)
def test_best_of_is_the_per_image_maximum(attacks: list[tuple[list, list, bool]]) -> None:
    records = [record(f"a{i}", p, s, nearest) for i, (p, s, nearest) in enumerate(attacks)]
    best = best_of(records)
    assert isinstance(best, BestRecord) and best.kind == "best"
    psnr = np.array([p for p, _, _ in attacks])
    ssim = np.array([s for _, s, _ in attacks])
    # the obvious reference: one image at a time, every attack's own criterion
    leaked = np.array(
        [(np.array(s) >= 0.4) if nearest else (np.array(p) >= 30.0) for p, s, nearest in attacks]
    )
    assert best.psnr == pytest.approx(psnr.max(0).tolist())
    assert best.ssim == pytest.approx(ssim.max(0).tolist())
    assert best.leaked == leaked.any(0).tolist()
    assert best.fraction_leaked == pytest.approx(leaked.any(0).mean())
    assert best.true_images == psnr.shape[1]
    # the named winner of each image holds that image's best PSNR
    chosen = [psnr[int(name[1:]), i] for i, name in enumerate(best.best_attack)]
    assert chosen == pytest.approx(psnr.max(0).tolist())


def test_one_attack_or_class_samples_give_no_best_record() -> None:
    assert best_of([record("a", [40.0], [0.9], False)]) is None
    samples = attack_record("inversion", [1.0], matching="training")
    assert best_of([record("a", [40.0], [0.9], False), samples]) is None


@pytest.mark.needs_data  # the referee loads the public test split
def test_the_referee_scores_each_attack_and_their_per_image_best(tmp_path: Path) -> None:
    """Two real attacks on one real FedSGD gradient: the best record takes each image's max."""
    spec = model_spec("mlp", widths=(64,), activation="relu")
    model = build_model(spec, seed=0)
    images = torch.rand((4, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    task_loss(spec, model(images), labels).backward()
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    gradient = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
    observation = Observation(1, 0, spec, weights, gradient, PublicMeta("fedsgd", 4, 0.1, 1, 4))
    key = TruthKey.generate()
    TruthStore(point_store(tmp_path, 0), key=key).put(Truth(1, 0, images, labels))
    scenario = load(
        "quickstart",
        {
            "model.widths": [64],
            "attack.name": "analytic",
            "attack.also": [{"name": "dlg", "iterations": 3}],
        },
    )
    records: list[Record] = []
    saved: list[AttackRecord] = []
    scorer = Scorer(
        {0: scenario}, key, tmp_path, records.append, save_attack=lambda r, _a: saved.append(r)
    )
    referee = Referee(scenario, records.append, PrivacyLedger(scenario), scorer.take_in_point(0))
    referee.on_round(RoundTraffic(1, (0,), (observation,), ()))
    analytic, dlg, best = [r for r in records if isinstance(r, AttackRecord | BestRecord)]
    assert isinstance(best, BestRecord) and [analytic.attack, dlg.attack] == ["analytic", "dlg"]
    assert best.psnr == [max(a, b) for a, b in zip(analytic.psnr, dlg.psnr, strict=True)]
    assert best.attacks == ["analytic", "dlg"] and best.leak_threshold_db == 30.0
    assert [r.attack for r in saved] == ["analytic"]  # the scenario's attack keeps its arrays
