"""Blind against noise-aware attacks on the dlg-defenses-fedavg federation, from one round and
from every round of the attacked client (the noise rows of ``benchmarks/results/adaptive.json``).

The federation of ``scenarios/dlg-defenses-fedavg.toml`` (200 MNIST clients of 100 images, 20
sampled a round, 2 local epochs in batches of 10, 784-256-10 ReLU MLP, lr 0.5) with Gaussian
noise of std ``sigma`` on each client's weight change, run without Ray: each sampled client
computes its update exactly as a leaksim client does (:func:`compute_update`, defenses
included) and the server averages them (equal shards: the plain mean). The attacked client is
the one the study attacks in the last round (the lowest sampled id). Attacks on its updates:

- ``subspace`` blind and told ``noise_std = sigma``, on the last round's update;
- ``subspace-rounds`` blind and told ``noise_std = sigma``, on every update of that client
  up to the last round;
- ``analytic`` blind and told ``noise_std = sigma`` (the study's second attack), last round.

Candidate sets are scored by SSIM >= 0.4 to the best candidate, the analytic attack by PSNR
>= 30 dB, as the referee scores them.

    python -m benchmarks.bench_adaptive                 # writes benchmarks/results/adaptive.json
    python -m benchmarks.bench_adaptive --rounds 20     # a shorter training run

Cost, measured on 2 shared cores: about 8 s a round of 20 clients, and 40-120 s per subspace
attack on a 100-image client; 100 rounds at three noise levels take over an hour. A 3-round run
at std 0.01 (``--rounds 3 --sigmas 0.01``, client 12, sampled in all three rounds): blind
subspace 0% from one round and from all three, noise-aware 3% from one round and 9% from all
three; the analytic attack 0% either way.
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


def client_updates(sigma: float, rounds: int, seed: int) -> tuple[list[Observation], Truth, float]:
    """Every update the attacked client sent over ``rounds`` rounds, the truth of the last, and
    the run's seconds."""
    scenario = load(
        STUDY,
        {
            "seed": seed,
            "federation.rounds": rounds,
            "attack.rounds": [rounds],
            "defenses": [{"name": "gaussian-noise", "std": sigma}],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for sigma in args.sigmas:
        seen, truth, seconds = client_updates(sigma, args.rounds, args.seed)
        last = seen[-1]
        row: dict[str, Any] = {
            "noise_std": sigma,
            "client": last.client_id,
            "client_updates": len(seen),
            "federation_seconds": seconds,
        }
        for mode, assumed in (("blind", 0.0), ("adaptive", sigma)):
            row[f"subspace_one_round_{mode}"] = candidates_leaked(
                "subspace", {"noise_std": assumed}, [last], truth, []
            )
            row[f"subspace_all_rounds_{mode}"] = candidates_leaked(
                "subspace-rounds", {"noise_std": assumed}, [last], truth, seen
            )
            row[f"analytic_one_round_{mode}"] = analytic_leaked(assumed, last, truth)
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = f"python -m benchmarks.bench_adaptive --rounds {args.rounds} --seed {args.seed}"
    output = {"study": STUDY, "rounds": args.rounds, "seed": args.seed, "command": command,
              "noise": rows}  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, json.dumps(output, indent=1))


if __name__ == "__main__":
    main()
