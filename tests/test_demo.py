"""The demo: its pieces on tiny inputs, and `dalle-demo --fast` end to end."""

import dataclasses
import json
import math
import re
import runpy
from pathlib import Path

import pytest
import torch
from einops import rearrange
from PIL import Image

from dalle_pytorch import CLIP, DALLE, DiscreteVAE
from dalle_pytorch.cli import demo as demo_cli
from dalle_pytorch.cli.demo import build_parser, default_threads, format_report, main
from dalle_pytorch.data.shapes import (
    COLOURS,
    DEFAULT_SHAPES,
    NUM_PHRASINGS,
    ShapeAttributes,
    caption_for,
    evaluation_prompts,
)
from dalle_pytorch.demo.pipeline import (
    FAST_CONFIG,
    DemoConfig,
    build_word_tokenizer,
    caption_ids,
    generate_for_prompts,
    make_grid,
    resolve_device,
    run_demo,
)
from dalle_pytorch.demo.report import Stopwatch, build_report, grid_rows, write_grid_and_report
from dalle_pytorch.demo.training import encode_images, train_dalle, train_vae
from dalle_pytorch.training.settings import TrainingSettings, lr_factor_fn


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
    attributes = [ShapeAttributes("circle", "red", "big", "filled"), ShapeAttributes("star", "red", "big", "outline")]
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


def test_grid_rows_show_each_colour_held_out_and_seen():
    prompts = evaluation_prompts()
    samples = torch.rand(len(prompts), 10, 3, 8, 8)
    reconstructions = torch.rand(2, 12, 3, 8, 8)
    fidelity = {"seen": {"both_match": 0.5}, "heldout": {"both_match": 0.25}}
    rows = grid_rows(prompts, samples, fidelity, reconstructions)
    assert rows[0] == ("DALLE samples; colour and shape right: 50% seen pairs, 25% held out", None)
    assert rows[-3:-2] == [("VAE: ground truth and reconstruction", None)]
    assert [label for label, _ in rows[-2:]] == ["ground truth", "reconstruction"]
    assert torch.equal(rows[-2][1], reconstructions[0, :8]) and torch.equal(rows[-1][1], reconstructions[1, :8])
    by_caption = {p.caption: (index, p) for index, p in enumerate(prompts)}
    shown = []
    for label, images in rows[1:-3]:
        index, prompt = by_caption[label.removesuffix("  (held out)")]
        assert label.endswith("(held out)") == prompt.heldout
        assert torch.equal(images, samples[index, :8])
        shown.append(prompt)
    # per colour: its held-out pair, then a seen pair; together every shape appears
    assert [p.attributes.colour for p in shown] == [c for c in COLOURS for _ in range(2)]
    assert [p.heldout for p in shown] == [True, False] * len(COLOURS)
    assert {p.attributes.shape for p in shown} == set(DEFAULT_SHAPES)
    assert make_grid(rows).size[1] == 2 + 2 * 24 + (2 * len(COLOURS) + 2) * (16 + 2)
    with pytest.raises(ValueError, match="samples"):
        grid_rows(prompts[:-1], samples, fidelity, reconstructions)
    with pytest.raises(ValueError, match="reconstructions"):
        grid_rows(prompts, samples, fidelity, reconstructions[0])


def test_report_is_strict_json_and_checks_the_targets(tmp_path):
    stopwatch = Stopwatch()
    with stopwatch("data"):
        sum(range(1000))
    fidelity = {"seen": {"both_match": 0.8}, "heldout": {"both_match": float("nan")}}
    report = build_report(
        FAST_CONFIG, torch.device("cpu"), stopwatch, {"vae": 0.1}, 0.99, {"both_match": 0.9}, fidelity
    )
    assert list(report) == [
        "config", "device", "torch_threads", "seconds", "cpu_seconds", "final_losses", "shape_classifier_accuracy",
        "vae_reconstruction", "fidelity", "targets",
    ]  # fmt: skip
    assert DemoConfig(**report["config"]) == FAST_CONFIG and report["device"] == "cpu"
    assert list(report["seconds"]) == list(report["cpu_seconds"]) == ["data", "total"]
    assert 0.0 <= report["seconds"]["data"] <= report["seconds"]["total"]
    assert report["fidelity"]["heldout"]["both_match"] is None  # NaN -> null
    assert math.isnan(fidelity["heldout"]["both_match"])  # the input is left as it was
    json.dumps(report, allow_nan=False)
    assert report["targets"] == {"seen_both_match": 0.8, "heldout_both_match": 0.5, "met": False}
    fidelity["heldout"]["both_match"] = 0.5
    assert build_report(FAST_CONFIG, "cpu", stopwatch, {}, 1.0, {}, fidelity)["targets"]["met"] is True
    fidelity["seen"]["both_match"] = 0.79
    assert build_report(FAST_CONFIG, "cpu", stopwatch, {}, 1.0, {}, fidelity)["targets"]["met"] is False

    prompts = evaluation_prompts()
    written = write_grid_and_report(
        tmp_path, config=FAST_CONFIG, device="cpu", stopwatch=stopwatch, final_losses={"vae": 0.1},
        shape_classifier_accuracy=0.99, prompts=prompts, samples=torch.rand(len(prompts), 2, 3, 8, 8),
        fidelity=fidelity, vae_reconstruction={"both_match": 0.9}, reconstructions=torch.rand(2, 8, 3, 8, 8),
    )  # fmt: skip
    assert json.loads((tmp_path / "report.json").read_text()) == written
    assert Image.open(tmp_path / "grid.png").size[1] == 2 + 2 * 24 + 16 * (16 + 2)


def test_config_validation():
    with pytest.raises(ValueError, match="dalle_steps"):
        dataclasses.replace(FAST_CONFIG, dalle_steps=0)
    with pytest.raises(TypeError, match="vae_steps"):
        dataclasses.replace(FAST_CONFIG, vae_steps=1.5)
    with pytest.raises(ValueError, match="CLIP"):
        dataclasses.replace(FAST_CONFIG, clip_steps=0, candidates_per_sample=2)
    with pytest.raises(ValueError, match="null_cond_prob"):
        dataclasses.replace(FAST_CONFIG, null_cond_prob=0.0, cond_scale=3.0)
    with pytest.raises(ValueError, match="dalle2_decoder_text_drop_prob"):
        dataclasses.replace(FAST_CONFIG, dalle2_decoder_text_drop_prob=1.0)
    with pytest.raises(ValueError, match="precision must be one of"):
        dataclasses.replace(FAST_CONFIG, precision="fp8")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("toaster")


def test_decode_precisions_are_checked():
    assert dataclasses.replace(FAST_CONFIG, decode_precisions=["bf16", "int8"]).decode_precisions == ("bf16", "int8")
    for bad in (("fp16",), ("bf16", "bf16")):
        with pytest.raises(ValueError, match="decode_precisions must be distinct names out of"):
            dataclasses.replace(FAST_CONFIG, decode_precisions=bad)
    with pytest.raises(TypeError, match="tuple of names"):
        dataclasses.replace(FAST_CONFIG, decode_precisions="bf16")
    assert build_parser().parse_args(["--decode-precision", "fp32, int8"]).decode_precision == ("fp32", "int8")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--decode-precision", "fp8"])
    assert main(["--model", "dalle2", "--decode-precision", "bf16"]) == 2
    with pytest.raises(ValueError, match="decode_precisions are judged with model='dalle'"):
        run_demo(dataclasses.replace(FAST_CONFIG, decode_precisions=("bf16",)), model="both")


def test_cli_parses_step_overrides():
    args = build_parser().parse_args(["--fast", "--steps", "vae=5", "dalle=7", "--out-dir", "x"])
    assert dict(args.steps) == {"vae_steps": 5, "dalle_steps": 7} and args.out_dir == "x" and args.fast
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--steps", "gan=5"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--steps", "vae=-1"])
    assert build_parser().parse_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--precision", "fp64"])


def test_generation_does_not_depend_on_batch_size(tokenizer):
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8)
    dalle = DALLE(dim=32, vae=vae, num_text_tokens=tokenizer.vocab_size, text_seq_len=8, depth=1, heads=2, dim_head=16)
    prompts = evaluation_prompts(shapes=("circle", "star"), colours=("red", "orange"))[:2]
    config = dataclasses.replace(FAST_CONFIG, samples_per_prompt=3, cond_scale=2.0)
    whole = generate_for_prompts(dalle, tokenizer, prompts, config, progress=False)
    pieces = generate_for_prompts(dalle, tokenizer, prompts, config, batch_size=5, progress=False)
    assert whole.shape == (2, 3, 3, 16, 16)
    assert whole.min() >= 0.0 and whole.max() <= 1.0
    torch.testing.assert_close(whole, pieces)
    assert not torch.equal(whole[0, 0], whole[0, 1])  # samples of one prompt differ


def test_clip_reranking_keeps_the_best_scored_candidate(tokenizer):
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8)
    dalle = DALLE(dim=32, vae=vae, num_text_tokens=tokenizer.vocab_size, text_seq_len=8, depth=1, heads=2, dim_head=16)
    clip = CLIP(
        dim_text=16, dim_image=16, dim_latent=8, num_text_tokens=tokenizer.vocab_size, text_enc_depth=1,
        text_seq_len=8, text_heads=2, visual_enc_depth=1, visual_heads=2, visual_image_size=16, visual_patch_size=4,
    )  # fmt: skip
    prompts = evaluation_prompts(shapes=("circle", "star"), colours=("red", "orange"))[:2]
    config = dataclasses.replace(FAST_CONFIG, samples_per_prompt=2, candidates_per_sample=3, clip_steps=1)
    best = generate_for_prompts(dalle, tokenizer, prompts, config, clip=clip, progress=False)
    assert best.shape == (2, 2, 3, 16, 16)
    # the same seeds without reranking: every candidate, in the order (prompt, sample, candidate)
    every = generate_for_prompts(
        dalle, tokenizer, prompts, dataclasses.replace(config, samples_per_prompt=6, candidates_per_sample=1),
        progress=False,
    )  # fmt: skip
    text = tokenizer.tokenize([p.caption for p in prompts for _ in range(6)], 8)
    with torch.no_grad():
        scores = clip(text, rearrange(every, "p k c h w -> (p k) c h w")).view(2, 2, 3)
    chosen = rearrange(every, "p (k c) ch h w -> p k c ch h w", c=3)[
        torch.arange(2)[:, None], torch.arange(2)[None, :], scores.argmax(dim=-1)
    ]
    torch.testing.assert_close(best, chosen)
    with pytest.raises(ValueError, match="clip"):
        generate_for_prompts(dalle, tokenizer, prompts, config, clip=None, progress=False)


def test_demo_models_train_through_the_library_trainer(tmp_path):
    config = dataclasses.replace(
        FAST_CONFIG, image_size=16, vae_num_layers=2, vae_num_tokens=16, vae_hidden_dim=8, vae_codebook_dim=8,
        vae_steps=20, vae_batch_size=4, dalle_dim=16, dalle_depth=1, dalle_heads=2, dalle_steps=3,
        dalle_batch_size=4, clip_steps=0,
    )  # fmt: skip
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        vae, vae_loss = train_vae(images, config, progress=False, log_dir=tmp_path / name / "vae")
        codes = encode_images(vae, images)
        text = torch.randint(1, 9, (10, 3, 5), generator=torch.Generator().manual_seed(1))
        dalle, dalle_loss = train_dalle(vae, codes, text, 9, config, progress=False, log_dir=tmp_path / name / "dalle")
        runs.append((vae, dalle))
        assert math.isfinite(vae_loss) and math.isfinite(dalle_loss)
        assert not vae.training and not dalle.training
        assert not list((tmp_path / name).rglob("step-*"))  # trained in memory: no checkpoints
    # the Trainer's warm-up + cosine schedule from training/settings, as its metrics record it
    records = [json.loads(line) for line in (tmp_path / "a" / "vae" / "metrics.jsonl").read_text().splitlines()]
    schedule = TrainingSettings(output_dir=tmp_path, learning_rate=1.0, lr_schedule="cosine", warmup_steps=1)
    factor = lr_factor_fn(schedule, 20)
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert set(logged) == {10, 20}
    for step, lr in logged.items():
        assert lr == pytest.approx(config.vae_learning_rate * factor(step - 1))
    # reproducible: the same seeds give the same weights
    for first, second in zip(*runs):
        for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
            assert torch.equal(a, b), name
    # bf16 autocast: the same run in lower precision, close to fp32 but not the same
    torch.manual_seed(0)
    bf16_config = dataclasses.replace(config, precision="bf16")
    bf16_vae, bf16_loss = train_vae(images, bf16_config, progress=False, log_dir=tmp_path / "bf16" / "vae")
    assert math.isfinite(bf16_loss) and bf16_loss == pytest.approx(vae_loss, rel=0.1) and bf16_loss != vae_loss
    assert not torch.equal(bf16_vae.state_dict()["codebook.weight"], runs[0][0].state_dict()["codebook.weight"])


@pytest.mark.parametrize(
    ("torch_default", "cpu_count", "load", "expected"),
    [
        (2, 2, 0.1, 2),  # idle: torch's default
        (2, 2, 1.0, 1),  # another program holds one of the two cores
        (2, 2, 9.0, 1),  # heavily shared: never below one thread
        (8, 8, 3.2, 5),  # the idle cores, rounded
        (4, 16, 0.0, 4),  # never more than torch's default
        (2, None, 5.0, 2),  # unknown CPU count or load average: torch's default
        (2, 2, None, 2),
    ],
)
def test_default_threads_uses_at_most_the_idle_cores(torch_default, cpu_count, load, expected):
    assert default_threads(torch_default, cpu_count, load) == expected


def test_default_threads_rejects_a_bad_torch_default():
    with pytest.raises(ValueError, match="torch_default"):
        default_threads(0, 2, 0.0)


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("load", "argv", "expected"), [(9.0, [], 1), (0.0, [], 2), (9.0, ["--threads", "2"], 2)])
def test_demo_runs_with_the_chosen_threads_and_restores_them(monkeypatch, capsys, load, argv, expected):
    seen = []

    def fake_run_demo(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise _Stop

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(demo_cli, "run_demo", fake_run_demo)
        monkeypatch.setattr(demo_cli.os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(demo_cli.os, "cpu_count", lambda: 2)
        with pytest.raises(_Stop):
            main(["--fast", "--quiet", *argv])
        assert seen == [expected]
        assert torch.get_num_threads() == 2
        assert ("using 1 of 2 torch threads" in capsys.readouterr().out) == (expected == 1)
    finally:
        torch.set_num_threads(previous)


def _run_demo(tmp_path, extra, samples=FAST_CONFIG.samples_per_prompt):
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
    assert fidelity["seen"]["num_images"] == 28 * samples
    assert fidelity["heldout"]["num_images"] == 7 * samples
    assert len(fidelity["per_prompt"]) == 35
    assert "held-out pairs" in format_report(report)
    return report


@pytest.mark.filterwarnings("ignore:shape classifier reached only")
def test_demo_end_to_end_with_tiny_budget(tmp_path):
    # the whole --fast pipeline with a few steps of everything: the files, the report and the table; the
    # fidelity of a real --fast run is checked by the slow test below
    extra = ["--steps", "vae=10", "dalle=10", "classifier=10", "--samples", "1", "--train_images", "300",
             "--precision", "bf16", "--decode-precision", "fp32,bf16,int8"]  # fmt: skip
    report = _run_demo(tmp_path, extra, samples=1)
    assert report["config"]["precision"] == "bf16" and "bf16 training" in format_report(report)
    for group in ("seen", "heldout", "overall"):
        assert 0.0 <= report["fidelity"][group]["both_match"] <= report["fidelity"][group]["colour_match"] <= 1.0
    assert report["config"]["vae_steps"] == 10 and report["config"]["num_train_images"] == 300
    assert set(report["final_losses"]) == {"vae", "dalle"}
    assert report["fidelity"]["chance"]["both_match"] == pytest.approx(1 / 35)
    # every decoding precision generated and judged beside fp32 (the trained model's own samples)
    precisions = report["decode_precision"]["precisions"]
    assert list(precisions) == ["fp32", "bf16", "int8"] and report["config"]["decode_precisions"] == list(precisions)
    assert precisions["fp32"]["points_vs_fp32"] == {"seen": 0.0, "heldout": 0.0, "overall": 0.0}
    assert precisions["fp32"]["identical_to_fp32"] == 1.0
    groups = ("seen", "heldout", "overall")
    assert precisions["fp32"]["both_match"] == {group: report["fidelity"][group]["both_match"] for group in groups}
    for result in precisions.values():
        points = 100 * (result["both_match"]["overall"] - report["fidelity"]["overall"]["both_match"])
        assert result["points_vs_fp32"]["overall"] == pytest.approx(points)
        assert 0.0 <= result["identical_to_fp32"] <= 1.0 and result["generation_seconds"] >= 0
    noise = report["decode_precision"]["noise"]  # fp32 with other seeds: what sampling alone changes
    assert noise["identical_to_fp32"] < 1.0 and set(noise["points_vs_fp32"]) == set(groups)
    assert "generation_fp32_other_seeds" in report["seconds"] and "fp32, other seeds" in format_report(report)
    drops = [-r["points_vs_fp32"]["overall"] for r in precisions.values()]
    assert report["decode_precision"]["met"] == (max(drops) <= report["decode_precision"]["max_drop_points"])
    assert {"generation_bf16", "generation_int8"} <= set(report["seconds"])
    assert "decoding precision" in format_report(report) and "within 3 points of fp32" in format_report(report)


@pytest.mark.slow
@pytest.mark.timeout(900)  # about 2-3 minutes on 2 cores; the suite-wide 300 s limit is too tight for a slow machine
def test_fast_demo_end_to_end(tmp_path):
    report = _run_demo(tmp_path, [])
    chance = report["fidelity"]["chance"]["both_match"]  # 1/35
    assert report["shape_classifier_accuracy"] >= 0.98
    assert report["fidelity"]["seen"]["both_match"] > 10 * chance
    assert report["fidelity"]["heldout"]["both_match"] > 5 * chance


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _script_cells(source: str) -> list[str]:
    """The code cells of a percent-format script ('# %%' starts a cell)."""
    parts = re.split(r"^# %%(.*)$", source, flags=re.M)
    return [body.strip("\n") for marker, body in zip(parts[1::2], parts[2::2]) if "[markdown]" not in marker]


def test_walkthrough_notebook_holds_the_script_code():
    notebook = json.loads((EXAMPLES / "walkthrough.ipynb").read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4 and isinstance(notebook["metadata"], dict)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    code = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code == _script_cells((EXAMPLES / "walkthrough.py").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_walkthrough_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / "walkthrough.py"), run_name="__main__")
    assert Image.open(tmp_path / "outputs" / "walkthrough" / "walkthrough.png").size[0] > 300
