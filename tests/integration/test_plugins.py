"""User plugins: an attack and a defense from a file of the user's, through ``--plugin``.

The file registers with the decorators the built-in plugins use; the scenario then names them
like built-ins, they run in a real Ray federation (the clients import the same file), and a bad
parameter gets the same one-line error as a built-in's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.scenario import load
from tests.integration.conftest import leaksim, read_results

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = '''
"""A user's plugin file: one attack, one defense."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attacks.base import Attack, register_attack
from defenses.base import UpdateDefense, register_defense
from simulator.core.fields import param
from simulator.core.protocol import Observation, Reconstruction


@dataclass(frozen=True)
class ConstantParams:
    value: float = param(0.5, low=0.0, high=1.0, help="the grey level guessed for every pixel")


@register_attack("constant-guess", "Guesses a uniform grey image for every sample.")
class ConstantGuess(Attack[ConstantParams]):
    Params = ConstantParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return [
            Reconstruction(
                o.round,
                o.client_id,
                torch.full((o.meta.batch_size, *o.model.input_shape), self.params.value),
                None,
                status="converged",
            )
            for o in observations
        ]


@dataclass(frozen=True)
class ScaleParams:
    factor: float = param(0.5, low=0.0, low_open=True, high=1.0, help="multiplies the update")


@register_defense("scale-update", "Multiplies the update by a factor.")
class ScaleUpdate(UpdateDefense):
    Params = ScaleParams

    def apply(self, update, generator):
        return {name: tensor * self.params.factor for name, tensor in update.items()}
'''

SCENARIO = """
description = "plugin attack and defense"
seed = 1

[data]
test_examples = 200

[model]
kind = "mlp"
widths = [16]

[federation]
clients = 3
fraction = 1.0
rounds = 1
batch_size = 4
timeout_s = 120

[attack]
name = "constant-guess"

[attack.params]
value = 0.25

[sweep]
defenses = [[], [{ name = "scale-update", factor = 0.5 }]]
"""

runner = CliRunner(env={"COLUMNS": "300"})
PLUGGED = ("run", "quickstart", "--plugin")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plugin file per test process (a file registers its names once per process)."""
    path = tmp_path_factory.mktemp("plugin") / "my_plugins.py"
    path.write_text(PLUGIN)
    return path


def one_line(result: object) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_plugin_attack_and_defense_run_in_a_real_federation(plugin: Path, tmp_path: Path) -> None:
    scenario = tmp_path / "plugged.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "run"
    done = leaksim("run", str(scenario), "--plugin", str(plugin), "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    records = read_results(out)
    attacks = [r for r in records if r["kind"] == "attack"]
    assert {r["attack"] for r in attacks} == {"constant-guess"}
    assert sorted({r["point"] for r in attacks}) == [0, 1] and len(attacks) == 6
    assert all(r["true_images"] == 4 and r["mean_psnr"] > 0 for r in attacks)
    norms = {(r["point"], r["client"]): r["update_norm"] for r in records if r["kind"] == "update"}
    for client in range(3):  # the defense halved every client's gradient
        assert norms[(1, client)] == pytest.approx(0.5 * norms[(0, client)], rel=1e-5)
    points = [r for r in records if r["kind"] == "point"]
    assert [p["defense"] for p in points] == ["none", "scale-update"]
    # the run folder's scenario names the plugin file, so it reruns as it ran
    assert str(plugin) in (out / "scenario.toml").read_text()


def test_a_bad_plugin_parameter_gets_the_same_one_line_error_as_a_built_in(plugin: Path) -> None:
    shape = (
        r"invalid scenario: quickstart\.toml: attack: attack '[\w-]+': parameter '\w+' = \S+ "
        r"is out of range; allowed: [\[(]\S+, \S+[\])]"
    )
    ours = runner.invoke(
        app,
        [
            *PLUGGED,
            str(plugin),
            "--set",
            "attack.name=constant-guess",
            "--set",
            "attack.params.value=2.0",
        ],
    )
    built_in = runner.invoke(
        app, ["run", "quickstart", "--set", "attack.name=idlg", "--set", "attack.params.lr=-1.0"]
    )
    for result in (ours, built_in):
        assert result.exit_code == 2
        assert re.fullmatch(shape, one_line(result)), one_line(result)
    assert "'constant-guess': parameter 'value' = 2.0" in one_line(ours)
    defense = runner.invoke(
        app,
        [*PLUGGED, str(plugin), "--set", 'defenses=[{name="scale-update", factor=0.0}]'],
    )
    assert defense.exit_code == 2
    assert one_line(defense) == (
        "invalid scenario: quickstart.toml: defenses[0]: defense 'scale-update': parameter "
        "'factor' = 0.0 is out of range; allowed: (0.0, 1.0]"
    )


def test_plugins_are_listed_and_usable_from_python(plugin: Path) -> None:
    listed = runner.invoke(app, ["list", "--plugin", str(plugin)])
    assert listed.exit_code == 0
    assert "constant-guess" in listed.output and "scale-update" in listed.output
    scenario = load("quickstart", {"attack.name": "constant-guess"}, plugins=[plugin])
    assert scenario.attack.name == "constant-guess" and scenario.plugins == (str(plugin),)


def test_a_missing_plugin_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "quickstart", "--plugin", str(tmp_path / "nope.py")])
    assert result.exit_code == 2
    assert "plugin file" in one_line(result) and "does not exist" in one_line(result)
