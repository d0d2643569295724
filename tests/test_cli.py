"""End-to-end tests of the command-line tools on tiny settings: each tool runs in-process with main([...])
(or run([...])) and writes real files in tmp_path. The 2-process test is in test_distributed.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dalle_pytorch.cli import convert, generate, train_clip, train_dalle, train_vae
from dalle_pytorch.cli.generate import prompt_folder, prompt_folder_name
from dalle_pytorch.io.download import CACHE_ENV, OFFLINE_ENV
from dalle_pytorch.models.vae import DiscreteVAE
from dalle_pytorch.text.tokenizer_training import train_tokenizer
from dalle_pytorch.training.data_order import ResumableSampler
from dalle_pytorch.training.run_logging import read_metrics
from dalle_pytorch.training.settings import TrainingSettings, lr_factor_fn
from dalle_pytorch.training.state import TRAINING_STATE_NAME

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle")


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine's 2 cores are shared: OpenMP spin-waiting with 2 threads makes tiny models 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_dataset(folder: Path, count: int = 8) -> Path:
    """`count` small PNGs (a coloured square or disc on grey) with two-line captions."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:20, 0:24]
    for i in range(count):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        pixels = np.full((20, 24, 3), 128, dtype=np.uint8)
        inside = (abs(yy - 10) < 6) & (abs(xx - 12) < 6) if shape == "square" else (yy - 10) ** 2 + (xx - 12) ** 2 < 36
        pixels[inside] = COLOURS[colour]
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {colour} {shape}\n{shape} in {colour}\n", encoding="utf-8")
    return folder


def vae_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--image_folder", str(data), "--image_size", "16", "--num_layers", "2", "--num_tokens", "32",
            "--emb_dim", "16", "--hidden_dim", "8", "--num_resnet_blocks", "1", "--batch_size", "4",
            "--output_dir", str(out), "--no_progress", "--device", "cpu", "--log_every_n_steps", "1",
            "--sample_every_n_steps", "1000", *extra]  # fmt: skip


def dalle_args(env: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    return ["--image_text_folder", str(env.data), "--vae_path", str(env.vae), "--bpe_path", str(env.tokenizer),
            "--dim", "32", "--depth", "2", "--heads", "2", "--dim_head", "16", "--text_seq_len", "8",
            "--truncate_captions", "--batch_size", "2", "--output_dir", str(out), "--no_progress",
            "--device", "cpu", "--log_every_n_steps", "1", "--sample_every_n_steps", "1000", *extra]  # fmt: skip


# dropout, caption dropping, accumulation and 4 steps per epoch: resuming at step 3 is mid-epoch and the
# run crosses an epoch boundary, with random draws at every step
EXACT = ["--batch_size", "1", "--ga_steps", "2", "--ff_dropout", "0.1", "--attn_dropout", "0.1",
         "--null_cond_prob", "0.3", "--log_sample_ids", "--seed", "7"]  # fmt: skip


def data_tokenizer_and_vae(root: Path) -> SimpleNamespace:
    """Data, a tokenizer trained on its captions and a VAE trained 2 steps, under `root` (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = write_dataset(root / "data")
        tokenizer = root / "tokenizer.json"
        train_tokenizer(data, 300, tokenizer, min_frequency=1)
        vae = root / "vae"
        train_vae.main(vae_args(data, vae, "--max_steps", "2"))
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, data=data, tokenizer=tokenizer, vae=vae, reference=root / "reference")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """`data_tokenizer_and_vae`, and a DALLE trained 6 steps in one go."""
    namespace = data_tokenizer_and_vae(tmp_path_factory.mktemp("cli"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exact_run = dalle_args(namespace, namespace.reference, *EXACT, "--max_steps", "6", "--save_every_n_steps", "3")
        train_dalle.main(exact_run)
    finally:
        torch.set_num_threads(threads)
    return namespace


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def last_record_per_step(output_dir: Path) -> dict[int, dict]:
    return {record["step"]: record for record in read_metrics(output_dir) if "loss" in record}


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("module", [train_vae, train_dalle, train_clip, generate, convert])
def test_every_flag_has_help_and_the_dashed_spelling(module):
    for action in module.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            for spelling in action.option_strings:
                assert spelling.replace("_", "-") in action.option_strings, spelling


def test_dashed_and_underscored_flags_parse_the_same():
    parser = train_dalle.build_parser()
    a = parser.parse_args(["--image_text_folder", "x", "--keep_n_checkpoints", "3", "--no_shift_tokens"])
    b = parser.parse_args(["--image-text-folder", "x", "--keep-n-checkpoints", "3", "--no-shift-tokens"])
    assert vars(a) == vars(b)
    assert a.keep_n_checkpoints == 3 and a.shift_tokens is False and a.rotary_emb is True


# ------------------------------------------------------------------------------------------ end to end


def test_train_vae_then_dalle_then_generate_then_resume(env, tmp_path):
    vae_checkpoint = env.vae / "step-00000002"
    assert (vae_checkpoint / "config.json").is_file() and (vae_checkpoint / TRAINING_STATE_NAME).is_file()
    recorded = json.loads((env.vae / "args.json").read_text())
    assert recorded["tool"] == "dalle-train-vae" and recorded["args"]["image_size"] == 16

    out = tmp_path / "dalle"
    train_dalle.main(
        dalle_args(env, out, "--max_steps", "2", "--save_every_n_steps", "1", "--sample_every_n_steps", "2")
    )
    checkpoint = out / "step-00000002"
    assert (checkpoint / "vae" / "model.safetensors").is_file()  # the VAE travels inside the DALLE folder
    assert_same_weights(checkpoint / "vae", vae_checkpoint)
    assert (out / "samples" / "samples-00000002.png").is_file()
    assert (out / "samples" / "samples-00000002.txt").read_text().strip()  # the caption of the sample
    assert json.loads((out / "args.json").read_text())["tokenizer"]["kind"] == "hug"

    outputs = tmp_path / "outputs"
    generate.main(["--dalle_path", str(out), "--text", "a red square|a blue circle", "--num_images", "3",
                   "--batch_size", "2", "--outputs_dir", str(outputs), "--device", "cpu"])  # fmt: skip
    for name in ("a_red_square", "a_blue_circle"):
        folder = outputs / name
        assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "2.png", "grid.png", "metadata.json"]
        assert read_png(folder / "0.png").shape == (16, 16, 3)
        metadata = json.loads((folder / "metadata.json").read_text())
        assert [image["seed"] for image in metadata["images"]] == [0, 1, 2]
        assert metadata["dalle_path"].endswith("step-00000002")

    # resume: the same folder, two more steps, metrics continue
    train_dalle.main(dalle_args(env, out, "--dalle_path", str(out), "--max_steps", "4", "--save_every_n_steps", "2"))
    assert (out / "step-00000004" / TRAINING_STATE_NAME).is_file()
    assert sorted(last_record_per_step(out)) == [1, 2, 3, 4]


def test_resume_is_exact(env, tmp_path):
    out = tmp_path / "halves"
    train_dalle.main(dalle_args(env, out, *EXACT, "--max_steps", "3", "--save_every_n_steps", "3"))
    train_dalle.main(dalle_args(env, out, *EXACT, "--resume", "--max_steps", "6", "--save_every_n_steps", "3"))
    assert_same_weights(out / "step-00000006", env.reference / "step-00000006")
    resumed, reference = last_record_per_step(out), last_record_per_step(env.reference)
    assert [resumed[s]["sample_ids"] for s in range(1, 7)] == [reference[s]["sample_ids"] for s in range(1, 7)]
    assert [resumed[s]["loss"] for s in range(1, 7)] == [reference[s]["loss"] for s in range(1, 7)]
    # a resumed training state carries the optimizer: both runs end with the same Adam moments
    a = torch.load(out / "step-00000006" / TRAINING_STATE_NAME, weights_only=True)["optimizer"]["state"]
    b = torch.load(env.reference / "step-00000006" / TRAINING_STATE_NAME, weights_only=True)["optimizer"]["state"]
    for key in b:
        torch.testing.assert_close(a[key]["exp_avg_sq"], b[key]["exp_avg_sq"], rtol=0, atol=0)
    # resuming a run that already reached --max_steps does nothing
    train_dalle.main(dalle_args(env, out, *EXACT, "--resume", "--max_steps", "6"))
    assert len(read_metrics(out)) == 6 and sorted(p.name for p in out.glob("step-*"))[-1] == "step-00000006"


KILL_DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    import dalle_pytorch.training.state as training_state
    torch.set_num_threads(1)
    marker, saves, write = Path(sys.argv[1]), [], training_state.write_model_dir  # what save_checkpoint calls

    def write_then_hang_in_third_save(model, directory):
        write(model, directory)
        if type(model).__name__ == "DALLE":
            saves.append(directory)
            if len(saves) == 3:  # weights written to the temporary folder, nothing renamed yet
                marker.write_text(str(directory))
                time.sleep(300)

    training_state.write_model_dir = write_then_hang_in_third_save
    from dalle_pytorch.cli import train_dalle
    train_dalle.main(sys.argv[2:])
""")


def test_resume_after_sigkill_during_a_save_matches_the_uninterrupted_run(env, tmp_path):
    out, marker = tmp_path / "killed", tmp_path / "marker"
    args = dalle_args(env, out, *EXACT, "--max_steps", "6", "--save_every_n_steps", "1")
    log = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, str(marker), *args],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=log)  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
        assert time.monotonic() < deadline, "the training subprocess never reached its third save"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    log.close()
    assert process.returncode == -signal.SIGKILL

    half_written = Path(marker.read_text())
    assert half_written.exists() and half_written.name.startswith(".step-00000003.tmp-")
    assert not (out / "step-00000003").exists()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000001", "step-00000002"]

    train_dalle.main(dalle_args(env, out, *EXACT, "--resume", "--max_steps", "6", "--save_every_n_steps", "3"))
    assert_same_weights(out / "step-00000006", env.reference / "step-00000006")
    resumed, reference = last_record_per_step(out), last_record_per_step(env.reference)
    assert [resumed[s]["sample_ids"] for s in range(1, 7)] == [reference[s]["sample_ids"] for s in range(1, 7)]


# ------------------------------------------------------------------------------------------ safety


def patch_vae_loss(monkeypatch, change):
    """Wrap DiscreteVAE.forward so that change(call number, loss) replaces the training loss."""
    calls = []
    original = DiscreteVAE.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if kwargs.get("return_loss"):
            calls.append(1)
            return change(len(calls), out)
        return out

    monkeypatch.setattr(DiscreteVAE, "forward", forward)


def test_a_nan_loss_skips_the_update(env, tmp_path, monkeypatch):
    patch_vae_loss(monkeypatch, lambda call, loss: loss * float("nan") if call == 2 else loss)
    out = tmp_path / "vae"
    with pytest.warns(RuntimeWarning, match="NaN/inf; the update was skipped"):
        train_vae.main(vae_args(env.data, out, "--max_steps", "3", "--save_every_n_steps", "1"))
    assert_same_weights(out / "step-00000001", out / "step-00000002")  # step 2 changed nothing
    assert not torch.equal(weights(out / "step-00000002")["codebook.weight"],
                           weights(out / "step-00000003")["codebook.weight"])  # fmt: skip
    records = last_record_per_step(out)
    assert [records[s]["skipped"] for s in (1, 2, 3)] == [False, True, False]
    state = torch.load(out / "step-00000003" / TRAINING_STATE_NAME, weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # two real updates
    for tensor in weights(out / "step-00000003").values():
        assert torch.isfinite(tensor).all()


def test_repeated_nan_losses_stop_the_run_with_a_clear_message(env, tmp_path, monkeypatch, capsys):
    patch_vae_loss(monkeypatch, lambda call, loss: loss + float("inf") if call > 1 else loss)
    out = tmp_path / "vae"
    with pytest.warns(RuntimeWarning), pytest.raises(SystemExit) as stop:
        train_vae.main(
            vae_args(env.data, out, "--max_steps", "20", "--save_every_n_steps", "1", "--max_nan_steps", "3")
        )
    assert stop.value.code == 1
    message = capsys.readouterr().err
    assert "NaN/inf for 3 steps in a row" in message and "step-00000003" in message
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000001", "step-00000002", "step-00000003"]
    assert_same_weights(out / "step-00000001", out / "step-00000003")


def test_ctrl_c_finishes_the_step_saves_and_exits_130(env, tmp_path, monkeypatch, capsys):
    def interrupt(call, loss):
        if call == 2:
            signal.raise_signal(signal.SIGINT)
        return loss

    patch_vae_loss(monkeypatch, interrupt)
    out = tmp_path / "vae"
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        train_vae.main(vae_args(env.data, out, "--max_steps", "10", "--save_every_n_steps", "100"))
    assert stop.value.code == 130
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000002"]
    assert "interrupted; checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler_before


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("../../etc", "etc"), ("/abs/path", "abs_path"), ("..", "prompt"), ("", "prompt"), ("a/b\\c:d", "a_b_c_d"),
     ("CON", "CON_"), ("雪の森", "雪の森"), ("-rf *", "rf"), ("x" * 300, "x" * 100)],
)  # fmt: skip
def test_prompt_folder_names_are_one_safe_path_component(prompt, expected):
    name = prompt_folder_name(prompt)
    assert name == expected
    assert "/" not in name and "\\" not in name and "." not in name and len(name.encode()) <= 100


def test_no_prompt_writes_outside_outputs_dir(env, tmp_path):
    outputs, outside = tmp_path / "outputs", tmp_path / "outside"
    outside.mkdir()
    outputs.mkdir()
    (outputs / "evil").symlink_to(outside, target_is_directory=True)
    prompts = ["../../etc", "/tmp/absolute", "..", "evil", f"{tmp_path}/outside/x"]
    generate.main(["--dalle_path", str(env.reference), "--text", "|".join(prompts), "--num_images", "1",
                   "--outputs_dir", str(outputs), "--device", "cpu"])  # fmt: skip
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "outside"]
    folders = sorted(p.name for p in outputs.iterdir() if p.is_dir() and not p.is_symlink())
    assert folders == sorted(["etc", "tmp_absolute", "prompt", "evil-2", prompt_folder_name(prompts[-1])])
    for folder in folders:
        assert json.loads((outputs / folder / "metadata.json").read_text())["prompt"] in prompts


def test_a_folder_name_resolving_outside_outputs_dir_is_refused(tmp_path, monkeypatch):
    # the last line of defence, should a name ever resolve out
    monkeypatch.setattr(generate, "prompt_folder_name", lambda prompt: "../escaped")
    with pytest.raises(ValueError, match="outside --outputs_dir"):
        prompt_folder(tmp_path / "outputs", "anything", taken=set())


def test_generated_images_do_not_depend_on_batch_size(env, tmp_path):
    for batch_size in ("1", "3"):
        generate.main(["--dalle_path", str(env.reference), "--text", "a green circle", "--num_images", "3",
                       "--batch_size", batch_size, "--seed", "5", "--outputs_dir", str(tmp_path / batch_size),
                       "--device", "cpu"])  # fmt: skip
    images = [[read_png(tmp_path / b / "a_green_circle" / f"{n}.png") for n in range(3)] for b in ("1", "3")]
    for one, three in zip(*images):
        assert np.array_equal(one, three)
    assert not all(np.array_equal(images[0][0], other) for other in images[0][1:])  # different seeds differ


def test_generate_with_lower_precision_weights(env, tmp_path):
    for weights in ("bf16", "int8"):
        generate.main(["--dalle_path", str(env.reference), "--text", "a green circle", "--num_images", "2",
                       "--weights", weights, "--outputs_dir", str(tmp_path / weights), "--device", "cpu"])  # fmt: skip
        images = [read_png(tmp_path / weights / "a_green_circle" / f"{n}.png") for n in range(2)]
        assert all(image.shape == images[0].shape for image in images)
        assert json.loads((tmp_path / weights / "args.json").read_text())["args"]["weights"] == weights
    with pytest.raises(SystemExit):
        generate.main(["--dalle_path", str(env.reference), "--text", "x", "--weights", "fp16"])


def test_train_clip_then_rerank_and_prime(env, tmp_path):
    clip_out = tmp_path / "clip"
    train_clip.main(["--image_text_folder", str(env.data), "--bpe_path", str(env.tokenizer), "--dim_text", "32",
                     "--dim_image", "32", "--dim_latent", "16", "--text_enc_depth", "1", "--text_seq_len", "8",
                     "--text_heads", "2", "--visual_enc_depth", "1", "--visual_heads", "2",
                     "--visual_image_size", "8", "--visual_patch_size", "4", "--truncate_captions",
                     "--batch_size", "4", "--max_steps", "2", "--sample_every_n_steps", "1", "--output_dir",
                     str(clip_out), "--no_progress", "--device", "cpu", "--log_every_n_steps", "1"])  # fmt: skip
    assert (clip_out / "step-00000002" / "config.json").is_file()
    assert any("batch_retrieval_accuracy" in record for record in read_metrics(clip_out))

    common = ["--dalle_path", str(env.reference), "--clip_path", str(clip_out), "--text", "a red circle",
              "--num_images", "4", "--device", "cpu"]  # fmt: skip
    generate.main([*common, "--outputs_dir", str(tmp_path / "all")])
    generate.main([*common, "--outputs_dir", str(tmp_path / "top"), "--keep_top", "2"])
    everything = json.loads((tmp_path / "all" / "a_red_circle" / "metadata.json").read_text())["images"]
    kept = json.loads((tmp_path / "top" / "a_red_circle" / "metadata.json").read_text())["images"]
    scores = [image["clip_score"] for image in everything]
    assert scores == sorted(scores, reverse=True)
    assert [image["index"] for image in kept] == [image["index"] for image in everything[:2]]
    assert sorted(p.name for p in (tmp_path / "top" / "a_red_circle").glob("*.png")) == ["0.png", "1.png", "grid.png"]
    assert np.array_equal(read_png(tmp_path / "top" / "a_red_circle" / "0.png"),
                          read_png(tmp_path / "all" / "a_red_circle" / "0.png"))  # fmt: skip

    generate.main(["--dalle_path", str(env.reference), "--text", "a red circle", "--num_images", "2",
                   "--img", str(env.data / "00.png"), "--num_init_img_tokens", "8", "--outputs_dir",
                   str(tmp_path / "primed"), "--device", "cpu"])  # fmt: skip
    metadata = json.loads((tmp_path / "primed" / "a_red_circle" / "metadata.json").read_text())
    assert metadata["settings"]["num_init_img_tokens"] == 8 and len(metadata["images"]) == 2


# ------------------------------------------------------------------------------------------ options


def test_openai_vae_is_the_default_and_fails_clearly_without_its_files(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as stop:
        train_dalle.main(["--image_text_folder", str(env.data), "--output_dir", str(tmp_path / "d"), "--device", "cpu"])
    assert stop.value.code == 2
    assert "OpenAI dVAE encoder" in capsys.readouterr().err


def test_bad_input_gives_a_one_line_error(env, tmp_path, capsys):
    cases = [
        (train_dalle, ["--image_text_folder", str(env.data), "--vae_path", str(tmp_path / "none")], "--vae_path"),
        (generate, ["--dalle_path", str(env.reference)], "--text"),
        (
            generate,
            ["--dalle_path", str(env.reference), "--text", "x", "--keep_top", "2"],
            "--keep_top needs --clip_path",
        ),
        (train_vae, ["--image_folder", str(tmp_path)], "no images"),
    ]
    for module, argv, expected in cases:
        with pytest.raises(SystemExit) as stop:
            module.main([*argv, "--device", "cpu"])
        assert stop.value.code == 2
        assert expected in capsys.readouterr().err


def test_keep_n_checkpoints_precision_and_lr_schedule(env, tmp_path):
    out = tmp_path / "vae"
    train_vae.main(vae_args(env.data, out, "--max_steps", "3", "--save_every_n_steps", "1", "--keep_n_checkpoints",
                            "2", "--precision", "bf16", "--lr_schedule", "cosine", "--warmup_steps", "2"))  # fmt: skip
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000002", "step-00000003"]
    lrs = [last_record_per_step(out)[s]["lr"] for s in (1, 2, 3)]
    expected = lr_factor_fn(
        TrainingSettings(output_dir=out, learning_rate=1e-3, lr_schedule="cosine", warmup_steps=2), 3
    )
    assert lrs == pytest.approx([1e-3 * expected(s) for s in range(3)])

    fp16 = tmp_path / "fp16"
    train_vae.main(vae_args(env.data, fp16, "--max_steps", "1", "--fp16"))
    state = torch.load(fp16 / "step-00000001" / TRAINING_STATE_NAME, weights_only=True)
    assert state["scaler"]["scale"] > 0  # loss scaling is on and its state is saved for resume


def test_tensorboard_logging_or_a_clear_hint_to_install_it(env, tmp_path, capsys):
    out = tmp_path / "vae"
    argv = vae_args(env.data, out, "--max_steps", "1", "--tensorboard")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit) as stop:
            train_vae.main(argv)
        assert stop.value.code == 2
        assert "pip install tensorboard" in capsys.readouterr().err
    else:
        train_vae.main(argv)
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_webdataset_shards_and_precomputed_image_tokens(env, tmp_path):
    shard = tmp_path / "shards" / "000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for path in sorted(env.data.iterdir()):
            tar.add(path, arcname=path.name)
    out = tmp_path / "wds"
    train_dalle.main(dalle_args(env, out, "--max_steps", "2", "--save_every_n_steps", "2", "--wds", "png,txt")
                     + ["--image_text_folder", str(shard.parent)])  # fmt: skip
    assert (out / "step-00000002" / TRAINING_STATE_NAME).is_file()

    out = tmp_path / "precomputed"
    result = train_dalle.run(dalle_args(env, out, "--max_steps", "2", "--precompute_image_tokens", "--log_sample_ids"))
    assert result.step == 2 and all(np.isfinite(record["loss"]) for record in result.history)


# ------------------------------------------------------------------------------------------ pieces


def test_resumable_sampler_continues_where_it_stopped_and_splits_ranks():
    full = ResumableSampler(10, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert sorted(index for index, _ in order) == list(range(10))
    resumed = ResumableSampler(10, seed=3)
    resumed.set_epoch(2, start_sample=4)
    assert list(resumed) == order[4:] and len(resumed) == 6
    other_epoch = ResumableSampler(10, seed=3)
    other_epoch.set_epoch(3)
    assert [i for i, _ in other_epoch] != [i for i, _ in order]

    ranks = [ResumableSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(2)
    shares = [[index for index, _ in sampler] for sampler in ranks]
    assert [len(share) for share in shares] == [4, 4, 4]  # padded so every rank takes as many steps
    assert set().union(*shares) == set(range(10))


def test_temperature_anneals_from_the_step_to_a_floor():
    assert train_vae.temperature_at(0, 1.0, 0.5, 1e-2) == 1.0
    assert train_vae.temperature_at(10, 1.0, 0.5, 1e-2) == pytest.approx(np.exp(-0.1))
    assert train_vae.temperature_at(10_000, 1.0, 0.5, 1e-2) == 0.5
