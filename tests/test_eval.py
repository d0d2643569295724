"""Tests for the fidelity evaluation of the shapes dataset: colour from pixels, shape from a classifier."""

import json
import math
import warnings

import pytest
import torch

from dalle_pytorch.data.shapes import (
    COLOURS,
    DEFAULT_SHAPES,
    ShapeAttributes,
    ShapePrompt,
    ShapesDataset,
    evaluation_prompts,
    render_shape,
)
from dalle_pytorch.demo.judge import (
    ShapeClassifier,
    degrade,
    dominant_colour,
    evaluate_fidelity,
    palette_hues,
    train_shape_classifier,
)

PALETTE = list(COLOURS)


def ground_truth(num_samples, split="all", seed=0):
    dataset = ShapesDataset(num_samples, split=split, seed=seed)
    samples = [dataset.sample(i) for i in range(num_samples)]
    images = torch.stack([image for _, image, _ in samples])
    return images, [attributes for _, _, attributes in samples]


def rendered_prompts(prompts, copies=2):
    """Ground-truth images for each prompt, slightly shifted and rotated, with the matching prompt list."""
    repeated = [p for p in prompts for _ in range(copies)]
    images = torch.stack([
        render_shape(p.attributes, 32, offset=(float(k % 3 - 1), float(k % 2)), rotation=float(4 * (k % 3)))
        for k, p in enumerate(repeated)
    ])  # fmt: skip
    return images, repeated


@pytest.fixture(scope="module")
def quick_classifier():
    """A classifier trained on a small budget (a few seconds); it may warn that it is below 98%."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        classifier, accuracy = train_shape_classifier(steps=60, num_train_images=500, num_test_images=300)
    return classifier, accuracy


# --------------------------------------------------------------------------------------------- colour


def test_palette_hues_are_far_apart():
    hues = palette_hues()
    assert hues.shape == (len(COLOURS),)
    gaps = (hues[:, None] - hues[None, :]).abs()
    gaps = torch.minimum(gaps, 360 - gaps) + 360 * torch.eye(len(hues))
    assert gaps.min() >= 25


def test_dominant_colour_on_ground_truth():
    images, attributes = ground_truth(350, seed=1)
    expected = torch.tensor([PALETTE.index(a.colour) for a in attributes])
    predicted = dominant_colour(images)
    assert predicted.dtype == torch.long and predicted.shape == (350,)
    assert (predicted == expected).float().mean() >= 0.99


def test_dominant_colour_survives_dimming_haze_and_noise():
    images, attributes = ground_truth(200, seed=2)
    expected = torch.tensor([PALETTE.index(a.colour) for a in attributes])
    assert torch.equal(dominant_colour(0.6 * images), expected)  # scaling keeps hue
    hazy = (images + torch.tensor([0.10, 0.05, 0.12]).view(1, 3, 1, 1)).clamp(0, 1)
    assert (dominant_colour(hazy) == expected).float().mean() >= 0.97
    degraded = degrade(images, torch.Generator().manual_seed(0))
    assert (dominant_colour(degraded) == expected).float().mean() >= 0.95


def test_dominant_colour_of_an_empty_image_is_minus_one_and_subsets_index_their_palette():
    assert torch.equal(dominant_colour(torch.zeros(2, 3, 16, 16)), torch.tensor([-1, -1]))
    assert torch.equal(dominant_colour(torch.full((1, 3, 16, 16), 0.5)), torch.tensor([-1]))
    blue = render_shape(ShapeAttributes("star", "blue", "big", "filled"))[None]
    assert dominant_colour(blue, colours=("green", "blue")).item() == 1


def test_dominant_colour_does_not_modify_its_input_and_rejects_bad_input():
    images, _ = ground_truth(4)
    before = images.clone()
    dominant_colour(images * 1.5)
    dominant_colour(images)
    assert torch.equal(images, before)
    with pytest.raises(ValueError, match=r"\(b, 3, h, w\)"):
        dominant_colour(images[0])
    with pytest.raises(TypeError, match="float"):
        dominant_colour((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="colours"):
        dominant_colour(images, colours=("red", "pink"))


# --------------------------------------------------------------------------------------------- shape


def test_classifier_shapes_and_errors():
    classifier = ShapeClassifier(("circle", "square", "star"), width=4)
    assert classifier(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    assert classifier(torch.rand(1, 3, 48, 40)).shape == (1, 3)
    prediction = classifier.predict(torch.rand(5, 3, 16, 16), batch_size=2)
    assert prediction.dtype == torch.long and prediction.shape == (5,)
    assert classifier.training  # predict restores the mode it found
    with pytest.raises(ValueError, match="shape_names"):
        ShapeClassifier(("circle",))
    with pytest.raises(ValueError, match=r"\(b, 3, h, w\)"):
        classifier(torch.rand(2, 1, 32, 32))


def test_classifier_training_is_deterministic_and_leaves_global_rng_alone():
    budget = dict(steps=2, batch_size=8, num_train_images=16, num_test_images=8)
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="98%"):
        first, accuracy_first = train_shape_classifier(**budget)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.warns(UserWarning, match="98%"):
        second, accuracy_second = train_shape_classifier(**budget)
    assert accuracy_first == accuracy_second
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="steps"):
        train_shape_classifier(steps=0)


def test_quick_classifier_is_well_above_chance(quick_classifier):
    classifier, accuracy = quick_classifier
    assert not classifier.training
    assert accuracy >= 0.7  # chance is 0.2
    images, attributes = ground_truth(200, split="heldout", seed=3)
    labels = torch.tensor([DEFAULT_SHAPES.index(a.shape) for a in attributes])
    assert (classifier.predict(images) == labels).float().mean() >= 0.7


def test_classifier_ignores_colour(quick_classifier):
    classifier, _ = quick_classifier
    predictions = torch.stack([
        classifier.predict(torch.stack([render_shape(ShapeAttributes(s, c, "big", "filled")) for s in DEFAULT_SHAPES]))
        for c in PALETTE
    ])  # fmt: skip
    assert torch.equal(predictions, predictions[:1].expand_as(predictions))


@pytest.mark.slow
def test_default_classifier_reaches_98_percent_on_heldout_ground_truth():
    classifier, accuracy = train_shape_classifier()
    assert accuracy >= 0.98
    images, attributes = ground_truth(500, split="heldout", seed=4)
    labels = torch.tensor([DEFAULT_SHAPES.index(a.shape) for a in attributes])
    assert (classifier.predict(images) == labels).float().mean() >= 0.98
    images, prompts = rendered_prompts(evaluation_prompts(size="small", fill="outline"))
    report = evaluate_fidelity(images, prompts, classifier)
    assert report["overall"]["both_match"] >= 0.98
    # the degraded images it was trained to tolerate are still judged right
    images, attributes = ground_truth(500, seed=5)
    labels = torch.tensor([DEFAULT_SHAPES.index(a.shape) for a in attributes])
    degraded = degrade(images, torch.Generator().manual_seed(1))
    assert (classifier.predict(degraded) == labels).float().mean() >= 0.95


# --------------------------------------------------------------------------------------------- fidelity


def test_fidelity_of_ground_truth_is_perfect(quick_classifier):
    classifier, _ = quick_classifier
    prompts = evaluation_prompts()
    images, repeated = rendered_prompts(prompts)
    report = evaluate_fidelity(images, repeated, classifier)
    json.dumps(report)  # serialisable as report.json
    assert report["overall"]["num_images"] == 2 * len(prompts)
    assert report["seen"]["num_images"] + report["heldout"]["num_images"] == 2 * len(prompts)
    assert report["heldout"]["num_images"] == 2 * len(COLOURS)
    assert report["overall"]["colour_match"] == 1.0
    assert report["overall"]["shape_match"] >= 0.9
    assert report["heldout"]["both_match"] >= 0.9 and report["seen"]["both_match"] >= 0.9
    assert [entry["prompt"] for entry in report["per_prompt"]] == [p.caption for p in prompts]
    first = report["per_prompt"][0]
    assert first["colour"] == "red" and first["shape"] == "circle" and first["heldout"]
    assert first["num_images"] == 2 and first["predicted_colours"] == ["red", "red"]
    assert report["chance"]["both_match"] == pytest.approx(1 / (len(COLOURS) * len(DEFAULT_SHAPES)))


def test_fidelity_of_noise_is_low(quick_classifier):
    classifier, _ = quick_classifier
    prompts = [p for p in evaluation_prompts() for _ in range(4)]
    noise = torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = evaluate_fidelity(noise, prompts, classifier)
    assert report["overall"]["colour_match"] <= 0.35
    assert report["overall"]["shape_match"] <= 0.45
    assert report["overall"]["both_match"] <= 0.12


def test_fidelity_counts_blank_images_as_misses(quick_classifier):
    classifier, _ = quick_classifier
    prompts = evaluation_prompts(which="seen")[:3]
    report = evaluate_fidelity(torch.zeros(3, 3, 32, 32), prompts, classifier)
    assert report["overall"] == {"num_images": 3, "colour_match": 0.0, "shape_match": 0.0, "both_match": 0.0}
    assert report["per_prompt"][0]["predicted_shapes"] == [None]
    assert report["heldout"]["num_images"] == 0 and math.isnan(report["heldout"]["both_match"])


def test_fidelity_rejects_bad_input(quick_classifier):
    classifier, _ = quick_classifier
    prompts = evaluation_prompts()[:2]
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="one prompt per image"):
        evaluate_fidelity(images[:1], prompts, classifier)
    with pytest.raises(TypeError, match="ShapePrompt"):
        evaluate_fidelity(images, ["a big filled red circle"] * 2, classifier)
    hexagon = ShapePrompt("a big filled red hexagon", ShapeAttributes("hexagon", "red", "big", "filled"), False)
    with pytest.raises(ValueError, match="unknown to the classifier"):
        evaluate_fidelity(images, [hexagon, hexagon], classifier)
    with pytest.raises(TypeError, match="ShapeClassifier"):
        evaluate_fidelity(images, prompts, lambda x: x)
