"""The records a run writes to ``results.jsonl``: one typed record per kind, one meaning per field.

Each is a frozen dataclass whose :meth:`Record.to_dict` is the JSON object written (``kind``
first); optional fields that do not apply are left out, not written as null. Attack records
(the referee's scores) are built by :mod:`simulator.scoring` as :class:`AttackRecord`, whose
``scores`` are the scorer's named figures for that family of attack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

# A field whose value None means "does not apply": left out of the written record.
OPTIONAL = {"optional": True}


@dataclass(frozen=True)
class Record:
    """A record of a run; subclasses set ``kind``."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None and item.metadata.get("optional"):
                continue
            out[item.name] = value
        return out


@dataclass(frozen=True)
class StartupRecord(Record):
    """The federation came up: how long client discovery took."""

    kind: ClassVar[str] = "startup"
    discovery_s: float


@dataclass(frozen=True)
class RoundRecord(Record):
    """The global model tested after a round (round 0: the initial model)."""

    kind: ClassVar[str] = "round"
    round: int
    test_accuracy: float
    test_loss: float
    seconds: float | None = field(default=None, metadata=OPTIONAL)  # the round's wall time
    failures: int | None = field(default=None, metadata=OPTIONAL)  # failed client updates


@dataclass(frozen=True)
class FailureRecord(Record):
    """A sampled client that sent an error, or nothing in time."""

    kind: ClassVar[str] = "failure"
    round: int
    client: int
    reason: str


@dataclass(frozen=True)
class UpdateRecord(Record):
    """One update the server received (client -1: the aggregate under secure aggregation)."""

    kind: ClassVar[str] = "update"
    round: int
    client: int
    num_examples: int
    update_norm: float


@dataclass(frozen=True)
class AttackErrorRecord(Record):
    """An attack that raised; the federation went on."""

    kind: ClassVar[str] = "attack_error"
    round: int
    attack: str
    error: str


@dataclass(frozen=True)
class ManipulationRecord(Record):
    """A malicious server sent this client a manipulated model instead of the honest one.

    ``change`` says what differs (an added block, re-drawn weights); ``aggregated`` whether
    the client's reply joined aggregation (by default it does not).
    """

    kind: ClassVar[str] = "manipulation"
    round: int
    client: int
    attack: str
    change: str
    aggregated: bool


@dataclass(frozen=True)
class AttackRecord(Record):
    """One reconstruction scored against the truth of its update.

    ``scores`` are the scorer's figures, named by :mod:`simulator.scoring` (PSNR, SSIM, the
    leaked fraction, the trace...), whose set depends on how the attack's images are matched;
    :mod:`simulator.scoring.score`'s docstring lists the optional ones (exact shares, the
    paper's 3x3-window SSIM ``*_paper`` fields, a truth-free selection's ``selected*``).
    """

    kind: ClassVar[str] = "attack"
    round: int
    client: int
    attack: str
    status: str
    notes: str
    scores: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        identity = {k: v for k, v in super().to_dict().items() if k != "scores"}
        return {**identity, **self.scores}


@dataclass(frozen=True)
class PrivacyRecord(Record):
    """The (epsilon, delta) a training defense spent, for the client that trained most."""

    kind: ClassVar[str] = "privacy"
    epsilon: float
    delta: float
    client: int
    mean_epsilon: float


@dataclass(frozen=True)
class PointRecord(Record):
    """One sweep point's summary: the values it set, how it ended, its final accuracy."""

    kind: ClassVar[str] = "point"
    point: int
    swept: Mapping[str, Any]
    status: str
    rounds_completed: int
    defense: str
    strength: Any
    final_accuracy: float | None
    failed_updates: int
    seconds: float
    error: str | None = field(default=None, metadata=OPTIONAL)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        swept = out.pop("swept")
        head = {"kind": self.kind, "point": self.point}
        return {**head, **{f"set:{k}": v for k, v in swept.items()}, **out}


@dataclass(frozen=True)
class NoteRecord(Record):
    """Something the run changed that the reader should know (``flwr run`` only)."""

    kind: ClassVar[str] = "note"
    message: str


@dataclass(frozen=True)
class InterruptedRecord(Record):
    """A sweep point stopped by a signal before it ended; ``leaksim run --resume`` reruns it.

    ``round`` is the last round whose "round" record was written (0: none yet).
    """

    kind: ClassVar[str] = "interrupted"
    point: int
    signal: str
    round: int
