"""Tests for dalle_pytorch.training.state: training state for exact resume, save_checkpoint, rotation."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy_models import ToyNet, assert_same_state, perturbed

from dalle_pytorch.io.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_pretrained
from dalle_pytorch.training.state import (
    TRAINING_STATE_NAME,
    CheckpointManager,
    load_training_state,
    save_checkpoint,
    save_training_state,
)

# ---------------------------------------------------------------------------------------- training state


def draw_all_rngs():
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3),
        torch.randint(0, 100, (4,)),
    )


def test_training_state_restores_rng_draws_and_counters(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leaves a cached second Gaussian in both generators
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    path = save_training_state(
        tmp_path,
        optimizer=optimizer,
        step=12,
        epoch=3,
        data_position={"batch": 5, "order": torch.arange(4)},
        extra={"note": "x"},
    )
    expected = draw_all_rngs()
    random.seed(10), np.random.seed(20), torch.manual_seed(30)

    state = load_training_state(tmp_path, optimizer=optimizer)
    again = draw_all_rngs()
    assert again[:4] == expected[:4]
    assert torch.equal(again[4], expected[4]) and torch.equal(again[5], expected[5])
    assert (state["step"], state["epoch"], state["extra"]) == (12, 3, {"note": "x"})
    assert state["data_position"]["batch"] == 5
    assert torch.equal(state["data_position"]["order"], torch.arange(4))
    raw = torch.load(path, weights_only=True)  # readable without trusting the file
    assert raw["step"] == 12 and path.name == TRAINING_STATE_NAME


def test_optimizer_scheduler_and_scaler_round_trip(tmp_path):
    model = ToyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    save_training_state(tmp_path, optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=3, epoch=0)

    optimizer2 = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=2, gamma=0.5)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    load_training_state(tmp_path, optimizer=optimizer2, scheduler=scheduler2, scaler=scaler2, restore_rng=False)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert scaler2.get_scale() == 256.0
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.005
    for p in model.parameters():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer2.state[p][name], optimizer.state[p][name])


def train(model, optimizer, scheduler, steps):
    """Each step draws from all three RNGs (data, noise, dropout), so resuming needs every RNG state."""
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 4)
        target = x.sum(-1, keepdim=True) * random.uniform(0.5, 1.5) + float(np.random.randn())
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def fresh_run(model=None):
    model = model if model is not None else ToyNet(hidden=(16,), dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def seed_everything(seed):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


@pytest.mark.parametrize("restore_rng", [True, False])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, restore_rng):
    seed_everything(0)
    straight = fresh_run()
    train(*straight, steps=6)

    seed_everything(0)
    model, optimizer, scheduler = fresh_run()
    train(model, optimizer, scheduler, steps=3)
    manager = CheckpointManager(tmp_path / "run")
    manager.save(model, 3, optimizer=optimizer, scheduler=scheduler, epoch=0)
    del model, optimizer, scheduler
    seed_everything(123)  # whatever happened in between must not matter

    path = manager.latest()
    model, optimizer, scheduler = fresh_run(load_pretrained(path))
    state = load_training_state(path, optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng)
    assert state["step"] == 3
    train(model, optimizer, scheduler, steps=3)
    same = all(torch.equal(a, b) for a, b in zip(straight[0].state_dict().values(), model.state_dict().values()))
    assert same is restore_rng  # without the RNG states the run diverges, so this test can fail


def test_training_state_refuses_what_weights_only_cannot_read(tmp_path):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="training state\\['extra'\\]\\['fn'\\] is a function"):
        save_training_state(tmp_path, optimizer=optimizer, step=0, epoch=0, extra={"fn": lambda: 0})
    with pytest.raises(ValueError, match="step should be a non-negative int"):
        save_training_state(tmp_path, optimizer=optimizer, step=-1, epoch=0)
    assert list(tmp_path.iterdir()) == []


def test_failed_training_state_write_keeps_the_previous_one(tmp_path, monkeypatch):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    save_training_state(tmp_path, optimizer=optimizer, step=1, epoch=0)

    def failing_save(obj, filename):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(tmp_path, optimizer=optimizer, step=2, epoch=0)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [TRAINING_STATE_NAME]
    assert load_training_state(tmp_path, restore_rng=False)["step"] == 1


def test_training_state_version_and_missing_parts_are_clear_errors(tmp_path):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    save_training_state(tmp_path, optimizer=optimizer, step=0, epoch=0)
    with pytest.raises(ValueError, match="holds no scheduler state"):
        load_training_state(tmp_path, scheduler=scheduler, restore_rng=False)
    torch.save({"format_version": 99}, tmp_path / TRAINING_STATE_NAME)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_training_state(tmp_path)


def test_save_checkpoint_writes_model_and_training_state_together(tmp_path):
    model, optimizer, scheduler = fresh_run()
    path = save_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer, scheduler=scheduler, step=4, epoch=1)
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, TRAINING_STATE_NAME])
    assert load_training_state(path, restore_rng=False)["epoch"] == 1
    model.save_pretrained(path)  # a plain model save replaces the whole directory
    assert not (path / TRAINING_STATE_NAME).exists()
    with pytest.raises(ValueError, match="only together with its optimizer"):
        save_checkpoint(tmp_path / "other", model, step=4)


# ---------------------------------------------------------------------------------------- rotation


def test_manager_keeps_the_last_n_and_finds_the_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep_n=2)
    assert manager.latest() is None and manager.checkpoints() == []
    models = {step: perturbed(ToyNet(), seed=step) for step in (5, 20, 100_000_000)}
    optimizer = torch.optim.SGD(models[5].parameters(), lr=0.1)
    for step, model in models.items():
        path = manager.save(model, step, optimizer=optimizer, epoch=0)
        assert path.name == f"step-{step:08d}"
    assert [p.name for p in manager.checkpoints()] == ["step-00000020", "step-100000000"]
    assert manager.latest() == tmp_path / "run" / "step-100000000"
    assert_same_state(models[100_000_000], load_pretrained(manager.latest()))
    assert load_training_state(manager.latest(), restore_rng=False)["step"] == 100_000_000

    manager.save(models[5], 20)  # saving an existing step replaces it; the newest write is never pruned
    assert [p.name for p in manager.checkpoints()] == ["step-00000020", "step-100000000"]
    assert_same_state(models[5], load_pretrained(manager.checkpoints()[0]))
    assert not (manager.checkpoints()[0] / TRAINING_STATE_NAME).exists()


def test_manager_ignores_and_sweeps_leftovers_of_a_crash(tmp_path):
    root = tmp_path / "run"
    manager = CheckpointManager(root)
    manager.save(ToyNet(), 1)
    leftover = root / ".step-00000002.tmp-0123456789ab"
    leftover.mkdir()
    (leftover / WEIGHTS_NAME).write_bytes(b"half a file")
    (root / "step-00000003").mkdir()  # not written by the manager: no config.json
    assert manager.latest() == root / "step-00000001"
    manager.save(ToyNet(), 2)
    assert not leftover.exists()
    assert manager.latest() == root / "step-00000002"


def test_manager_rejects_bad_arguments(tmp_path):
    for keep_n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="keep_n"):
            CheckpointManager(tmp_path, keep_n=keep_n)
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="step should be a non-negative int"):
        manager.save(ToyNet(), -1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        manager.save(ToyNet(), 1, optimiser=None)
