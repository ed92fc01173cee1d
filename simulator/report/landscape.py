"""The gradient-matching loss over a 2-D slice of input space through the true batch.

Gradient matching converges slowly where this surface is flat: ``render`` evaluates
``||grad L(x* + a u + b v) - grad L(x*)||^2`` on an (a, b) grid, with u, v random orthonormal
directions in the space of the whole batch, the true labels known and the model at its
initial weights. All grid points are evaluated as one vectorised batch (``torch.func.vmap``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from simulator.core.config import Scenario
from simulator.core.models import build_model, task_loss
from simulator.core.seeding import seeded_generator
from simulator.data.shards import load_shard
from simulator.report.figures import plt, save


@dataclass(frozen=True)
class Landscape:
    """Gradient distances on a grid of offsets (rows: b, columns: a) around the true batch."""

    offsets: np.ndarray
    distance: np.ndarray
    batch_size: int
    model: str


def compute(
    scenario: Scenario, resolution: int = 41, radius: float = 1.0, chunk: int = 256
) -> Landscape:
    """Evaluate the matching loss of client 0's first-round batch on a ``resolution``² grid."""
    fed = scenario.federation
    spec = scenario.model
    model = build_model(spec, seed=scenario.seed)
    params = {k: v.detach() for k, v in model.named_parameters()}
    shard = load_shard(scenario.data, fed.clients, scenario.seed, 0)
    batch = torch.randperm(len(shard.labels), generator=seeded_generator(scenario.seed, 1, 0))
    inputs, labels = shard.inputs[batch[: fed.batch_size]], shard.labels[batch[: fed.batch_size]]

    def loss(weights: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return task_loss(spec, functional_call(model, weights, (images,)), labels)

    gradient = grad(loss)
    target = gradient(params, inputs)

    def distance(images: torch.Tensor) -> torch.Tensor:
        g = gradient(params, images)
        return sum(((g[k] - target[k]) ** 2).sum() for k in g)  # type: ignore[return-value]

    generator = torch.Generator().manual_seed(scenario.seed)
    directions, _ = torch.linalg.qr(torch.randn(inputs.numel(), 2, generator=generator))
    u, v = (directions[:, i].reshape(inputs.shape) for i in range(2))
    offsets = torch.linspace(-radius, radius, resolution)
    b, a = torch.meshgrid(offsets, offsets, indexing="ij")
    points = inputs + a.reshape(-1, 1, 1, 1, 1) * u + b.reshape(-1, 1, 1, 1, 1) * v
    values = torch.cat([vmap(distance)(part) for part in points.split(chunk)])
    return Landscape(
        offsets.numpy(), values.reshape(resolution, resolution).numpy(), fed.batch_size, spec.kind
    )


def render(landscape: Landscape, path: Path) -> Path:
    """Save the landscape as a log-scaled heat map with contour lines; the truth is at (0, 0)."""
    figure, axis = plt.subplots(figsize=(4.6, 3.8))
    log_distance = np.log10(landscape.distance + 1e-12)
    extent = (
        landscape.offsets[0],
        landscape.offsets[-1],
        landscape.offsets[0],
        landscape.offsets[-1],
    )
    image = axis.imshow(log_distance, origin="lower", extent=extent, cmap="magma")
    axis.contour(
        landscape.offsets,
        landscape.offsets,
        log_distance,
        levels=12,
        colors="white",
        linewidths=0.4,
    )
    axis.plot(0, 0, "c+", markersize=10)
    axis.set(
        xlabel="offset along u",
        ylabel="offset along v",
        title=f"log10 gradient distance ({landscape.model}, batch {landscape.batch_size})",
    )
    axis.title.set_fontsize(8)
    figure.colorbar(image, ax=axis)
    save(figure, path)
    np.savez_compressed(
        path.with_suffix(".npz"), offsets=landscape.offsets, distance=landscape.distance
    )
    return path
