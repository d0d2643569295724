"""End-to-end tests of the DALL-E 2 command-line tools on tiny models: each runs in-process with main([...]),
2 steps, and writes real files in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_clip
from PIL import Image
from safetensors.torch import load_file
from test_distributed import free_port

from dalle_pytorch.cli import dalle2_embed, dalle2_generate, train_decoder, train_prior
from dalle_pytorch.cli.common import write_args_json
from dalle_pytorch.cli.dalle2_options import tokenizer_spec_near
from dalle_pytorch.data.shapes import ShapesDataset, write_folder
from dalle_pytorch.diffusion.dalle2 import DALLE2
from dalle_pytorch.diffusion.decoder import Decoder
from dalle_pytorch.diffusion.prior import DiffusionPrior
from dalle_pytorch.text.tokenizer import tokenizer
from dalle_pytorch.training.run_logging import read_metrics
from dalle_pytorch.training.state import TRAINING_STATE_NAME

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TEXT_LEN = 12
COMMON = ["--no_progress", "--device", "cpu", "--log_every_n_steps", "1", "--batch_size", "2"]
PRIOR = ["--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8", "--timesteps", "10"]
# dropout, accumulation and 4 micro-batches per epoch: resuming at step 3 is mid-epoch and crosses an epoch
# (the cosine schedule depends on --max_steps, so both halves would need the same one)
EXACT = ["--ga_steps", "2", "--seed", "7", "--ema_decay", "0.9", "--save_every_n_steps", "3", "--lr_schedule",
         "exponential", "--lr_decay_every", "2", "--warmup_steps", "2", "--clip_grad_norm", "1.0"]  # fmt: skip
PRIOR_EXACT = ["--ff_dropout", "0.1", "--attn_dropout", "0.1", *EXACT]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """A tiny CLIP saved as a model folder, 8 shapes images with captions, and their embeddings."""
    root = tmp_path_factory.mktemp("dalle2_cli")
    clip = root / "clip"
    make_clip(num_text_tokens=tokenizer.vocab_size, text_seq_len=TEXT_LEN).save_pretrained(clip)
    data = write_folder(ShapesDataset(8, image_size=16), root / "data")
    embeddings = root / "embeddings"
    dalle2_embed.main(["--clip_path", str(clip), "--image_folder", str(data), "--output_dir", str(embeddings),
                       "--truncate_captions", "--text_encodings", "--device", "cpu", "--shard_size", "5"])  # fmt: skip
    return SimpleNamespace(root=root, clip=clip, data=data, embeddings=embeddings)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder and its child model folders (not the moving average `ema/`)."""
    tensors = {}
    for file in folder.rglob("model.safetensors"):
        part = file.parent.relative_to(folder)
        if part.parts[:1] != ("ema",):
            tensors.update({f"{part}/{key}": value for key, value in load_file(str(file)).items()})
    assert tensors, f"no weights in {folder}"
    return tensors


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(output_dir) if "loss" in record}


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("module", [train_prior, train_decoder, dalle2_generate])
def test_every_flag_has_help_and_the_dashed_spelling(module, capsys):
    for action in module.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            for spelling in action.option_strings:
                assert spelling.replace("_", "-") in action.option_strings, spelling
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and module.PROG in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ prior


def prior_args(env: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    return ["--embeddings", str(env.embeddings), "--clip_path", str(env.clip), *PRIOR, *COMMON,
            "--output_dir", str(out), *extra]  # fmt: skip


def test_train_prior_from_embeddings_and_from_a_folder(env, tmp_path):
    out = tmp_path / "prior"
    train_prior.main(prior_args(env, out, "--max_steps", "2", "--save_every_n_steps", "2", "--ema_decay", "0.9"))
    checkpoint = out / "step-00000002"
    prior = DiffusionPrior.from_pretrained(checkpoint)
    assert prior.clip is not None and prior.condition_on_text_encodings  # the embeddings hold text encodings
    ema = DiffusionPrior.from_pretrained(checkpoint / "ema")
    assert any(not torch.equal(a, b) for a, b in zip(prior.parameters(), ema.parameters()))
    assert sorted(losses(out)) == [1, 2] and json.loads((out / "args.json").read_text())["tool"] == "dalle2-train-prior"
    embed = ema.sample(["a red square"], num_samples_per_batch=1, sample_steps=2)
    assert embed.shape == (1, 16)

    # the same from images through the CLIP, with the model flags from a JSON config and dashed flags
    config = tmp_path / "prior.json"
    config.write_text(json.dumps({"dim": 16, "depth": 1, "heads": 2, "dim-head": 8, "timesteps": 10}))
    folder_out = tmp_path / "prior_folder"
    train_prior.main(["--image-text-folder", str(env.data), "--clip-path", str(env.clip), "--config", str(config),
                      "--truncate-captions", *COMMON, "--output-dir", str(folder_out), "--max-steps", "2",
                      "--save-every-n-steps", "2"])  # fmt: skip
    prior = DiffusionPrior.from_pretrained(folder_out / "step-00000002")
    assert prior.net.config["dim"] == 16 and prior.net.config["depth"] == 1


def test_train_prior_without_clip_or_text_encodings(env, tmp_path):
    out = tmp_path / "prior"
    train_prior.main(["--embeddings", str(env.embeddings), *PRIOR, *COMMON, "--output_dir", str(out),
                      "--max_steps", "2", "--save_every_n_steps", "2", "--no_text_encodings"])  # fmt: skip
    prior = DiffusionPrior.from_pretrained(out / "step-00000002")
    assert prior.clip is None and not prior.condition_on_text_encodings


def test_prior_resume_is_exact(env, tmp_path):
    reference, halves = tmp_path / "reference", tmp_path / "halves"
    train_prior.main(prior_args(env, reference, *PRIOR_EXACT, "--max_steps", "6"))
    train_prior.main(prior_args(env, halves, *PRIOR_EXACT, "--max_steps", "3"))
    train_prior.main(prior_args(env, halves, *PRIOR_EXACT, "--max_steps", "6", "--resume"))
    for sub in ("", "ema"):
        assert_same_weights(halves / "step-00000006" / sub, reference / "step-00000006" / sub)
    assert losses(halves) == losses(reference) and sorted(losses(reference)) == list(range(1, 7))
    a = torch.load(halves / "step-00000006" / TRAINING_STATE_NAME, weights_only=True)["optimizer"]["state"]
    b = torch.load(reference / "step-00000006" / TRAINING_STATE_NAME, weights_only=True)["optimizer"]["state"]
    for key in b:
        assert torch.equal(a[key]["exp_avg_sq"], b[key]["exp_avg_sq"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--embeddings or --image_text_folder"),
        (["--image_text_folder", "x"], "needs --clip_path"),
        (["--embeddings", "nowhere"], "holds no index.json"),
        (["--embeddings", "x", "--config", "missing.json"], "--config: no such file"),
    ],
)
def test_train_prior_bad_input_gives_a_one_line_error(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_prior.main([*extra, "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


# ------------------------------------------------------------------------------------------ decoder

DECODER = ["--image_sizes", "8,16", "--dim", "8", "--dim_mults", "1,2", "--resnet_groups", "4", "--attn_heads", "2",
           "--attn_dim_head", "8", "--timesteps", "10", "--truncate_captions"]  # fmt: skip


def decoder_args(env: SimpleNamespace, out: Path, unet: int, *extra: str) -> list[str]:
    return ["--unet_number", str(unet), "--image_text_folder", str(env.data), *DECODER, *COMMON,
            "--output_dir", str(out), *extra]  # fmt: skip


def unet_weights(folder: Path, number: int) -> dict[str, torch.Tensor]:
    prefix = f"unets.{number - 1}."
    return {key: value for key, value in weights(folder).items() if key.startswith(f"./{prefix}")}


def test_train_decoder_unet_1_then_unet_2_leaves_the_other_untouched(env, tmp_path):
    first, second = tmp_path / "unet1", tmp_path / "unet2"
    train_decoder.main(decoder_args(env, first, 1, "--clip_path", str(env.clip), "--max_steps", "2",
                                    "--save_every_n_steps", "2", "--ema_decay", "0.9"))  # fmt: skip
    trained = first / "step-00000002"
    decoder = Decoder.from_pretrained(trained)
    assert decoder.image_sizes == (8, 16) and decoder.clip is not None and (trained / "ema").is_dir()
    assert sorted(losses(first)) == [1, 2]

    # unet 2 from the first run's decoder, with the image embeddings read from disk instead of the CLIP
    train_decoder.main(decoder_args(env, second, 2, "--decoder_path", str(first), "--embeddings",
                                    str(env.embeddings), "--max_steps", "2", "--save_every_n_steps", "2"))  # fmt: skip
    after = second / "step-00000002"
    for number, same in ((1, True), (2, False)):
        before_unet, after_unet = unet_weights(trained, number), unet_weights(after, number)
        assert before_unet and before_unet.keys() == after_unet.keys()
        identical = all(torch.equal(before_unet[key], after_unet[key]) for key in before_unet)
        assert identical == same, number
    clip_before, clip_after = weights(trained / "clip"), weights(after / "clip")
    assert all(torch.equal(clip_before[key], clip_after[key]) for key in clip_before)
    images = Decoder.from_pretrained(after).sample(torch.nn.functional.normalize(torch.randn(2, 16), dim=-1),
                                                   sample_steps=2)  # fmt: skip
    assert images.shape == (2, 3, 16, 16)


def test_decoder_resume_is_exact(env, tmp_path):
    reference, halves = tmp_path / "reference", tmp_path / "halves"
    source = ["--clip_path", str(env.clip), "--dropout", "0.1", *EXACT]
    train_decoder.main(decoder_args(env, reference, 1, *source, "--max_steps", "6"))
    train_decoder.main(decoder_args(env, halves, 1, *source, "--max_steps", "3"))
    train_decoder.main(decoder_args(env, halves, 1, *source, "--max_steps", "6", "--resume"))
    for sub in ("", "ema"):
        assert_same_weights(halves / "step-00000006" / sub, reference / "step-00000006" / sub)
    assert losses(halves) == losses(reference) and sorted(losses(reference)) == list(range(1, 7))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--unet_number", "1", "--image_text_folder", "x"], "--clip_path (a new decoder) or --decoder_path"),
        (["--unet_number", "3", "--image_text_folder", "DATA", "--clip_path", "CLIP"], "unet_number must be"),
        (["--unet_number", "1", "--image_text_folder", "DATA", "--clip_path", "CLIP", "--dim", "8,a"], "--dim"),
        (
            ["--unet_number", "1", "--image_text_folder", "DATA", "--clip_path", "CLIP", "--embeddings", "DATA"],
            "index.json",
        ),
    ],
)
def test_train_decoder_bad_input_gives_a_one_line_error(env, tmp_path, capsys, extra, message):
    extra = [str(env.data) if e == "DATA" else str(env.clip) if e == "CLIP" else e for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        train_decoder.main([*extra, *DECODER, "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ generate


@pytest.fixture(scope="module")
def trained(env) -> SimpleNamespace:
    """A prior and a 2-U-Net decoder (U-Net 1 trained), 2 steps each with a moving average."""
    prior, decoder = env.root / "trained_prior", env.root / "trained_decoder"
    steps = ["--max_steps", "2", "--save_every_n_steps", "2", "--ema_decay", "0.9"]
    train_prior.main(prior_args(env, prior, *steps))
    train_decoder.main(decoder_args(env, decoder, 1, "--clip_path", str(env.clip), *steps))
    return SimpleNamespace(prior=prior, decoder=decoder)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


SAMPLING = ["--sample_steps", "2", "--prior_sample_steps", "2", "--device", "cpu"]


def test_generate_from_prompts_writes_grids_and_metadata(trained, tmp_path):
    models = ["--prior_path", str(trained.prior), "--decoder_path", str(trained.decoder)]
    text = ["--text", "a red square|a blue circle", "--num_images", "3", "--cond_scale", "2", "--prior_cond_scale",
            "1.5", "--seed", "5", *SAMPLING]  # fmt: skip
    folders = dalle2_generate.run([*models, *text, "--batch_size", "2", "--outputs_dir", str(tmp_path / "a")])
    assert [folder.name for folder in folders] == ["a_red_square", "a_blue_circle"]
    for folder in folders:
        metadata = json.loads((folder / "metadata.json").read_text())
        assert metadata["prompt"] in ("a red square", "a blue circle") and metadata["settings"]["cond_scale"] == 2.0
        assert [entry["seed"] for entry in metadata["images"]] == [5, 6, 7]
        assert all(read_png(folder / f"{i}.png").shape == (16, 16, 3) for i in range(3))
        assert (folder / "grid.png").is_file()
    # the images do not depend on --batch_size, and the moving average is what samples
    again = dalle2_generate.run([*models, *text, "--batch_size", "3", "--outputs_dir", str(tmp_path / "b")])
    raw = dalle2_generate.run([*models, *text, "--no_ema", "--outputs_dir", str(tmp_path / "c")])
    for first, second, third in zip(folders, again, raw):
        assert all(np.array_equal(read_png(first / f"{i}.png"), read_png(second / f"{i}.png")) for i in range(3))
        assert not all(np.array_equal(read_png(first / f"{i}.png"), read_png(third / f"{i}.png")) for i in range(3))


def test_generate_variations_and_inpainting(env, trained, tmp_path):
    source = sorted(env.data.glob("*.png"))[0]
    original = read_png(source)
    assert original.shape == (16, 16, 3)
    [folder] = dalle2_generate.run(["--decoder_path", str(trained.decoder), "--variations_of", str(source),
                                    "--num_images", "2", "--outputs_dir", str(tmp_path), *SAMPLING])  # fmt: skip
    assert folder.name == f"variations_{source.stem}"
    assert read_png(folder / "1.png").shape == (16, 16, 3)

    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255  # generate the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inpaint = ["--inpaint", str(source), "--mask", str(tmp_path / "mask.png"), "--text", "a red square"]
    models = ["--prior_path", str(trained.prior), "--decoder_path", str(trained.decoder)]
    [folder] = dalle2_generate.run([*models, *inpaint, "--num_images", "2", "--outputs_dir", str(tmp_path), *SAMPLING])
    for i in range(2):
        painted = read_png(folder / f"{i}.png")
        assert painted.shape == (16, 16, 3)
        assert np.array_equal(painted[:, 8:], original[:, 8:])  # the kept half exactly as given
    assert json.loads((folder / "metadata.json").read_text())["mode"] == "inpaint"


def test_generate_from_a_dalle2_folder(trained, tmp_path):
    prior = DiffusionPrior.from_pretrained(trained.prior / "step-00000002" / "ema")
    decoder = Decoder.from_pretrained(trained.decoder / "step-00000002" / "ema")
    DALLE2(prior=prior, decoder=decoder).save_pretrained(tmp_path / "dalle2")
    text = ["--text", "a red square", "--num_images", "1", *SAMPLING]
    [folder] = dalle2_generate.run(
        ["--dalle2_path", str(tmp_path / "dalle2"), *text, "--outputs_dir", str(tmp_path / "a")]
    )
    [same] = dalle2_generate.run(["--prior_path", str(trained.prior), "--decoder_path", str(trained.decoder), *text,
                                  "--outputs_dir", str(tmp_path / "b")])  # fmt: skip
    assert np.array_equal(read_png(folder / "0.png"), read_png(same / "0.png"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text", "x"], "give --decoder_path"),
        (["--decoder_path", "D", "--text", "x"], "prompts need a prior"),
        (["--decoder_path", "D"], "nothing to draw"),
        (["--decoder_path", "D", "--inpaint", "a.png"], "--inpaint and --mask go together"),
        (["--decoder_path", "D", "--variations_of", "a.png", "--cond_scale", "0.5"], "--cond_scale must be >= 1"),
        (["--decoder_path", "D", "--variations_of", "missing.png"], "missing.png"),
        (["--decoder_path", "nowhere", "--variations_of", "a.png"], "--decoder_path"),
    ],
)
def test_generate_bad_input_gives_a_one_line_error(trained, tmp_path, capsys, extra, message):
    extra = [str(trained.decoder) if e == "D" else e for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        dalle2_generate.main([*extra, "--outputs_dir", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ torchrun

DDP_DRIVER = textwrap.dedent("""
    import os, sys
    import torch
    from dalle_pytorch.cli import train_decoder
    torch.set_num_threads(1)
    result = train_decoder.run(sys.argv[2:])
    torch.save({"history": result.history, "state": result.model.state_dict(),
                "checkpoints": [str(path) for path in result.checkpoints]},
               os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
""")


def test_two_processes_train_decoder_unet_2_and_leave_unet_1_alone(env, trained, tmp_path):
    driver, results, out = tmp_path / "driver.py", tmp_path / "results", tmp_path / "unet2"
    driver.write_text(DDP_DRIVER)
    results.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver), str(results),
        *decoder_args(env, out, 2, "--decoder_path", str(trained.decoder), "--max_steps", "2",
                      "--save_every_n_steps", "2", "--log_sample_ids", "--ema_decay", "0.9"),
    ]  # fmt: skip
    # the processes import this checkout's library, as the test does
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]

    ranks = [torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, tensor in ranks[0]["state"].items():  # DDP keeps the ranks equal
        assert torch.equal(tensor, ranks[1]["state"][key]), key
    for mine, other in zip(ranks[0]["history"], ranks[1]["history"]):
        assert mine["local_loss"] != other["local_loss"] and not set(mine["sample_ids"]) & set(other["sample_ids"])
    assert ranks[1]["checkpoints"] == [] and [Path(p).name for p in ranks[0]["checkpoints"]] == ["step-00000002"]
    before = unet_weights(trained.decoder / "step-00000002", 1)
    after = unet_weights(out / "step-00000002", 1)
    assert before and all(torch.equal(before[key], after[key]) for key in before)


def test_resuming_another_unet_is_refused(env, trained, capsys):
    before = sorted(path.name for path in trained.decoder.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        train_decoder.main(decoder_args(env, trained.decoder, 2, "--resume", "--max_steps", "4"))
    assert exit_info.value.code == 2
    assert "trained U-Net 1, not --unet_number 2" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(path.name for path in trained.decoder.iterdir()) == before


def test_the_tokenizer_of_a_moving_average_is_its_training_runs(tmp_path):
    run = tmp_path / "run"
    (run / "step-00000002" / "ema").mkdir(parents=True)
    spec = {"kind": "hug", "path": str(tmp_path / "tokenizer.json")}
    write_args_json(run, "dalle2-train-decoder", SimpleNamespace(x=1), tokenizer=spec)
    args = dalle2_generate.build_parser().parse_args(["--decoder_path", str(run)])
    assert tokenizer_spec_near(args, run / "step-00000002" / "ema") == spec
    assert tokenizer_spec_near(args, run / "step-00000002") == spec


def test_run_folders_and_model_kinds_are_checked(env, trained, tmp_path, capsys):
    def error_of(main, argv):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    before = sorted(path.name for path in trained.prior.iterdir())
    # a new run into a folder holding a run is refused (and leaves it alone)
    assert "already holds a dalle2-train-prior run" in error_of(train_prior.main, prior_args(env, trained.prior))
    assert sorted(path.name for path in trained.prior.iterdir()) == before
    # a prior where a decoder belongs
    message = error_of(train_decoder.main, decoder_args(env, tmp_path / "d", 1, "--decoder_path", str(trained.prior)))
    assert "holds a DiffusionPrior, not a Decoder" in message
    models = ["--prior_path", str(trained.prior), "--decoder_path", str(trained.decoder), "--device", "cpu"]
    message = error_of(dalle2_generate.main, [*models, "--text", "x", "--outputs_dir", str(trained.decoder)])
    assert "holds a dalle2-train-decoder run" in message


def test_guidance_needs_a_model_trained_with_dropped_conditions(env, tmp_path, capsys):
    out = tmp_path / "decoder"
    train_decoder.main(decoder_args(env, out, 1, "--clip_path", str(env.clip), "--image_cond_drop_prob", "0",
                                    "--max_steps", "1", "--save_every_n_steps", "1"))  # fmt: skip
    image = str(sorted(env.data.glob("*.png"))[0])
    with pytest.raises(SystemExit):
        dalle2_generate.main(["--decoder_path", str(out), "--variations_of", image, "--cond_scale", "2",
                              "--outputs_dir", str(tmp_path / "o"), "--device", "cpu"])  # fmt: skip
    assert "needs a decoder trained with --image_cond_drop_prob > 0" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_of_both_models(env, tmp_path, precision):
    steps = ["--max_steps", "1", "--save_every_n_steps", "1", "--precision", precision]
    train_prior.main(prior_args(env, tmp_path / "prior", *steps))
    train_decoder.main(decoder_args(env, tmp_path / "decoder", 2, "--clip_path", str(env.clip), *steps))
    assert (tmp_path / "prior" / "step-00000001" / TRAINING_STATE_NAME).is_file()
    assert (tmp_path / "decoder" / "step-00000001" / TRAINING_STATE_NAME).is_file()
    assert np.isfinite(list(losses(tmp_path / "decoder").values())).all()


def test_nan_losses_are_skipped_then_stop_the_run(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Decoder, "loss", lambda self, pred, target: (pred - target).sum() * float("nan"))
    out = tmp_path / "decoder"
    with pytest.raises(SystemExit) as exit_info:
        train_decoder.main(decoder_args(env, out, 1, "--clip_path", str(env.clip), "--max_steps", "5",
                                        "--max_nan_steps", "2"))  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "NaN/inf for 2 steps in a row" in err


def test_decoder_from_a_json_config(env, tmp_path):
    config = tmp_path / "decoder.json"
    config.write_text(json.dumps({"image-sizes": [8, 16], "dim": 8, "dim_mults": [1, 2], "resnet_groups": 4,
                                  "attn_heads": 2, "attn_dim_head": 8, "timesteps": 10}))  # fmt: skip
    out = tmp_path / "decoder"
    train_decoder.main(["--unet_number", "1", "--image_text_folder", str(env.data), "--clip_path", str(env.clip),
                        "--config", str(config), "--truncate_captions", "--dim", "8,4", *COMMON, "--output_dir",
                        str(out), "--max_steps", "1", "--save_every_n_steps", "1"])  # fmt: skip
    decoder = Decoder.from_pretrained(out / "step-00000001")
    assert decoder.image_sizes == (8, 16) and decoder.schedule.timesteps == 10
    assert [unet.config["dim"] for unet in decoder.unets] == [8, 4]  # the flag wins over the file
    assert all(unet.config["dim_mults"] == (1, 2) for unet in decoder.unets)
