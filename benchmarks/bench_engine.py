"""Engine overhead: start-up, per-round cost and peak memory of a FedSGD MNIST federation.

Compares each round's wall time under Flower + Ray with the same client work done in-process
(shard lookup, one batch gradient per sampled client, aggregation), so the difference is what
the simulation engine costs. Peak memory is the largest resident size of this process and
every process below it (the run's worker, Ray and its actors), sampled every 0.5 s. Every run
is a ``leaksim run`` command, as a user starts it.

    python -m benchmarks.bench_engine [--against TREE]
    # writes benchmarks/results/engine.json: every row, and
    # round_seconds_3_clients (the quickstart with 3 of its 10 clients a round: the slope of
    # the command's wall time between 5 and 45 rounds), overhead_ratio_100 (per-round time
    # with 100 sampled clients over the same clients' work in process), clients_1000
    # (startup_seconds, round_seconds, peak_rss_mb). With --study, also the wall time of
    # `leaksim run dlg-defenses-fedsgd --set 'sweep.seed=[0]'`.
    #
    # --against TREE: a checkout of earlier code with its own .venv (`make setup` there):
    # every measurement runs in both trees, one after the other, and the summary keys get a
    # "before" twin, so both come from one sitting on one machine. The two trees' records of
    # the quickstart (45 rounds) and of the study are compared (benchmarks.compare_runs).
    # --study-only: just the study, its result added to the existing engine.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import simulator.run.builtins  # noqa: F401  (registers every built-in plugin)
from benchmarks.compare_runs import compare
from simulator.core.config import Scenario
from simulator.core.models import build_model
from simulator.core.seeding import seeded_generator
from simulator.data.shards import load_shard
from simulator.federation.traffic import sample_clients
from simulator.federation.training import batch_gradient
from simulator.run.folder import write_atomic
from simulator.run.processes import descendants, process_table
from simulator.scenario import load

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


@dataclasses.dataclass(frozen=True)
class Tree:
    """A checkout to run ``leaksim`` from: its folder and its interpreter."""

    label: str
    root: Path

    @property
    def python(self) -> Path:
        venv = self.root / ".venv" / "bin" / "python"
        return venv if venv.exists() else Path(sys.executable)

    def leaksim(self, *args: str, timeout: float = 1800) -> float:
        """Run ``leaksim ARGS`` from this tree; its wall time in seconds."""
        started = time.perf_counter()
        subprocess.run(
            [str(self.python), "-m", "simulator.cli", *args],
            cwd=self.root,
            env={**os.environ, "PYTHONPATH": str(self.root)},
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        return time.perf_counter() - started


def settings(overrides: dict[str, object]) -> list[str]:
    return [a for key, value in overrides.items() for a in ("--set", f"{key}={json.dumps(value)}")]


def measure(
    tree: Tree, fraction: float, rounds: int, clients: int, out: Path, cpus: float = 1.0
) -> dict[str, float | str]:
    overrides = {
        "federation.clients": clients,
        "federation.fraction": fraction,
        "federation.rounds": rounds,
        "data.test_examples": 2000,
        "attack.name": "none",
        "federation.cpus_per_client": cpus,
    }
    with PeakMemory() as memory:
        total = tree.leaksim("run", "quickstart", *settings(overrides), "--out", str(out))
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    round_records = [r for r in records if r["kind"] == "round"]
    per_round = [r["seconds"] or 0.0 for r in round_records if r["round"] >= 2]  # round 1 loads
    startup = total - sum(r.get("seconds") or 0.0 for r in round_records)
    discovery = next(r["discovery_s"] for r in records if r["kind"] == "startup")
    engine_round = statistics.median(per_round)
    scenario = load("quickstart", overrides)
    compute_round = in_process_round_seconds(scenario, min(rounds, 10))
    return {
        "code": tree.label,
        "clients": clients,
        "fraction": fraction,
        "sampled_per_round": max(1, int(clients * fraction)),
        "cpus_per_client": cpus,
        "rounds": rounds,
        "total_s": round(total, 2),
        "startup_s": round(startup, 2),
        "discovery_s": round(discovery, 2),
        "first_round_s": round(round_records[1].get("seconds") or 0.0, 3),
        "median_round_s": round(engine_round, 4),
        "in_process_round_s": round(compute_round, 4),
        "engine_overhead_per_round_s": round(engine_round - compute_round, 4),
        "overhead_over_work": round((engine_round - compute_round) / compute_round, 2),
        "peak_memory_gib": round(memory.peak / 2**30, 2),
    }


def quickstart_round_seconds(tree: Tree, scratch: Path, short: int = 5, long: int = 45) -> dict:
    """The quickstart with 3 of its 10 clients a round: wall time at two round counts, and the
    slope between them (what one more round costs; start-up and the attack cancel)."""
    walls = {}
    for rounds in (short, long):
        out = scratch / f"{tree.label}-quickstart-{rounds}"
        overrides = {"federation.fraction": 0.3, "federation.rounds": rounds}
        walls[rounds] = tree.leaksim("run", "quickstart", *settings(overrides), "--out", str(out))
    return {
        "code": tree.label,
        "wall_s": {str(k): round(v, 2) for k, v in walls.items()},
        "round_seconds": round((walls[long] - walls[short]) / (long - short), 4),
    }


def same_records(trees: list[Tree], scratch: Path, name: str) -> str:
    """Whether the trees' runs ``<label>-<name>`` left the same records, timings aside."""
    if len(trees) < 2:
        return "not compared"
    folders = [scratch / f"{tree.label}-{name}" for tree in trees]
    problems = compare(*folders)
    return "identical" if not problems else "; ".join(problems[:5])


def study_seconds(tree: Tree, scratch: Path) -> float:
    """Wall time of `leaksim run dlg-defenses-fedsgd --set 'sweep.seed=[0]'`."""
    out = scratch / f"{tree.label}-study"
    return round(
        tree.leaksim("run", "dlg-defenses-fedsgd", "--set", "sweep.seed=[0]", "--out", str(out)), 1
    )


def summary_keys(rows: list[dict], quick: dict, large: int) -> dict[str, object]:
    keys: dict[str, object] = {"round_seconds_3_clients": quick["round_seconds"]}
    full = [r for r in rows if r["sampled_per_round"] == 100 and r["clients"] != large]
    if full:
        keys["overhead_ratio_100"] = round(
            float(full[0]["median_round_s"]) / float(full[0]["in_process_round_s"]), 2
        )
    big = [r for r in rows if r["clients"] == large]
    if big:
        keys[f"clients_{large}"] = {
            "startup_seconds": big[0]["startup_s"],
            "round_seconds": big[0]["median_round_s"],
            "peak_rss_mb": round(float(big[0]["peak_memory_gib"]) * 1024),
        }
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--large", type=int, default=1000, help="clients of the large run; 0: none")
    parser.add_argument("--against", type=Path, help="a checkout of earlier code, set up")
    parser.add_argument("--study", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--study-only", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    trees = [Tree("this", Path(__file__).resolve().parents[1])]
    if args.against is not None:
        trees.append(Tree("before", args.against.resolve()))
    if args.study_only:
        with tempfile.TemporaryDirectory() as folder:
            study: dict[str, float | str] = {t.label: study_seconds(t, Path(folder)) for t in trees}
            study["records"] = same_records(trees, Path(folder), "study")
        print(json.dumps(study), flush=True)
        summary = json.loads(args.output.read_text())
        summary["dlg_defenses_fedsgd_seed0_seconds"] = study
        write_atomic(args.output, json.dumps(summary, indent=2) + "\n")
        return
    runs = [(args.clients, f) for f in args.fractions]
    runs += [(args.large, 0.1)] if args.large else []
    rows: dict[str, list[dict]] = {t.label: [] for t in trees}
    quick: dict[str, dict] = {}
    study = {}
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        for clients, fraction in runs:  # the trees one after the other, setting by setting
            for tree in trees:
                out = scratch / f"{tree.label}-{clients}-{fraction}"
                row = measure(tree, fraction, args.rounds, clients, out, args.cpus_per_client)
                rows[tree.label].append(row)
                print(json.dumps(row), flush=True)
        for tree in trees:
            quick[tree.label] = quickstart_round_seconds(tree, scratch)
            print(json.dumps(quick[tree.label]), flush=True)
        quick_records = same_records(trees, scratch, "quickstart-45")
        if args.study:
            for tree in trees:
                study[tree.label] = study_seconds(tree, scratch)
                print(json.dumps({"code": tree.label, "study_s": study[tree.label]}), flush=True)
            study["records"] = same_records(trees, scratch, "study")
    summary: dict[str, object] = {
        "machine": f"{os.cpu_count()} CPU cores",
        "runs": [row for tree in trees for row in rows[tree.label]],
        "quickstart_3_clients": [quick[t.label] for t in trees],
        "quickstart_45_rounds_records": quick_records,
        **summary_keys(rows["this"], quick["this"], args.large),
    }
    if "before" in rows:
        summary["before"] = summary_keys(rows["before"], quick["before"], args.large)
        summary["against_commit"] = subprocess.run(
            ["git", "-C", str(args.against), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    if study:
        summary["dlg_defenses_fedsgd_seed0_seconds"] = study
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
