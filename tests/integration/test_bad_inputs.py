"""Every input is checked before work: one line naming the key or file, exit code 2.

Each case runs ``leaksim run`` (in-process, through the CLI) with one bad input and must end
with status 2 and a single line that names what is wrong, within 10 s, without starting Ray
(``ray.init`` is replaced by a tripwire) and without creating the run folder.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import ray
import torch
from typer.testing import CliRunner

from simulator import api
from simulator.cli import app
from simulator.run.cluster import RAY_ADDRESS_ENV

runner = CliRunner(env={"COLUMNS": "300"})
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
LABELS = "train-labels-idx1-ubyte.gz"
SECAGG = '{name="secure-aggregation"}'

# (case id, --set overrides or other arguments, a fragment of the one-line message)
CASES: list[tuple[str, list[str], str]] = [
    ("fraction-nan", ["federation.fraction=nan"], "federation.fraction = nan must be a finite"),
    ("lr-inf", ["federation.lr=inf"], "federation.lr = inf must be a finite number"),
    ("lr-minus-inf", ["federation.lr=-inf"], "federation.lr = -inf must be a finite number"),
    ("timeout-nan", ["federation.timeout_s=nan"], "federation.timeout_s = nan must be a finite"),
    (
        "alpha-nan",
        ['data.partition="dirichlet"', "data.alpha=nan"],
        "partitioner 'dirichlet': parameter 'alpha' = nan must be a finite number",
    ),
    ("alpha-under-iid", ["data.alpha=0.3"], "data.alpha is not read by data.partition 'iid'"),
    (
        "widths-swept-under-cnn",
        ['model.kind="cnn"', "sweep.model.widths=[[8], [16]]"],
        "model.widths is not read by model.kind 'cnn'; it is read by",
    ),
    ("threshold-nan", ["attack.leak_threshold_db=nan"], "attack.leak_threshold_db = nan"),
    ("ssim-inf", ["attack.leak_threshold_ssim=inf"], "attack.leak_threshold_ssim = inf"),
    ("seed-negative", ["seed=-1"], "seed = -1 must be >= 0"),
    ("seed-2-64", [f"seed={2**64}"], f"seed = {2**64} is too large; allowed: 0 to 2**64 - 1"),
    ("seed-swept-2-64", [f"sweep.seed=[0, {2**64}]"], f"seed = {2**64} is too large"),
    ("seed-repeated", ["sweep.seed=[0, 0]"], "sweep.seed lists 0 more than once"),
    (
        "attack-seed-2-64",
        ["attack.name=dlg", f"attack.params.seed={2**64}"],
        f"attack 'dlg': parameter 'seed' = {2**64} is out of range; allowed: [0, {2**63 - 1}]",
    ),
    (
        "timeout-tiny",
        ["federation.timeout_s=1e-9"],
        "federation.timeout_s = 1e-09 is out of range; allowed: [10.0, inf)",
    ),
    ("clients-huge", ["federation.clients=1000000"], "federation.clients = 1000000 is out of"),
    ("rounds-huge", ["federation.rounds=1000000000"], "federation.rounds = 1000000000 is out"),
    ("failed-share", ["faults.max_failed_share=-0.5"], "faults.max_failed_share = -0.5 is out"),
    ("cpus", ["federation.cpus_per_client=1000"], "federation.cpus_per_client = 1000 exceeds"),
    (
        "batch-over-shard",
        ["federation.batch_size=64", "data.examples_per_client=16"],
        "federation.batch_size = 64 is larger than the smallest client shard (16 examples)",
    ),
    ("crash-rounds", ["faults.crash_rounds=[999]"], "faults.crash_rounds = [999] must be rounds"),
    ("crash-clients", ["faults.crash_clients=[99]"], "faults.crash_clients = [99] must be client"),
    ("attack-rounds", ["attack.rounds=[0]"], "attack.rounds = [0] must be rounds in 1..100"),
    (
        "secagg-one-client",
        [
            "federation.clients=2",
            "federation.fraction=0.5",
            'defenses=[{name="secure-aggregation"}]',
        ],
        "needs at least 2 clients sampled per round",
    ),
    (
        "secagg-threshold",
        ["federation.fraction=0.3", 'defenses=[{name="secure-aggregation", min_clients=5}]'],
        "'min_clients' = 5 exceeds the 3 clients sampled per round",
    ),
    ("rounds-zero", ["federation.rounds=0"], "federation.rounds = 0 is out of range"),
    ("lr-zero", ["federation.lr=0"], "federation.lr = 0.0 is out of range; allowed: (0.0, inf)"),
    ("clients-zero", ["federation.clients=0"], "federation.clients = 0 is out of range"),
    ("unknown-key", ["federation.rouds=3"], "unknown key federation.rouds (did you mean 'rounds'"),
    ("unknown-attack", ["attack.name=dgl"], "unknown attack 'dgl' (did you mean 'dlg'?)"),
    ("attack-param", ["attack.params.tolerance=-1.0"], "parameter 'tolerance' = -1.0 is out of"),
    ("unknown-defense", ['defenses=[{name="blur"}]'], "defenses[0]: unknown defense 'blur'"),
    ("defense-param", ['defenses=[{name="pruning", fraction=1.5}]'], "'fraction' = 1.5 is out"),
    ("partition", ["data.partition=shards"], "data.partition = 'shards' is not a known"),
    ("dataset", ["data.dataset=cifar"], "data.dataset = 'cifar' is not a known dataset"),
    ("model", ["model.kind=resnet"], "model.kind = 'resnet' is not a known model"),
    ("markup", ["federation.protocol=[/x]"], "federation.protocol = '[/x]' is not allowed"),
    ("device", ["attack.device=tpu"], "attack.device = 'tpu' is not allowed"),
]
if not torch.cuda.is_available():  # a GPU machine honours these
    CASES += [
        ("attack-cuda", ["attack.device=cuda"], "attack.device = 'cuda' but torch sees no CUDA"),
        ("client-cuda", ["federation.device=cuda"], "federation.device = 'cuda' but torch sees"),
    ]


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Ray may not start; no download may reach a network; returns the would-be run folder."""

    def tripwire(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("work was started for an invalid input")

    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)  # no cluster given: checks run here
    monkeypatch.setattr(ray, "init", tripwire)  # an in-process federation
    monkeypatch.setattr(api, "execute", tripwire)  # the worker process that would run one
    monkeypatch.setenv("LEAKSIM_MIRRORS", "http://127.0.0.1:9/")  # discard port: refused
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "run"


def check(args: list[str], out: Path, fragment: str) -> None:
    # "Before work" is the tripwires' to show (no Ray, no worker, no download), not a clock's:
    # a time bound only measures how busy the machine is.
    result = runner.invoke(app, ["run", *args, "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, lines
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_bad_scenario_value_stops_before_work(
    guarded: Path, overrides: list[str], fragment: str
) -> None:
    args = ["quickstart"]
    for override in overrides:
        args += ["--set", override]
    check(args, guarded, fragment)


def test_a_swept_model_key_the_model_kind_does_not_read_is_an_error(
    guarded: Path, tmp_path: Path
) -> None:
    quickstart = (Path(__file__).resolve().parents[2] / "scenarios" / "quickstart.toml").read_text()
    head, _, rest = quickstart.partition("[model]")
    federation = rest[rest.index("[federation]") :]
    scenario = tmp_path / "cnn-widths.toml"
    model = '[model]\nkind = "cnn"\n\n'
    sweep = '\n[sweep]\n"model.widths" = [[8], [16]]\n'
    scenario.write_text(head + model + federation + sweep)
    check([str(scenario)], guarded, "model.widths is not read by model.kind 'cnn'")


def test_a_mistyped_path_is_an_error_not_a_shipped_scenario(guarded: Path) -> None:
    check(["/x/quickstart.toml"], guarded, "no scenario file '/x/quickstart.toml'")


def test_a_binary_scenario_file_is_an_error(guarded: Path, tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    check([str(binary)], guarded, "not a text file")


def test_a_missing_plugin_file_is_an_error(guarded: Path, tmp_path: Path) -> None:
    check(["quickstart", "--plugin", str(tmp_path / "nope.py")], guarded, "does not exist")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("import sys\nsys.exit(0)\n", "SystemExit (the file called sys.exit(0) at import)"),
        ("raise KeyboardInterrupt\n", "KeyboardInterrupt at import"),
        ("class Stop(BaseException):\n    pass\nraise Stop('x')\n", "Stop: x"),
    ],
    ids=["sys-exit", "keyboard-interrupt", "base-exception"],
)
def test_a_plugin_that_exits_at_import_is_a_one_line_error(
    guarded: Path, tmp_path: Path, body: str, fragment: str
) -> None:
    path = tmp_path / "exits.py"
    path.write_text(body)
    check(["quickstart", "--plugin", str(path)], guarded, f"exits.py': {fragment}")


def test_a_plugin_path_that_is_a_directory_is_named(guarded: Path, tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    check(["quickstart", "--plugin", str(tmp_path / "plugins")], guarded, "is a directory")


def test_a_long_run_gets_a_one_line_estimate_before_it_starts(guarded: Path) -> None:
    """A run the machine takes hours over is named with its time before any work (here the
    tripwire then stops it: the line came first)."""
    result = runner.invoke(
        app, ["run", "quickstart", "--set", "federation.rounds=100000", "--out", str(guarded)]
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("warning: this run needs at least about "), lines
    assert " h on " in lines[0] and "1 point(s) x 100000 rounds of 10 clients" in lines[0]
    assert "work was started" in lines[1]
    quick = runner.invoke(app, ["run", "quickstart", "--out", str(guarded)])
    assert "warning" not in quick.output


def data_copy(tmp_path: Path, damage: str) -> Path:
    """The verified MNIST files, with the training labels damaged as ``damage`` says."""
    folder = tmp_path / "data"
    shutil.copytree(SHARED / "mnist", folder / "mnist")
    labels = folder / "mnist" / LABELS
    if damage == "corrupt":
        raw = bytearray(labels.read_bytes())
        raw[100] ^= 0xFF
        labels.write_bytes(bytes(raw))
    elif damage == "truncated":
        labels.write_bytes(labels.read_bytes()[: labels.stat().st_size // 2])
    elif damage == "not-gzip":
        labels.write_bytes(gzip.compress(b"x")[:3] + b"not a gzip stream" * 1700)
    elif damage == "missing":
        labels.unlink()
    return folder


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "not-gzip", "missing"])
def test_a_damaged_or_missing_data_file_is_named_before_work(
    guarded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setenv("LEAKSIM_DATA_DIR", str(data_copy(tmp_path, damage)))
    check(["quickstart"], guarded, f"data: mnist files {LABELS} are missing or damaged")


def test_a_data_directory_that_is_a_file_is_named(
    guarded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("LEAKSIM_DATA_DIR", str(not_a_folder))
    check(["quickstart"], guarded, f"LEAKSIM_DATA_DIR = '{not_a_folder}' is not a directory")
    monkeypatch.setenv("LEAKSIM_DATA_DIR", str(SHARED))
    check(["quickstart", "--data-dir", str(not_a_folder)], guarded, "data.dir = ")
