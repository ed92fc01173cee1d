"""Engine overhead: start-up, per-round cost and peak memory of a FedSGD MNIST federation.

Compares each round's wall time under Flower + Ray with the same client work done in-process
(shard lookup, one batch gradient per sampled client, aggregation), so the difference is what
the simulation engine costs. Peak memory is the largest resident size of this process and
every process below it (the run's worker, Ray and its actors), sampled every 0.5 s.

    python -m benchmarks.bench_engine
    # 100 clients at fractions 0.1 and 1.0, then 1,000 clients at 0.1; writes
    # benchmarks/results/engine.json with every row and the issue's summary keys:
    # overhead_ratio_100 (per-round time with 100 sampled clients over the same clients' work
    # in process), clients_1000 (startup_seconds, round_seconds, peak_rss_mb) and
    # sweep_10_points_seconds: ten points of dlg-defenses-fedsgd (seeds 0 and 1 x its five
    # defenses, 2 rounds, round 1 attacked) run as ten runs of one point, each starting Ray
    # (``before``: what every sweep point paid before the shared head), and as one run whose
    # points share one Ray head (``after``)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from simulator import api
from simulator.core.config import Scenario
from simulator.core.models import build_model
from simulator.core.records import RoundRecord, StartupRecord
from simulator.core.seeding import seeded_generator
from simulator.data.shards import load_shard
from simulator.federation.traffic import sample_clients
from simulator.federation.training import batch_gradient
from simulator.run.folder import write_atomic
from simulator.run.processes import descendants, process_table
from simulator.scenario import expand, load

RESULTS = Path(__file__).parent / "results" / "engine.json"


def tree_rss_bytes() -> int:
    """Resident memory of this process and all its descendants."""
    total = 0
    for pid in {os.getpid(), *descendants(os.getpid(), process_table())}:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples :func:`tree_rss_bytes` in a thread while the block runs; ``peak`` in bytes."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s, self.peak = period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, tree_rss_bytes())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def in_process_round_seconds(scenario: Scenario, rounds: int) -> float:
    """Mean seconds per round for the clients' work alone, with no Flower or Ray."""
    fed = scenario.federation
    spec = scenario.model
    model = build_model(spec, seed=scenario.seed)
    for client in range(fed.clients):  # warm the shard cache, as the first round does in Ray
        load_shard(scenario.data, fed.clients, scenario.seed, client)
    torch.set_num_threads(1)
    started = time.perf_counter()
    for server_round in range(1, rounds + 1):
        grads = []
        for client in sample_clients(range(fed.clients), fed.fraction, scenario.seed, server_round):
            shard = load_shard(scenario.data, fed.clients, scenario.seed, client)
            generator = seeded_generator(scenario.seed, server_round, client)
            batch = torch.randperm(len(shard.labels), generator=generator)[: fed.batch_size]
            grads.append(batch_gradient(model, spec, shard.inputs[batch], shard.labels[batch]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                param -= fed.lr * torch.stack([g[name] for g in grads]).mean(0)
    return (time.perf_counter() - started) / rounds


def measure(
    fraction: float, rounds: int, clients: int, out: Path, cpus: float = 1.0
) -> dict[str, float]:
    scenario = load(
        "quickstart",
        {
            "federation.clients": clients,
            "federation.fraction": fraction,
            "federation.rounds": rounds,
            "data.test_examples": 2000,
            "attack.name": "none",
            "federation.cpus_per_client": cpus,
        },
    )
    started = time.perf_counter()
    with PeakMemory() as memory:
        result = api.run(scenario, out_dir=out)
    total = time.perf_counter() - started
    round_records = result.table(RoundRecord)
    per_round = [r.seconds or 0.0 for r in round_records if r.round >= 2]  # round 1 loads data
    startup = total - sum(r.seconds or 0.0 for r in round_records)
    engine_round = statistics.median(per_round)
    compute_round = in_process_round_seconds(scenario, min(rounds, 10))
    return {
        "clients": clients,
        "fraction": fraction,
        "sampled_per_round": max(1, int(clients * fraction)),
        "cpus_per_client": cpus,
        "rounds": rounds,
        "total_s": round(total, 2),
        "startup_s": round(startup, 2),
        "discovery_s": round(result.table(StartupRecord)[0].discovery_s, 2),
        "first_round_s": round(round_records[1].seconds or 0.0, 3),
        "median_round_s": round(engine_round, 4),
        "in_process_round_s": round(compute_round, 4),
        "engine_overhead_per_round_s": round(engine_round - compute_round, 4),
        "overhead_over_work": round((engine_round - compute_round) / compute_round, 2),
        "peak_memory_gib": round(memory.peak / 2**30, 2),
    }


def measure_sweep(scratch: Path, rounds: int = 2) -> dict[str, object]:
    """Wall time of a 10-point sweep with one Ray start per point (before) and per run (after)."""
    scenario = load("dlg-defenses-fedsgd", {"federation.rounds": rounds, "attack.rounds": [1]})
    scenario = dataclasses.replace(scenario, sweep={**scenario.sweep, "seed": [0, 1]})
    points = expand(scenario)
    started = time.perf_counter()
    for point in points:  # a run per point: each starts (and ends) a Ray of its own
        api.run(point.scenario, out_dir=scratch / f"alone-{point.index}")
    before = time.perf_counter() - started
    started = time.perf_counter()
    result = api.run(scenario, out_dir=scratch / "sweep")
    after = time.perf_counter() - started
    return {
        "scenario": "dlg-defenses-fedsgd",
        "points": len(points),
        "rounds": rounds,
        "before": round(before, 1),
        "after": round(after, 1),
        "saved_per_point": round((before - after) / len(points), 2),
        "point_seconds_after": [round(r.seconds, 1) for r in result.table()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--large", type=int, default=1000, help="clients of the large run; 0: none")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    settings = [(args.clients, f) for f in args.fractions]
    settings += [(args.large, 0.1)] if args.large else []
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for clients, fraction in settings:
            out = Path(scratch) / f"run-{clients}-{fraction}"
            rows.append(measure(fraction, args.rounds, clients, out, args.cpus_per_client))
            print(json.dumps(rows[-1]), flush=True)
        sweep = measure_sweep(Path(scratch)) if args.sweep else None
    summary: dict[str, object] = {"machine": "2 CPU cores", "runs": rows}
    if sweep is not None:
        print(json.dumps(sweep), flush=True)
        summary["sweep_10_points_seconds"] = sweep
    full = [r for r in rows if r["sampled_per_round"] == 100]
    if full:
        summary["overhead_ratio_100"] = round(
            float(full[0]["median_round_s"]) / float(full[0]["in_process_round_s"]), 2
        )
    large = [r for r in rows if r["clients"] == args.large]
    if large:
        summary["clients_1000" if args.large == 1000 else f"clients_{args.large}"] = {
            "startup_seconds": large[0]["startup_s"],
            "round_seconds": large[0]["median_round_s"],
            "peak_rss_mb": round(float(large[0]["peak_memory_gib"]) * 1024),
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
