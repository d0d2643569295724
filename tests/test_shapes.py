"""Tests for the built-in synthetic shapes dataset."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dalle_pytorch.data.shapes import (
    ALL_SHAPES,
    COLOURS,
    DEFAULT_SHAPES,
    FILLS,
    NUM_PHRASINGS,
    SIZES,
    ShapeAttributes,
    ShapesDataset,
    caption_for,
    evaluation_prompts,
    heldout_pairs,
    render_shape,
    write_folder,
)

FILL_WORDS = {"filled": "filled", "outlined": "outline", "outline": "outline"}


def words(caption):
    return re.findall(r"[a-z]+", caption)


def test_same_seed_same_samples_in_any_order():
    a = ShapesDataset(20, seed=3)
    b = ShapesDataset(20, seed=3)
    for index in [7, 0, 19, 7, 3]:
        caption_a, image_a = a[index]
        caption_b, image_b = b[index]
        assert caption_a == caption_b
        assert torch.equal(image_a, image_b)
        assert a.attributes(index) == b.attributes(index)
    assert a[-1][0] == a[19][0]


def test_different_seed_different_samples():
    a = ShapesDataset(16, seed=0)
    b = ShapesDataset(16, seed=1)
    assert [a.attributes(i) for i in range(16)] != [b.attributes(i) for i in range(16)]
    assert not torch.equal(a[0][1], b[0][1]) or a[0][0] != b[0][0]


def test_captions_name_exactly_the_drawn_attributes():
    dataset = ShapesDataset(120, split="all", seed=5)
    phrasings_seen = set()
    for index in range(len(dataset)):
        caption, _, attributes = dataset.sample(index)
        said = words(caption)
        assert attributes.colour in said and attributes.shape in said
        assert not set(said) & (set(COLOURS) - {attributes.colour})
        assert not set(said) & (set(ALL_SHAPES) - {attributes.shape})
        assert not set(said) & (set(SIZES) - {attributes.size})
        assert all(FILL_WORDS[w] == attributes.fill for w in said if w in FILL_WORDS)
        phrasings_seen.add(caption.replace(attributes.colour, "C").replace(attributes.shape, "S"))
    assert len(phrasings_seen) > NUM_PHRASINGS  # several phrasings (times size/fill words) are in use


def test_caption_phrasings_and_articles():
    attributes = ShapeAttributes("triangle", "blue", "big", "filled")
    assert caption_for(attributes) == "a big filled blue triangle"
    assert caption_for(attributes, 0) == "a big blue triangle"
    assert caption_for(ShapeAttributes("circle", "orange", "small", "outline"), 2) == (
        "an orange circle, small and outlined"
    )
    assert caption_for(ShapeAttributes("star", "red", "small", "outline"), 3) == "the outline of a small red star"
    assert len({caption_for(attributes, k) for k in range(NUM_PHRASINGS)}) == NUM_PHRASINGS
    with pytest.raises(ValueError, match="phrasing"):
        caption_for(attributes, NUM_PHRASINGS)


def test_heldout_pairs_leave_every_colour_and_shape_in_training():
    held = heldout_pairs()
    assert len(held) == len(COLOURS)
    assert [colour for colour, _ in held] == list(COLOURS)
    assert held[0] == ("red", "circle") and held[1] == ("orange", "square")
    for shapes, colours in [(DEFAULT_SHAPES, tuple(COLOURS)), (ALL_SHAPES, ("red", "blue", "green")),
                            (("circle", "star"), tuple(COLOURS))]:  # fmt: skip
        held = set(heldout_pairs(shapes, colours))
        train = {(c, s) for c in colours for s in shapes} - held
        assert {c for c, _ in train} == set(colours)
        assert {s for _, s in train} == set(shapes)


def test_train_split_never_shows_heldout_pairs_and_shows_everything_else():
    dataset = ShapesDataset(600, split="train", seed=2)
    seen = [dataset.attributes(i) for i in range(len(dataset))]
    pairs = {(a.colour, a.shape) for a in seen}
    assert not pairs & set(heldout_pairs())
    assert pairs == {(c, s) for c in COLOURS for s in DEFAULT_SHAPES} - set(heldout_pairs())
    assert {a.size for a in seen} == set(SIZES) and {a.fill for a in seen} == set(FILLS)
    # each block of len(combinations) samples holds every combination exactly once
    block = len(dataset.combinations)
    assert block == 28 * 4
    assert len(set(seen[:block])) == block and len(set(seen[block : 2 * block])) == block


def test_heldout_split_shows_only_heldout_pairs():
    dataset = ShapesDataset(100, split="heldout", seed=2)
    pairs = {(dataset.attributes(i).colour, dataset.attributes(i).shape) for i in range(len(dataset))}
    assert pairs == set(heldout_pairs())


def test_shape_and_colour_subsets():
    dataset = ShapesDataset(40, split="all", shapes=("star", "hexagon"), colours=("red", "cyan"))
    assert {(a.colour, a.shape) for a in map(dataset.attributes, range(40))} == {
        (c, s) for c in ("red", "cyan") for s in ("star", "hexagon")
    }


def test_images_are_in_range_and_inside_the_frame():
    dataset = ShapesDataset(200, split="all", seed=9, shapes=ALL_SHAPES)
    for index in range(len(dataset)):
        _, image = dataset[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
        assert image.max() > 0.5  # something bright is drawn
        border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        assert torch.all(border == 0), f"sample {index} touches the border: {dataset.attributes(index)}"


def test_image_size_is_configurable():
    _, image = ShapesDataset(2, image_size=48)[1]
    assert image.shape == (3, 48, 48)


def test_rendering_follows_the_attributes():
    def foreground(attributes):
        return (render_shape(attributes).amax(dim=0) > 0.3).sum().item()

    for shape in ALL_SHAPES:
        big_filled = foreground(ShapeAttributes(shape, "green", "big", "filled"))
        assert big_filled > 1.8 * foreground(ShapeAttributes(shape, "green", "small", "filled"))
        # the middle of a big shape is coloured when filled and background when outlined
        assert render_shape(ShapeAttributes(shape, "green", "big", "filled"))[:, 16, 16].max() > 0.7
        assert render_shape(ShapeAttributes(shape, "green", "big", "outline"))[:, 16, 16].max() < 0.05
    # the inside of a filled shape is exactly the palette colour
    image = render_shape(ShapeAttributes("square", "purple", "big", "filled"))
    torch.testing.assert_close(image[:, 16, 16], torch.tensor(COLOURS["purple"]) / 255)


def test_render_offset_and_rotation_move_the_shape():
    attributes = ShapeAttributes("triangle", "yellow", "small", "filled")
    centred = render_shape(attributes)
    shifted = render_shape(attributes, offset=(4.0, 0.0))
    torch.testing.assert_close(shifted[:, :, 8:], centred[:, :, 4:-4], atol=1e-6, rtol=0)
    assert not torch.equal(render_shape(attributes, rotation=20.0), centred)


def test_dataloader_collates_captions_and_images():
    captions, images = next(iter(DataLoader(ShapesDataset(8), batch_size=4)))
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert images.shape == (4, 3, 32, 32)


def test_write_folder_writes_textimage_pairs(tmp_path):
    dataset = ShapesDataset(5, seed=4)
    folder = write_folder(dataset, tmp_path / "shapes")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{i:06d}.png" for i in range(5)] + [f"{i:06d}.txt" for i in range(5)]
    )
    for index in range(5):
        caption, image = dataset[index]
        assert (folder / f"{index:06d}.txt").read_text(encoding="utf-8").strip() == caption
        pixels = np.asarray(Image.open(folder / f"{index:06d}.png").convert("RGB"), dtype=np.float32) / 255
        torch.testing.assert_close(torch.from_numpy(pixels).permute(2, 0, 1), image, atol=0.5 / 255, rtol=0)


def test_evaluation_prompts_cover_every_pair():
    prompts = evaluation_prompts()
    assert len(prompts) == len(COLOURS) * len(DEFAULT_SHAPES)
    assert {(p.attributes.colour, p.attributes.shape) for p in prompts if p.heldout} == set(heldout_pairs())
    assert prompts[0].caption == "a big filled red circle" and prompts[0].heldout
    assert all(caption_for(p.attributes) == p.caption for p in prompts)
    heldout = evaluation_prompts(which="heldout", size="small", fill="outline")
    assert len(heldout) == len(COLOURS) and all(p.heldout for p in heldout)
    assert heldout[0].caption == "a small outlined red circle"
    assert not any(p.heldout for p in evaluation_prompts(which="seen"))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 4, "split": "test"}, ValueError, "split"),
        ({"num_samples": 4, "image_size": 4}, ValueError, "image_size"),
        ({"num_samples": 4, "seed": -1}, ValueError, "seed"),
        ({"num_samples": 4, "shapes": ("circle", "blob")}, ValueError, "shapes"),
        ({"num_samples": 4, "shapes": ("circle",)}, ValueError, "shapes"),
        ({"num_samples": 4, "colours": ("red", "red")}, ValueError, "colours"),
        ({"num_samples": 4, "position_jitter": 0.8}, ValueError, "position_jitter"),
    ],
)
def test_bad_dataset_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ShapesDataset(**kwargs)


def test_bad_indices_and_attributes():
    dataset = ShapesDataset(4)
    with pytest.raises(IndexError):
        dataset[4]
    with pytest.raises(TypeError, match="index"):
        dataset["0"]
    with pytest.raises(ValueError, match="colour"):
        render_shape(ShapeAttributes("circle", "pink", "big", "filled"))
    with pytest.raises(TypeError, match="attributes"):
        render_shape(("circle", "red", "big", "filled"))
    with pytest.raises(TypeError, match="ShapesDataset"):
        write_folder([("a red circle", torch.zeros(3, 8, 8))], "unused")
