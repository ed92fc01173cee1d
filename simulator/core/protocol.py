"""The types that cross the trust boundary: what a real FL server receives from one client in
one round (:class:`Observation`), and what an attack returns (:class:`Reconstruction`).

At the end, apart: the ground truth the referee scores against (:class:`Truth`, which never
crosses to an attack), and the keys of the messages between the ServerApp and the ClientApps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from simulator.core.models import ModelSpec
from simulator.core.objectives import OBJECTIVES, Objective, objective_key

Protocol = Literal["fedsgd", "fedavg"]


@dataclass(frozen=True)
class PublicData:
    """Labelled data the server holds besides the updates: the test split it evaluates the
    global model on. Attacks may use its statistics (never a client's data)."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class PublicMeta:
    """Protocol settings a server knows because it sent them (or the client reports them)."""

    protocol: Protocol
    batch_size: int
    lr: float
    local_epochs: int
    num_examples: int

    @property
    def local_steps(self) -> int:
        """The SGD steps of a FedAvg client with these settings (:func:`local_steps`)."""
        return local_steps(self.num_examples, self.batch_size, self.local_epochs)


def local_steps(examples: int, batch_size: int, epochs: int) -> int:
    """SGD steps of ``epochs`` passes over ``examples`` in mini-batches of ``batch_size``, the
    last one partial: ``epochs * ceil(examples / batch_size)``.

    The one count of local training's steps: the client's plain SGD and DP-SGD's (Poisson
    batches of that expected size) both take it, the privacy ledger charges it, and the attacks
    that undo FedAvg's steps divide by it.
    """
    return epochs * math.ceil(examples / batch_size)


@dataclass(frozen=True)
class Observation:
    """One intercepted client update.

    ``update`` holds, per parameter name, the gradient (fedsgd) or the client's new weights
    (fedavg), exactly as the client sent them. ``global_weights`` is what the server sent.
    """

    round: int
    client_id: int
    model: ModelSpec
    global_weights: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    meta: PublicMeta

    def update_norm(self) -> float:
        """L2 norm of the update over all parameters (of the weight change under fedavg)."""
        if self.meta.protocol == "fedavg":
            deltas = [self.update[k] - self.global_weights[k] for k in self.update]
        else:
            deltas = list(self.update.values())
        return float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas)))


Status = Literal["converged", "stalled", "budget", "diverged"]
STATUSES: tuple[str, ...] = ("converged", "stalled", "budget", "diverged")
Matching = Literal["hungarian", "nearest", "training"]


@dataclass
class Reconstruction:
    """What an attack recovered from one observation.

    ``images`` is (n, C, H, W) in [0, 1]; ``labels`` is (n,) int64 dataset labels, or None when
    the attack could not recover them (``notes`` says why).
    ``objective`` names what the attack minimised (:mod:`simulator.core.objectives`; "none"
    for a closed form) and ``objective_value`` is its value at the reported images (NaN when
    not computed).
    ``trace`` holds one dict per logged iteration: at least "iteration", "seconds" (wall time
    since the batched run started) and the objective's value under
    :func:`objective_key` (``gradient_distance``, ``kkt_stationarity``, ...; none for "none").
    ``snapshots`` are (iteration, images) pairs so that a scorer holding the truth can plot
    quality against iterations. ``confident`` optionally flags (n,) the images the attack
    vouches for (the analytic attack's single-sample recoveries).
    ``predicted_share``: the share of the batch the attack guarantees to recover exactly (the
    active attacks' alone-in-a-bin bound; NaN when it cannot be computed), None when it states
    no guarantee; the scorer then reports the shares recovered at 60 and 30 dB beside it.
    ``seconds``: the wall time of the attack's call that made it, measured by the malicious
    server around the call (whatever an attack sets is replaced); the trace's own "seconds"
    only place its iterations in time.
    ``matching``: "hungarian" pairs each true image with its own reconstruction (one-to-one);
    "nearest" means the images are candidates, more or fewer than the truth, and each true
    image is scored against its most similar candidate (dataset reconstruction); "training"
    means class samples, each scored against the nearest training image of its class
    (network inversion).
    ``status``: "converged" (objective under tolerance, or a closed form), "stalled" (the
    optimiser stopped making progress above the tolerance: a local minimum, a flat valley),
    "budget" (iterations spent), "diverged" (non-finite values met; the images are the best
    finite iterate).
    """

    round: int
    client_id: int
    images: torch.Tensor
    labels: torch.Tensor | None
    trace: list[dict[str, float]] = field(default_factory=list)
    snapshots: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    status: Status = "budget"
    attack: str = ""
    notes: str = ""
    confident: torch.Tensor | None = None
    objective: Objective = "gradient-distance"
    objective_value: float = math.nan
    matching: Matching = "hungarian"
    predicted_share: float | None = None
    seconds: float = math.nan

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        key = objective_key(self.objective)
        if self.objective != "none" and any(key not in row for row in self.trace):
            raise ValueError(f"every trace row of a {self.objective} attack needs {key!r}")
        if self.images.dim() != 4:
            raise ValueError(f"images must be (n, C, H, W), got shape {tuple(self.images.shape)}")


# ---------------------------------------------------------------------------------------------
# The ground truth and the wire keys. The truth's type lives here, beside the boundary types,
# so that scoring reads it without the federation that stores it
# (:class:`simulator.federation.truth.TruthStore`); the wire keys, so that a client defense
# reading a train message (``defenses/inspection.py``) names the same key as the ServerApp.


@dataclass(frozen=True)
class Truth:
    """The exact images and labels a client's update was computed from, in order."""

    round: int
    client_id: int
    inputs: torch.Tensor
    labels: torch.Tensor


# Record keys of the train and query messages (``flwr.app.RecordDict``) and of their config.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SCENARIO_KEY = "leaksim-scenario"
ROUND_KEY = "server-round"
CLIENT_ID_KEY = "client-id"
NUM_EXAMPLES_KEY = "num-examples"
