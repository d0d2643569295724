"""The moving average of the weights in the training loop: its values, its checkpoints, exact resume."""

import pytest
import torch
from conftest import make_vae, random_images
from safetensors.torch import load_file

from dalle_pytorch import DiscreteVAE
from dalle_pytorch.cli import train_vae
from dalle_pytorch.data.shapes import ShapesDataset, write_folder
from dalle_pytorch.training.data_order import IndexedBatches
from dalle_pytorch.training.distributed import DistributedContext
from dalle_pytorch.training.ema import WeightAverage
from dalle_pytorch.training.state import EMA_DIR_NAME, TRAINING_STATE_NAME
from dalle_pytorch.training.trainer import Trainer, TrainingSettings

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

IMAGES = [random_images(1, seed=i)[0] for i in range(6)]


class Crash(Exception):
    """Stands in for the process being killed: nothing is saved on the way out."""


def train(output_dir, max_steps, *, model=None, resume=None, crash_at=None, **settings):
    """Trains a tiny VAE on six images with accumulation, three micro-batches an epoch (so a run crosses
    epochs); `crash_at`: raise in the loss of that step."""
    ctx = DistributedContext()
    options = dict(batch_size=2, ga_steps=2, epochs=10, learning_rate=1e-2, seed=3, save_every_n_steps=2,
                   progress=False, ema_decay=0.9)  # fmt: skip
    settings = TrainingSettings(output_dir=output_dir, max_steps=max_steps, **{**options, **settings})

    def loss_fn(vae, images, step):
        if step == crash_at:
            raise Crash
        return vae(images, return_loss=True)

    data = IndexedBatches(IMAGES, batch_size=settings.batch_size, seed=settings.seed, ctx=ctx)
    trainer = Trainer(model if model is not None else make_vae(), data, loss_fn, settings, ctx)
    if resume is not None:
        trainer.resume(resume)
    trainer.fit()
    return trainer


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_equal_weights(a, b):
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_ema_weights_are_the_exponential_moving_average_of_the_weights(tmp_path):
    trainer = train(tmp_path, 3, save_every_n_steps=1, ema_decay=0.75)
    raw = [weights(tmp_path / f"step-{step:08d}") for step in (1, 2, 3)]
    averaged = [weights(tmp_path / f"step-{step:08d}" / EMA_DIR_NAME) for step in (1, 2, 3)]
    expected = dict(raw[0])  # the first update copies the weights
    for key in expected:
        assert torch.equal(averaged[0][key], raw[0][key]), key
    for step in (1, 2):
        expected = {key: 0.75 * expected[key] + 0.25 * raw[step][key] for key in expected}
        assert not torch.equal(raw[step]["codebook.weight"], expected["codebook.weight"])
        for key in expected:
            torch.testing.assert_close(averaged[step][key], expected[key], rtol=1e-6, atol=1e-7)
    # the average is a model of the same class, loadable on its own, and the trainer hands it out
    loaded = DiscreteVAE.from_pretrained(tmp_path / "step-00000003" / EMA_DIR_NAME)
    torch.testing.assert_close(loaded.codebook.weight, trainer.ema_model.codebook.weight, rtol=0, atol=0)
    assert not any(p.requires_grad for p in trainer.ema_model.parameters())
    state = torch.load(tmp_path / "step-00000003" / TRAINING_STATE_NAME, weights_only=True)
    assert state["extra"]["ema_updates"] == 3


def test_killed_and_resumed_run_with_ema_equals_an_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train(reference, 6)
    with pytest.raises(Crash):
        train(killed, 6, crash_at=5)  # dies during step 6, after the checkpoints of steps 2 and 4
    assert sorted(p.name for p in killed.glob("step-*")) == ["step-00000002", "step-00000004"]
    latest = killed / "step-00000004"
    train(killed, 6, model=DiscreteVAE.from_pretrained(latest), resume=latest)
    assert_equal_weights(killed / "step-00000006", reference / "step-00000006")
    assert_equal_weights(killed / "step-00000006" / EMA_DIR_NAME, reference / "step-00000006" / EMA_DIR_NAME)
    # and the average is not just the weights
    assert not torch.equal(
        weights(reference / "step-00000006")["codebook.weight"],
        weights(reference / "step-00000006" / EMA_DIR_NAME)["codebook.weight"],
    )


def test_without_ema_nothing_changes_and_resuming_into_ema_starts_it_afresh(tmp_path):
    trainer = train(tmp_path / "plain", 2, ema_decay=None)
    assert trainer.ema is None and trainer.ema_model is None
    checkpoint = tmp_path / "plain" / "step-00000002"
    assert not (checkpoint / EMA_DIR_NAME).exists()
    assert torch.load(checkpoint / TRAINING_STATE_NAME, weights_only=True)["extra"]["ema_updates"] is None
    with pytest.warns(UserWarning, match="starts afresh"):
        resumed = train(tmp_path / "plain", 3, model=DiscreteVAE.from_pretrained(checkpoint), resume=checkpoint)
    assert resumed.ema.updates == 1  # one update since the resume: a copy of the step-3 weights
    assert_equal_weights(tmp_path / "plain" / "step-00000003" / EMA_DIR_NAME, tmp_path / "plain" / "step-00000003")


def test_bad_ema_decay_is_a_clear_error(tmp_path):
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            TrainingSettings(output_dir=tmp_path, ema_decay=decay)
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(make_vae(), decay)
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        TrainingSettings(output_dir=tmp_path, ema_decay=0.9, deepspeed=True, zero_stage=3)


def test_training_cli_saves_the_average_with_ema_decay(tmp_path):
    data = write_folder(ShapesDataset(4, image_size=16), tmp_path / "data")
    out = tmp_path / "vae"
    train_vae.main(["--image_folder", str(data), "--image_size", "16", "--num_layers", "2", "--num_tokens", "16",
                    "--emb_dim", "8", "--hidden_dim", "8", "--batch_size", "2", "--max_steps", "2",
                    "--output_dir", str(out), "--no_progress", "--device", "cpu", "--ema-decay", "0.99"])  # fmt: skip
    averaged = DiscreteVAE.from_pretrained(out / "step-00000002" / EMA_DIR_NAME)
    raw = DiscreteVAE.from_pretrained(out / "step-00000002")
    assert averaged.config == raw.config
    assert not torch.equal(averaged.codebook.weight, raw.codebook.weight)
