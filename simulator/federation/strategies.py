"""Aggregation strategies. FedAvg is Flower's own; FedSGD averages gradients and steps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class FedSGD(FedAvg):
    """Clients send one batch gradient each; the server applies their weighted mean with lr.

    Weighting by ``num-examples`` (the batch size) makes the step the gradient of the union of
    the sampled batches, as in McMahan et al.'s FedSGD.
    """

    def __init__(self, lr: float, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lr = lr
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean_gradient, metrics = super().aggregate_train(server_round, replies)
        if mean_gradient is None or self._global is None:
            return None, metrics
        gradient = {name: array.numpy() for name, array in mean_gradient.items()}
        weights = {name: array.numpy() for name, array in self._global.items()}
        stepped = sgd_step(weights, gradient, self.lr)
        return ArrayRecord({name: Array(value) for name, value in stepped.items()}), metrics


def sgd_step(
    weights: Mapping[str, np.ndarray], gradient: Mapping[str, np.ndarray], lr: float
) -> dict[str, np.ndarray]:
    """The FedSGD server step ``w - lr * g`` per parameter (also under SecAgg+'s aggregate)."""
    return {name: value - lr * gradient[name] for name, value in weights.items()}


def make_strategy(protocol: str, lr: float) -> FedAvg:
    """The inner strategy for ``protocol``; sampling is left to the interceptor around it."""
    options: dict[str, object] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_available_nodes": 1,
    }
    if protocol == "fedsgd":
        return FedSGD(lr=lr, **options)
    return FedAvg(**options)  # type: ignore[arg-type]
