"""Tests for dalle_pytorch.checkpoint: model directories, training state for resume, rotation, atomicity."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dalle_pytorch import checkpoint
from dalle_pytorch._version import __version__
from dalle_pytorch.checkpoint import (
    CONFIG_NAME,
    TRAINING_STATE_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointManager,
    PretrainedMixin,
    load_pretrained,
    load_training_state,
    read_config,
    save_checkpoint,
    save_training_state,
)

# ---------------------------------------------------------------------------------------- toy models


class ToyNet(PretrainedMixin, nn.Module):
    """An MLP whose constructor insists on a tuple, so config round trips must restore tuples."""

    def __init__(self, dim: int = 4, hidden: tuple = (8,), dropout: float = 0.0):
        super().__init__()
        if not isinstance(hidden, tuple):
            raise TypeError(f"hidden should be a tuple, got {type(hidden).__name__}")
        self.config = dict(dim=dim, hidden=hidden, dropout=dropout)
        sizes = (dim, *hidden, 1)
        layers = []
        for size_in, size_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(size_in, size_out), nn.Tanh(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers[:-2])
        self.register_buffer("input_scale", torch.ones(dim))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x):
        return self.net(x * self.input_scale)


class SubToyNet(ToyNet):
    pass


class TiedLM(PretrainedMixin, nn.Module):
    def __init__(self, vocab: int = 10, dim: int = 6):
        super().__init__()
        self.config = dict(vocab=vocab, dim=dim)
        self.embed = nn.Embedding(vocab, dim)
        self.to_logits = nn.Linear(dim, vocab, bias=False)
        self.to_logits.weight = self.embed.weight

    def forward(self, ids):
        return self.to_logits(self.embed(ids))


class ToyVAE(PretrainedMixin, nn.Module):
    def __init__(self, num_tokens: int = 7, dim: int = 5):
        super().__init__()
        self.config = dict(num_tokens=num_tokens, dim=dim)
        self.num_tokens = num_tokens
        self.codebook = nn.Embedding(num_tokens, dim)
        self.encoder = nn.Linear(dim, num_tokens)


class ToyDALLE(PretrainedMixin, nn.Module):
    pretrained_children = ("vae",)

    def __init__(self, *, vae: ToyVAE, dim: int = 5, share_codebook: bool = False):
        super().__init__()
        self.config = dict(dim=dim, share_codebook=share_codebook)
        self.vae = vae
        self.vae.requires_grad_(False)
        self.image_emb = nn.Embedding(vae.num_tokens, dim)
        if share_codebook:
            self.image_emb.weight = vae.codebook.weight
        self.to_logits = nn.Linear(dim, vae.num_tokens)

    def forward(self, ids):
        return self.to_logits(self.image_emb(ids))


class FetchingVAE(PretrainedMixin, nn.Module):
    """Stands in for a released VAE whose constructor downloads unless `_from_config` says not to."""

    def __init__(self, num_tokens: int = 4, download: bool = True):
        super().__init__()
        self.config = dict(num_tokens=num_tokens)
        self.downloaded = download
        self.codebook = nn.Embedding(num_tokens, 3)

    @classmethod
    def _from_config(cls, config, **children):
        return cls(**config, download=False)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def stored_keys(path: Path) -> set:
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as file:
        return set(file.keys())


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator))
    return model


# ---------------------------------------------------------------------------------------- model directories


def test_round_trip_restores_config_weights_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = perturbed(ToyNet(dim=4, hidden=(8, 6)), seed=1)
    model.scratch.fill_(5.0)
    path = model.save_pretrained(tmp_path / "toy")

    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["model_type"] == "ToyNet"
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 1
    assert meta["library_version"] == __version__
    assert meta["config"] == {"dim": 4, "hidden": [8, 6], "dropout": 0.0}
    assert stored_keys(path) == set(model.state_dict()) and "scratch" not in stored_keys(path)

    loaded = ToyNet.from_pretrained(path)
    assert type(loaded) is ToyNet and not loaded.training
    assert loaded.config == model.config and isinstance(loaded.config["hidden"], tuple)
    assert isinstance(model.config["hidden"], tuple)  # saving did not touch the caller's config
    assert_same_state(model, loaded)
    assert torch.equal(loaded.scratch, torch.zeros(3))  # non-persistent buffers come from the constructor
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_nested_tuples_and_dicts_round_trip(tmp_path):
    class Nested(PretrainedMixin, nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.config = dict(spec=spec)
            self.weight = nn.Parameter(torch.zeros(2))

    spec = {"layers": ((1, 2), [3, (4,)]), "name": "n", "ratio": 0.5, "off": None, "flag": True}
    loaded = Nested.from_pretrained(Nested(spec).save_pretrained(tmp_path / "nested"))
    assert loaded.config["spec"] == spec
    assert type(loaded.config["spec"]["layers"]) is tuple
    assert type(loaded.config["spec"]["layers"][0]) is tuple
    assert type(loaded.config["spec"]["layers"][1]) is list
    assert type(loaded.config["spec"]["layers"][1][1]) is tuple


def test_load_pretrained_dispatches_on_model_type_and_allows_subclasses(tmp_path):
    model = SubToyNet(hidden=(3,))
    path = model.save_pretrained(tmp_path / "sub")
    for loader in (load_pretrained, ToyNet.from_pretrained, SubToyNet.from_pretrained):
        loaded = loader(path)
        assert type(loaded) is SubToyNet
        assert_same_state(model, loaded)


def test_from_pretrained_rejects_another_model_type(tmp_path):
    path = ToyNet().save_pretrained(tmp_path / "toy")
    with pytest.raises(TypeError, match="holds a ToyNet, not a TiedLM"):
        TiedLM.from_pretrained(path)
    with pytest.raises(TypeError, match="not a SubToyNet"):
        SubToyNet.from_pretrained(path)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    path = model.save_pretrained(tmp_path / "tied")
    assert len(stored_keys(path)) == 1 and stored_keys(path) <= {"embed.weight", "to_logits.weight"}
    loaded = load_pretrained(path)
    assert loaded.to_logits.weight is loaded.embed.weight
    assert_same_state(model, loaded)
    ids = torch.tensor([[1, 2, 9]])
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("share_codebook", [False, True])
def test_child_model_lives_in_subfolder_with_weights_stored_once(tmp_path, share_codebook):
    torch.manual_seed(0)
    model = ToyDALLE(vae=perturbed(ToyVAE(), seed=3), share_codebook=share_codebook)
    path = model.save_pretrained(tmp_path / "dalle")

    assert read_config(path)["children"] == ["vae"]
    assert read_config(path / "vae")["model_type"] == "ToyVAE"
    assert stored_keys(path / "vae") == {"codebook.weight", "encoder.weight", "encoder.bias"}
    parent_keys = stored_keys(path)
    assert not any(key.startswith("vae.") for key in parent_keys)
    assert ("image_emb.weight" in parent_keys) is not share_codebook

    loaded = load_pretrained(path)
    assert type(loaded) is ToyDALLE and type(loaded.vae) is ToyVAE
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert (loaded.image_emb.weight is loaded.vae.codebook.weight) is share_codebook
    assert_same_state(model, loaded)


def test_from_config_override_builds_without_the_constructor_default(tmp_path):
    model = FetchingVAE(download=True)
    loaded = FetchingVAE.from_pretrained(model.save_pretrained(tmp_path / "fetching"))
    assert loaded.downloaded is False
    assert_same_state(model, loaded)


def test_strict_load_lists_missing_unexpected_keys_and_shape_mismatches(tmp_path):
    path = ToyNet(hidden=(8,)).save_pretrained(tmp_path / "toy")
    tensors = load_file(str(path / WEIGHTS_NAME))
    del tensors["net.0.bias"]
    tensors["bogus.weight"] = torch.zeros(2)
    tensors["net.3.weight"] = torch.zeros(1, 9)
    save_file(tensors, str(path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError) as error:
        ToyNet.from_pretrained(path)
    message = str(error.value)
    assert "missing keys (1): net.0.bias" in message
    assert "unexpected keys (1): bogus.weight" in message
    assert "net.3.weight: file (1, 9) vs model (1, 8)" in message


def test_config_from_newer_format_version_is_a_clear_error(tmp_path):
    path = ToyNet().save_pretrained(tmp_path / "toy")
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta.update(format_version=checkpoint.FORMAT_VERSION + 1, library_version="9.0.0")
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 2 .*9.0.0.*upgrade dalle_pytorch"):
        load_pretrained(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"model_type": "NoSuchModel"}, "unknown model_type 'NoSuchModel'"),
        ({"format_version": "1"}, "format_version should be a positive integer"),
        ({"format_version": True}, "format_version should be a positive integer"),
        ({"children": "vae"}, "'children' should be a list"),
        ({"config": [4]}, "'config' should be a JSON object"),
        ({"tuple_paths": [["nope"]]}, "tuple path \\['nope'\\]"),
        ({"children": ["vae"]}, "sub-models \\['vae'\\] that ToyNet does not take"),
    ],
)
def test_malformed_config_is_a_clear_error(tmp_path, edit, match):
    path = ToyNet().save_pretrained(tmp_path / "toy")
    meta = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**meta, **edit}))
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


def test_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        load_pretrained(tmp_path / "nothing")


@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"device": torch.device("cpu")}, TypeError, "config\\['device'\\] is a device"),
        ({"sizes": [1, np.int64(2)]}, TypeError, "config\\['sizes'\\]\\[1\\] is a int64"),
        ({"table": {1: "a"}}, TypeError, "has key 1; config.json needs string keys"),
        ({"lr": float("nan")}, ValueError, "config\\['lr'\\] is nan"),
        (None, TypeError, "should set `self.config`"),
    ],
)
def test_unsavable_config_is_refused_and_nothing_is_written(tmp_path, config, error, match):
    model = ToyNet()
    model.config = config
    with pytest.raises(error, match=match):
        model.save_pretrained(tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_config_naming_a_child_is_refused(tmp_path):
    model = ToyDALLE(vae=ToyVAE())
    model.config = {**model.config, "vae": None}
    with pytest.raises(TypeError, match="must not hold the sub-models \\['vae'\\]"):
        model.save_pretrained(tmp_path / "dalle")


# ---------------------------------------------------------------------------------------- atomic writes


def failing_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")
    raise OSError("disk full")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(checkpoint, "_exchange_directories", lambda a, b: False)
    old, new = ToyDALLE(vae=ToyVAE()), perturbed(ToyDALLE(vae=ToyVAE()), seed=5)
    path = old.save_pretrained(tmp_path / "dalle")
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_file", failing_save_file)
        with pytest.raises(OSError, match="disk full"):
            new.save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dalle"]  # temporary directory cleaned up
    assert_same_state(old, load_pretrained(path))

    new.save_pretrained(path)  # and replacing an existing checkpoint works on this code path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dalle"]
    assert_same_state(new, load_pretrained(path))


def test_failed_second_rename_restores_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_exchange_directories", lambda a, b: False)
    old = ToyNet()
    path = old.save_pretrained(tmp_path / "toy")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new directory moving into place
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="interrupted"):
        perturbed(ToyNet(), seed=2).save_pretrained(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    assert_same_state(old, load_pretrained(path))


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests_dir!r})
import torch
import test_checkpoint as t
from dalle_pytorch import checkpoint

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "write":  # killed while writing the new weights
    def save_file(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        die()
    checkpoint.save_file = save_file
else:  # killed between moving the old checkpoint aside and moving the new one in
    checkpoint._exchange_directories = lambda a, b: False
    real_replace, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            die()
        real_replace(src, dst)
    os.replace = replace
t.perturbed(t.ToyNet(), seed=7).save_pretrained(sys.argv[1])
"""


@pytest.mark.parametrize("moment", ["write", "swap"])
def test_sigkill_during_save_leaves_previous_checkpoint_readable(tmp_path, moment):
    old = perturbed(ToyNet(), seed=1)
    path = old.save_pretrained(tmp_path / "toy")
    script = KILL_SCRIPT.format(tests_dir=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(path), moment],
                            capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    if moment == "swap":
        assert not path.exists()
        with pytest.warns(UserWarning, match="interrupted save"):
            loaded = load_pretrained(path)
    else:
        loaded = load_pretrained(path)
    assert_same_state(old, loaded)

    new = perturbed(ToyNet(), seed=8)
    new.save_pretrained(path)  # the next save succeeds and sweeps away the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    assert_same_state(new, load_pretrained(path))


# ---------------------------------------------------------------------------------------- training state


def draw_all_rngs():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3), torch.randint(0, 100, (4,)))


def test_training_state_restores_rng_draws_and_counters(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leaves a cached second Gaussian in both generators
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    path = save_training_state(tmp_path, optimizer=optimizer, step=12, epoch=3,
                               data_position={"batch": 5, "order": torch.arange(4)}, extra={"note": "x"})
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
    load_training_state(tmp_path, optimizer=optimizer2, scheduler=scheduler2, scaler=scaler2,
                        restore_rng=False)
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
    same = all(torch.equal(a, b) for a, b in zip(straight[0].state_dict().values(),
                                                model.state_dict().values()))
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
    path = save_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer, scheduler=scheduler,
                           step=4, epoch=1)
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


# ---------------------------------------------------------------------------------------- real models


def test_discrete_vae_round_trip(tmp_path):
    vae_module = pytest.importorskip("dalle_pytorch.vae")
    if not issubclass(vae_module.DiscreteVAE, PretrainedMixin):
        pytest.skip("DiscreteVAE does not use PretrainedMixin yet")
    torch.manual_seed(0)
    vae = vae_module.DiscreteVAE(image_size=16, num_tokens=8, codebook_dim=8, num_layers=2, hidden_dim=8)
    loaded = load_pretrained(vae.save_pretrained(tmp_path / "vae"))
    assert type(loaded) is vae_module.DiscreteVAE and loaded.config == vae.config
    assert_same_state(vae, loaded)


def test_dalle_round_trip_keeps_vae_in_subfolder_and_tied_embeddings(tmp_path):
    dalle_module = pytest.importorskip("dalle_pytorch.dalle")
    vae_module = pytest.importorskip("dalle_pytorch.vae")
    if not issubclass(dalle_module.DALLE, PretrainedMixin):
        pytest.skip("DALLE does not use PretrainedMixin yet")
    torch.manual_seed(0)
    vae = vae_module.DiscreteVAE(image_size=16, num_tokens=8, codebook_dim=8, num_layers=2, hidden_dim=8)
    dalle = dalle_module.DALLE(dim=16, vae=vae, num_text_tokens=20, text_seq_len=4, depth=2, heads=2,
                               dim_head=8, share_input_output_emb=True, shared_attn_ids=(0, 0))
    path = dalle.save_pretrained(tmp_path / "dalle")
    assert read_config(path / "vae")["model_type"] == "DiscreteVAE"
    assert not any(key.startswith("vae.") for key in stored_keys(path))
    loaded = load_pretrained(path)
    assert type(loaded) is dalle_module.DALLE and loaded.config == dalle.config
    assert_same_state(dalle, loaded)
    text, image = torch.randint(1, 20, (2, 4)), torch.randint(0, 8, (2, 16))
    torch.testing.assert_close(loaded(text, image), dalle.eval()(text, image), rtol=0, atol=0)
