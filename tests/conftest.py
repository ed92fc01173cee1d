"""Shared fixtures: the verified MNIST copies beside the checkout, and a clean environment.

The tests read MNIST and Fashion-MNIST from ``../shared/data`` beside the checkout (or from
wherever leaksim would look: ``LEAKSIM_DATA_DIR``, ``~/.cache/leaksim``). Where none of those
holds them, as in a fresh clone, the tests that need them are skipped, not failed: the
integration tests (every one runs leaksim on MNIST), those that ask for ``shared_data_dir`` or
are marked ``needs_data`` (their code catches the missing files' error), and any test or test
module that stops on :class:`DataNotFoundError`. Nothing is downloaded then.

Tests compose the process as the command line does: every built-in plugin registered.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import torch

import simulator.run.builtins  # noqa: F401  (registers every built-in plugin)
from simulator.data.datasets import DataNotFoundError, candidate_dirs
from simulator.report.summary import write_report
from tests.unit.report.synthetic_run import build_run

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INTEGRATION = Path(__file__).resolve().parent / "integration"

if (SHARED_DATA / "mnist").is_dir():
    os.environ.setdefault("LEAKSIM_DATA_DIR", str(SHARED_DATA))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per test process: with the suite spread over the cores, a second
    # intra-op thread in each only makes them wait for each other.
    torch.set_num_threads(1)
HAVE_DATA = any((folder / "mnist").is_dir() for folder in candidate_dirs())
NO_DATA = f"needs the MNIST files: none at {SHARED_DATA}, $LEAKSIM_DATA_DIR or ~/.cache/leaksim"
if not HAVE_DATA:
    # A test that needs the files then fails to find them at once (discard port: refused).
    os.environ.setdefault("LEAKSIM_MIRRORS", "http://127.0.0.1:9/")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The verified MNIST / Fashion-MNIST IDX files (layout ``<dir>/<dataset>/<file>``)."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(NO_DATA)
    return SHARED_DATA


@pytest.fixture(scope="session")
def reported_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic defense sweep (failures, hostile error messages) with its report written
    once for every test that only reads it: drawing its figures takes seconds."""
    run_dir = build_run(tmp_path_factory.mktemp("reported-sweep"))
    write_report(run_dir)
    return run_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_data: reads the MNIST files (skipped without)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if HAVE_DATA:
        return
    skip = pytest.mark.skip(reason=NO_DATA)
    for item in items:
        if item.path.is_relative_to(INTEGRATION) or item.get_closest_marker("needs_data"):
            item.add_marker(skip)


class DataModule(pytest.Module):
    """A test module that loads data when imported is skipped, not an error, without data."""

    def _getobj(self) -> Any:
        try:
            return super()._getobj()
        except DataNotFoundError:
            if HAVE_DATA:
                raise
            raise pytest.skip.Exception(NO_DATA, allow_module_level=True) from None


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module:
    return DataModule.from_parent(parent, path=module_path)


def _skip_without_data() -> Generator[None, Any, Any]:
    try:
        return (yield)
    except DataNotFoundError:
        if HAVE_DATA:
            raise
        pytest.skip(NO_DATA)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _skip_without_data())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _skip_without_data())
