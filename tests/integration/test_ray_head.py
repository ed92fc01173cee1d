"""One Ray start per run: the private head, reused by the run's points and ended with it.

These start real Ray heads of their own (the suite's session cluster is set aside for them).
"""

from __future__ import annotations

import os

import pytest
import ray

from simulator.run import engine, ray_head
from simulator.run.cluster import RAY_ADDRESS_ENV, connect, ray_address
from simulator.run.network import processes_mentioning, wait_for_port


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ray_head.RayHead]:
    """Every head the code under test starts (real heads, noted as they start)."""
    heads: list[ray_head.RayHead] = []
    real_start = ray_head.start_head

    def start(num_cpus: int, timeout_s: float = ray_head.START_TIMEOUT_S) -> ray_head.RayHead:
        heads.append(real_start(num_cpus, timeout_s))
        return heads[-1]

    monkeypatch.setattr(ray_head, "start_head", start)
    return heads


def test_every_point_of_a_run_connects_to_one_head_that_ends_with_the_run(
    monkeypatch: pytest.MonkeyPatch, started: list[ray_head.RayHead]
) -> None:
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    jobs = []
    with ray_head.run_cluster(num_cpus=1) as address:
        assert os.environ[RAY_ADDRESS_ENV] == address
        assert wait_for_port(int(address.rpartition(":")[2]), 1.0)
        for _point in range(2):  # each point is a driver of its own on the same cluster
            connect(address)
            jobs.append(ray.get_runtime_context().get_job_id())
            ray.shutdown()
    assert len(started) == 1
    assert len(set(jobs)) == 2  # two jobs of one cluster: the second point found the head up
    assert RAY_ADDRESS_ENV not in os.environ
    head = started[0]
    assert head.process.poll() is not None
    assert not processes_mentioning(str(head.temp)), "a process of the head was left running"
    assert not head.temp.exists()


def test_the_sweep_loop_starts_one_head_for_all_its_points(
    monkeypatch: pytest.MonkeyPatch, started: list[ray_head.RayHead]
) -> None:
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    seen: list[str | None] = []
    # The points themselves are not the subject: each notes the cluster it would connect to.
    monkeypatch.setattr(engine, "run_point", lambda *_a, **_k: seen.append(ray_address()))
    points = [object(), object(), object()]
    engine.run_points(points, lambda _r: None, lambda *_a: None, None, num_cpus=1)  # type: ignore[arg-type]
    assert len(started) == 1
    assert seen == [started[0].address] * 3
    assert not processes_mentioning(str(started[0].temp))
