"""Where tensors live: the device of the attacks and of the clients, chosen by scenario keys.

``attack.device`` and ``federation.device`` each take ``"auto"`` (a CUDA GPU where torch sees
one, else the CPU), ``"cpu"`` or ``"cuda"``. Nothing requires a GPU: ``"auto"`` falls back to
the CPU, and ``"cuda"`` on a machine without one is refused before any work starts
(:func:`check_device`). Everything that crosses a process or message boundary (updates,
reconstructions, truths) is moved back to the CPU, so records and messages do not depend on
the device; the numbers themselves may differ in the last bits between CPU and GPU kernels,
so reruns are bit-identical on the same device only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from simulator.core.fields import InputError

DeviceChoice = Literal["auto", "cpu", "cuda"]
CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class DeviceError(InputError):
    """A device key asks for hardware this machine does not have."""


def gpu_count() -> int:
    """CUDA GPUs torch can use here (0 on a CPU-only build or machine)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(key: str, choice: str) -> None:
    """Raise :class:`DeviceError` unless ``choice`` can be honoured on this machine."""
    if choice not in CHOICES:
        raise DeviceError(f"{key} = {choice!r} is not a device; allowed: {', '.join(CHOICES)}")
    if choice == "cuda" and gpu_count() == 0:
        raise DeviceError(
            f"{key} = 'cuda' but torch sees no CUDA GPU on this machine; allowed here: "
            "'auto' (uses the CPU) or 'cpu'"
        )


def resolve_device(choice: str) -> torch.device:
    """The torch device for a ``device`` key's value (``"cuda"`` assumed checked)."""
    if choice == "cpu" or (choice == "auto" and gpu_count() == 0):
        return torch.device("cpu")
    return torch.device("cuda")


def move(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A copy of a name -> tensor mapping on ``device`` (no copy where already there)."""
    return {name: tensor.to(device) for name, tensor in tensors.items()}
