"""Scenario files: validation errors name the key and the allowed values; overrides; sweeps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator.core.config import Scenario, ScenarioError
from simulator.core.fields import FieldError, build_params
from simulator.core.models import CnnParams, MlpParams, build_model
from simulator.core.seeding import seeded_generator, seeded_numpy
from simulator.data.partition import DirichletParams, partition
from simulator.federation.client import ClientDefenses
from simulator.federation.traffic import sample_clients
from simulator.run.folder import scenario_toml
from simulator.scenario import expand, from_dict, load, parse_override


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_quickstart_is_the_default_and_valid() -> None:
    scenario = load()
    assert scenario.name == "quickstart"
    assert scenario.federation.protocol == "fedsgd"


def test_every_shipped_scenario_loads() -> None:
    from simulator.scenario import SCENARIO_DIR

    for path in SCENARIO_DIR.glob("*.toml"):
        assert expand(load(path)), path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[federation]\nprotocl = 'fedsgd'",
            "unknown key federation.protocl (did you mean 'protocol'?)",
        ),
        (
            "[federation]\nprotocol = 'fedprox'",
            "federation.protocol = 'fedprox' is not allowed; choose one of 'fedsgd', 'fedavg'",
        ),
        (
            "[federation]\nbatch_size = 0",
            "federation.batch_size = 0 is out of range; allowed: [1, inf)",
        ),
        (
            "[federation]\nfraction = 1.5",
            "federation.fraction = 1.5 is out of range; allowed: (0.0, 1.0]",
        ),
        ("[federation]\nlr = 'fast'", "federation.lr = 'fast' has type str; allowed: float"),
        ("[federation]\nlr = 0.0", "federation.lr = 0.0 is out of range; allowed: (0.0, inf)"),
        (
            "[federation]\nclients = 0",
            "federation.clients = 0 is out of range; allowed: [1, 10000]",
        ),
        (
            "[federation]\nclients = 10001",
            "federation.clients = 10001 is out of range; allowed: [1, 10000]",
        ),
        (
            "[federation]\nrounds = 100001",
            "federation.rounds = 100001 is out of range; allowed: [1, 100000]",
        ),
        (
            "[federation]\ntimeout_s = 1e-9",
            "federation.timeout_s = 1e-09 is out of range; allowed: [10.0, inf)",
        ),
        (
            "[sweep]\nseed = [0, 0]",
            "sweep.seed lists 0 more than once; each value is one point",
        ),
        (
            "[sweep]\n'model.widths' = [[8], [16], [8]]",
            "sweep.model.widths lists [8] more than once",
        ),
        (
            "[sweep]\nseed = [0, -1]",
            "seed = -1 must be >= 0",
        ),
        (
            "[faults]\nmax_failed_share = 1.5",
            "faults.max_failed_share = 1.5 is out of range; allowed: [0.0, 1.0]",
        ),
        (
            "[model]\nkind = 'cnn'\n[sweep]\n'model.widths' = [[8], [16]]",
            "model.widths is not read by model.kind 'cnn'",
        ),
        ("[model]\nkind = 'resnet'", "model.kind = 'resnet' is not a known model"),
        ("[modle]\nkind = 'mlp'", "unknown top-level key 'modle' (did you mean 'model'?)"),
        ("[data]\ndataset = 'cifar'", "data.dataset = 'cifar' is not a known dataset"),
        (
            "[faults]\ncrash_clients = [99]",
            "faults.crash_clients = [99] must be client ids in 0..9",
        ),
        (
            "[sweep]\n'federation.batch_size' = [1, -2]",
            "federation.batch_size = -2 is out of range; allowed: [1, inf)",
        ),
        (
            "[sweep]\n'federation.batch_size' = 4",
            "sweep.federation.batch_size must be a non-empty list",
        ),
        ("[attack]\nname = 'magic'", "attack"),
        (
            "[attack]\nalso = [{ name = 'idlg' }]",
            "attack.also needs a first attack: set attack.name",
        ),
        ("[attack]\nname = 'dlg'\nalso = [{ iterations = 3 }]", "attack.also[0] must be a table"),
        ("[attack]\nname = 'dlg'\nalso = [{ name = 'dlg', steps = 3 }]", "attack.also[0]: "),
        ("seed = 'x'", "seed = 'x' has type str; allowed: int"),
        ("[[defenses]]\nname = 'pruning'\nfraction = 1.5", "defenses[0]: defense 'pruning'"),
        (
            "[[defenses]]\nname = 'gaussian-noise'\nstd = -0.1",
            "defenses[0]: defense 'gaussian-noise'",
        ),
        ("[[defenses]]\nname = 'blur'", "defenses[0]: unknown defense 'blur'"),
        ("defenses = [{ std = 0.1 }]", "defenses[0] must be a table with a name"),
        ("[federation\n", "not valid TOML"),
        (
            "[federation]\nlr_schedule = 'cosine'",
            "federation.lr_schedule = 'cosine' is not allowed; choose one of 'constant', "
            "'loss-scaled'",
        ),
        (
            "[federation]\nlr_schedule = 'loss-scaled'",
            "federation.lr_schedule = 'loss-scaled' needs federation.protocol 'fedavg'",
        ),
        (
            "[federation]\nprotocol = 'fedavg'\nlr_schedule = 'loss-scaled'\nweight_decay = 0.03",
            "needs federation.weight_decay = 0, got 0.03",
        ),
        (
            "[data]\nexamples_per_client = 100\n"
            "[federation]\nprotocol = 'fedavg'\nlr_schedule = 'loss-scaled'\nbatch_size = 50",
            "federation.batch_size = 50 must cover the client's 100 examples",
        ),
        (
            "[data]\nexamples_per_client = 100\n"
            "[federation]\nprotocol = 'fedavg'\nlr_schedule = 'loss-scaled'\nbatch_size = 100\n"
            "[[defenses]]\nname = 'dp-sgd'",
            "is not supported with the dp-sgd defense",
        ),
    ],
)
def test_bad_files_get_errors_that_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load(write(tmp_path, text))
    assert expected in str(info.value)
    assert str(info.value).startswith("s.toml")


def test_the_loss_scaled_schedule_is_a_key_like_any_other() -> None:
    paper = load("kkt-mnist-odd-even-paper")
    assert paper.federation.lr_schedule == "constant"  # the default: plain steps
    scaled = load("kkt-mnist-odd-even-paper", {"federation.lr_schedule": "loss-scaled"})
    assert scaled.federation.lr_schedule == "loss-scaled"
    assert Scenario.from_json(scaled.to_json()) == scaled


@pytest.mark.parametrize("seed", [2**64, 2**70])
def test_a_seed_beyond_the_generators_64_bits_is_refused(seed: int) -> None:
    # TOML holds 64-bit signed integers only: such seeds come as overrides or from Python.
    with pytest.raises(ScenarioError, match=r"seed = \d+ is too large; allowed: 0 to 2\*\*64 - 1"):
        load("quickstart", {"seed": seed})
    with pytest.raises(ScenarioError, match=r"seed = \d+ is too large"):
        load("quickstart", {"sweep.seed": [0, seed]})


def test_the_largest_seed_reaches_every_generator() -> None:
    """The bound is where torch stops: the largest seed allowed seeds the initial model, and
    one more overflows torch's generator."""
    largest = load("quickstart", {"seed": 2**64 - 1})
    seed = largest.seed
    assert build_model(largest.model, seed=seed) is not None
    assert seeded_generator(seed, 1, 0).initial_seed() >= 0  # a client's batches
    with seeded_numpy(seed, 1, 0):  # client mods (SecAgg+'s rounding)
        pass
    assert len(sample_clients(range(10), 0.2, seed, 1)) == 2  # the server's sample
    assert len(partition(np.arange(100) % 10, 4, "iid", seed=seed)) == 4  # the shards
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed(seed + 1)


@pytest.mark.parametrize(
    ("attack", "key"),
    [
        ("dlg", "attack.params.seed"),
        ("inversion", "attack.params.seed"),
        ("kkt", "attack.params.seed"),
    ],
)
def test_an_attack_seed_beyond_the_generators_range_is_refused(attack: str, key: str) -> None:
    with pytest.raises(
        ScenarioError,
        match=rf"attack '{attack}': parameter 'seed' = {2**64} is out of range; "
        rf"allowed: \[0, {2**63 - 1}\]",
    ):
        load("quickstart", {"attack.name": attack, key: 2**64})


def test_a_plugin_seed_is_held_to_the_generators_range_whatever_it_declares() -> None:
    """A plugin that declares its seed without a bound still gets one; the largest seed
    allowed leaves room for the offsets attacks add (seed + 1) within torch's 64 bits."""

    @dataclasses.dataclass(frozen=True)
    class Unbounded:
        seed: int = 0

    with pytest.raises(FieldError, match=r"attack 'x': parameter 'seed' = -1 is out of range"):
        build_params("attack 'x'", Unbounded, {"seed": -1})
    with pytest.raises(FieldError, match=rf"'seed' = {2**63} is out of range"):
        build_params("attack 'x'", Unbounded, {"seed": 2**63})
    largest = build_params("attack 'x'", Unbounded, {"seed": 2**63 - 1}).seed
    assert torch.Generator().manual_seed(largest + 1).initial_seed() == largest + 1


def test_missing_scenario_lists_shipped_ones() -> None:
    with pytest.raises(ScenarioError, match=r"shipped scenarios: .*quickstart"):
        load("no-such-scenario")


def test_overrides_parse_toml_values_and_revalidate() -> None:
    assert parse_override("federation.lr=1e-3") == ("federation.lr", 1e-3)
    assert parse_override("model.widths=[10, 20]") == ("model.widths", [10, 20])
    assert parse_override("data.dataset=fashion-mnist") == ("data.dataset", "fashion-mnist")
    scenario = load("quickstart", ["federation.batch_size=1", "model.widths=[32]"])
    assert scenario.federation.batch_size == 1
    assert scenario.model.params.widths == (32,)
    with pytest.raises(ScenarioError, match=r"federation\.batch_size = 0"):
        load("quickstart", ["federation.batch_size=0"])
    with pytest.raises(ScenarioError, match="unknown section 'federaton'"):
        load("quickstart", ["federaton.lr=1"])


def test_sweep_is_the_grid_over_its_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[sweep]\n'federation.batch_size' = [1, 2, 4]\n"
        "[sweep.model]\nactivation = ['relu', 'tanh']\n",
    )
    points = expand(load(path))
    assert len(points) == 6
    combos = {
        (p.scenario.federation.batch_size, p.scenario.model.params.activation) for p in points
    }
    assert combos == {(b, a) for b in (1, 2, 4) for a in ("relu", "tanh")}
    assert all(not p.scenario.sweep for p in points)
    assert [p.index for p in points] == list(range(6))


def test_scenarios_are_immutable_and_roundtrip_through_json() -> None:
    scenario = load("quickstart")
    with pytest.raises(AttributeError):
        scenario.federation.lr = 1.0  # type: ignore[misc]
    assert Scenario.from_json(scenario.to_json()) == scenario


def test_resolved_scenario_toml_loads_back(tmp_path: Path) -> None:
    scenario = load("fedavg-label-skew")
    assert load(write(tmp_path, scenario_toml(scenario))) == scenario


def test_a_model_key_the_kind_does_not_read_is_refused_in_one_line(tmp_path: Path) -> None:
    """widths on a plain cnn would be ignored silently: refused, naming the kinds that read it."""
    path = tmp_path / "s.toml"
    path.write_text('[model]\nkind = "cnn"\nwidths = [100]\n')
    with pytest.raises(ScenarioError, match=r"model\.widths is not read by model\.kind 'cnn'"):
        load(path)
    with pytest.raises(ScenarioError, match=r"model\.init_scale .* homogeneous-mlp"):
        load("fedavg-multistep", overrides=["model.init_scale=0.5"])


def test_model_keys_are_checked_against_every_kind_the_scenario_takes(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    # One [model] table for a sweep over kinds: each key is read by one of them.
    path.write_text(
        '[model]\nkind = "cnn"\nchannels = [4]\nwidths = [8]\n'
        '[sweep]\n"model.kind" = ["cnn", "mlp"]\n'
    )
    assert load(path).sweep["model.kind"] == ("cnn", "mlp")
    # Switching the kind by override leaves the file's keys for its own kind alone.
    assert load("fedavg-multistep", overrides=['model.kind="mlp"']).model.kind == "mlp"
    with pytest.raises(ScenarioError, match=r"model\.widths"):
        load("fedavg-multistep", overrides=['model.kind="cnn"', "model.widths=[]"])


def test_each_point_of_a_sweep_over_kinds_keeps_the_keys_its_kind_reads(tmp_path: Path) -> None:
    """One [model] table for cnn and mlp: the mlp point gets the table's widths (not mlp's
    default), the cnn point its channels, and neither holds the other's keys."""
    path = tmp_path / "s.toml"
    path.write_text(
        '[model]\nkind = "cnn"\nchannels = [4]\nwidths = [8]\n'
        '[sweep]\n"model.kind" = ["cnn", "mlp"]\n'
    )
    cnn, mlp = (point.scenario.model for point in expand(load(path)))
    assert cnn.params == CnnParams(channels=(4,)) and mlp.params == MlpParams(widths=(8,))
    assert load(write(tmp_path, scenario_toml(load(path)))) == load(path)


def test_a_partitioners_key_is_read_only_under_that_partitioner() -> None:
    with pytest.raises(ScenarioError, match=r"data\.alpha is not read by data\.partition 'iid'"):
        load("quickstart", ["data.alpha=0.3"])
    scenario = load("quickstart", ['data.partition="dirichlet"', "data.alpha=0.3"])
    assert scenario.data.params == DirichletParams(alpha=0.3)
    data = scenario.to_dict()["data"]
    assert data["alpha"] == 0.3 and "classes_per_client" not in data
    # Switching the partitioner by override drops the file's keys for the old one.
    skewed = load("fedavg-label-skew", ['data.partition="iid"'])
    assert skewed.data.params is None and "classes_per_client" not in skewed.to_dict()["data"]


def test_a_validated_scenario_carries_its_plugins_built_once_per_process() -> None:
    scenario = from_dict(
        {
            "attack": {"name": "analytic", "also": [{"name": "idlg", "iterations": 3}]},
            "defenses": [{"name": "clipping", "max_norm": 1.0}, {"name": "gaussian-noise"}],
        }
    )
    defenses = scenario.built_defenses
    assert [type(d).__name__ for d in defenses] == ["Clipping", "GaussianNoise"]
    assert scenario.built_defenses is defenses  # built by the check, kept
    assert [name for name, _ in scenario.attack.built] == ["analytic", "idlg"]
    # What a client decodes from each train message is one object per process, so it builds
    # its defenses once, and applies the very instances the scenario holds.
    received = Scenario.from_json(scenario.to_json())
    assert Scenario.from_json(scenario.to_json()) is received
    assert ClientDefenses.from_scenario(received).update[0] is received.built_defenses[0]
