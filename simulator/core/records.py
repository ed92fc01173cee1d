"""The records a run writes to ``results.jsonl``: one typed record per kind, one meaning per field.

Each is a frozen dataclass whose :meth:`Record.to_dict` is the JSON object written (``kind``
first after the sweep ``point``); optional fields that do not apply are left out, not written
as null. :func:`read` turns a written object back into its typed record, so writers and readers
share one type. Attack records (the referee's scores) are built by :mod:`simulator.scoring` as
:class:`AttackRecord`, the per-image best of several attacks as :class:`BestRecord`.

The ``startup`` record names the format (:data:`FORMAT_VERSION`). Folders written before it
was named (format 1) still read: :func:`read` maps their keys to today's (an attack record's
``batch_size``, the trace's one ``gradient_distance`` key for every objective, the ``best``
that was an ``attack`` record whose attack was "best").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from simulator.core.objectives import Objective, objective_key

# 2: typed ``best`` records, ``true_images``/``generated``, the objective named in attack
# records and their traces. 1: before the startup record held a version.
FORMAT_VERSION = 2
FIRST_FORMAT = 1

# A field whose value None means "does not apply": left out of the written record.
OPTIONAL = {"optional": True}

RecordT = TypeVar("RecordT", bound="Record")


class RecordError(ValueError):
    """A results.jsonl object that is no record of a kind this version knows."""


@dataclass(frozen=True)
class Record:
    """A record of a run; subclasses set ``kind``.

    ``point`` is the sweep point the record belongs to (the engine sets it as it writes; a
    ``flwr run`` has no points and leaves it out).
    """

    kind: ClassVar[str] = ""
    point: int | None = field(default=None, kw_only=True, metadata=OPTIONAL)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.point is None else {"point": self.point}
        out["kind"] = self.kind
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "point" or (value is None and item.metadata.get("optional")):
                continue
            out[item.name] = value
        return out

    @classmethod
    def from_dict(cls: type[RecordT], values: Mapping[str, Any]) -> RecordT:
        """The record of a written object (without its ``kind``); RecordError on unknown or
        missing fields."""
        try:
            return cls(**values)
        except TypeError as error:
            raise RecordError(f"not a {cls.kind!r} record: {error}") from None


@dataclass(frozen=True)
class StartupRecord(Record):
    """The federation came up: how long client discovery took, and the records' format.

    ``plugins``: every plugin file that ran in the attack process or the clients, as
    ``{"path", "sha256"}`` (hashed by the process that scores, when the run started): the
    scores of a plugin attack are only as trustworthy as that code.
    """

    kind: ClassVar[str] = "startup"
    discovery_s: float
    format: int = FORMAT_VERSION
    plugins: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StartupRecord:
        return super().from_dict({"format": FIRST_FORMAT, **values})


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


@dataclass(frozen=True, kw_only=True)
class LeakageRecord(Record):
    """What every scoring of one update's images says: how much of it leaked, by which bar.

    ``psnr`` and ``ssim`` hold one value per image scored (PSNR capped at 100 dB);
    ``fraction_leaked`` the share of them at or above the leak threshold: ``leak_threshold_db``
    (PSNR) for one-to-one reconstructions, ``leak_threshold_ssim`` for candidate sets and
    class samples. ``true_images``: how many of the client's true images were scored.
    """

    round: int
    client: int
    status: str
    notes: str
    true_images: int | None = field(default=None, metadata=OPTIONAL)
    mean_psnr: float
    median_psnr: float
    mean_ssim: float
    fraction_leaked: float
    leak_threshold_db: float | None = field(default=None, metadata=OPTIONAL)
    leak_threshold_ssim: float | None = field(default=None, metadata=OPTIONAL)
    psnr: Sequence[float]
    ssim: Sequence[float]
    seconds: float | None


_ATTACK_HEAD = ("point", "kind", "round", "client", "attack", "status", "notes", "matching")


@dataclass(frozen=True, kw_only=True)
class AttackRecord(LeakageRecord):
    """One reconstruction scored against the truth of its update.

    ``matching``: how its images met the truth (:attr:`Reconstruction.matching`); network
    inversion's class samples ("training") count ``generated`` samples instead of
    ``true_images``. ``recovered``: how many images the attack returned. ``objective``: what
    the attack minimised (:attr:`Reconstruction.objective`); each ``trace`` row holds its
    ``iteration`` and the objective's value under the objective's key (``kkt_stationarity``),
    none for "none". ``psnr_curve``: (iteration, mean PSNR) of the snapshots.
    ``predicted_share``, ``recovered_60db`` and ``recovered_30db``: an active attack's
    guarantee and the shares of the batch it recovered at 60 and 30 dB.

    ``extra`` holds the figures particular to a matching, written beside the others;
    :mod:`simulator.scoring.score`'s docstring lists them (exact label counts, the paper's
    3x3-window SSIM ``*_paper`` fields, a truth-free selection's ``selected*``...).
    """

    kind: ClassVar[str] = "attack"
    attack: str
    matching: str
    objective: Objective
    generated: int | None = field(default=None, metadata=OPTIONAL)
    recovered: int
    label_accuracy: float | None
    iterations: int
    iterations_to_threshold: int | None
    seconds_to_threshold: float | None
    trace: Sequence[Mapping[str, float]]
    psnr_curve: Sequence[Sequence[float]]
    predicted_share: float | None = field(default=None, metadata=OPTIONAL)
    recovered_60db: float | None = field(default=None, metadata=OPTIONAL)
    recovered_30db: float | None = field(default=None, metadata=OPTIONAL)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        extra = out.pop("extra")
        head = {k: out.pop(k) for k in _ATTACK_HEAD if k in out}  # which update, which attack
        return {**head, **out, **extra}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AttackRecord:
        values = _upgrade_attack(values) if "batch_size" in values else values
        typed = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in values.items() if k not in typed}
        return super().from_dict(
            {**{k: v for k, v in values.items() if k in typed}, "extra": extra}
        )


@dataclass(frozen=True, kw_only=True)
class BestRecord(LeakageRecord):
    """The per-image best of several attacks' records of one update (``attack.also``).

    Per true image: the highest PSNR and SSIM any attack reached, ``leaked`` when any attack
    leaked it by its own bar (the leak thresholds are those of the attacks combined), and
    ``best_attack``, the attack of the highest PSNR. ``seconds`` is the attacks' total.
    """

    kind: ClassVar[str] = "best"
    attacks: Sequence[str]
    leaked: Sequence[bool]
    best_attack: Sequence[str]


@dataclass(frozen=True)
class PrivacyRecord(Record):
    """The (epsilon, delta) a DP defense spent, for the client that trained most, and the
    ceiling that puts on reconstruction (:mod:`simulator.scoring.dp_bound`).

    ``prior_baseline``: the upper confidence bound on the share of public targets the best
    update-free guess leaks (``prior_guess`` names it); ``reconstruction_bound``: the most
    any attack may leak of one target given that prior, from (epsilon, delta) and
    ``rdp_curve`` ((order, RDP epsilon) pairs) where the defense gives it. Left out where the
    run has no public data.
    """

    kind: ClassVar[str] = "privacy"
    epsilon: float
    delta: float
    client: int
    mean_epsilon: float
    prior_baseline: float | None = field(default=None, metadata=OPTIONAL)
    prior_guess: str | None = field(default=None, metadata=OPTIONAL)
    reconstruction_bound: float | None = field(default=None, metadata=OPTIONAL)
    rdp_curve: Sequence[Sequence[float]] | None = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class PointRecord(Record):
    """One sweep point's summary: the values it set, how it ended, its final accuracy.

    Written with each swept value as its own ``set:<key>`` field.
    """

    kind: ClassVar[str] = "point"
    point: int = field()  # required here (field(): not the base's default of None)
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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PointRecord:
        swept = {k[4:]: v for k, v in values.items() if k.startswith("set:")}
        rest = {k: v for k, v in values.items() if not k.startswith("set:")}
        return super().from_dict({**rest, "swept": swept})


@dataclass(frozen=True)
class NoteRecord(Record):
    """Something the run changed or found that the reader should know (``flwr run``
    setting the number of clients; a plugin file that changed during a run)."""

    kind: ClassVar[str] = "note"
    message: str


@dataclass(frozen=True)
class InterruptedRecord(Record):
    """A sweep point stopped by a signal before it ended; ``leaksim run --resume`` reruns it.

    ``round`` is the last round whose "round" record was written (0: none yet).
    """

    kind: ClassVar[str] = "interrupted"
    point: int = field()  # required here (field(): not the base's default of None)
    signal: str
    round: int


KINDS: dict[str, type[Record]] = {
    kind.kind: kind
    for kind in (
        StartupRecord, RoundRecord, FailureRecord, UpdateRecord, AttackErrorRecord,
        ManipulationRecord, AttackRecord, BestRecord, PrivacyRecord, PointRecord, NoteRecord,
        InterruptedRecord,
    )
}  # fmt: skip


def read(written: Mapping[str, Any]) -> Record:
    """The typed record of one object of results.jsonl (as :meth:`Record.to_dict` wrote it,
    or as format 1 did); RecordError when it is none."""
    values = dict(written)
    kind = values.pop("kind", None)
    if kind == AttackRecord.kind and values.get("attack") == "best" and "attacks" in values:
        return BestRecord.from_dict(_upgrade_best(values))  # format 1 wrote "best" as an attack
    if kind not in KINDS:
        raise RecordError(f"unknown record kind {kind!r}")
    return KINDS[kind].from_dict(values)


def of_kind(records: Sequence[Record], kind: type[RecordT]) -> list[RecordT]:
    """The records of one kind, in order."""
    return [r for r in records if isinstance(r, kind)]


# Format 1 named every attack's objective "gradient_distance"; these built-in attacks
# minimised something else (or nothing: the closed-form active attacks).
_FORMAT_1_OBJECTIVES = {
    "kkt": "kkt-stationarity",
    "inversion": "generator-loss",
    "subspace": "span-residual",
    "imprint": "none",
    "trap-weights": "none",
    "client-separation": "none",
}


def _upgrade_attack(values: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1 attack record's keys as today's."""
    old = dict(values)
    matching = old.setdefault("matching", "hungarian")
    count = old.pop("batch_size")
    old["generated" if matching == "training" else "true_images"] = count
    objective = _FORMAT_1_OBJECTIVES.get(str(old.get("attack")), "gradient-distance")
    old["objective"] = objective
    trace = []
    for row in old.get("trace") or []:
        row = dict(row)
        value = row.pop("gradient_distance", None)
        if objective != "none":
            row[objective_key(objective)] = value
        trace.append(row)
    old["trace"] = trace
    return old


# What format 1 wrote into a best record so that readers of attack records could take it.
_FORMAT_1_BEST_FILLERS = (
    "label_accuracy", "iterations_to_threshold", "seconds_to_threshold", "trace", "psnr_curve",
)  # fmt: skip


def _upgrade_best(values: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1 best record (an ``attack`` record whose attack is "best") as today's."""
    old = {k: v for k, v in values.items() if k not in _FORMAT_1_BEST_FILLERS and k != "attack"}
    old["true_images"] = old.pop("batch_size", None)
    return old
