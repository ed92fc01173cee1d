"""Network inversion: generator, loss terms, parameter validation, the attack and its scorer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import attacks.inversion.attack  # noqa: F401  (registers "inversion")
from attacks.inversion.attack import Inversion, InversionParams, classifier_confidence
from attacks.inversion.generator import ConditionalGenerator, soft_labels
from attacks.inversion.losses import LOSSES, FrozenClassifier, LossContext, margins
from simulator.core.models import ModelSpec, build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta, Reconstruction
from simulator.core.registry import ATTACKS, INVERSION_LOSSES
from simulator.data.datasets import load_split, to_tensor
from simulator.scoring.inversion import class_diversity, random_noise_baseline, score_inversion
from simulator.scoring.metrics import psnr, ssim

SPEC = model_spec(kind="mlp", widths=(100,))
TRAIN = 3000
# A small budget that still lifts the confidence far above chance (measured: ~0.9 mean).
FAST = {"steps": 150, "batch_size": 40, "samples_per_class": 4, "log_every": 50}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split("mnist", "train")
    return to_tensor(images[:TRAIN]), torch.from_numpy(labels[:TRAIN].copy())


@pytest.fixture(scope="module")
def weights(mnist: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MLP trained for a fraction of a second (about 90% test accuracy)."""
    torch.set_num_threads(1)
    images, labels = mnist
    model = build_model(SPEC, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows = torch.randint(0, images.shape[0], (64,), generator=order)
        loss = torch.nn.functional.cross_entropy(model(images[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _observation(weights: dict[str, torch.Tensor], protocol: str = "fedavg") -> Observation:
    update = (
        {k: v + 0.01 for k, v in weights.items()}
        if protocol == "fedavg"
        else {k: torch.zeros_like(v) for k, v in weights.items()}
    )
    meta = PublicMeta(protocol=protocol, batch_size=64, lr=0.1, local_epochs=1, num_examples=64)
    return Observation(3, 7, SPEC, weights, update, meta)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def result(weights: dict[str, torch.Tensor]) -> Reconstruction:
    torch.set_num_threads(1)
    return ATTACKS.create("inversion", FAST).run([_observation(weights)])[0]


# --- generator --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 20)])
def test_generator_output_shape_and_range(shape: tuple[int, int, int]) -> None:
    gen = ConditionalGenerator(8, 5, shape, width=4)
    labels = torch.tensor([0, 1, 4])
    with torch.no_grad():
        out = gen(torch.randn(3, 8), labels)
    assert out.shape == (3, *shape)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_generator_depends_on_class_and_seed_without_touching_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = ConditionalGenerator(8, 10, generator=torch.Generator().manual_seed(1))
    b = ConditionalGenerator(8, 10, generator=torch.Generator().manual_seed(1))
    c = ConditionalGenerator(8, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    z = torch.zeros(2, 8)
    assert torch.equal(a(z, torch.tensor([0, 1])), b(z, torch.tensor([0, 1])))
    assert not torch.equal(a(z, torch.tensor([0, 1])), c(z, torch.tensor([0, 1])))
    same_noise = a(z, torch.tensor([0, 1]))
    assert not torch.equal(same_noise[0], same_noise[1])  # the class alone changes the image


def test_generator_rejects_sizes_not_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        ConditionalGenerator(8, 10, (1, 30, 28))


def test_soft_labels_are_a_softmax_of_a_scaled_one_hot() -> None:
    soft = soft_labels(torch.tensor([2]), 4, sharpness=math.log(3.0))
    assert torch.allclose(soft, torch.tensor([[1 / 6, 1 / 6, 1 / 2, 1 / 6]]))


# --- loss terms --------------------------------------------------------------------------------


def _context(spec: ModelSpec, images: torch.Tensor, labels: torch.Tensor) -> LossContext:
    model = build_model(spec, seed=0)
    classifier = FrozenClassifier(spec, model.state_dict())
    logits, features = classifier(images)
    stream = torch.Generator().manual_seed(0)
    return LossContext(
        images=images,
        pre_activation=torch.logit(images.clamp(1e-4, 1 - 1e-4)),
        logits=logits,
        features=features,
        labels=labels,
        soft_labels=soft_labels(labels, spec.num_classes, 5.0),
        classifier=classifier,
        noise=lambda shape: torch.randn(shape, generator=stream),
        noise_std=0.1,
        range_bound=6.0,
        coefficients=torch.full(labels.shape, 1.0 / labels.numel()),
        theta=classifier.trainable_copy(),
    )


def test_every_loss_has_a_description_with_a_formula_and_a_weight_field() -> None:
    names = {f.name for f in dataclasses.fields(InversionParams)}
    for term, entry in ((t, INVERSION_LOSSES.entry(t).value) for t in LOSSES):
        assert f"weight_{term}" in names
        assert ":" in entry.description and "\n" not in entry.description


@pytest.mark.parametrize("kind", ["mlp", "lenet", "cnn"])
def test_every_loss_is_finite_and_differentiable_for_every_architecture(kind: str) -> None:
    images = torch.rand(4, 1, 28, 28, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])  # same-class pairs, or diversity has nothing to score
    specs = {
        "mlp": model_spec("mlp", widths=(16,)),
        "lenet": ModelSpec("lenet"),
        "cnn": model_spec("cnn", channels=(4, 4)),
    }
    ctx = _context(specs[kind], images, labels)
    assert ctx.features.shape[0] == 4 and ctx.features.dim() == 2
    for term, entry in ((t, INVERSION_LOSSES.entry(t).value) for t in LOSSES):
        value = entry.fn(ctx)
        assert value.shape == () and math.isfinite(float(value.detach())), term
        if term != "pixel_range":  # that one acts on the pre-activation, not the images
            (grad,) = torch.autograd.grad(value, images, retain_graph=True)
            assert float(grad.abs().sum()) > 0, term


def test_loss_terms_take_their_documented_values() -> None:
    labels = torch.tensor([0, 0, 1])
    same = torch.rand(1, 1, 28, 28).expand(3, -1, -1, -1).clone()
    ctx = _context(SPEC, same, labels)
    assert float(INVERSION_LOSSES.entry("diversity").value.fn(ctx)) == pytest.approx(1.0, abs=1e-5)
    flat = _context(SPEC, torch.ones(3, 1, 28, 28), labels)
    assert float(INVERSION_LOSSES.entry("total_variation").value.fn(flat)) == 0.0
    ctx.features = torch.eye(3)
    assert float(INVERSION_LOSSES.entry("orthogonality").value.fn(ctx)) == pytest.approx(0.0)
    ctx.features = torch.ones(3, 5)
    assert float(INVERSION_LOSSES.entry("orthogonality").value.fn(ctx)) == pytest.approx(1.0)
    ctx.logits = torch.tensor([[5.0, 0.0] + [0.0] * 8] * 3)
    ctx.soft_labels = torch.softmax(ctx.logits, 1)
    assert float(INVERSION_LOSSES.entry("kl").value.fn(ctx)) == pytest.approx(0.0, abs=1e-6)
    assert margins(ctx.logits, labels)[0] == pytest.approx(5.0 - math.log(9.0), abs=1e-5)


def test_kkt_term_matches_a_per_sample_reference() -> None:
    spec = model_spec(kind="mlp", widths=(6,), input_shape=(1, 4, 4), num_classes=3)
    images, labels = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    ctx = _context(spec, images, labels)
    ctx.coefficients = torch.softmax(torch.randn(5), 0)
    model = build_model(spec, seed=0)
    combined = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(5):  # the slow, obvious way: one backward pass per sample
        margin = margins(model(images[i : i + 1]), labels[i : i + 1]).sum()
        grads = torch.autograd.grad(margin, list(model.parameters()))
        combined = [c + ctx.coefficients[i] * g for c, g in zip(combined, grads, strict=True)]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    flat = torch.cat([c.flatten() for c in combined])
    expected = 1 - torch.nn.functional.cosine_similarity(theta, flat, dim=0)
    assert float(INVERSION_LOSSES.entry("kkt").value.fn(ctx).detach()) == pytest.approx(
        float(expected), abs=1e-5
    )


# --- parameters --------------------------------------------------------------------------------


def test_negative_weight_is_rejected_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"'weight_kl' = -0\.5 is out of range"):
        ATTACKS.create("inversion", {"weight_kl": -0.5})
    with pytest.raises(ValueError, match="weight_diversity"):
        InversionParams(weight_diversity=-1.0)


def test_all_zero_weights_are_rejected() -> None:
    zeros = {f"weight_{t}": 0.0 for t in LOSSES}
    with pytest.raises(ValueError, match="every loss weight is 0"):
        ATTACKS.create("inversion", zeros)


def test_client_target_needs_fedavg(weights: dict[str, torch.Tensor]) -> None:
    attack = ATTACKS.create("inversion", {**FAST, "steps": 1, "target": "client"})
    with pytest.raises(ValueError, match=r"target 'client'.*'fedsgd'"):
        attack.run([_observation(weights, "fedsgd")])
    rec = attack.run([_observation(weights, "fedavg")])[0]
    assert rec.images.shape == (40, 1, 28, 28)


def test_binary_models_are_rejected(weights: dict[str, torch.Tensor]) -> None:
    spec = ModelSpec(kind="binary-fc")
    model = build_model(spec, seed=0)
    obs = dataclasses.replace(
        _observation(weights), model=spec, global_weights=dict(model.state_dict())
    )
    with pytest.raises(ValueError, match="binary"):
        ATTACKS.create("inversion", {"steps": 1}).run([obs])


# --- the attack ----------------------------------------------------------------------------------


def test_attack_makes_the_classifier_confident(
    result: Reconstruction, weights: dict[str, torch.Tensor]
) -> None:
    assert result.images.shape == (40, 1, 28, 28) and result.attack == "inversion"
    assert float(result.images.min()) >= 0.0 and float(result.images.max()) <= 1.0
    assert result.labels is not None
    assert result.labels.tolist() == torch.arange(10).repeat_interleave(4).tolist()
    assert (result.round, result.client_id, result.status) == (3, 7, "budget")
    confidence = classifier_confidence(SPEC, weights, result.images, result.labels)
    assert float(confidence.mean()) > 0.5  # chance is 0.1
    first, last = result.trace[0], result.trace[-1]
    assert first["confidence"] < 0.3 and last["confidence"] == pytest.approx(
        float(confidence.mean()), abs=1e-5
    )
    assert last["confidence_min"] == pytest.approx(float(confidence.min()), abs=1e-5)
    assert result.objective_value == pytest.approx(last["generator_loss"])
    for record in result.trace:
        assert {"iteration", "generator_loss", "seconds", "confidence"} <= set(record)
        assert {f"loss_{t}" for t in LOSSES} <= set(record)
    assert "confidence mean" in result.notes


def test_generated_images_are_nearer_training_data_than_noise(
    result: Reconstruction, mnist: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = mnist
    assert result.labels is not None
    scores = score_inversion(result.images, result.labels, images, labels)
    noise = random_noise_baseline(result.labels, images, labels)
    assert scores["mean_nn_ssim"] > noise["mean_nn_ssim"] + 0.02


@pytest.mark.parametrize("term", list(LOSSES))
@pytest.mark.parametrize("switch", ["weight", "ablate"])
def test_each_term_can_be_switched_off(
    term: str, switch: str, weights: dict[str, torch.Tensor]
) -> None:
    off = {f"weight_{term}": 0.0} if switch == "weight" else {"ablate": term}
    params = {"steps": 2, "batch_size": 10, "samples_per_class": 1, **off}
    rec = ATTACKS.create("inversion", params).run([_observation(weights)])[0]
    assert all(f"loss_{term}" not in record for record in rec.trace)
    others = set(LOSSES) - {term}
    assert all({f"loss_{t}" for t in others} <= set(record) for record in rec.trace)
    assert math.isfinite(rec.objective_value) and rec.images.shape == (10, 1, 28, 28)
    assert rec.matching == "training"


def test_reruns_with_the_same_seed_are_identical(weights: dict[str, torch.Tensor]) -> None:
    params = {"steps": 5, "batch_size": 10, "samples_per_class": 2, "kkt_coefficients": "learned"}
    obs = _observation(weights)
    first = ATTACKS.create("inversion", params).run([obs])[0]
    torch.rand(3)  # the global RNG must not matter
    second = ATTACKS.create("inversion", params).run([obs])[0]
    other = ATTACKS.create("inversion", {**params, "seed": 1}).run([obs])[0]
    assert torch.equal(first.images, second.images)
    assert not torch.equal(first.images, other.images)


def test_stop_confidence_converges_early(weights: dict[str, torch.Tensor]) -> None:
    params = {**FAST, "steps": 400, "stop_confidence": 0.5, "snapshots": 2}
    rec = Inversion(InversionParams(**params)).run([_observation(weights)])[0]
    assert rec.status == "converged"
    assert rec.trace[-2]["confidence"] >= 0.5 and rec.trace[-2]["iteration"] < 400


# --- scoring -------------------------------------------------------------------------------------


def _slow_nearest(
    images: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor
) -> tuple[list[float], list[int]]:
    """Reference: SSIM of every image against every same-class training image, in loops."""
    best_ssim, best_index = [], []
    for image, label in zip(images, labels, strict=True):
        scores = [
            (float(ssim(image[None], train[j][None])), j)
            for j in range(train.shape[0])
            if train_labels[j] == label
        ]
        value, index = max(scores)
        best_ssim.append(value)
        best_index.append(index)
    return best_ssim, best_index


def test_scorer_matches_a_slow_reference() -> None:
    stream = torch.Generator().manual_seed(0)
    train = torch.rand(18, 1, 16, 16, generator=stream)
    train_labels = torch.arange(3).repeat(6)
    copies = (train[[0, 4, 8]] + 0.05 * torch.randn(3, 1, 16, 16, generator=stream)).clamp(0, 1)
    images = torch.cat([copies, torch.rand(3, 1, 16, 16, generator=stream)])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ref_ssim, ref_index = _slow_nearest(images, labels, train, train_labels)
    exact = score_inversion(images, labels, train, train_labels, top_k=2, shortlist=6)
    assert exact["nn_index"] == ref_index
    assert exact["nn_ssim"] == pytest.approx(ref_ssim, abs=1e-12)
    expected_psnr = psnr(images, train[torch.tensor(ref_index)]).tolist()
    assert exact["nn_psnr"] == pytest.approx(expected_psnr)
    assert exact["mean_nn_ssim"] == pytest.approx(sum(ref_ssim) / 6)
    assert exact["top_k_nn_ssim"] == pytest.approx(sum(sorted(ref_ssim)[-2:]) / 2)
    assert exact["above_threshold"] == sum(s >= 0.4 for s in ref_ssim) == 3
    assert exact["per_class"]["1"]["max_nn_ssim"] == pytest.approx(max(ref_ssim[1], ref_ssim[4]))
    # The default shortlist finds the obvious near-copies too.
    default = score_inversion(images, labels, train, train_labels)
    assert default["nn_index"][:3] == [0, 4, 8]


def test_class_diversity_and_missing_classes() -> None:
    image = torch.rand(1, 1, 16, 16)
    images = torch.cat([image, image * 0.5, torch.rand(1, 1, 16, 16)])
    diversity = class_diversity(images, torch.tensor([0, 0, 1]))
    assert diversity[0] == pytest.approx(0.0, abs=1e-9) and math.isnan(diversity[1])
    train = torch.rand(4, 1, 16, 16)
    scores = score_inversion(images, torch.tensor([0, 0, 5]), train, torch.tensor([0, 0, 1, 1]))
    assert scores["nn_index"][2] == -1 and math.isnan(scores["nn_ssim"][2])
    assert scores["count"] == 3 and scores["top_k"] == 2
