"""The same ServerApp and ClientApp on Flower's deployment engine: one SuperLink and two
SuperNodes as separate processes on loopback, driven by `flwr run`.

Each SuperNode gets its partition through its node config and has no truth store: the
server's records hold no scored attack, while the reconstructions it wrote (run config
``reconstructions``) are scored here, in the test, against the batches the clients really
trained on (recomputed from the scenario): the malicious server attacked what it received
over the wire. Every process is ended by its process group and none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from simulator.core.models import build_model
from simulator.federation.client import compute_update
from simulator.federation.truth import TRUTH_DIR_ENV
from simulator.run.network import free_port, wait_for_port
from simulator.scenario import load
from simulator.scoring.metrics import leak_summary
from tests.integration.conftest import quickstart_with

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (field 5 of /proc/PID/stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def processes(commands: list[list[str]], env: dict[str, str]) -> Iterator[list[int]]:
    """Start each command in its own session; on exit end every group, bounded waits."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    started = [
        subprocess.Popen(command, env=env, start_new_session=True, **quiet) for command in commands
    ]
    try:
        yield [p.pid for p in started]
    finally:
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(group_members(p.pid) for p in started) and time.monotonic() < deadline:
            time.sleep(0.3)
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_flwr_run_on_a_superlink_and_two_supernodes(tmp_path: Path) -> None:
    scenario_file = tmp_path / "tiny.toml"
    scenario_file.write_text(quickstart_with(rounds=1, clients=2, fraction=1.0))
    link, nodes = free_port(), [free_port(), free_port()]
    home, recovered = tmp_path / "flwr-home", tmp_path / "reconstructions"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n"
    )
    env = {k: v for k, v in os.environ.items() if k != TRUTH_DIR_ENV}  # no truth anywhere
    env |= {
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
    }
    superlink = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                 "--port", str(link)]  # fmt: skip
    supernodes = [
        [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
         "--port", str(port), "--node-config", f"partition-id={i} num-partitions=2"]
        for i, port in enumerate(nodes)
    ]  # fmt: skip
    with processes([superlink], env) as (link_group,):
        assert wait_for_port(link, 60), "the SuperLink did not start within 60 s"
        with processes(supernodes, env) as node_groups:
            run_config = f'scenario="{scenario_file}" reconstructions="{recovered}"'
            done = subprocess.run(
                [str(BIN / "flwr"), "run", str(REPO), "lab", "--stream", "--run-config",
                 run_config],
                env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
            )  # fmt: skip
    assert not group_members(link_group) and not any(group_members(g) for g in node_groups)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kind"')]
    rounds = [r["round"] for r in records if r["kind"] == "round"]
    assert rounds == [0, 1], done.stdout[-3000:] + done.stderr[-3000:]
    updates = sorted((r["round"], r["client"]) for r in records if r["kind"] == "update")
    assert updates == [(1, 0), (1, 1)]
    assert not [r for r in records if r["kind"] == "attack"]  # no truth: nothing scored

    # The batches the clients trained on in round 1, recomputed here (this process has no
    # truth store either: compute_update only returns them).
    scenario = load(scenario_file)
    weights = build_model(scenario.model, seed=scenario.seed).state_dict()
    for client in (0, 1):
        saved = np.load(recovered / f"analytic-round-1-client-{client}.npz")
        truth = compute_update(scenario, 1, client, weights).truth
        summary = leak_summary(torch.from_numpy(saved["images"]).float(), truth.inputs)
        assert summary.fraction_leaked >= 0.5, summary.psnr.tolist()
