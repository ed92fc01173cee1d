"""Benchmark of the active attacks on MNIST, in process (no Ray), timed per update.

    python -m benchmarks.bench_active          # writes benchmarks/results/active.json

Each update is computed the way a client computes it: the malicious server's
``manipulate`` picks the model (public statistics: the MNIST test split), the client trains it
on private digits from the training split with the federation's own ``batch_gradient`` or
``local_train``, and the attack reads the observation; the scorer
(:func:`simulator.scoring.score.score`) pairs the reconstruction with the true batch. The
model is the quickstart's MLP 784-256-10 at its seeded initialisation. Every figure is a mean
over ``batches`` updates, each a fresh draw of digits.

Records:

* ``imprint``: k = 256 bins, n = 64 digits, FedSGD; ``predicted`` is ``(1 - 1/k)^(n-1)``.
* ``imprint_grid``: k in {64, 256, 1024} x n in {8, 64, 256}, with the paper's one-direction
  block (``one_direction_60db``) beside the default (directions by load).
* ``imprint_fedavg``: 64 digits per client, FedAvg with 1, 4 and 16 local steps (batch 64, 16,
  4; one epoch) and 2 epochs of 16 steps: how recovery falls with local steps.
* ``trap_weights``: n = 100 (and 32), FedSGD, the MLP's 256 first-layer neurons re-drawn;
  ``trap_weights_fedavg``: 32 digits per client, FedAvg with 1, 4 and 8 local steps.
* ``secagg``: 10 clients of batch 8, 128 bins each, FedSGD, each client's update quantized,
  weighted and summed exactly as Flower's SecAgg+ does (its own ``quantize`` and
  ``dequantize``, default parameters), and the client-separation attack on the aggregate;
  ``secagg_100``: 100 clients of batch 8 with 32 bins each (a 3,200-neuron block), 2 rounds;
  ``secagg_fedavg``: 10 clients of 16 digits, FedAvg with 1 and 4 local steps, 16 rounds.

Every record has ``images`` (true images attacked), ``recovered_60db`` and ``recovered_30db``
(shares at PSNR >= 60 / 30 dB), ``seconds`` (mean attack time per update) and ``batches``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from attacks.active.base import ActiveAttack, Plan, predicted_share
from attacks.active.imprint import Imprint, ImprintParams
from attacks.active.separation import ClientSeparation, SeparationParams
from attacks.active.trap_weights import TrapWeights, TrapWeightsParams
from simulator.core.config import DataConfig, FederationConfig
from simulator.core.models import SentModel, build_model, model_spec, model_with_weights
from simulator.core.protocol import Observation, PublicData, PublicMeta, Reconstruction, Truth
from simulator.data.shards import Shard, load_test_set, load_training_union
from simulator.federation.training import batch_gradient, local_train
from simulator.run.folder import write_atomic
from simulator.scoring.score import score

RESULTS = Path(__file__).parent / "results" / "active.json"
SPEC = model_spec("mlp", widths=(256,), input_shape=(1, 28, 28), num_classes=10)
Weights = dict[str, torch.Tensor]
ActiveT = TypeVar("ActiveT", bound=ActiveAttack)


@dataclass
class Data:
    """Private digits (the training split) and the server's public ones (the test split)."""

    private: Shard
    public: PublicData

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randperm(len(self.private.labels), generator=generator)[:size]
        return self.private.inputs[index], self.private.labels[index]


def load_data() -> Data:
    data = DataConfig(dataset="mnist")
    test = load_test_set(data)
    return Data(load_training_union(data, 1, 0), PublicData(test.inputs, test.labels))


def armed(attack: ActiveT, data: Data) -> ActiveT:
    """``attack`` holding the server's public data, as the malicious server hands it."""
    attack.public = data.public
    return attack


def plan(
    data: Data, clients: Sequence[int], samples: int, protocol: str = "fedsgd", secagg: bool = False
) -> Plan:
    weights = build_model(SPEC, seed=0).state_dict()
    federation = FederationConfig(protocol=protocol, batch_size=samples)  # type: ignore[arg-type]
    expected = dict.fromkeys(clients, samples)
    return Plan(1, tuple(clients), tuple(clients), SPEC, weights, federation, expected, secagg)


def fedsgd_update(offer: SentModel, images: torch.Tensor, labels: torch.Tensor) -> Weights:
    """The client's FedSGD update on the model it was sent."""
    model = model_with_weights(offer.spec, offer.weights)
    return batch_gradient(model, offer.spec, images, labels)


def observe(offer: SentModel, update: Weights, meta: PublicMeta, client: int = 0) -> Observation:
    return Observation(1, client, offer.spec, offer.weights, update, meta)


@dataclass
class Tally:
    """Scores summed over updates."""

    images: int = 0
    at_60: float = 0.0
    at_30: float = 0.0
    seconds: float = 0.0
    updates: int = 0
    labels: float = 0.0

    def add(self, reconstruction: Reconstruction, truth: Truth, seconds: float) -> None:
        record = score(reconstruction, truth).record
        # the active attacks state a bound, so their records hold the exact shares
        assert record.recovered_60db is not None and record.recovered_30db is not None
        count = int(truth.inputs.shape[0])
        self.images += count
        self.at_60 += record.recovered_60db * count
        self.at_30 += record.recovered_30db * count
        self.labels += (record.label_accuracy or 0.0) * count
        self.seconds += seconds
        self.updates += 1

    def record(self, **extra: Any) -> dict[str, Any]:
        return {
            **extra,
            "images": self.images,
            "recovered_60db": round(self.at_60 / self.images, 4),
            "recovered_30db": round(self.at_30 / self.images, 4),
            "seconds": round(self.seconds / self.updates, 4),
            "batches": self.updates,
        }


def attack_once(attack: ActiveAttack[Any], obs: Observation) -> tuple[Reconstruction, float]:
    start = time.perf_counter()
    reconstruction = attack.run([obs])[0]
    return reconstruction, time.perf_counter() - start


def fedsgd_tally(
    attack: Any, offer: Any, data: Data, samples: int, batches: int, generator: torch.Generator
) -> Tally:
    """``batches`` FedSGD batches computed on the manipulated model, each attacked and scored."""
    tally = Tally()
    for _ in range(batches):
        images, labels = data.batch(samples, generator)
        meta = PublicMeta("fedsgd", samples, 0.1, 1, samples)
        obs = observe(offer, fedsgd_update(offer, images, labels), meta)
        reconstruction, seconds = attack_once(attack, obs)
        tally.add(reconstruction, Truth(1, 0, images, labels), seconds)
    return tally


def imprint_point(
    data: Data, bins: int, samples: int, batches: int, directions: int = 0
) -> dict[str, Any]:
    attack = Imprint(ImprintParams(bins=bins, directions=directions))
    offer = armed(attack, data).manipulate(plan(data, [0], samples))[0]
    generator = torch.Generator().manual_seed(bins * 1000 + samples)
    tally = fedsgd_tally(attack, offer, data, samples, batches, generator)
    return tally.record(
        bins=bins, n=samples, predicted=round(predicted_share(bins, samples), 4),
        model_change=offer.change,
    )  # fmt: skip


def imprint_grid(data: Data, batches: int) -> list[dict[str, Any]]:
    rows = []
    for bins in (64, 256, 1024):
        for samples in (8, 64, 256):
            count = max(batches, 4096 // samples)  # small batches: more draws, same precision
            row = imprint_point(data, bins, samples, count)
            paper = imprint_point(data, bins, samples, count, directions=1)
            row["one_direction_60db"] = paper["recovered_60db"]
            rows.append(row)
            print(f"  imprint k={bins} n={samples}: {row}", flush=True)
    return rows


def imprint_fedavg(data: Data, batches: int) -> list[dict[str, Any]]:
    """64 digits per client; FedAvg with more and more local steps (lr 0.1)."""
    samples, rows = 64, []
    for batch, epochs in ((64, 1), (16, 1), (4, 1), (4, 2)):
        attack = Imprint(ImprintParams(bins=256))
        offer = armed(attack, data).manipulate(plan(data, [0], samples, "fedavg"))[0]
        generator = torch.Generator().manual_seed(batch * 10 + epochs)
        tally = Tally()
        for _ in range(batches):
            images, labels = data.batch(samples, generator)
            model = model_with_weights(offer.spec, offer.weights)
            shard = Shard(images, labels)
            local_train(model, offer.spec, shard, epochs, batch, 0.1, generator)
            update = {k: v.detach().clone() for k, v in model.state_dict().items()}
            meta = PublicMeta("fedavg", batch, 0.1, epochs, samples)
            reconstruction, seconds = attack_once(attack, observe(offer, update, meta))
            tally.add(reconstruction, Truth(1, 0, images, labels), seconds)
        steps = epochs * -(-samples // batch)
        row = tally.record(bins=256, n=samples, local_steps=steps, batch_size=batch)
        rows.append(row)
        print(f"  imprint FedAvg {steps} steps: {row}", flush=True)
    return rows


def trap_point(data: Data, samples: int, batches: int) -> dict[str, Any]:
    attack = TrapWeights(TrapWeightsParams())
    offer = armed(attack, data).manipulate(plan(data, [0], samples))[0]
    generator = torch.Generator().manual_seed(samples)
    tally = fedsgd_tally(attack, offer, data, samples, batches, generator)
    record = tally.record(n=samples, width=256, model_change=offer.change)
    record["label_accuracy"] = round(tally.labels / tally.images, 4)
    return record


def trap_fedavg(data: Data, batches: int) -> list[dict[str, Any]]:
    """32 digits per client; FedAvg with 1, 4 and 8 local steps (lr 0.1, one epoch)."""
    samples, rows = 32, []
    for batch in (32, 8, 4):
        attack = TrapWeights(TrapWeightsParams())
        offer = armed(attack, data).manipulate(plan(data, [0], samples, "fedavg"))[0]
        generator = torch.Generator().manual_seed(batch)
        tally = Tally()
        for _ in range(batches):
            images, labels = data.batch(samples, generator)
            model = model_with_weights(offer.spec, offer.weights)
            local_train(model, offer.spec, Shard(images, labels), 1, batch, 0.1, generator)
            update = {k: v.detach().clone() for k, v in model.state_dict().items()}
            meta = PublicMeta("fedavg", batch, 0.1, 1, samples)
            reconstruction, seconds = attack_once(attack, observe(offer, update, meta))
            tally.add(reconstruction, Truth(1, 0, images, labels), seconds)
        row = tally.record(n=samples, local_steps=-(-samples // batch), batch_size=batch)
        rows.append(row)
        print(f"  trap weights FedAvg {row['local_steps']} steps: {row}", flush=True)
    return rows


class SecAggSum:
    """The unmasked aggregate Flower's SecAgg+ hands the strategy (default parameters),
    accumulated one client at a time.

    Per client, as ``secaggplus_mod``: weight ``round(n / max_weight * Q) / Q``, clip to +-C,
    stochastic quantization to Q levels; the server sums and dequantizes as
    ``SecAggPlusWorkflow`` does. The masks cancel exactly, so they are left out.
    """

    clipping, levels = 8.0, 2**22

    def __init__(self, max_weight: float) -> None:
        self.max_weight = max_weight
        self.total: dict[str, np.ndarray] = {}
        self.q_total = 0
        self.count = 0

    def add(self, update: Weights, examples: int) -> None:
        q_ratio = round(examples / self.max_weight * self.levels)
        self.q_total += q_ratio
        self.count += 1
        names = list(update)
        arrays = [update[n].double().numpy() * (q_ratio / self.levels) for n in names]
        for name, part in zip(names, quantize(arrays, self.clipping, self.levels), strict=True):
            if name in self.total:
                self.total[name] += part
            else:
                self.total[name] = part.astype(np.int64)

    def view(self) -> Weights:
        names = list(self.total)
        mixed = dequantize([self.total[n] for n in names], self.clipping, self.levels)
        offset = -(self.count - 1) * self.clipping
        return {
            n: torch.from_numpy((vec + offset) * (self.levels / self.q_total)).float()
            for n, vec in zip(names, mixed, strict=True)
        }


def secagg_view(updates: Sequence[Weights], examples: Sequence[int], max_weight: float) -> Weights:
    """:class:`SecAggSum` of ``updates`` with their example counts."""
    total = SecAggSum(max_weight)
    for update, count in zip(updates, examples, strict=True):
        total.add(update, count)
    return total.view()


def mean_sent(offers: dict[int, SentModel]) -> Weights:
    """The mean of the weights sent (equal weights: every client reports one batch)."""
    first = next(iter(offers.values()))
    total = {k: v.double().clone() for k, v in first.weights.items()}
    for offer in list(offers.values())[1:]:
        for k, v in offer.weights.items():
            total[k] += v.double()
    return {k: (v / len(offers)).float() for k, v in total.items()}


def secagg_point(data: Data, clients: int, batch: int, bins: int, rounds: int) -> dict[str, Any]:
    attack = ClientSeparation(SeparationParams(bins=bins))
    ids = list(range(clients))
    offers = armed(attack, data).manipulate(plan(data, ids, batch, secagg=True))
    sent = mean_sent(offers)
    generator = torch.Generator().manual_seed(clients)
    np.random.seed(clients)  # SecAgg+'s stochastic rounding draws from numpy's generator
    tally = Tally()
    for _ in range(rounds):
        total, images, labels = SecAggSum(float(batch)), [], []
        for c in ids:
            batch_images, batch_labels = data.batch(batch, generator)
            total.add(fedsgd_update(offers[c], batch_images, batch_labels), batch)
            images.append(batch_images)
            labels.append(batch_labels)
        meta = PublicMeta("fedsgd", batch * clients, 0.1, 1, batch * clients)
        obs = Observation(1, -1, offers[0].spec, sent, total.view(), meta)
        reconstruction, seconds = attack_once(attack, obs)
        tally.add(reconstruction, Truth(1, -1, torch.cat(images), torch.cat(labels)), seconds)
    record = tally.record(clients=clients, batch_size=batch, bins_per_client=bins)
    record["predicted"] = round(predicted_share(bins, batch), 4)
    return record


def secagg_fedavg(data: Data, rounds: int) -> list[dict[str, Any]]:
    """10 clients of 16 digits under SecAgg+, FedAvg with 1 and 4 local steps (lr 0.1)."""
    clients, samples, rows = 10, 16, []
    for batch in (16, 4):
        attack = ClientSeparation(SeparationParams(bins=128))
        ids = list(range(clients))
        offers = armed(attack, data).manipulate(plan(data, ids, samples, "fedavg", secagg=True))
        sent = mean_sent(offers)
        generator = torch.Generator().manual_seed(batch)
        np.random.seed(batch)
        tally = Tally()
        for _ in range(rounds):
            total, images, labels = SecAggSum(float(samples)), [], []
            for c in ids:
                batch_images, batch_labels = data.batch(samples, generator)
                model = model_with_weights(offers[c].spec, offers[c].weights)
                shard = Shard(batch_images, batch_labels)
                local_train(model, offers[c].spec, shard, 1, batch, 0.1, generator)
                total.add({k: v.detach().clone() for k, v in model.state_dict().items()}, samples)
                images.append(batch_images)
                labels.append(batch_labels)
            meta = PublicMeta("fedavg", batch, 0.1, 1, samples * clients)
            obs = Observation(1, -1, offers[0].spec, sent, total.view(), meta)
            reconstruction, seconds = attack_once(attack, obs)
            truth = Truth(1, -1, torch.cat(images), torch.cat(labels))
            tally.add(reconstruction, truth, seconds)
        steps = -(-samples // batch)
        row = tally.record(clients=clients, n=samples, local_steps=steps, batch_size=batch)
        rows.append(row)
        print(f"  secagg FedAvg {steps} steps: {row}", flush=True)
    return rows


def timed(name: str, work: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = work()
    print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=32, help="updates per figure (>= 16)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = timed("data", load_data)
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, 1 thread",
        "model": "MLP 784-256-10 (quickstart), seeded initialisation",
    }
    results["imprint"] = timed("imprint", lambda: imprint_point(data, 256, 64, args.batches))
    print(f"  {results['imprint']}", flush=True)
    results["imprint_grid"] = timed("imprint grid", lambda: imprint_grid(data, args.batches))
    results["imprint_fedavg"] = timed("imprint fedavg", lambda: imprint_fedavg(data, args.batches))
    results["trap_weights"] = timed("trap weights", lambda: trap_point(data, 100, args.batches))
    print(f"  {results['trap_weights']}", flush=True)
    results["trap_weights_32"] = timed("trap 32", lambda: trap_point(data, 32, args.batches))
    results["trap_weights_fedavg"] = timed("trap fedavg", lambda: trap_fedavg(data, args.batches))
    results["secagg"] = timed("secagg", lambda: secagg_point(data, 10, 8, 128, args.batches))
    print(f"  {results['secagg']}", flush=True)
    results["secagg_100"] = timed("secagg 100", lambda: secagg_point(data, 100, 8, 32, 2))
    print(f"  {results['secagg_100']}", flush=True)
    results["secagg_fedavg"] = timed("secagg fedavg", lambda: secagg_fedavg(data, 16))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
