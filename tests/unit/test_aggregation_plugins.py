"""A user's own aggregation defense, from a plugin file: it runs, or it is refused in one line.

An :class:`AggregationDefense` says how the run carries it out (Flower's SecAgg+ fit workflow,
and the fewest updates revealed). A plugin that says so is routed to SecAgg+ with its own
workflow; one that does not (say, one written against an older ``view()`` API) is refused
when its file is loaded: one line, exit code 2, before any work or Ray. Both without Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from flwr.server.workflow import SecAggWorkflow
from typer.testing import CliRunner

from simulator import api
from simulator.cli import app
from simulator.federation.secagg import SecAggStrategy, secagg_workflow
from simulator.run.cluster import RAY_ADDRESS_ENV
from simulator.run.preflight import preflight
from simulator.scenario import load

USABLE = '''
"""A user's aggregation defense: Flower's SecAgg (every client shares keys with all)."""

from flwr.server.workflow import SecAggWorkflow

from defenses.base import AggregationDefense, register_defense


@register_defense("user-secagg", "Flower's SecAgg: the server sees only the aggregate.")
class UserSecAgg(AggregationDefense):
    @property
    def min_clients(self):
        return 3

    def workflow(self, federation, largest_weight):
        return SecAggWorkflow(
            reconstruction_threshold=0.75, max_weight=largest_weight, timeout=federation.timeout_s
        )
'''

VIEW_ONLY = '''
"""An aggregation defense that says what the server sees, but not how a run carries it out."""

from defenses.base import AggregationDefense, register_defense


@register_defense("user-view-only", "Sums the updates.")
class ViewOnly(AggregationDefense):
    def view(self, updates, weights=None):
        return {k: sum(u[k] for u in updates) for k in updates[0]}
'''

runner = CliRunner(env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin files, written once per test process (a name registers once per process)."""
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "usable.py").write_text(USABLE)
    (folder / "view_only.py").write_text(VIEW_ONLY)
    return folder


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither Ray nor the worker process that would run a point may start."""

    def tripwire(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("work was started for an invalid input")

    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.setattr(api, "execute", tripwire)


def test_an_aggregation_defense_without_its_workflow_is_refused_in_one_line(
    plugins: Path, no_work: None, tmp_path: Path
) -> None:
    plugin = plugins / "view_only.py"
    result = runner.invoke(
        app,
        [
            "run",
            "quickstart",
            "--plugin",
            str(plugin),
            "--set",
            'defenses=[{name="user-view-only"}]',
            "--out",
            str(tmp_path / "run"),
        ],
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert lines == [
        f"invalid scenario: quickstart.toml: plugin file {str(plugin)!r}: TypeError: "
        "defense 'user-view-only': ViewOnly does not implement min_clients, workflow"
    ]
    assert not (tmp_path / "run").exists()


def test_a_usable_aggregation_defense_passes_every_check_and_drives_secagg(
    plugins: Path, shared_data_dir: Path
) -> None:
    scenario = load(
        "quickstart",
        {"federation.fraction": 1.0, "defenses": [{"name": "user-secagg"}]},
        plugins=[plugins / "usable.py"],
    )
    preflight(scenario)  # everything checked before a run starts: nothing refused
    # the SecAgg+ path takes the plugin's workflow and its min_clients
    workflow = secagg_workflow(scenario)
    assert type(workflow) is SecAggWorkflow
    fed = scenario.federation
    assert (workflow.max_weight, workflow.timeout) == (fed.batch_size, fed.timeout_s)
    assert workflow.reconstruction_threshold == 0.75 and workflow.num_shares == 1.0
    strategy = SecAggStrategy(scenario, {}, {}, lambda _traffic: None, lambda _r, _a: None)  # type: ignore[arg-type,return-value]
    assert strategy.min_clients == 3


def test_the_kind_checks_apply_to_a_users_aggregation_defense(plugins: Path) -> None:
    path = plugins / "usable.py"
    with pytest.raises(ValueError, match="'user-secagg': parameter 'min_clients' = 3 exceeds"):
        load(
            "quickstart",
            {
                "federation.clients": 2,
                "federation.fraction": 1.0,
                "defenses": [{"name": "user-secagg"}],
            },
            plugins=[path],
        )
    both = [{"name": "user-secagg"}, {"name": "secure-aggregation"}]
    with pytest.raises(ValueError, match="at most one aggregation defense per scenario"):
        load("quickstart", {"federation.fraction": 1.0, "defenses": both}, plugins=[path])
