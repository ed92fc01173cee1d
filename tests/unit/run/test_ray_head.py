"""One Ray start per run, without starting Ray: a user's cluster is used as given, and a head
that cannot start is an error. The private head itself, started for real, reused by the run's
points and ended with it, is tested in tests/integration/test_ray_head.py."""

from __future__ import annotations

import os
import sys

import pytest

from simulator.run import ray_head
from simulator.run.cluster import RAY_ADDRESS_ENV
from simulator.run.processes import descendants


def test_a_users_cluster_is_used_as_given_and_nothing_is_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(RAY_ADDRESS_ENV, "10.1.2.3:6379")
    before = descendants(os.getpid())
    with ray_head.run_cluster() as address:
        assert address == "10.1.2.3:6379"
        assert descendants(os.getpid()) == before
    assert os.environ[RAY_ADDRESS_ENV] == "10.1.2.3:6379"


def test_a_head_that_cannot_start_is_an_error_with_its_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    script = "import sys; print('ray: no room for a head'); sys.exit(3)"
    monkeypatch.setattr(ray_head, "ray_command", lambda: [sys.executable, "-c", script])
    no_head = pytest.raises(ray_head.RayHeadError, match="exited: ray: no room for a head")
    with no_head, ray_head.run_cluster():
        pytest.fail("the run went on without a cluster")
    assert RAY_ADDRESS_ENV not in os.environ
