"""simulator.partition: determinism, disjointness, the skew each scheme promises, bad input."""

from __future__ import annotations

import socket
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.core.registry import PARTITIONERS
from simulator.data.datasets import read_idx
from simulator.data.partition import (
    DirichletParams,
    LabelSkewParams,
    _flower,
    _partition_cached,
    partition,
)

SCHEMES = ["iid", "label-skew", "dirichlet"]


@pytest.fixture(scope="module")
def labels(shared_data_dir) -> np.ndarray:
    """The 60,000 MNIST training labels."""
    return read_idx(shared_data_dir / "mnist" / "train-labels-idx1-ubyte.gz").astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_registry() -> None:
    assert set(PARTITIONERS) == set(SCHEMES)
    assert all(d and "\n" not in d for d in PARTITIONERS.values())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_disjoint_and_covering(labels: np.ndarray, scheme: str) -> None:
    a = partition(labels, 100, scheme, seed=7)
    b = partition(labels, 100, scheme, seed=7)
    c = partition(labels, 100, scheme, seed=8)
    assert len(a) == 100
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(np.sort(x), np.sort(y)) for x, y in zip(a, c, strict=True))
    for shard in a:
        assert shard.dtype == np.int64 and len(shard) >= 1
    everything = np.concatenate(a)
    assert len(everything) == len(labels)  # 100 clients x 2 classes reach every class
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))


def test_results_are_private_copies(labels: np.ndarray) -> None:
    first = partition(labels, 10, "iid", seed=1)
    expected = first[0].copy()
    first[0][:] = -1
    assert np.array_equal(partition(labels, 10, "iid", seed=1)[0], expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_fresh_split_of_mnist_into_100_clients_gives_the_cached_shards(
    labels: np.ndarray, scheme: str
) -> None:
    # Calls with the same arguments are served from the cache; this checks that what is
    # computed again from nothing is the same split (and so that the cache keys are complete).
    cached = partition(labels, 100, scheme, seed=3)
    _partition_cached.cache_clear()
    fresh = partition(labels, 100, scheme, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(cached, fresh, strict=True))
    assert sum(len(s) for s in fresh) == len(labels)


def test_iid_is_even(labels: np.ndarray) -> None:
    shards = partition(labels, 7, "iid", seed=0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels)
    overall = np.bincount(labels, minlength=10) / len(labels)
    for s in shards:
        assert np.abs(np.bincount(labels[s], minlength=10) / len(s) - overall).max() < 0.02


def test_prefix_of_a_shard_is_a_random_subsample(labels: np.ndarray) -> None:
    (shard,) = partition(labels, 1, "label-skew", seed=0, params=LabelSkewParams(2))
    assert set(np.unique(labels[shard[:200]]).tolist()) == {0, 1}  # not one class first
    assert not np.all(np.diff(shard) > 0)


@pytest.mark.parametrize(("num_clients", "k"), [(10, 1), (100, 2), (7, 3), (20, 10)])
def test_label_skew_gives_exactly_k_classes(labels: np.ndarray, num_clients: int, k: int) -> None:
    shards = partition(labels, num_clients, "label-skew", seed=1, params=LabelSkewParams(k))
    for i, s in enumerate(shards):
        assert sorted(np.unique(labels[s]).tolist()) == sorted((i + t) % 10 for t in range(k))


def test_label_skew_leaves_unreachable_classes_out(labels: np.ndarray) -> None:
    shards = partition(labels, 2, "label-skew", seed=1, params=LabelSkewParams(2))
    used = np.concatenate(shards)
    assert sorted(np.unique(labels[used]).tolist()) == [0, 1, 2]
    assert len(used) == np.isin(labels, [0, 1, 2]).sum()


@pytest.mark.parametrize(("n", "num_clients", "k", "seed"), [(3000, 100, 2, 1), (800, 7, 3, 5)])
def test_label_skew_equals_flowers_pathological_partitioner(
    n: int, num_clients: int, k: int, seed: int
) -> None:
    """The numpy label-skew reproduces Flower's PathologicalPartitioner ("deterministic")."""
    y = np.random.default_rng(0).integers(0, 10, n)
    ours = partition(y, num_clients, "label-skew", seed, params=LabelSkewParams(k))
    datasets, fp = _flower()
    order = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0]).permutation(n)
    ref = fp.PathologicalPartitioner(num_clients, "label", k, "deterministic", seed=seed)
    ref.dataset = datasets.Dataset.from_dict({"label": y[order], "index": order})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [np.asarray(ref.load_partition(i)["index"]) for i in range(num_clients)]
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks(labels: np.ndarray) -> None:
    def mean_entropy(alpha: float) -> float:
        shards = partition(
            labels, 20, "dirichlet", seed=2, params=DirichletParams(alpha), min_size=10
        )
        assert min(len(s) for s in shards) >= 10
        return float(np.mean([_entropy(np.bincount(labels[s], minlength=10)) for s in shards]))

    e = [mean_entropy(a) for a in (100.0, 1.0, 0.1)]
    assert e[0] > 2.2 > e[1] > e[2] and e[2] < 1.2, e  # log(10) = 2.30 is perfectly mixed


def test_works_offline_and_quietly(
    labels: np.ndarray, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    _partition_cached.cache_clear()
    for scheme in SCHEMES:
        params = DirichletParams(0.05) if scheme == "dirichlet" else None
        partition(labels, 30, scheme, seed=11, params=params)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, r"num_clients=0: need at least 1"),
        ({"num_clients": 61}, r"num_clients=61 with min_size=1 needs 61 samples, but .* only 60"),
        ({"min_size": 7}, r"num_clients=10 with min_size=7 needs 70 samples"),
        ({"min_size": 0}, r"min_size=0: must be at least 1"),
        (
            {"scheme": "shards"},
            r"unknown scheme 'shards'; choose one of dirichlet, iid, label",
        ),
        ({"scheme": "label-skew", "classes_per_client": 0}, r"classes_per_client=0: must be bet"),
        ({"scheme": "label-skew", "classes_per_client": 11}, r"between 1 and the 10 classes"),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"alpha=0.0: .* finite number > 0"),
        ({"scheme": "dirichlet", "alpha": -1.0}, r"alpha=-1.0"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, r"alpha=nan"),
        ({"scheme": "dirichlet", "alpha": float("inf")}, r"alpha=inf"),
        ({"seed": -1}, r"seed=-1: must be a non-negative integer"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "labels": np.arange(60) % 10,
        "num_clients": 10,
        "scheme": "iid",
        "seed": 0,
    }
    settings = {k: kwargs.pop(k) for k in ("classes_per_client", "alpha") if k in kwargs}
    if settings:  # built unvalidated: partition itself must refuse them
        params = LabelSkewParams if kwargs["scheme"] == "label-skew" else DirichletParams
        args["params"] = params(**settings)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        partition(**(args | kwargs))  # type: ignore[arg-type]


def test_bad_labels_and_impossible_splits() -> None:
    with pytest.raises(ValueError, match="1-D integer array"):
        partition(np.zeros((4, 2), dtype=int), 2, "iid", 0)
    with pytest.raises(ValueError, match="1-D integer array"):
        partition(np.zeros(8), 2, "iid", 0)
    # Class 9 has a single sample, but with 2 classes per client all 4 clients need it.
    y = np.array([0] * 20 + [9])
    with pytest.raises(ValueError, match=r"class 9 has 1 samples but 4 clients need it"):
        partition(y, 4, "label-skew", 0, params=LabelSkewParams(2))
    # Tiny alpha with a large min_size cannot be met: Flower gives up, we say why.
    with pytest.raises(ValueError, match=r"'dirichlet' cannot split 100 samples into 5 .*alpha"):
        partition(np.arange(100) % 2, 5, "dirichlet", 0, DirichletParams(0.01), min_size=19)


def _reference_ok(shards: list[np.ndarray], n: int, min_size: int) -> bool:
    """The disjoint-partition property, checked the slow obvious way."""
    seen: set[int] = set()
    for shard in shards:
        if len(shard) < min_size:
            return False
        for i in shard.tolist():
            if i in seen or not 0 <= i < n:
                return False
            seen.add(i)
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(1, 200),
    num_classes=st.integers(1, 6),
    scheme=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_disjoint_cover(
    data: st.DataObject, n: int, num_classes: int, scheme: str, seed: int
) -> None:
    y = np.random.default_rng(seed).integers(0, num_classes, n)
    present = len(np.unique(y))
    num_clients = data.draw(st.integers(1, min(n, 12)), label="num_clients")
    k = data.draw(st.integers(1, present), label="classes_per_client")
    min_size = data.draw(st.integers(1, 3), label="min_size")
    try:
        params = {"dirichlet": DirichletParams(0.5), "label-skew": LabelSkewParams(k)}
        shards = partition(y, num_clients, scheme, seed, params.get(scheme), min_size=min_size)
    except ValueError:
        # Only legitimately impossible requests may fail.
        assert scheme != "iid" or num_clients * min_size > n
        return
    assert len(shards) == num_clients
    assert _reference_ok(shards, n, min_size)
    if scheme != "label-skew":
        assert sum(len(s) for s in shards) == n
    else:
        for s in shards:
            assert len(np.unique(y[s])) == k
        if num_clients + k - 1 >= present:  # client i holds classes i..i+k-1 (mod classes)
            assert sum(len(s) for s in shards) == n


def test_training_pool_parity_draws_half_odd_half_even_by_seed() -> None:
    from simulator.data.partition import training_pool

    labels = np.random.default_rng(0).integers(0, 10, size=1000)
    pool = training_pool(labels, 50, "parity", seed=3)
    assert len(set(pool.tolist())) == 50
    assert (labels[pool[:25]] % 2 == 1).all() and (labels[pool[25:]] % 2 == 0).all()
    assert np.array_equal(pool, training_pool(labels, 50, "parity", seed=3))
    assert not np.array_equal(pool, training_pool(labels, 50, "parity", seed=4))
    assert np.array_equal(training_pool(labels, 0, "parity", seed=3), np.arange(1000))
