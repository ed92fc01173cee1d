"""Attackers that know the defense: pruning, int8 and the inspection arms race, in process.

Two parts, both written under the ``"active"`` key of ``benchmarks/results/adaptive.json``
(read, changed and written back atomically, so other keys of the file stay):

* ``update_defenses``: one client of the ``dlg-defenses-fedavg`` federation in round 1 (100
  MNIST training digits, 2 local epochs in batches of 10 at lr 0.5 on the seeded MLP
  784-256-10), its weight change pruned (90%) or quantized (int8) as the defense does, then the
  first-layer subspace attack blind and told the defense (``known_defense``). Leaked = the
  referee's rule for candidates: best-candidate SSIM >= 0.4.
* ``inspection``: the quickstart federation (MLP 784-256-10, FedSGD, 3 clients of batches of 8
  a round, lr 0.5) trained honestly for 30 rounds in process; each inspection is run over the
  whole run (every round, and every 7th round, as a rarely sampled client sees it) for its
  false positives, and the active attacks, plain and disguised, send their model at rounds 1,
  10 and 30. Per attack: the share of those models each inspection refuses, and the share of
  the batch recovered at 60 dB from what passes (refused: nothing).

    python -m benchmarks.bench_adaptive_active   # 17 minutes on 2 shared cores at load ~20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

import attacks  # noqa: F401  (registers the attacks)
from attacks.active.base import ActiveAttack, Plan
from attacks.active.imprint import Imprint, ImprintParams
from attacks.active.trap_weights import TrapWeights, TrapWeightsParams
from defenses.base import UpdateDefense
from defenses.inspection import Inspection, InspectionParams, ModelRejected
from defenses.pruning import Pruning, PruningParams
from defenses.quantization import Quantization, QuantizationParams
from simulator.core.config import FederationConfig
from simulator.core.models import build_model, model_spec, model_with_weights
from simulator.core.protocol import Observation, PublicData, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.core.seeding import seeded_generator
from simulator.data.datasets import load_split, to_tensor
from simulator.data.shards import Shard
from simulator.federation.training import batch_gradient, local_train
from simulator.run.folder import write_atomic
from simulator.scenario import load
from simulator.scoring.metrics import match, nearest_candidates, psnr

RESULTS = Path(__file__).parent / "results" / "adaptive.json"
KEY = "active"
SPEC = model_spec("mlp", widths=(256,), activation="relu")
Weights = dict[str, torch.Tensor]


def digits(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split("mnist", split)
    return to_tensor(images[:count]), torch.tensor(labels[:count], dtype=torch.int64)


def fedavg_client(images: torch.Tensor, labels: torch.Tensor) -> Observation:
    """Round 1 of one ``dlg-defenses-fedavg`` client: 2 epochs, batches of 10, lr 0.5."""
    model = build_model(SPEC, seed=0)
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    local_train(model, SPEC, Shard(images, labels), 2, 10, 0.5, seeded_generator(0, 1, 0))
    update = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = PublicMeta("fedavg", 10, 0.5, 2, num_examples=int(images.shape[0]))
    return Observation(1, 0, SPEC, sent, update, meta)


def defended(obs: Observation, defense: UpdateDefense) -> Observation:
    """``obs`` as the server sees it when the client applies ``defense`` to its change."""
    change = {k: obs.update[k] - obs.global_weights[k] for k in obs.update}
    sent = defense.apply(change, torch.Generator())
    update = {k: obs.global_weights[k] + sent[k] for k in sent}
    return dataclasses.replace(obs, update=update)


def update_defense_rows() -> list[dict[str, Any]]:
    images, labels = digits("train", 100)
    client = fedavg_client(images, labels)
    settings: list[tuple[str, UpdateDefense | None, str]] = [
        ("none", None, "none"),
        ("pruning 0.9", Pruning(PruningParams(0.9)), "pruning"),
        ("quantization int8", Quantization(QuantizationParams("int8")), "int8"),
    ]
    rows = []
    for label, defense, known in settings:
        obs = client if defense is None else defended(client, defense)
        for attacker in ("blind", "adaptive") if defense is not None else ("blind",):
            start = time.perf_counter()
            params = {"known_defense": known if attacker == "adaptive" else "none"}
            (reconstruction,) = ATTACKS.create("subspace", params).run([obs])
            report = nearest_candidates(images, reconstruction.images)
            rows.append(
                {
                    "defense": label,
                    "attack": f"subspace ({attacker})",
                    "leaked": report.recovered,
                    "of": int(images.shape[0]),
                    "mean_ssim": round(float(report.ssim.mean()), 4),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(rows[-1], flush=True)
    return rows


def honest_run(rounds: int, images: torch.Tensor, labels: torch.Tensor) -> list[Weights]:
    """The global models of ``rounds`` honest quickstart rounds (3 clients, batches of 8)."""
    weights = build_model(SPEC, seed=0).state_dict()
    models = [weights]
    for r in range(rounds - 1):
        grads = []
        for c in range(3):
            batch = slice(24 * r + 8 * c, 24 * r + 8 * c + 8)
            model = model_with_weights(SPEC, weights)
            grads.append(batch_gradient(model, SPEC, images[batch], labels[batch]))
        weights = {k: v - 0.5 * sum(g[k] for g in grads) / 3 for k, v in weights.items()}
        models.append(weights)
    return models


def arrays(weights: Weights) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in weights.items()}


def refuses(inspection: Inspection, reference: Weights, sent: Weights) -> bool:
    """Whether a client whose last accepted model is ``reference`` refuses ``sent``."""
    state = RecordDict()
    scenario = load("quickstart")
    inspection.inspect(arrays(reference), state, scenario)
    try:
        inspection.inspect(arrays(sent), state, scenario)
    except ModelRejected:
        return True
    return False


def inspection_rows() -> dict[str, Any]:
    train, train_labels = digits("train", 1000)
    public = PublicData(*digits("test", 4000))
    history = honest_run(30, train, train_labels)
    inspections = {
        "tensor-wide (max_ratio 4)": Inspection(InspectionParams()),
        "per-row (rows = true)": Inspection(InspectionParams(rows=True)),
    }
    false_positives = {}
    for name, inspection in inspections.items():
        refused = checked = 0
        for every in (1, 7):
            state = RecordDict()
            for weights in history[::every]:
                checked += 1
                try:
                    inspection.inspect(arrays(weights), state, load("quickstart"))
                except ModelRejected:
                    refused += 1
        false_positives[name] = {"refused": refused, "of": checked}
    disguise = TrapWeightsParams(row_scale="honest", honest_rows=0.5)
    attackers: list[tuple[str, ActiveAttack[Any], int]] = [
        ("trap-weights", TrapWeights(), 32),
        ("trap-weights, disguised", TrapWeights(disguise), 32),
        ("trap-weights, disguised", TrapWeights(disguise), 100),
        ("imprint (block)", Imprint(ImprintParams(bins=128)), 64),
        ("imprint, folded", Imprint(ImprintParams(bins=128, placement="first-layer")), 64),
    ]
    rows = []
    private, private_labels = digits("train", 1200)
    for label, attack, batch in attackers:
        attack.public = public
        row: dict[str, Any] = {"attack": label, "batch": batch, "rounds": [1, 10, 30]}
        refused = {name: 0 for name in inspections}
        leaked = {name: 0.0 for name in inspections}
        for index in (0, 9, 29):
            federation = FederationConfig(protocol="fedsgd", batch_size=batch)
            plan = Plan(index + 1, (0,), (0,), SPEC, history[index], federation, {0: batch}, False)
            offer = attack.manipulate(plan)[0]
            model = model_with_weights(offer.spec, offer.weights)
            x, y = private[1000 : 1000 + batch], private_labels[1000 : 1000 + batch]
            update = batch_gradient(model, offer.spec, x, y)
            meta = PublicMeta("fedsgd", batch, 0.5, 1, batch)
            obs = Observation(index + 1, 0, offer.spec, offer.weights, update, meta)
            (reconstruction,) = attack.run([obs])
            images = reconstruction.images
            if images.shape[0] < batch:
                grey = torch.full((batch - images.shape[0], *images.shape[1:]), 0.5)
                images = torch.cat([images, grey])
            share = float((psnr(images[match(images, x)], x) >= 60).double().mean())
            for name, inspection in inspections.items():
                if refuses(inspection, history[index], offer.weights):
                    refused[name] += 1
                else:
                    leaked[name] += share / 3
        row.update(
            {f"refused, {n}": f"{refused[n]} of 3" for n in inspections}
            | {f"leaked at 60 dB, {n}": round(leaked[n], 3) for n in inspections}
        )
        rows.append(row)
        print(row, flush=True)
    return {"false_positives": false_positives, "attacks": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-update-defenses", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    section: dict[str, Any] = {"inspection": inspection_rows()}
    if not args.skip_update_defenses:
        section["update_defenses"] = update_defense_rows()
    section["seconds"] = round(time.perf_counter() - start, 1)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[KEY] = section
    write_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} [{KEY}]")


if __name__ == "__main__":
    main()
