"""Quantization of the update to a lower precision, then back to its dtype (what is received).

- "fp16": a round trip through IEEE half precision (round to nearest even); values beyond the
  largest finite half (65504) saturate to it rather than become infinite.
- "int8": per-tensor symmetric quantization: scale = max|x| / 127, q = round(x / scale) in
  [-127, 127] (round half to even), received as q * scale. So at most 255 distinct values and at
  most 128 distinct magnitudes per tensor, and |error| <= scale / 2. A tensor of zeros stays zero.

Changes what the server observes (the dequantized values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from defenses.base import UpdateDefense, register_defense
from simulator.core.config import FederationConfig
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge

INT8_LEVELS = 127
FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class QuantizationParams:
    """Parameters of "quantization"."""

    precision: Literal["fp16", "int8"] = param(
        "int8", help="fp16 round trip, or per-tensor symmetric int8 (scale max|x|/127)"
    )


def fp16_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` rounded to half precision (saturating) and returned in its own dtype."""
    return tensor.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(tensor.dtype)


def int8_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` quantized to int8 levels with scale max|x|/127 and dequantized."""
    scale = tensor.abs().max() / INT8_LEVELS if tensor.numel() else tensor.new_zeros(())
    if scale == 0:
        return torch.zeros_like(tensor)
    levels = torch.round(tensor / scale).clamp(-INT8_LEVELS, INT8_LEVELS)
    return levels * scale


@register_defense("quantization", "Rounds the update to fp16, or to per-tensor symmetric int8.")
class Quantization(UpdateDefense):
    """Lossy quantization; changes the observation (the server sees the rounded values)."""

    Params = QuantizationParams
    params: QuantizationParams

    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Every tensor rounded (int8 scales are per tensor, hence one pass per tensor)."""
        round_trip = fp16_round_trip if self.params.precision == "fp16" else int8_round_trip
        return {name: round_trip(t) for name, t in update.items()}

    def known_to_server(
        self, federation: FederationConfig, shard_size: int = 0
    ) -> DefenseKnowledge:
        return DefenseKnowledge((self.name,), intervals=self.params.precision)
