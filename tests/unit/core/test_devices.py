"""Device selection: ``auto`` finds a GPU only where torch sees one, ``cuda`` without one is
refused, and clients ask Ray for a GPU share only when they train on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attacks.server import on_device
from simulator.core.devices import DeviceError, check_device, move, resolve_device
from simulator.core.models import ModelSpec
from simulator.core.protocol import Observation, PublicMeta
from simulator.run.engine import backend_config
from simulator.scenario import load


def pretend_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(("gpus", "choice", "expected"), [
    (0, "auto", "cpu"), (0, "cpu", "cpu"), (2, "auto", "cuda"), (2, "cpu", "cpu"),
    (2, "cuda", "cuda"),
])  # fmt: skip
def test_resolution_follows_the_gpus_torch_sees(
    monkeypatch: pytest.MonkeyPatch, gpus: int, choice: str, expected: str
) -> None:
    pretend_gpus(monkeypatch, gpus)
    check_device("attack.device", choice)
    assert resolve_device(choice).type == expected


def test_cuda_without_a_gpu_is_refused_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_gpus(monkeypatch, 0)
    with pytest.raises(DeviceError, match=r"^federation.device = 'cuda' but torch sees no CUDA"):
        check_device("federation.device", "cuda")
    with pytest.raises(DeviceError, match="allowed: auto, cpu, cuda"):
        check_device("attack.device", "tpu")


@pytest.mark.parametrize(("gpus", "choice", "share"), [
    (0, "cpu", 0.0), (0, "auto", 0.0), (1, "cpu", 0.0), (1, "auto", 0.25), (1, "cuda", 0.25),
    (0, "cuda", 0.25),  # on a cluster the nodes' GPUs count, not this machine's
])  # fmt: skip
def test_clients_ask_ray_for_a_gpu_share_only_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, gpus: int, choice: str, share: float
) -> None:
    pretend_gpus(monkeypatch, gpus)
    scenario = load(
        "quickstart", [f"federation.device={choice}", "federation.gpus_per_client=0.25"]
    )
    assert backend_config(scenario)["client_resources"]["num_gpus"] == share


def test_observations_move_whole_to_the_attack_device() -> None:
    weights = {"w": torch.ones(3, 2), "b": torch.zeros(3)}
    meta = PublicMeta("fedsgd", 4, 0.1, 1, 4)
    observation = Observation(
        1, 0, ModelSpec("mlp"), weights, move(weights, weights["w"].device), meta
    )
    moved = on_device([observation], torch.device("meta"))[0]
    assert {t.device.type for t in [*moved.update.values(), *moved.global_weights.values()]} == {
        "meta"
    }
    assert dataclasses.replace(moved, update={}, global_weights={}) == dataclasses.replace(
        observation, update={}, global_weights={}
    )
    assert on_device([observation], torch.device("cpu"))[0] is observation  # no copy on the CPU
