"""Intra-op threads that wait passively: an attack's time alone and beside other busy processes.

A run's worker computes its attacks with torch's intra-op threads (two on two cores). By
default the OpenMP runtime under torch spins between parallel regions; when another process
holds a core (a Ray actor training, a second sweep lane, another job), the spinning threads
take turns with the one doing the work, and an attack of many small steps slows several-fold.
Every process a run starts gets ``OMP_WAIT_POLICY=PASSIVE`` (``simulator.run.cluster``); the
thread count, and so every number, stays the same. Measured on 2 cores: 2.7 s passive against
7.3 s spinning beside a busy process, 2.8 s against 8.8 s for two attacks at once, and 2.7 s
against 2.3 s alone (waking sleeping threads costs a fifth on an idle machine).

This measures the KKT toy attack (the ``kkt-toy`` scenario's client and attack, 300
iterations) in a fresh process, with the runtime's default and with the passive policy:
alone, beside one busy process, and two attacks at once (as ``--parallel 2``).

    python -m benchmarks.bench_threads    # writes benchmarks/results/threads.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from simulator.run.folder import write_atomic

RESULTS = Path(__file__).parent / "results" / "threads.json"
ROOT = Path(__file__).resolve().parents[1]
REPEATS = 2

ATTACK = """
import time
import torch
from attacks.kkt.attack import KKT, KKTParams
from tests.fixtures.trained_model import TrainConfig, homogeneous_spec, toy_red_blue, train_victim

images, labels = toy_red_blue()
spec = homogeneous_spec((3, 16, 16), widths=(100, 100), init_scale=1e-2)
config = TrainConfig(steps=500, lr=0.5, weight_decay=1e-3)
observation = train_victim(spec, images, labels, config).observation(20, config)
started = time.perf_counter()
KKT(KKTParams(iterations=300, init_scale=0.1, alpha=500.0)).run([observation])
print(time.perf_counter() - started, torch.get_num_threads())
"""
BUSY = "while True: pass"


def attack_seconds(policy: str | None, neighbours: int, attacks: int) -> list[float]:
    """Seconds of each of ``attacks`` concurrent attack processes, with ``neighbours``
    processes spinning beside them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(neighbours)]
    try:
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", ATTACK], env=env, stdout=subprocess.PIPE, text=True
            )
            for _ in range(attacks)
        ]
        outputs = [run.communicate(timeout=900)[0].split() for run in runs]
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert all(threads == str(os.cpu_count() or 1) for _, threads in outputs), outputs
    return [round(float(seconds), 2) for seconds, _ in outputs]


def main() -> None:
    settings = [(0, 1, "alone"), (1, 1, "one busy process beside"), (0, 2, "two attacks at once")]
    rows = []
    for neighbours, attacks, setting in settings:
        for policy in (None, "PASSIVE"):
            seconds = []
            for _ in range(REPEATS):
                seconds += attack_seconds(policy, neighbours, attacks)
            row = {
                "setting": setting,
                "omp_wait_policy": policy or "default",
                "seconds": seconds,
                "median_seconds": sorted(seconds)[len(seconds) // 2],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "command": "python -m benchmarks.bench_threads",
        "cpus": os.cpu_count(),
        "what": "KKT toy attack, 300 iterations, torch's default intra-op threads",
        "when": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    write_atomic(RESULTS, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
