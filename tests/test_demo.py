"""The demo: its pieces on tiny inputs, and `dalle-demo --fast` end to end."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from dalle_pytorch import DALLE, DiscreteVAE
from dalle_pytorch.cli.demo import build_parser, format_report, main
from dalle_pytorch.demo import (
    FAST_CONFIG,
    DemoConfig,
    build_word_tokenizer,
    caption_ids,
    generate_for_prompts,
    make_grid,
    resolve_device,
)
from dalle_pytorch.shapes import NUM_PHRASINGS, ShapeAttributes, caption_for, evaluation_prompts


@pytest.fixture
def tokenizer(tmp_path):
    return build_word_tokenizer(["a big red circle", "an orange star, small and filled"], tmp_path / "tok.json")


def test_word_tokenizer_gives_one_id_per_word(tokenizer, tmp_path):
    ids = tokenizer.encode("a big red circle")
    assert len(ids) == 4 and 0 not in ids and len(set(ids)) == 4
    assert tokenizer.encode("A BIG red circle") == ids  # lower-cased
    assert len(tokenizer.encode("an orange star, small and filled")) == 7  # the comma is a word
    assert tokenizer.decode(ids) == "a big red circle"
    assert tokenizer.encode("a purple circle")[1] == 1  # unknown word -> [UNK]
    assert tokenizer.vocab_size == 2 + 11  # [PAD], [UNK] and 11 distinct words
    padded = tokenizer.tokenize(["a big red circle", "red"], context_length=6)
    assert torch.equal(padded[1], torch.tensor([tokenizer.encode("red")[0], 0, 0, 0, 0, 0]))
    assert (tmp_path / "tok.json").is_file()


def test_word_tokenizer_rejects_bad_captions(tmp_path):
    with pytest.raises(TypeError, match="captions"):
        build_word_tokenizer("a big red circle", tmp_path / "tok.json")
    with pytest.raises(ValueError, match="at least one word"):
        build_word_tokenizer(["", "  "], tmp_path / "tok.json")


def test_caption_ids_hold_every_phrasing(tokenizer):
    attributes = [ShapeAttributes("circle", "red", "big", "filled"), ShapeAttributes("star", "orange", "small", "filled")]
    ids = caption_ids(tokenizer, attributes, text_seq_len=9)
    assert ids.shape == (2, NUM_PHRASINGS, 9) and ids.dtype == torch.long
    for phrasing in range(NUM_PHRASINGS):
        expected = tokenizer.tokenize(caption_for(attributes[1], phrasing), 9)[0]
        assert torch.equal(ids[1, phrasing], expected)


def test_make_grid_size_and_pixels():
    images = torch.zeros(3, 3, 8, 8)
    images[1, 0] = 1.0  # the second tile of the first row is pure red
    grid = make_grid([("heading", None), ("a row", images), ("short", images[:1])], scale=2, gap=2)
    assert isinstance(grid, Image.Image)
    label_width = grid.width - 3 * (16 + 2) - 2
    assert grid.height == 2 + 24 + 2 * (16 + 2)
    assert grid.getpixel((label_width + 18 + 8, 2 + 24 + 8)) == (255, 0, 0)
    assert grid.getpixel((label_width + 8, 2 + 24 + 8)) == (0, 0, 0)
    with pytest.raises(ValueError, match="rows"):
        make_grid([])
    with pytest.raises(ValueError, match="one size"):
        make_grid([("a", torch.zeros(1, 3, 8, 8)), ("b", torch.zeros(1, 3, 4, 4))])


def test_config_validation():
    with pytest.raises(ValueError, match="dalle_steps"):
        dataclasses.replace(FAST_CONFIG, dalle_steps=0)
    with pytest.raises(TypeError, match="vae_steps"):
        dataclasses.replace(FAST_CONFIG, vae_steps=1.5)
    with pytest.raises(ValueError, match="CLIP"):
        dataclasses.replace(FAST_CONFIG, clip_steps=0, candidates_per_sample=2)
    with pytest.raises(ValueError, match="null_cond_prob"):
        dataclasses.replace(FAST_CONFIG, null_cond_prob=0.0, cond_scale=3.0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("toaster")


def test_cli_parses_step_overrides():
    args = build_parser().parse_args(["--fast", "--steps", "vae=5", "dalle=7", "--out-dir", "x"])
    assert dict(args.steps) == {"vae_steps": 5, "dalle_steps": 7} and args.out_dir == "x" and args.fast
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--steps", "gan=5"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--steps", "vae=-1"])


def test_generation_does_not_depend_on_batch_size(tokenizer):
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8)
    dalle = DALLE(dim=32, vae=vae, num_text_tokens=tokenizer.vocab_size, text_seq_len=8, depth=1, heads=2, dim_head=16)
    prompts = evaluation_prompts(shapes=("circle", "star"), colours=("red", "orange"))
    config = dataclasses.replace(FAST_CONFIG, samples_per_prompt=3, cond_scale=2.0)
    whole = generate_for_prompts(dalle, tokenizer, prompts, config, progress=False)
    pieces = generate_for_prompts(dalle, tokenizer, prompts, config, batch_size=5, progress=False)
    assert whole.shape == (4, 3, 3, 16, 16)
    assert 0.0 <= whole.min() and whole.max() <= 1.0
    torch.testing.assert_close(whole, pieces)
    assert not torch.equal(whole[0, 0], whole[0, 1])  # samples of one prompt differ


def _run_demo(tmp_path, extra):
    out_dir = tmp_path / "demo"
    rng_before = torch.get_rng_state()
    threads_before = torch.get_num_threads()
    assert main(["--fast", "--out_dir", str(out_dir), "--quiet", "--threads", "1", *extra]) == 0
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert torch.get_num_threads() == threads_before
    for name in ("grid.png", "report.json", "tokenizer.json", "vae/config.json", "dalle/config.json"):
        assert (out_dir / name).is_file(), name
    report = json.loads((out_dir / "report.json").read_text())
    assert Image.open(out_dir / "grid.png").size[0] > 300
    fidelity = report["fidelity"]
    assert fidelity["seen"]["num_images"] == 28 * FAST_CONFIG.samples_per_prompt
    assert fidelity["heldout"]["num_images"] == 7 * FAST_CONFIG.samples_per_prompt
    assert len(fidelity["per_prompt"]) == 35
    assert "held-out pairs" in format_report(report)
    return report


def test_fast_demo_end_to_end_with_fewer_steps(tmp_path):
    # the --fast pipeline with shortened training: checks the files and that the samples already follow
    # the prompt's colour far more often than chance (1/7)
    report = _run_demo(tmp_path, ["--steps", "vae=150", "dalle=150", "classifier=40", "--samples", "2"])
    assert report["fidelity"]["overall"]["colour_match"] > 0.5


@pytest.mark.slow
def test_fast_demo_end_to_end(tmp_path):
    report = _run_demo(tmp_path, [])
    chance = report["fidelity"]["chance"]["both_match"]  # 1/35
    assert report["shape_classifier_accuracy"] >= 0.95
    assert report["fidelity"]["seen"]["both_match"] > 10 * chance
    assert report["fidelity"]["heldout"]["both_match"] > 5 * chance
