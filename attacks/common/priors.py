"""Image priors that regularise gradient inversion towards natural-looking images."""

from __future__ import annotations

import torch


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean |dx| + mean |dy| per leading index.

    ``images`` is (..., C, H, W); the result has the leading shape (``...``). This is the mean
    (not sum) form used by Inverting Gradients, so its scale does not depend on image size.
    For a batch of dummies per problem, pass (problems, n, C, H, W) flattened to
    (problems, n*C, H, W) to get one value per problem.
    """
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(-3, -2, -1))
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(-3, -2, -1))
    return dx + dy
