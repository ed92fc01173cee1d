"""Blind against adaptive attacks on the dlg-defenses-fedavg federation, from one round and
from every round of the attacked client: the ``"noise"`` and ``"intervals"`` keys of
``benchmarks/results/adaptive.json`` (the ``"active"`` key is ``bench_adaptive_active``'s).

The federation of ``scenarios/dlg-defenses-fedavg.toml`` (200 MNIST clients of 100 images, 20
sampled a round, 2 local epochs in batches of 10, 784-256-10 ReLU MLP, lr 0.5, the study's
rounds) with one defense on each client's weight change, run without Ray: each sampled client
computes its update exactly as a leaksim client does (:func:`compute_update`, defenses
included) and the server averages them (equal shards: the plain mean). The attacked client is
the first one sampled in the last round. Attacks on its updates:

- Gaussian noise of std ``sigma`` (``"noise"``):
  - ``subspace`` blind and told ``noise_std = sigma``, on the last round's update;
  - ``subspace-rounds`` blind and told ``noise_std = sigma``, on every update of that client
    up to the last round;
  - ``analytic`` blind and told ``noise_std = sigma`` (the study's second attack), last round;
- pruning 90% and int8 quantization (``"intervals"``): ``subspace`` blind and told the
  defense (``known_defense``: the change completed inside the known intervals first), on the
  last round's update.

Candidate sets are scored by SSIM >= 0.4 to the best candidate, the analytic attack by PSNR
>= 30 dB, as the referee scores them.

    python -m benchmarks.bench_adaptive                 # writes benchmarks/results/adaptive.json
    python -m benchmarks.bench_adaptive --rounds 20     # a shorter training run
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import simulator.run.builtins  # noqa: F401  (registers every built-in plugin)
from simulator.core.models import build_model
from simulator.core.protocol import Observation, Truth
from simulator.core.registry import ATTACKS
from simulator.federation.client import compute_update
from simulator.federation.traffic import public_meta, sample_clients
from simulator.run.folder import write_atomic
from simulator.scenario import load
from simulator.scoring.metrics import leak_summary, nearest_candidates

RESULTS = Path(__file__).parent / "results" / "adaptive.json"
SIGMAS = (0.001, 0.01, 0.1)
STUDY = "dlg-defenses-fedavg"


INTERVALS = ({"name": "pruning", "fraction": 0.9}, {"name": "quantization", "precision": "int8"})


def client_updates(
    defense: Mapping[str, Any], rounds: int, seed: int
) -> tuple[list[Observation], Truth, float]:
    """Every update the attacked client sent over ``rounds`` rounds under ``defense`` (a
    ``[[defenses]]`` table), the truth of the last, and the run's seconds."""
    scenario = load(
        STUDY,
        {
            "seed": seed,
            "federation.rounds": rounds,
            "attack.rounds": [rounds],
            "defenses": [dict(defense)],
        },
    )
    fed = scenario.federation
    target = sample_clients(range(fed.clients), fed.fraction, scenario.seed, rounds)[0]
    # The driver's initial model: seeded by the scenario's seed.
    initial = build_model(scenario.model, seed=scenario.seed)
    weights = {k: v.detach().clone() for k, v in initial.state_dict().items()}
    seen: list[Observation] = []
    truth: Truth | None = None
    started = time.perf_counter()
    for server_round in range(1, rounds + 1):
        sampled = sample_clients(range(fed.clients), fed.fraction, scenario.seed, server_round)
        updates = {c: compute_update(scenario, server_round, c, weights) for c in sampled}
        if target in updates:
            update = updates[target]
            meta = public_meta(fed, len(update.truth.labels))
            seen.append(Observation(server_round, target, scenario.model, weights,
                                    dict(update.update), meta))  # fmt: skip
            truth = update.truth
        weights = mean_weights([u.update for u in updates.values()])
    assert truth is not None  # the target is sampled in the last round by construction
    return seen, truth, time.perf_counter() - started


def mean_weights(updates: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FedAvg's aggregate of equally weighted clients: the mean of their weights."""
    return {k: torch.stack([u[k] for u in updates]).mean(0) for k in updates[0]}


def candidates_leaked(name: str, params: dict[str, Any], observations: list[Observation],
                      truth: Truth, history: list[Observation]) -> dict[str, float]:  # fmt: skip
    """Share of the truth leaked by a candidate-set attack (SSIM >= 0.4), and its seconds."""
    attack = ATTACKS.create(name, params)
    started = time.perf_counter()
    attack.remember(history)
    (reconstruction,) = attack.run(observations)
    report = nearest_candidates(truth.inputs, reconstruction.images)
    return {"leaked": report.recovered / len(truth.labels),
            "seconds": time.perf_counter() - started}  # fmt: skip


def analytic_leaked(noise_std: float, observation: Observation, truth: Truth) -> dict[str, float]:
    """Share of the truth the analytic attack leaks at 30 dB, and its seconds."""
    started = time.perf_counter()
    (reconstruction,) = ATTACKS.create("analytic", {"noise_std": noise_std}).run([observation])
    summary = leak_summary(reconstruction.images, truth.inputs, None, None, 30.0)
    return {"leaked": summary.fraction_leaked, "seconds": time.perf_counter() - started}


def noise_row(sigma: float, rounds: int, seed: int) -> dict[str, Any]:
    """Blind and noise-aware leakage at noise std ``sigma``, from one round and from all."""
    seen, truth, seconds = client_updates({"name": "gaussian-noise", "std": sigma}, rounds, seed)
    last = seen[-1]
    row: dict[str, Any] = {"noise_std": sigma, "client": last.client_id,
                           "client_updates": len(seen), "federation_seconds": seconds}  # fmt: skip
    for mode, assumed in (("blind", 0.0), ("adaptive", sigma)):
        row[f"subspace_one_round_{mode}"] = candidates_leaked(
            "subspace", {"noise_std": assumed}, [last], truth, []
        )
        row[f"subspace_all_rounds_{mode}"] = candidates_leaked(
            "subspace-rounds", {"noise_std": assumed}, [last], truth, seen
        )
        row[f"analytic_one_round_{mode}"] = analytic_leaked(assumed, last, truth)
    return row


def intervals_row(defense: Mapping[str, Any], rounds: int, seed: int) -> dict[str, Any]:
    """Blind and interval-aware subspace leakage under pruning or quantization, last round."""
    seen, truth, seconds = client_updates(defense, rounds, seed)
    last = seen[-1]
    # What the study's subspace twin is told under this defense (Scenario.built_attacks).
    scenario = load(STUDY, {"defenses": [dict(defense)], "attack.also": []})
    ((_, twin),) = scenario.built_attacks[1:]
    known = twin.params.known_defense
    row: dict[str, Any] = {"defense": dict(defense), "client": last.client_id,
                           "federation_seconds": seconds}  # fmt: skip
    for mode, told in (("blind", "none"), ("adaptive", known)):
        row[f"subspace_one_round_{mode}"] = candidates_leaked(
            "subspace", {"known_defense": told}, [last], truth, []
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=load(STUDY, {}).federation.rounds)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    noise, intervals = [], []
    for sigma in args.sigmas:
        noise.append(noise_row(sigma, args.rounds, args.seed))
        print(json.dumps(noise[-1]), flush=True)
    for defense in INTERVALS:
        intervals.append(intervals_row(defense, args.rounds, args.seed))
        print(json.dumps(intervals[-1]), flush=True)
    command = f"python -m benchmarks.bench_adaptive --rounds {args.rounds} --seed {args.seed}"
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    results.update({"study": STUDY, "rounds": args.rounds, "seed": args.seed,
                    "command": command, "noise": noise, "intervals": intervals})  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
