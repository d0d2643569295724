"""Hostile and broken model folders, released-tokenizer files and training states: refused at once with an
error naming the file and the problem, never a huge allocation, a traceback from deep inside or garbage."""

import json
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dalle_pytorch import DALLE, DiscreteVAE
from dalle_pytorch.image_tokenizers.pretrained_vae import VQGanVAE
from dalle_pytorch.image_tokenizers.vqgan import VQGAN, read_vqgan_yaml
from dalle_pytorch.io.checkpoint import CheckpointError
from dalle_pytorch.io.safe_pickle import CheckpointFormatError
from dalle_pytorch.training.state import load_training_state, save_checkpoint
from tests.conftest import make_dalle, make_vae


def _edit_config(directory, **changes):
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    meta["config"].update(changes)
    path.write_text(json.dumps(meta))


def _timed(call):
    started = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        call()
    return caught.value, time.perf_counter() - started


# ------------------------------------------------------------------------------------------ sizes


def test_dalle_config_with_absurd_depth_fails_at_once(tmp_path):
    make_dalle().save_pretrained(tmp_path / "dalle")
    _edit_config(tmp_path / "dalle", depth=10**6)
    error, seconds = _timed(lambda: DALLE.from_pretrained(tmp_path / "dalle"))
    assert isinstance(error, CheckpointError)
    assert "config.json" in str(error) and "larger than the weights" in str(error)
    assert seconds < 5


def test_vae_config_with_one_huge_layer_is_refused_before_allocating(tmp_path):
    make_vae().save_pretrained(tmp_path / "vae")
    _edit_config(tmp_path / "vae", num_tokens=2**40)  # one (2**40, 16) codebook: 64 TB
    error, seconds = _timed(lambda: DiscreteVAE.from_pretrained(tmp_path / "vae"))
    assert "larger than the weights" in str(error) and seconds < 2


def _tiny_vqgan_config(**ddconfig_changes):
    ddconfig = dict(ch=32, out_ch=3, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], in_channels=3,
                    resolution=16, z_channels=32)  # fmt: skip
    return {"ddconfig": {**ddconfig, **ddconfig_changes}, "n_embed": 16, "embed_dim": 32, "quantizer": "vector"}


def _write_vqgan_files(directory, config, yaml_config):
    directory.mkdir()
    torch.save({"state_dict": VQGAN(config).state_dict()}, directory / "last.ckpt")
    params = {"embed_dim": yaml_config["embed_dim"], "n_embed": yaml_config["n_embed"], **yaml_config}
    document = {"model": {"target": "taming.models.vqgan.VQModel", "params": params}}
    (directory / "model.yaml").write_text(yaml.safe_dump(document))
    return directory / "last.ckpt", directory / "model.yaml"


def test_vqgan_yaml_describing_a_huge_model_fails_before_building_it(tmp_path):
    huge = _tiny_vqgan_config(num_res_blocks=100000)
    checkpoint, config = _write_vqgan_files(tmp_path / "vqgan", _tiny_vqgan_config(), huge)
    error, seconds = _timed(lambda: VQGanVAE(checkpoint, config))
    assert isinstance(error, CheckpointFormatError) and "model.yaml" in str(error)
    assert seconds < 5


def test_vqgan_with_matching_files_still_loads(tmp_path):
    checkpoint, config = _write_vqgan_files(tmp_path / "vqgan", _tiny_vqgan_config(), _tiny_vqgan_config())
    assert VQGanVAE(checkpoint, config).num_tokens == 16


def test_openai_encoder_with_absurd_block_count_fails_at_once(tmp_path):
    dall_e_encoder = pytest.importorskip("dall_e.encoder")
    dall_e_decoder = pytest.importorskip("dall_e.decoder")
    encoder = dall_e_encoder.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    decoder = dall_e_decoder.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    object.__setattr__(encoder, "n_blk_per_group", 100000)  # only the recorded attribute: weights stay small
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    from dalle_pytorch import OpenAIDiscreteVAE

    error, seconds = _timed(lambda: OpenAIDiscreteVAE(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"))
    assert isinstance(error, CheckpointFormatError) and "encoder.pkl" in str(error)
    assert "larger than the weights" in str(error) and seconds < 5


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for index in range(1, 9):
        previous, name = chr(ord("a") + index - 1), chr(ord("a") + index)
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    # The bomb sits where a config error message would print it: as ch_mult, whose entries must be ints.
    lines.append("model: {target: taming.models.vqgan.VQModel, params: {n_embed: 16, embed_dim: 32, ddconfig: "
                 "{ch: 32, out_ch: 3, ch_mult: *i, num_res_blocks: 1, attn_resolutions: [], in_channels: 3, "
                 "resolution: 16, z_channels: 32}}}")  # fmt: skip
    path = tmp_path / "model.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1200

    error, seconds = _timed(lambda: read_vqgan_yaml(path))
    assert "aliases" in str(error) and seconds < 1
    assert len(str(error)) < 600


def test_yaml_without_aliases_still_reads(tmp_path):
    path = tmp_path / "model.yaml"
    document = {"model": {"target": "taming.models.vqgan.VQModel", "params": _tiny_vqgan_config()}}
    path.write_text(yaml.safe_dump(document))
    assert read_vqgan_yaml(path)["n_embed"] == 16


# ------------------------------------------------------------------------------------------ clear errors


def test_config_value_of_the_wrong_type_names_file_and_key(tmp_path):
    make_vae().save_pretrained(tmp_path / "vae")
    _edit_config(tmp_path / "vae", hidden_dim="16")
    with pytest.raises(CheckpointError, match=r"config\.json: config\['hidden_dim'\] should be a int, found str"):
        DiscreteVAE.from_pretrained(tmp_path / "vae")


def test_config_value_the_constructor_rejects_names_the_file(tmp_path):
    make_vae().save_pretrained(tmp_path / "vae")
    _edit_config(tmp_path / "vae", num_layers=-1)
    with pytest.raises(CheckpointError, match=r"config\.json: cannot build a DiscreteVAE.*num_layers"):
        DiscreteVAE.from_pretrained(tmp_path / "vae")


def test_deeply_nested_config_json_is_a_clear_error(tmp_path):
    make_vae().save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointError, match="config.json is nested too deeply"):
        DiscreteVAE.from_pretrained(tmp_path / "vae")


def _rewrite_weights(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_integer_weights_where_floats_are_expected_are_refused(tmp_path):
    make_vae().save_pretrained(tmp_path / "vae")
    _rewrite_weights(tmp_path / "vae", lambda t: t.update({"codebook.weight": t["codebook.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*codebook\.weight: file has dtype torch\.int32"):
        DiscreteVAE.from_pretrained(tmp_path / "vae")


def test_nan_weights_are_refused(tmp_path):
    make_vae().save_pretrained(tmp_path / "vae")
    _rewrite_weights(tmp_path / "vae", lambda t: t["codebook.weight"].view(-1)[3].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*codebook\.weight: holds NaN"):
        DiscreteVAE.from_pretrained(tmp_path / "vae")


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_broken_safetensors_file_is_named(tmp_path, damage):
    make_vae().save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        DiscreteVAE.from_pretrained(tmp_path / "vae")


# ------------------------------------------------------------------------------------------ training state


def _checkpoint_with_state(tmp_path):
    model = make_vae()
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer, step=3, epoch=0)
    return tmp_path / "ckpt", model, optimizer


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_training_state_is_a_clear_error(tmp_path, damage):
    directory, _, optimizer = _checkpoint_with_state(tmp_path)
    path = directory / "training_state.pt"
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"training_state\.pt is (empty|truncated)"):
        load_training_state(directory, optimizer=optimizer)


def test_training_state_without_rng_fails_before_restoring_anything(tmp_path):
    directory, model, optimizer = _checkpoint_with_state(tmp_path)
    path = directory / "training_state.pt"
    state = torch.load(path, weights_only=True)
    del state["rng"]
    torch.save(state, path)
    fresh = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"training_state\.pt has no 'rng' entry"):
        load_training_state(directory, optimizer=fresh)
    assert fresh.state_dict()["state"] == {}  # nothing half-restored


def test_config_types_follow_the_annotation_not_the_default(tmp_path):
    # DALLE's loss_img_weight defaults to the int 7 but is a float: 7.5 in config.json is valid.
    make_dalle(loss_img_weight=7.5).save_pretrained(tmp_path / "dalle")
    assert DALLE.from_pretrained(tmp_path / "dalle").loss_img_weight == 7.5
    _edit_config(tmp_path / "dalle", heads=2.0)
    with pytest.raises(CheckpointError, match=r"config\['heads'\] should be a int, found float"):
        DALLE.from_pretrained(tmp_path / "dalle")
