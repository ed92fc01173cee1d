"""Sharding a labelled dataset into federated clients.

"iid" and "dirichlet" use Flower's partitioners (flwr-datasets), which work on Hugging Face
``datasets.Dataset`` objects: here an in-memory one holding just the labels and the original row
index, so nothing is downloaded and callers get plain index arrays. "label-skew" reimplements
Flower's PathologicalPartitioner in numpy (see ``_label_skew`` for why). A partitioner's own
settings (dirichlet's ``alpha``, label-skew's ``classes_per_client``) are its ``Params``,
registered with it and validated like an attack's parameters; they are written in ``[data]``.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from simulator.core.fields import param
from simulator.core.registry import PARTITIONERS

__all__ = ["POOL_BALANCES", "Split", "partition", "register_partitioner", "training_pool"]


@dataclass(frozen=True)
class PartitionRequest:
    """What a partitioner is asked: labels in a seeded order, and the scheme's ``params`` (its
    registered ``Params``, validated; None for a scheme that takes none)."""

    labels: np.ndarray
    order: np.ndarray
    num_clients: int
    seed: int
    min_size: int
    params: Any


# A partitioner: the index arrays of every client, for one request.
Split = Callable[[PartitionRequest], tuple[np.ndarray, ...]]


def register_partitioner(
    name: str, description: str, params: type | None = None
) -> Callable[[Split], Split]:
    """Make a partitioner usable as ``data.partition`` in scenario files (plugin files too);
    ``params``, a frozen dataclass, declares the ``[data]`` keys it reads."""

    def decorate(split: Split) -> Split:
        PARTITIONERS.add(name, description, split, params)
        return split

    return decorate


@dataclass(frozen=True)
class DirichletParams:
    """Parameters of "dirichlet"."""

    alpha: float = param(
        0.5, low=0.0, low_open=True, help="Dirichlet concentration: smaller, more skew"
    )


@dataclass(frozen=True)
class LabelSkewParams:
    """Parameters of "label-skew"."""

    classes_per_client: int = param(2, low=1, high=10, help="classes every client holds")


POOL_BALANCES: dict[str, str] = {
    "none": "a uniform random subset",
    "parity": "half odd, half even digits (the odd/even set of Haim et al. 2022)",
}


def training_pool(labels: np.ndarray, size: int, balance: str, seed: int) -> np.ndarray:
    """Sorted indices of the training examples a run uses: all of them when ``size`` is 0.

    Otherwise ``size`` examples drawn by ``seed``; with "parity", ``size // 2`` odd labels
    (first) then ``size - size // 2`` even ones, so that small dataset-reconstruction studies
    train on exactly the sets the papers describe.
    """
    labels = np.asarray(labels)
    if size == 0:
        return np.arange(len(labels))
    if balance not in POOL_BALANCES:
        raise ValueError(f"unknown balance {balance!r}; choose one of {sorted(POOL_BALANCES)}")
    rng = np.random.default_rng(seed)
    if balance == "none":
        groups = [(np.arange(len(labels)), size)]
    else:
        groups = [
            (np.flatnonzero(labels % 2 == 1), size // 2),
            (np.flatnonzero(labels % 2 == 0), size - size // 2),
        ]
    chosen = []
    for members, count in groups:
        if count > len(members):
            raise ValueError(f"asked for {count} examples of a group that has {len(members)}")
        chosen.append(np.sort(rng.choice(members, count, replace=False)))
    return np.concatenate(chosen)


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    params: Any = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` among ``num_clients`` clients.

    ``params`` is the scheme's ``Params`` (``PARTITIONERS.validate(scheme, {...})``; None: its
    defaults). Returns one int64 index array per client, in a seeded random order (so a
    prefix is a uniform subsample); no index appears twice and every client holds at least
    ``min_size`` samples. The result depends only on the arguments.
    "label-skew" gives client ``i`` the classes ``i, i+1, ..., i+classes_per_client-1``
    (mod the number of classes, in sorted label order), so with fewer than
    ``num_classes - classes_per_client + 1`` clients some classes go unused.
    """
    labels = np.asarray(labels)
    if scheme not in PARTITIONERS:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(PARTITIONERS)}")
    if params is None:
        params = PARTITIONERS.validate(scheme, {})
    _check(labels, num_clients, scheme, seed, params, min_size)
    shards = _partition_cached(
        labels.tobytes(),
        labels.dtype.str,
        len(labels),
        operator.index(num_clients),
        scheme,
        operator.index(seed),
        params,
        operator.index(min_size),
    )
    return [s.copy() for s in shards]


def _check(
    labels: np.ndarray, num_clients: int, scheme: str, seed: int, params: Any, min_size: int
) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    n = len(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients}: need at least 1 client")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be a non-negative integer")
    if min_size < 1:
        raise ValueError(f"min_size={min_size}: must be at least 1 (no client may be empty)")
    if num_clients * min_size > n:
        raise ValueError(
            f"num_clients={num_clients} with min_size={min_size} needs "
            f"{num_clients * min_size} samples, but there are only {n}"
        )
    if isinstance(params, LabelSkewParams):
        num_classes = len(np.unique(labels))
        if not 1 <= params.classes_per_client <= num_classes:
            raise ValueError(
                f"classes_per_client={params.classes_per_client}: must be between 1 and the "
                f"{num_classes} classes present in the labels"
            )
    if isinstance(params, DirichletParams) and not (
        params.alpha > 0 and math.isfinite(params.alpha)
    ):
        raise ValueError(
            f"alpha={params.alpha}: the Dirichlet concentration must be a finite number > 0"
        )


def _flower() -> tuple[ModuleType, ModuleType]:
    # Imported on first use: `datasets` takes ~1.5 s to import, which `leaksim list` and
    # processes that never partition should not pay.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    from flwr_datasets import partitioner

    datasets.disable_progress_bars()
    return datasets, partitioner


# Keyed on the label bytes: Flower clients re-partition the same labels on every call.
@functools.lru_cache(maxsize=8)
def _partition_cached(
    label_bytes: bytes,
    dtype: str,
    n: int,
    num_clients: int,
    scheme: str,
    seed: int,
    params: Any,
    min_size: int,
) -> tuple[np.ndarray, ...]:
    labels = np.frombuffer(label_bytes, dtype=np.dtype(dtype), count=n)
    # Seeded shuffle first (as Flower's FederatedDataset does): it makes the contiguous blocks of
    # IidPartitioner random and varies which samples of a class each label-skew client gets.
    # A spawned stream, so it is independent of the partitioners' own default_rng(seed).
    order = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0]).permutation(n)
    split: Split = PARTITIONERS.entry(scheme).value
    shards = split(PartitionRequest(labels, order, num_clients, seed, min_size, params))
    if (smallest := min(len(s) for s in shards)) < min_size:
        raise ValueError(
            f"scheme {scheme!r} left a client with {smallest} samples, fewer than "
            f"min_size={min_size}; use fewer clients or a smaller min_size"
        )
    for s in shards:
        s.flags.writeable = False
    return shards


def _flower_partition(
    labels: np.ndarray,
    order: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float | None,
    min_size: int,
) -> tuple[np.ndarray, ...]:
    datasets, fp = _flower()
    if scheme == "iid":
        part = fp.IidPartitioner(num_partitions=num_clients)
    else:
        part = fp.DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=False,
            seed=seed,
        )
    # Arrow format: with numpy formatting Flower's label scans are ~50x slower.
    dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    part.dataset = dataset.with_format("arrow")
    try:
        with warnings.catch_warnings():
            # Flower warns on every Dirichlet re-draw for min_size; retrying is expected.
            warnings.filterwarnings("ignore", module=r"flwr_datasets\.")
            return tuple(
                part.load_partition(i)["index"].to_numpy().astype(np.int64)
                for i in range(num_clients)
            )
    except ValueError as e:
        setting = "" if alpha is None else f"alpha={alpha}, "
        raise ValueError(
            f"scheme {scheme!r} cannot split {len(labels)} samples into {num_clients} clients "
            f"with {setting}min_size={min_size}: {e}"
        ) from e


def _label_skew(
    labels: np.ndarray, order: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> tuple[np.ndarray, ...]:
    """Flower's PathologicalPartitioner(class_assignment_mode="deterministic"), in numpy.

    Hand-written because Flower's takes ~1.2 s for 60,000 labels and 100 clients, almost all
    of it in `datasets` fingerprint-hashing each client's index list (numpy scalars, one by one)
    inside `Dataset.select`; this gives the very same shards (the tests compare) in milliseconds.
    "deterministic" rather than "random": it spreads the classes evenly over the clients, where
    "random" can leave classes unused and overload others.
    """
    classes = np.unique(labels)
    owners: list[list[int]] = [[] for _ in classes]  # class position -> its clients, ascending
    for client in range(num_clients):
        for t in range(classes_per_client):
            owners[(client + t) % len(classes)].append(client)
    shuffled = labels[order]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, clients in zip(classes, owners, strict=True):
        if not clients:
            continue  # fewer clients than needed to cover every class
        members = order[shuffled == c]
        if len(members) < len(clients):
            raise ValueError(
                f"label-skew: class {c} has {len(members)} samples but {len(clients)} clients "
                f"need it; use fewer clients or a smaller classes_per_client"
            )
        for client, chunk in zip(clients, np.array_split(members, len(clients)), strict=True):
            parts[client].append(chunk)
    rng = np.random.default_rng(seed)
    shards = tuple(np.concatenate(p).astype(np.int64) for p in parts)
    for shard in shards:
        rng.shuffle(shard)  # the same draws as Flower's in-place shuffle of each partition
    return shards


def _flower_scheme(scheme: str) -> Split:
    """The partitioner that runs Flower's own partitioner for ``scheme``."""

    def split(request: PartitionRequest) -> tuple[np.ndarray, ...]:
        alpha = request.params.alpha if isinstance(request.params, DirichletParams) else None
        return _flower_partition(
            request.labels, request.order, request.num_clients, scheme, request.seed,
            alpha, request.min_size,
        )  # fmt: skip

    return split


register_partitioner("iid", "uniform random split: client sizes differ by at most one sample")(
    _flower_scheme("iid")
)
register_partitioner(
    "dirichlet",
    "per-class shares drawn from Dirichlet(alpha): smaller alpha, more skew",
    DirichletParams,
)(_flower_scheme("dirichlet"))


@register_partitioner(
    "label-skew",
    "pathological non-IID: every client holds exactly classes_per_client classes",
    LabelSkewParams,
)
def _skewed(request: PartitionRequest) -> tuple[np.ndarray, ...]:
    return _label_skew(
        request.labels, request.order, request.num_clients,
        request.params.classes_per_client, request.seed,
    )  # fmt: skip
