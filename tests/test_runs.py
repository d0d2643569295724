"""Run folders and damaged checkpoints, end to end through the training tools (tiny models, 2 steps):
resuming continues in the resumed run's folder, no tool writes into a folder holding another run,
args.json tells the real model settings, a damaged newest checkpoint is skipped, --max_steps wins."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli import (
    EXACT,
    assert_same_weights,
    dalle_args,
    data_tokenizer_and_vae,
    last_record_per_step,
    one_thread,  # noqa: F401 (autouse: one thread on the shared test machine)
    vae_args,
)

from dalle_pytorch.cli import generate, train_clip, train_dalle, train_vae
from dalle_pytorch.training.state import TRAINING_STATE_NAME, checkpoint_problem


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """Data, a tokenizer and a VAE run (2 steps)."""
    return data_tokenizer_and_vae(tmp_path_factory.mktemp("runs"))


def hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def two_dalle_runs(env: SimpleNamespace, tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    train_dalle.main(dalle_args(env, a, "--max_steps", "2", "--save_every_n_steps", "2"))
    train_dalle.main(dalle_args(env, b, "--max_steps", "2", "--save_every_n_steps", "2", "--dim", "16"))
    return a, b


def test_resuming_with_dalle_path_continues_in_that_run_and_leaves_others_untouched(env, tmp_path, monkeypatch):
    a, b = two_dalle_runs(env, tmp_path)
    before = hashes(b)
    monkeypatch.chdir(tmp_path)  # where the default --output_dir (./dalle) would go
    # no model flags and no --output_dir: the parser defaults (dim 512, text_seq_len 256) must not leak in
    train_dalle.main(["--image_text_folder", str(env.data), "--dalle_path", str(a), "--bpe_path", str(env.tokenizer),
                      "--truncate_captions", "--batch_size", "2", "--no_progress", "--device", "cpu",
                      "--max_steps", "4", "--save_every_n_steps", "2", "--log_every_n_steps", "1"])  # fmt: skip
    assert hashes(b) == before
    assert not (tmp_path / "dalle").exists()
    assert sorted(p.name for p in a.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert sorted(last_record_per_step(a)) == [1, 2, 3, 4]
    record = json.loads((a / "args.json").read_text())
    assert record["args"]["dim"] == 32 and record["args"]["text_seq_len"] == 8 and record["args"]["depth"] == 2
    assert record["model"]["type"] == "DALLE" and record["model"]["config"]["dim"] == 32
    assert record["resumed_from"].endswith("step-00000002")
    assert record["earlier_invocations"][0]["args"]["max_steps"] == 2  # the first invocation is kept


def test_no_tool_writes_into_a_folder_holding_another_run(env, tmp_path, capsys):
    a, b = two_dalle_runs(env, tmp_path)
    before_a, before_b = hashes(a), hashes(b)
    # a fresh run into B
    with pytest.raises(SystemExit) as exit_info:
        train_dalle.main(dalle_args(env, b, "--max_steps", "1"))
    assert exit_info.value.code == 2
    assert f"{b} already holds a dalle-train run" in capsys.readouterr().err
    # resuming A into B
    with pytest.raises(SystemExit):
        train_dalle.main(dalle_args(env, b, "--dalle_path", str(a), "--max_steps", "3"))
    assert f"--output_dir {b} holds another dalle-train run" in capsys.readouterr().err
    # another tool into a DALLE run
    with pytest.raises(SystemExit):
        train_vae.main(vae_args(env.data, a, "--max_steps", "1"))
    assert "already holds a dalle-train run" in capsys.readouterr().err
    # dalle-generate's --outputs_dir must not be a training run either
    with pytest.raises(SystemExit):
        generate.main(["--dalle_path", str(a), "--text", "a red square", "--outputs_dir", str(b), "--device", "cpu"])
    assert "holds a dalle-train run" in capsys.readouterr().err
    # while an earlier dalle-generate output folder is fine to generate into again
    generated = tmp_path / "generated"
    for _ in range(2):
        generate.main(["--dalle_path", str(a), "--text", "a red square", "--num_images", "1",
                       "--outputs_dir", str(generated), "--device", "cpu"])  # fmt: skip
    assert (generated / "a_red_square" / "0.png").is_file()
    assert hashes(a) == before_a and hashes(b) == before_b

    # resuming A into an empty folder branches the run there; A stays as it was
    branch = tmp_path / "branch"
    train_dalle.main(dalle_args(env, branch, "--dalle_path", str(a), "--max_steps", "3"))
    assert hashes(a) == before_a
    assert sorted(p.name for p in branch.glob("step-*")) == ["step-00000003"]


def test_every_training_tool_resumes_in_its_own_run(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # dalle-train-vae: --resume CHECKPOINT continues in that checkpoint's run
    a, b = tmp_path / "vae_a", tmp_path / "vae_b"
    train_vae.main(vae_args(env.data, a, "--max_steps", "2"))
    train_vae.main(vae_args(env.data, b, "--max_steps", "2"))
    before = hashes(b)
    train_vae.main(["--image_folder", str(env.data), "--resume", str(a / "step-00000002"), "--max_steps", "3",
                    "--no_progress", "--device", "cpu", "--batch_size", "4"])  # fmt: skip
    assert hashes(b) == before and not (tmp_path / "vae").exists()
    assert (a / "step-00000003").is_dir()
    recorded = json.loads((a / "args.json").read_text())["args"]
    assert recorded["image_size"] == 16 and recorded["num_tokens"] == 32 and recorded["emb_dim"] == 16

    # dalle-train-clip: --clip_path RUN continues in RUN
    clip_options = ["--image_text_folder", str(env.data), "--bpe_path", str(env.tokenizer), "--truncate_captions",
                    "--no_progress", "--device", "cpu", "--batch_size", "4"]  # fmt: skip
    model = ["--dim_text", "16", "--dim_image", "16", "--dim_latent", "16", "--text_enc_depth", "1",
             "--visual_enc_depth", "1", "--text_seq_len", "8", "--visual_image_size", "16", "--visual_patch_size", "8",
             "--text_heads", "2", "--visual_heads", "2"]  # fmt: skip
    c, d = tmp_path / "clip_c", tmp_path / "clip_d"
    train_clip.main([*clip_options, *model, "--output_dir", str(c), "--max_steps", "2"])
    train_clip.main([*clip_options, *model, "--output_dir", str(d), "--max_steps", "2"])
    before = hashes(d)
    train_clip.main([*clip_options, "--clip_path", str(c), "--max_steps", "3"])
    assert hashes(d) == before and not (tmp_path / "clip").exists()
    assert (c / "step-00000003").is_dir()
    assert json.loads((c / "args.json").read_text())["args"]["dim_text"] == 16


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_damaged_checkpoints_give_one_clear_line(env, tmp_path, capsys):
    a, _ = two_dalle_runs(env, tmp_path)
    checkpoint = a / "step-00000002"
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    truncate(damaged / "model.safetensors")
    assert "model.safetensors is truncated" in checkpoint_problem(damaged)
    prompt = ["--text", "a red square", "--outputs_dir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--dalle_path", str(damaged), *prompt])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("dalle-generate: error: --dalle_path:") and str(damaged / "model.safetensors") in err

    state_damaged = tmp_path / "state_damaged"
    shutil.copytree(checkpoint, state_damaged)
    truncate(state_damaged / TRAINING_STATE_NAME)
    with pytest.raises(SystemExit):
        train_dalle.main(dalle_args(env, tmp_path / "x", "--dalle_path", str(state_damaged), "--max_steps", "3"))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(state_damaged / TRAINING_STATE_NAME) in err and "damaged or truncated" in err

    # a VAE folder where a DALLE is expected
    for tool, args in ((generate, prompt), (train_dalle, dalle_args(env, tmp_path / "y", "--max_steps", "1"))):
        with pytest.raises(SystemExit):
            tool.main([*args, "--dalle_path", str(env.vae)])
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "holds a DiscreteVAE, not a DALLE (it belongs in --vae_path)" in err
    # and the other way round: a DALLE run as --vae_path, or resumed by dalle-train-vae
    a_dalle = a / "step-00000002"
    with pytest.raises(SystemExit):
        train_dalle.main(dalle_args(env, tmp_path / "z", "--max_steps", "1", "--vae_path", str(a)))  # the later wins
    assert "holds a DALLE, not a DiscreteVAE (it belongs in --dalle_path)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_vae.main(vae_args(env.data, tmp_path / "w", "--resume", str(a_dalle)))
    err = capsys.readouterr().err
    assert "--resume: " in err and "holds a DALLE, not a DiscreteVAE (it belongs in --dalle_path)" in err


@pytest.mark.parametrize("damage", ["model.safetensors", TRAINING_STATE_NAME, "vae/model.safetensors"])
def test_resuming_past_a_damaged_newest_checkpoint_equals_an_uninterrupted_run(env, tmp_path, capsys, damage):
    reference = tmp_path / "reference"
    train_dalle.main(dalle_args(env, reference, *EXACT, "--max_steps", "4", "--save_every_n_steps", "2"))
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    truncate(run / "step-00000004" / damage)
    train_dalle.main(dalle_args(env, run, *EXACT, "--resume", "--max_steps", "4", "--save_every_n_steps", "2"))
    err = capsys.readouterr().err
    assert "skipping the damaged checkpoint step-00000004" in err and damage.split("/")[-1] in err
    assert checkpoint_problem(run / "step-00000004") is None  # rewritten by the resumed run
    assert_same_weights(run / "step-00000004", reference / "step-00000004")
    a = torch.load(run / "step-00000004" / TRAINING_STATE_NAME, weights_only=True)["optimizer"]["state"]
    b = torch.load(reference / "step-00000004" / TRAINING_STATE_NAME, weights_only=True)["optimizer"]["state"]
    for key in b:
        torch.testing.assert_close(a[key]["exp_avg"], b[key]["exp_avg"], rtol=0, atol=0)


def test_max_steps_wins_over_the_default_epochs_and_the_tools_say_what_ended_them(env, tmp_path, capsys):
    # 8 images, batch 4: 2 steps per epoch, so the default 20 epochs would stop at step 40
    out = tmp_path / "vae"
    result = train_vae.run(vae_args(env.data, out, "--max_steps", "45", "--save_every_n_steps", "100"))
    assert result.step == 45 and result.stopped_by == "max_steps"
    assert f"stopped at step 45: --max_steps 45 reached; final checkpoint: {out / 'step-00000045'}" in (
        capsys.readouterr().out
    )
    assert json.loads((out / "args.json").read_text())["args"]["epochs"] is None
    # both given: whichever comes first
    result = train_vae.run(vae_args(env.data, tmp_path / "both", "--max_steps", "45", "--epochs", "1"))
    assert result.step == 2 and result.stopped_by == "epochs"
    assert "stopped at step 2: --epochs 1 done" in capsys.readouterr().out


def test_generate_refuses_guidance_without_null_cond_prob_and_says_where_it_wrote(env, tmp_path, capsys):
    plain, guided = tmp_path / "plain", tmp_path / "guided"
    train_dalle.main(dalle_args(env, plain, "--max_steps", "1"))
    train_dalle.main(dalle_args(env, guided, "--max_steps", "1", "--null_cond_prob", "0.5"))
    prompt = ["--text", "a red square|a blue circle", "--num_images", "2", "--device", "cpu", "--cond_scale", "3"]
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--dalle_path", str(plain), *prompt, "--outputs_dir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert "--cond_scale 3.0 needs a DALLE trained with --null_cond_prob > 0" in err
    assert not (tmp_path / "a").exists()

    outputs = tmp_path / "b"
    folders = generate.run(["--dalle_path", str(guided), *prompt, "--outputs_dir", str(outputs)])
    out = capsys.readouterr().out
    for folder, prompt_text in zip(folders, ("a red square", "a blue circle"), strict=True):
        assert f"2 images of {prompt_text!r}, grid.png and metadata.json -> {folder}" in out
        assert json.loads((folder / "metadata.json").read_text())["settings"]["cond_scale"] == 3
