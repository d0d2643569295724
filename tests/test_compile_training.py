"""Training with torch.compile: same checkpoints, same loss curve and exact resume as eager training.

The mechanics run with the cheap "aot_eager" backend (graph capture and autograd tracing without code
generation); one slow test runs inductor, the backend `compile=True` picks.
"""

import time

import pytest
import torch
from conftest import NUM_TEXT_TOKENS, TEXT_SEQ_LEN, make_dalle, random_images
from torch.utils.data import TensorDataset

from dalle_pytorch.cli import train_clip, train_dalle, train_decoder, train_prior, train_vae
from dalle_pytorch.io.checkpoint import load_pretrained
from dalle_pytorch.training.data_order import IndexedBatches
from dalle_pytorch.training.distributed import DistributedContext
from dalle_pytorch.training.trainer import Trainer, TrainingSettings

CHEAP = "aot_eager"


def _dataset(count: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, NUM_TEXT_TOKENS, (count, TEXT_SEQ_LEN), generator=g)
    return TensorDataset(text, random_images(count))


def _loss(model, batch, step):
    text, images = batch
    return model(text, images, return_loss=True)


def _trainer(output_dir, model=None, **settings) -> Trainer:
    torch._dynamo.reset()  # every run compiles afresh, as a new process would
    ctx = DistributedContext()
    data = IndexedBatches(_dataset(), batch_size=4, seed=0, ctx=ctx)
    options = dict(output_dir=output_dir, max_steps=4, epochs=10, progress=False, save_every_n_steps=2)
    model = model if model is not None else make_dalle()
    return Trainer(model, data, _loss, TrainingSettings(**{**options, **settings}), ctx)


def _losses(result) -> list[float]:
    return [record["loss"] for record in result.history]


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """Four compiled steps, a checkpoint every two (compiling is the slow part: shared by the tests)."""
    return _trainer(tmp_path_factory.mktemp("compiled"), compile=CHEAP).fit()


def test_compiled_checkpoints_hold_the_original_module_keys(compiled_run):
    result = compiled_run
    keys = set(make_dalle().state_dict())
    saved = load_pretrained(result.checkpoints[-1])
    assert set(saved.state_dict()) == keys
    assert not any("_orig_mod" in key for key in saved.state_dict())
    for name, value in saved.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[name])


def test_compiled_loss_curve_equals_eager(tmp_path, compiled_run):
    eager, compiled = _trainer(tmp_path / "eager").fit(), compiled_run
    assert len(_losses(compiled)) == 4
    assert _losses(eager) != _losses(eager)[:1] * 4  # the weights move, so the curve says something
    torch.testing.assert_close(torch.tensor(_losses(compiled)), torch.tensor(_losses(eager)), rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compiled_resume_equals_an_uninterrupted_compiled_run(tmp_path, compiled_run):
    straight = compiled_run
    first = _trainer(tmp_path / "stopped", compile=CHEAP, max_steps=2).fit()
    assert first.step == 2
    checkpoint = first.checkpoints[-1]
    resumed_trainer = _trainer(tmp_path / "stopped", model=load_pretrained(checkpoint), compile=CHEAP)
    resumed_trainer.resume(checkpoint)
    resumed = resumed_trainer.fit()
    assert resumed.step == 4
    assert _losses(resumed) == _losses(straight)[2:]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_compile_setting_picks_the_backend_and_rejects_bad_values(tmp_path):
    assert TrainingSettings(output_dir=tmp_path).compile_backend is None
    assert TrainingSettings(output_dir=tmp_path, compile=True).compile_backend == "inductor"
    assert TrainingSettings(output_dir=tmp_path, compile=CHEAP).compile_backend == CHEAP
    with pytest.raises(TypeError, match="compile must be a bool or a backend name"):
        TrainingSettings(output_dir=tmp_path, compile=1)
    with pytest.raises(ValueError, match="compile does not work together with deepspeed"):
        TrainingSettings(output_dir=tmp_path, compile=True, deepspeed=True)


@pytest.mark.parametrize("tool", [train_vae, train_dalle, train_clip, train_prior, train_decoder])
def test_every_training_cli_has_the_compile_flag(tool, tmp_path):
    parser = tool.build_parser()
    base = ["--output_dir", str(tmp_path)]
    folder = {train_vae: "--image_folder"}.get(tool, "--image_text_folder")
    extra = [folder, str(tmp_path)] + (["--unet_number", "1"] if tool is train_decoder else [])
    assert parser.parse_known_args(base + extra)[0].compile is False
    assert parser.parse_known_args(base + extra + ["--compile"])[0].compile is True
    assert parser.parse_known_args(base + extra + ["--compile", CHEAP])[0].compile == CHEAP


@pytest.mark.slow
def test_inductor_training_of_a_tiny_dalle_equals_eager(tmp_path):
    eager = _trainer(tmp_path / "eager").fit()
    started = time.perf_counter()
    compiled = _trainer(tmp_path / "compiled", compile=True).fit()
    print(f"inductor: 4 steps of a tiny DALLE including compilation took {time.perf_counter() - started:.1f} s")
    torch.testing.assert_close(torch.tensor(_losses(compiled)), torch.tensor(_losses(eager)), rtol=1e-4, atol=1e-5)
