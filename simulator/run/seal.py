"""The sealed referee's scoring half: truths opened, reconstructions scored, records written.

It runs where the run's truth key is (:class:`simulator.federation.truth.TruthKey`): in the
supervising ``leaksim`` process, which takes each round's reconstructions from the worker's
pipe (:func:`to_wire`, :func:`from_wire`: JSON and ``np.save`` bytes, never a pickle), or in
the process that runs the points itself when a run has taps. For each round it reads the truth
of every observed update (the union of the participants' batches for an aggregate), scores
each attack's reconstructions, writes their "attack" records and the scenario's attack's
arrays, adds the "best" records of several attacks, calls the taps, and deletes the round's
truths. The attack process never holds the key, so it can neither read a truth nor change
what it is scored against; and the supervisor refuses "attack" and "best" records from it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulator.core.config import Scenario
from simulator.core.models import is_binary
from simulator.core.protocol import Reconstruction, Truth
from simulator.core.records import AttackErrorRecord, AttackRecord, Record
from simulator.data.shards import load_training_union
from simulator.federation.traffic import AGGREGATE_CLIENT_ID
from simulator.federation.truth import TruthKey, TruthStore
from simulator.run.folder import TRUTH_PREFIX, RunFolder
from simulator.run.referee import AttackedRound, RefereedRound, Tap
from simulator.scoring.best import best_of
from simulator.scoring.score import score_round

SaveAttack = Callable[[AttackRecord, Mapping[str, np.ndarray]], object]


def truth_folder(folder: RunFolder) -> Path:
    """A new truth folder for a run: inside its run folder, a random name, mode 0700."""
    return Path(tempfile.mkdtemp(prefix=TRUTH_PREFIX, dir=folder.path))


def point_store(root: Path, point: int) -> Path:
    """The folder of one point's truths inside the run's truth folder."""
    return root / f"point-{point}"


@dataclass
class Scorer:
    """Scores the rounds of a run's points against their sealed truths; see the module doc.

    ``scenarios`` maps each point's index to its scenario; ``root`` is the run's private truth
    folder (one ``point-<i>`` store per point); records go to ``emit``, tagged with their
    point, and the scenario's attack's arrays to ``save_attack``.
    """

    scenarios: Mapping[int, Scenario]
    key: TruthKey
    root: Path
    emit: Callable[[Record], None]
    save_attack: SaveAttack = lambda _r, _a: None
    taps: Sequence[Tap] = ()

    def store(self, point: int) -> TruthStore:
        return TruthStore(point_store(self.root, point), key=self.key)

    def take(self, point: int, attacked: AttackedRound) -> None:
        """Score one round of ``point``, then delete its truths. A round that cannot be scored
        (a reconstruction the scorer cannot read, a truth not sealed to this run's key) gets
        an "attack_error" record, and the run goes on."""
        store = self.store(point)
        reconstructions = tuple(r for rs in attacked.per_attack for r in rs)
        truths: tuple[Truth, ...] = ()
        try:
            if reconstructions or self.taps:
                truths = self._truths(store, attacked)
            scored = [self._score(point, rs, truths) for rs in attacked.per_attack]
            if len(scored) > 1:
                self._best(point, scored)
        except Exception as error:  # a bad reconstruction must not end the run it is part of
            names = sorted({r.attack for r in reconstructions}) or ["referee"]
            message = f"not scored: {type(error).__name__}: {error}"
            self.emit(AttackErrorRecord(attacked.round, ", ".join(names), message, point=point))
        finally:
            store.discard_round(attacked.round)
        if attacked.traffic is not None:
            for tap in self.taps:
                tap(RefereedRound(attacked.traffic, truths, reconstructions))

    def take_in_point(self, point: int) -> Callable[[AttackedRound], None]:
        """A referee's judge for ``point`` (in this process)."""
        return lambda attacked: self.take(point, attacked)

    def end_point(self, point: int) -> None:
        """Delete what is left of a point's truths (rounds nobody refereed)."""
        self.store(point).clear()

    def _truths(self, store: TruthStore, attacked: AttackedRound) -> tuple[Truth, ...]:
        """The truth of every observation whose clients wrote one (read after the attacks)."""
        found = []
        for client in attacked.observed:
            if client != AGGREGATE_CLIENT_ID:
                truth = store.get(attacked.round, client)
                if truth is not None:
                    found.append(truth)
                continue
            parts = [store.get(attacked.round, c) for c in attacked.participants]
            if parts and all(p is not None for p in parts):
                found.append(
                    Truth(
                        attacked.round,
                        AGGREGATE_CLIENT_ID,
                        torch.cat([p.inputs for p in parts if p is not None]),
                        torch.cat([p.labels for p in parts if p is not None]),
                    )
                )
        return tuple(found)

    def _score(
        self, point: int, reconstructions: Sequence[Reconstruction], truths: Sequence[Truth]
    ) -> list[AttackRecord]:
        """Score and record one attack's reconstructions; the first attack's arrays are kept
        (the figures show the scenario's attack; the others are compared by their scores)."""
        scenario = self.scenarios[point]
        attack = scenario.attack

        def training_set() -> tuple[torch.Tensor, torch.Tensor]:
            """The union of every client's shard, for scoring network inversion (not kept)."""
            union = load_training_union(scenario.data, scenario.federation.clients, scenario.seed)
            return union.inputs, union.labels

        records = []
        for scored in score_round(
            reconstructions,
            truths,
            attack.leak_threshold_db,
            is_binary(scenario.model),
            attack.leak_threshold_ssim,
            training_set,
        ):
            record = dataclasses.replace(scored.record, point=point)
            self.emit(record)
            if record.attack == attack.name:
                self.save_attack(record, scored.arrays())
            records.append(record)
        return records

    def _best(self, point: int, per_attack: Sequence[Sequence[AttackRecord]]) -> None:
        """For each update every attack scored, the per-image best of them."""
        by_update: dict[tuple[int, int], list[AttackRecord]] = {}
        for records in per_attack:
            for record in records:
                by_update.setdefault((record.round, record.client), []).append(record)
        for records in by_update.values():
            best = best_of(records)
            if best is not None:
                self.emit(dataclasses.replace(best, point=point))


# --- the worker's pipe: a round's reconstructions as JSON, tensors as np.save bytes ----------


def _tensor(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    buffer = io.BytesIO()
    np.save(buffer, tensor.detach().cpu().numpy(), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def _from_tensor(text: str | None) -> torch.Tensor | None:
    if text is None:
        return None
    array = np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)
    return torch.from_numpy(np.array(array))


def _reconstruction(reconstruction: Reconstruction) -> dict[str, Any]:
    return {
        "round": reconstruction.round,
        "client_id": reconstruction.client_id,
        "images": _tensor(reconstruction.images),
        "labels": _tensor(reconstruction.labels),
        "trace": [{k: _number(v) for k, v in row.items()} for row in reconstruction.trace],
        "snapshots": [[int(i), _tensor(images)] for i, images in reconstruction.snapshots],
        "status": reconstruction.status,
        "attack": reconstruction.attack,
        "notes": reconstruction.notes,
        "confident": _tensor(reconstruction.confident),
        "objective": reconstruction.objective,
        "objective_value": reconstruction.objective_value,
        "matching": reconstruction.matching,
        "predicted_share": reconstruction.predicted_share,
        "seconds": reconstruction.seconds,
    }


def _from_reconstruction(values: Mapping[str, Any]) -> Reconstruction:
    images = _from_tensor(values["images"])
    if images is None:
        raise ValueError("a reconstruction without images")
    return Reconstruction(
        round=int(values["round"]),
        client_id=int(values["client_id"]),
        images=images,
        labels=_from_tensor(values["labels"]),
        trace=[{str(k): _number(v) for k, v in row.items()} for row in values["trace"]],
        snapshots=[(int(i), _checked(_from_tensor(t))) for i, t in values["snapshots"]],
        status=values["status"],
        attack=str(values["attack"]),
        notes=str(values["notes"]),
        confident=_from_tensor(values["confident"]),
        objective=values["objective"],
        objective_value=float(values["objective_value"]),
        matching=values["matching"],
        predicted_share=_optional_float(values["predicted_share"]),
        seconds=float(values["seconds"]),
    )


def _number(value: Any) -> float:
    """A trace value as JSON keeps it: an int stays an int (records print it so)."""
    if isinstance(value, int):
        return value
    return float(value)


def _checked(tensor: torch.Tensor | None) -> torch.Tensor:
    if tensor is None:
        raise ValueError("a snapshot without images")
    return tensor


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def to_wire(point: int, attacked: AttackedRound) -> dict[str, Any]:
    """One round's reconstructions of ``point`` as the worker sends them (no traffic)."""
    return {
        "point": point,
        "round": attacked.round,
        "observed": list(attacked.observed),
        "participants": list(attacked.participants),
        "per_attack": [[_reconstruction(r) for r in rs] for rs in attacked.per_attack],
    }


def from_wire(values: Mapping[str, Any]) -> tuple[int, AttackedRound]:
    """(point, round) as :func:`to_wire` sent them; ValueError or KeyError if malformed."""
    attacked = AttackedRound(
        int(values["round"]),
        tuple(int(c) for c in values["observed"]),
        tuple(int(c) for c in values["participants"]),
        tuple(tuple(_from_reconstruction(r) for r in rs) for rs in values["per_attack"]),
    )
    return int(values["point"]), attacked
