"""Conditional transposed-convolution generator for network inversion.

The generator maps latent noise plus a target class to an image that a frozen classifier should
assign to that class. The class enters twice, because either path alone lets the generator
ignore it early in training (the latent noise dominates a single concatenated vector):

* a soft label vector ``softmax(sharpness * one_hot(y))`` concatenated to the latent noise
  before the first (fully-connected) layer -- the same vector is the KL target of the losses;
* class-indicator planes (``num_classes`` one-hot maps of the first feature map's size)
  concatenated to that feature map before the first transposed convolution.

Layout for an output ``(C, H, W)`` with ``H`` and ``W`` divisible by 4 (``w`` = ``width``)::

    [z, soft label] -> Linear -> 2w x H/4 x W/4 -> LeakyReLU -> concat class planes
      -> ConvTranspose(4, stride 2) -> w x H/2 x W/2 -> LeakyReLU
      -> ConvTranspose(4, stride 2) -> C x H x W   (pre-activation) -> sigmoid -> [0, 1]

No batch normalisation: outputs of one sample must not depend on the rest of its batch, so the
images reported after training equal those scored during training. Weights are drawn from an
explicit ``torch.Generator`` (never the global RNG), so a seed fixes the attack's result without
disturbing anyone else's random stream.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import skip_init


def soft_labels(labels: torch.Tensor, num_classes: int, sharpness: float) -> torch.Tensor:
    """Softmax of a scaled one-hot: ``softmax(sharpness * one_hot(y))``, (n,) -> (n, K).

    Sharpness 0 gives the uniform vector, large sharpness approaches the hard one-hot; the
    target class gets ``e^s / (e^s + K - 1)``.
    """
    one_hot = nn.functional.one_hot(labels, num_classes).float()
    return torch.softmax(sharpness * one_hot, dim=1)


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv initialisation, drawn from ``generator``.

    Weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)
    reduces to this bound), with fan_in as PyTorch computes it for each layer type.
    """
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d)):
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(child.weight)
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            with torch.no_grad():
                child.weight.copy_(
                    torch.rand(child.weight.shape, generator=generator) * 2 * bound - bound
                )
                if child.bias is not None:
                    child.bias.copy_(
                        torch.rand(child.bias.shape, generator=generator) * 2 * bound - bound
                    )


class ConditionalGenerator(nn.Module):
    """Latent noise + target class -> image in [0, 1] of shape ``out_shape``.

    ``sharpness`` sets the soft label vector of the first conditioning path. Pass ``generator``
    to make the initial weights reproducible (seed 0 when omitted).
    """

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        out_shape: tuple[int, int, int] = (1, 28, 28),
        width: int = 32,
        sharpness: float = 5.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        channels, height, width_px = out_shape
        if height % 4 or width_px % 4:
            raise ValueError(
                f"generator output height and width must be divisible by 4, got {out_shape}"
            )
        if latent_dim < 1 or num_classes < 2 or width < 1:
            raise ValueError(
                f"need latent_dim >= 1, num_classes >= 2, width >= 1; got {latent_dim}, "
                f"{num_classes}, {width}"
            )
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.out_shape = out_shape
        self.sharpness = sharpness
        self.base = (height // 4, width_px // 4)
        # skip_init: the layers are filled from `generator` below, not the global RNG.
        self.project = skip_init(
            nn.Linear, latent_dim + num_classes, 2 * width * math.prod(self.base)
        )
        self.up1 = skip_init(
            nn.ConvTranspose2d, 2 * width + num_classes, width, 4, stride=2, padding=1
        )
        self.up2 = skip_init(nn.ConvTranspose2d, width, channels, 4, stride=2, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self._width = width
        _init_(self, generator if generator is not None else torch.Generator().manual_seed(0))

    def pre_activation(self, latent: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Output before the sigmoid, (n, C, H, W): the pixel-range loss acts on it."""
        soft = soft_labels(labels, self.num_classes, self.sharpness).to(latent.dtype)
        hidden = self.act(self.project(torch.cat([latent, soft], dim=1)))
        hidden = hidden.view(-1, 2 * self._width, *self.base)
        planes = nn.functional.one_hot(labels, self.num_classes).to(latent.dtype)
        planes = planes[:, :, None, None].expand(-1, -1, *self.base)
        hidden = self.act(self.up1(torch.cat([hidden, planes], dim=1)))
        return self.up2(hidden)

    def forward(self, latent: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (n, C, H, W), for latent (n, latent_dim) and labels (n,)."""
        return torch.sigmoid(self.pre_activation(latent, labels))
