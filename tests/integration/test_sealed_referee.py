"""The sealed referee, probed as a cheating plugin author would: five plugin attacks that try
to read or forge the truth score no better than the honest attack, and an attack's time is
the time its call took, whatever its trace claims.

Each cheat is the honest analytic attack plus one trick; when the trick fails it returns the
honest reconstruction (the forger returns grey images, as its trick needs). Every run is the
quickstart federation cut to its attacked round, undefended and under Gaussian noise 0.01.
The honest attack runs alone; four cheats and the slow liar run together in one run (the
first attack and its ``also`` list), each scored on its own records; the fifth cheat runs
alone on its own Ray head. Before the seal, every trick scored 100 dB (see the module's
history). The fifth, which seals its own reconstruction as the truth with the run's public
key, scored 100 dB and 100% leaked on all six updates until truths carried the run's tag (run
on the code before the tag).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulator.run.cluster import RAY_ADDRESS_ENV
from tests.integration.conftest import ROOT, read_results

CHEATS = '''
"""Cheating attacks: each is the honest analytic attack plus one trick."""

import glob
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attacks.base import Attack, register_attack
from attacks.first_layer.analytic import Analytic
from simulator.core.protocol import Observation, Reconstruction


@dataclass(frozen=True)
class NoParams:
    pass


def honest(observations):
    return Analytic().run(observations)


def with_truth(reconstructions, find):
    """The honest reconstructions, each replaced by the truth where ``find`` gets it."""
    for reconstruction in reconstructions:
        try:
            inputs = find(reconstruction.round, reconstruction.client_id)
        except Exception:
            continue
        if inputs is not None:
            reconstruction.images = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    return reconstructions


def read_store(root, server_round, client):
    for path in glob.glob(f"{root}/round-{server_round}/client-{client}.*"):
        with np.load(path, allow_pickle=False) as arrays:
            return np.array(arrays["inputs"])
    return None


@register_attack("cheat-read-store", "Reads the truth store named in the environment.")
class ReadStore(Attack[NoParams]):
    Params = NoParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        root = os.environ.get("LEAKSIM_TRUTH_DIR", "")
        return with_truth(honest(observations), lambda r, c: read_store(root, r, c))


def stores_in_reach():
    """Truth folders found without the variable: under the run folder that this process's
    command line names, and in any process's environment."""
    roots = []
    with open("/proc/self/cmdline", "rb") as stream:
        words = stream.read().decode().split("\\0")
    for word in words:
        if os.path.isdir(word):
            roots += glob.glob(os.path.join(word, ".truth*"))
    for environ in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(environ, "rb") as stream:
                for entry in stream.read().split(b"\\0"):
                    if b"TRUTH" in entry and b"=" in entry:
                        roots.append(entry.split(b"=", 1)[1].decode())
        except OSError:
            continue
    return roots


@register_attack("cheat-find-store", "Finds the truth store through /proc.")
class FindStore(Attack[NoParams]):
    Params = NoParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        roots = stores_in_reach()

        def find(server_round, client):
            for root in roots:
                found = read_store(root, server_round, client)
                if found is not None:
                    return found
            return None

        return with_truth(honest(observations), find)


@register_attack("cheat-forge-truth", "Returns grey images and makes the truth grey too.")
class ForgeTruth(Attack[NoParams]):
    Params = NoParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        import simulator.federation.truth as truth_module
        from simulator.core.protocol import Truth

        def grey_truth(self, server_round, client_id):
            images = torch.full((8, 1, 28, 28), 0.5)
            return Truth(server_round, client_id, images, torch.zeros(8, dtype=torch.int64))

        for holder in (getattr(truth_module, "TruthStore", None),):
            if holder is not None:
                for name in ("get", "open", "read"):
                    if hasattr(holder, name):
                        setattr(holder, name, grey_truth)
        reconstructions = honest(observations)
        for reconstruction in reconstructions:
            reconstruction.images = torch.full_like(reconstruction.images, 0.5)
        return reconstructions


@register_attack("cheat-training-files", "Replays the client's batch from the data folder.")
class TrainingFiles(Attack[NoParams]):
    Params = NoParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        from simulator.core.seeding import seeded_generator
        from simulator.data.shards import load_shard
        from simulator.scenario import load

        scenario = load("quickstart")  # the run's data, clients and seed, as a user knows them
        fed = scenario.federation

        def find(server_round, client):
            shard = load_shard(scenario.data, fed.clients, scenario.seed, client)
            generator = seeded_generator(scenario.seed, server_round, client)
            batch = torch.randperm(len(shard.labels), generator=generator)[: fed.batch_size]
            return shard.inputs[batch].numpy()

        return with_truth(honest(observations), find)


def truth_stores_of_this_run():
    """(truth folder, public key, tag key, tag key service) of each store of this run that a
    client's environment names in /proc (the run folder is in this process's command line)."""
    with open("/proc/self/cmdline", "rb") as stream:
        runs = [w for w in stream.read().decode().split("\\0") if w and os.path.isdir(w)]
    found = {}
    for environ in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(environ, "rb") as stream:
                entries = stream.read().decode(errors="replace").split("\\0")
        except OSError:
            continue
        env = dict(e.split("=", 1) for e in entries if "=" in e)
        root, public = env.get("LEAKSIM_TRUTH_DIR"), env.get("LEAKSIM_TRUTH_KEY")
        if root and public and any(root.startswith(os.path.abspath(r)) for r in runs):
            found[root] = (public, env.get("LEAKSIM_TRUTH_TAG_KEY"), env.get("LEAKSIM_TRUTH_TAGS"))
    return found


@register_attack("cheat-seal-truth", "Seals its own reconstruction as the truth.")
class SealTruth(Attack[NoParams]):
    Params = NoParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        import simulator.federation.truth as truth_module
        from simulator.core.protocol import Truth

        reconstructions = honest(observations)
        for root, (public, tag_hex, service) in truth_stores_of_this_run().items():
            tag_key = bytes.fromhex(tag_hex) if tag_hex else None
            if tag_key is None and service and hasattr(truth_module, "fetch_tag_key"):
                try:  # ask the run's tag key service, as a client does
                    tag_key = truth_module.fetch_tag_key(service, 5.0)
                except Exception:
                    pass
            try:  # the clients' own code, with the tag key if it got one
                store = truth_module.TruthStore(
                    root, bytes.fromhex(public), tag_key=tag_key or os.urandom(32)
                )
            except TypeError:  # before truths were tagged: the public key was all it took
                store = truth_module.TruthStore(root, bytes.fromhex(public))
            for reconstruction in reconstructions:
                if not os.path.isdir(f"{root}/round-{reconstruction.round}"):
                    continue
                images = reconstruction.images.detach().cpu()
                labels = reconstruction.labels
                if labels is None:
                    labels = torch.zeros(len(images), dtype=torch.int64)
                # Replaces the client's file (written to a temporary name, then renamed).
                store.put(Truth(reconstruction.round, reconstruction.client_id, images, labels))
        return reconstructions


@register_attack("slow-liar", "Sleeps 1 s per update and claims 0.001 s in its trace.")
class SlowLiar(Attack[NoParams]):
    Params = NoParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        reconstructions = honest(observations)
        time.sleep(1.0 * len(observations))
        for reconstruction in reconstructions:
            reconstruction.trace = [{**row, "seconds": 0.001} for row in reconstruction.trace]
        return reconstructions
'''

# The quickstart federation, cut to its attacked round.
SCENARIO = """
description = "quickstart, round 1, cheating plugins"
seed = 0
plugins = ["cheats.py"]

[data]
dataset = "mnist"
partition = "iid"
test_examples = 2000

[model]
kind = "mlp"
widths = [256]
activation = "relu"
bias = true

[federation]
protocol = "fedsgd"
clients = 10
fraction = 0.3
rounds = 1
batch_size = 8
lr = 0.5

[attack]
name = "{attack}"
rounds = [1]
also = [{also}]

[sweep]
defenses = [[], [{{ name = "gaussian-noise", std = 0.01 }}]]
"""

# Three leaksim runs of two points each; on a busy machine one takes minutes.
pytestmark = pytest.mark.timeout(900)

CHEAT_NAMES = ("cheat-read-store", "cheat-find-store", "cheat-forge-truth", "cheat-training-files")


def run_attack(
    tmp_path: Path, attack: str, *also: str, own_head: bool = False
) -> list[dict[str, Any]]:
    """The records of one run of ``attack`` and the ``also`` attacks beside it (the data
    folder only in LEAKSIM_DATA_DIR); the terminal names the plugin file with its SHA-256, and
    so does every startup record. ``own_head``: on a Ray head the run starts itself, not the
    suite's cluster."""
    folder = tmp_path / attack
    folder.mkdir()
    (folder / "cheats.py").write_text(CHEATS)
    listed = ", ".join(f'{{ name = "{name}" }}' for name in also)
    (folder / "scenario.toml").write_text(SCENARIO.format(attack=attack, also=listed))
    # No per-user data cache: the setting is the one way to the training files.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(folder / "cache")}
    if own_head:
        env.pop(RAY_ADDRESS_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "simulator.cli", "run", str(folder / "scenario.toml"),
         "--out", str(folder / "run")],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    plugin = folder / "cheats.py"
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert f"  {plugin}\n    SHA-256 {digest}" in done.stdout
    assert "only as trustworthy" in " ".join(done.stdout.split())
    records = read_results(folder / "run")
    startups = [r for r in records if r["kind"] == "startup"]
    assert len(startups) == 2
    assert all(r["plugins"] == [{"path": str(plugin), "sha256": digest}] for r in startups)
    return records


def scores(
    records: list[dict[str, Any]], attack: str | None = None
) -> dict[int, list[tuple[float, float]]]:
    """Per point, (mean PSNR, fraction leaked) of every attack record of ``attack`` (of any
    attack if None), by client."""
    by_point: dict[int, list[tuple[float, float]]] = {}
    for record in records:
        if record["kind"] == "attack" and attack in (None, record["attack"]):
            by_point.setdefault(record["point"], []).append(
                (record["mean_psnr"], record["fraction_leaked"])
            )
    return by_point


@pytest.fixture(scope="module")
def honest_scores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[tuple[float, float]]]:
    records = run_attack(tmp_path_factory.mktemp("honest"), "analytic")
    found = scores(records, "analytic")
    assert sorted(found) == [0, 1] and all(len(v) == 3 for v in found.values())
    # Under the noise, the analytic attack told its std runs too: the cheats must beat it too.
    aware = scores(records, "analytic knowing gaussian-noise")
    assert sorted(aware) == [1] and len(aware[1]) == 3
    return {
        point: [max(pair) for pair in zip(honest, aware.get(point, honest), strict=True)]
        for point, honest in found.items()
    }


@pytest.fixture(scope="module")
def cheats_and_liar(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One run: the first cheat, then the other cheats and the slow liar as ``also``."""
    first, *others = CHEAT_NAMES
    return run_attack(tmp_path_factory.mktemp("cheats"), first, *others, "slow-liar")


@pytest.mark.parametrize("cheat", CHEAT_NAMES)
def test_a_cheating_plugin_scores_no_better_than_the_honest_attack(
    cheat: str,
    honest_scores: dict[int, list[tuple[float, float]]],
    cheats_and_liar: list[dict[str, Any]],
) -> None:
    found = scores(cheats_and_liar, cheat)
    print(cheat, "honest", honest_scores, "cheat", found)
    for point, honest in honest_scores.items():
        cheated = found.get(point, [])  # refused: no attack record
        for (psnr, leaked), (honest_psnr, honest_leaked) in zip(cheated, honest, strict=False):
            assert leaked <= honest_leaked, (cheat, point, cheated, honest)
            # Grey images score a few dB, at most as well as a mean image can.
            assert psnr <= max(honest_psnr, 12.0) + 1e-9, (cheat, point, cheated, honest)


def test_a_plugin_that_seals_its_own_truth_to_the_public_key_is_refused(
    tmp_path: Path, honest_scores: dict[int, list[tuple[float, float]]]
) -> None:
    """The public key is no secret: the forger finds it (and the truth folders) in the
    clients' environments and seals its own reconstruction as each truth, tagged if it can get
    the tag key. On the run's own head the worker cannot: every forged truth is refused (an
    "attack_error" record), never scored. Before the tag, it scored 100 dB (the module doc)."""
    records = run_attack(tmp_path, "cheat-seal-truth", own_head=True)
    found = scores(records)
    for point, honest in honest_scores.items():
        for (psnr, leaked), (honest_psnr, honest_leaked) in zip(
            found.get(point, []), honest, strict=False
        ):
            assert leaked <= honest_leaked and psnr <= honest_psnr + 1e-9, (point, found)
    refused = [r for r in records if r["kind"] == "attack_error"]
    assert sorted(r["point"] for r in refused) == [0, 1], refused
    assert all("does not carry this run's tag" in r["error"] for r in refused), refused


def test_an_attack_is_timed_by_its_call_not_by_its_trace(
    cheats_and_liar: list[dict[str, Any]],
) -> None:
    attacks = [r for r in cheats_and_liar if r["kind"] == "attack" and r["attack"] == "slow-liar"]
    assert len(attacks) == 6  # 3 clients, 2 points
    assert all(r["seconds"] >= 1.0 for r in attacks), [r["seconds"] for r in attacks]
