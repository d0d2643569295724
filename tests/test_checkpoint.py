"""Tests for dalle_pytorch.io.checkpoint: model directories, their atomic saves, real models.

Training state and rotation: test_training_state.py; the atomic-write primitives: test_atomic.py."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from toy_models import (
    FetchingVAE,
    SubToyNet,
    TiedLM,
    ToyDALLE,
    ToyNet,
    ToyVAE,
    assert_same_state,
    perturbed,
    stored_keys,
)

from dalle_pytorch import DALLE, DiscreteVAE
from dalle_pytorch._version import __version__
from dalle_pytorch.io import atomic, checkpoint
from dalle_pytorch.io.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    PretrainedMixin,
    load_pretrained,
    read_config,
)

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
        monkeypatch.setattr(atomic, "_exchange_directories", lambda a, b: False)
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
    monkeypatch.setattr(atomic, "_exchange_directories", lambda a, b: False)
    old = ToyNet()
    path = old.save_pretrained(tmp_path / "toy")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new directory moving into place
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="interrupted"):
        perturbed(ToyNet(), seed=2).save_pretrained(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    assert_same_state(old, load_pretrained(path))


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests_dir!r})
import torch
import toy_models as t
from dalle_pytorch.io import atomic, checkpoint

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "write":  # killed while writing the new weights
    def save_file(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        die()
    checkpoint.save_file = save_file
else:  # killed between moving the old checkpoint aside and moving the new one in
    atomic._exchange_directories = lambda a, b: False
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
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(path), moment], capture_output=True, timeout=120
    )
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


# ---------------------------------------------------------------------------------------- real models


def test_discrete_vae_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_tokens=8, codebook_dim=8, num_layers=2, hidden_dim=8)
    loaded = load_pretrained(vae.save_pretrained(tmp_path / "vae"))
    assert type(loaded) is DiscreteVAE and loaded.config == vae.config
    assert_same_state(vae, loaded)


def test_dalle_round_trip_keeps_vae_in_subfolder_and_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_tokens=8, codebook_dim=8, num_layers=2, hidden_dim=8)
    dalle = DALLE(
        dim=16,
        vae=vae,
        num_text_tokens=20,
        text_seq_len=4,
        depth=2,
        heads=2,
        dim_head=8,
        share_input_output_emb=True,
        shared_attn_ids=(0, 0),
    )
    path = dalle.save_pretrained(tmp_path / "dalle")
    assert read_config(path / "vae")["model_type"] == "DiscreteVAE"
    assert not any(key.startswith("vae.") for key in stored_keys(path))
    loaded = load_pretrained(path)
    assert type(loaded) is DALLE and loaded.config == dalle.config
    assert_same_state(dalle, loaded)
    text, image = torch.randint(1, 20, (2, 4)), torch.randint(0, 8, (2, 16))
    torch.testing.assert_close(loaded(text, image), dalle.eval()(text, image), rtol=0, atol=0)
