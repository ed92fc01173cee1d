"""What a server knows of its clients' defenses, in the terms an attack can use.

The clients run the protocol the server hands out, so a defense's settings are public: a
server knows the std of the noise its clients add, that they prune or quantize their updates.
Each defense says what it does to the update (:meth:`defenses.base.Defense.known_to_server`);
each attack says how it uses that (:meth:`attacks.base.Attack.knowing`). A scenario runs every
attack that can use its point's defenses a second time, told them (``attack.adaptive``), under
the label :func:`knowing_label` makes, so that a defense is judged by the attack that knows it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Noise = Literal["none", "gaussian", "laplace"]
# The coordinate-wise defenses whose output bounds each true coordinate to a known interval
# (attacks.common.intervals computes those intervals).
KnownDefense = Literal["none", "pruning", "int8", "fp16"]
KNOWING = " knowing "  # between an attack's name and the defenses its adaptive twin was told


@dataclass(frozen=True)
class DefenseKnowledge:
    """The public settings of the defenses between a client's update and the server.

    ``noise``: the distribution of the independent noise added to every coordinate of the
    update the client sends, ``noise_scale`` its std (Gaussian) or scale b (Laplace).
    ``intervals``: the pruning or quantization the sent update went through last.
    ``defenses``: the names of the defenses this comes from. ``aggregated``: the server sees
    only an aggregate of several clients' updates (secure aggregation), which carries none of
    the per-update noise or intervals above as they are stated.
    """

    defenses: tuple[str, ...] = ()
    noise: Noise = "none"
    noise_scale: float = 0.0
    intervals: KnownDefense = "none"
    aggregated: bool = False

    @property
    def noise_std(self) -> float:
        """The noise's std per coordinate (Laplace: sqrt(2) b); 0 without noise."""
        if self.noise == "laplace":
            return math.sqrt(2.0) * self.noise_scale
        return self.noise_scale if self.noise == "gaussian" else 0.0

    def then(self, later: DefenseKnowledge) -> DefenseKnowledge:
        """This knowledge and that of a defense applied after it: the later noise or interval
        setting replaces an earlier one of the same sort (two noises: their stds combined, as
        Gaussian when either is)."""
        noise, scale = self.noise, self.noise_scale
        if later.noise != "none":
            if noise == "none":
                noise, scale = later.noise, later.noise_scale
            else:
                std = math.hypot(self.noise_std, later.noise_std)
                noise = "gaussian" if "gaussian" in (noise, later.noise) else "laplace"
                scale = std if noise == "gaussian" else std / math.sqrt(2.0)
        return DefenseKnowledge(
            defenses=self.defenses + later.defenses,
            noise=noise,
            noise_scale=scale,
            intervals=later.intervals if later.intervals != "none" else self.intervals,
        )


def combined(known: Iterable[DefenseKnowledge | None]) -> DefenseKnowledge | None:
    """The knowledge of defenses applied in this order (None where none says anything, or
    where the server sees only an aggregate: no twin is told a per-update setting then)."""
    found = [k for k in known if k is not None]
    if not found or any(k.aggregated for k in found):
        return None
    total = found[0]
    for later in found[1:]:
        total = total.then(later)
    return total


def knowing_label(attack: str, knowledge: DefenseKnowledge) -> str:
    """The label of ``attack``'s adaptive twin: ``"subspace knowing gaussian-noise"``."""
    return attack + KNOWING + "+".join(knowledge.defenses)


def is_adaptive(label: str) -> bool:
    """Whether an attack record's label is an adaptive twin's (:func:`knowing_label`)."""
    return KNOWING in label
