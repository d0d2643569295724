"""OpenAIDiscreteVAE and VQGanVAE load real-format files and match the reference implementations.

References: the official `dall_e` package (`pip install --no-deps DALL-E attrs`) and taming's modules
(`pip install --no-deps taming-transformers-rom1504`), built with random weights and saved the way the
released files are (whole pickled modules / Lightning checkpoints + YAML).
"""

import functools
import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dalle_pytorch.image_tokenizers.openai_dvae import map_pixels
from dalle_pytorch.image_tokenizers.pretrained_vae import OpenAIDiscreteVAE, VQGanVAE
from dalle_pytorch.io.download import DownloadError
from dalle_pytorch.io.safe_pickle import CheckpointFormatError

REFERENCE_INSTALL = "pip install --no-deps DALL-E==0.1 taming-transformers-rom1504==0.0.6 && pip install attrs requests"


def _reference(module_name: str):
    """The reference implementations are required: a missing one fails with how to install it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"reference implementation missing ({error}): {REFERENCE_INSTALL}") from error


dall_e_encoder = _reference("dall_e.encoder")
dall_e_decoder = _reference("dall_e.decoder")
dall_e_utils = _reference("dall_e.utils")
taming_model = _reference("taming.modules.diffusionmodules.model")
taming_quantize = _reference("taming.modules.vqvae.quantize")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_OPENAI = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)  # the official classes' minimum sizes
TINY_OPENAI_DECODER = dict(n_init=32, **TINY_OPENAI)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, including biases and norm affines the defaults leave at 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.02 * torch.randn(p.shape, generator=g))
            else:
                std = 1.0 if "embed" in name else p[0].numel() ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=g))


def _official_openai(seed: int = 0, encoder_kwargs=TINY_OPENAI, decoder_kwargs=TINY_OPENAI_DECODER):
    encoder = dall_e_encoder.Encoder(**encoder_kwargs)
    decoder = dall_e_decoder.Decoder(**decoder_kwargs)
    _randomize(encoder, seed)
    _randomize(decoder, seed + 1)
    return encoder, decoder


def _official_codes_and_images(encoder, decoder, images):
    with torch.no_grad():
        codes = encoder(dall_e_utils.map_pixels(images)).argmax(dim=1)  # (b, h, w)
        one_hot = F.one_hot(codes, encoder.vocab_size).permute(0, 3, 1, 2).float()
        stats = decoder(one_hot).float()
        decoded = dall_e_utils.unmap_pixels(torch.sigmoid(stats[:, :3]))
    return codes.flatten(1), decoded


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """Tiny official encoder/decoder with random weights, saved as released: torch.save of the module."""
    directory = tmp_path_factory.mktemp("openai")
    encoder, decoder = _official_openai()
    torch.save(encoder, directory / "encoder.pkl")
    torch.save(decoder, directory / "decoder.pkl")
    return directory, encoder, decoder


def _images(batch: int, size: int, seed: int = 3) -> torch.Tensor:
    """High-contrast blocky images: random networks give them more varied codes than uniform noise."""
    cells = torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).round()
    return F.interpolate(cells, size=(size, size), mode="nearest").clamp(0.05, 0.95)


# --- OpenAIDiscreteVAE ----------------------------------------------------------------------------------


def test_openai_loads_in_a_process_where_the_file_cannot_run_code(openai_files, tmp_path):
    directory, encoder, decoder = openai_files
    images = _images(1, 256)
    torch.save(images, tmp_path / "images.pt")
    # The child blocks the `dall_e` package the pickles name: unpickling them normally would import it.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dall_e"] = None
        import torch
        from dalle_pytorch.image_tokenizers.pretrained_vae import OpenAIDiscreteVAE
        vae = OpenAIDiscreteVAE(encoder_path={str(directory / "encoder.pkl")!r},
                                decoder_path={str(directory / "decoder.pkl")!r})
        images = torch.load({str(tmp_path / "images.pt")!r}, weights_only=True)
        codes = vae.get_codebook_indices(images)
        torch.save({{"codes": codes, "decoded": vae.decode(codes)}}, {str(tmp_path / "out.pt")!r})
        assert [name for name in sys.modules if name.startswith("dall_e")] == ["dall_e"]
        assert sys.modules["dall_e"] is None
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=240)

    ours = torch.load(tmp_path / "out.pt", weights_only=True)
    codes, decoded = _official_codes_and_images(encoder, decoder, images)
    assert codes.unique().numel() > 1  # a meaningful comparison, not a constant map
    assert torch.equal(ours["codes"], codes)
    torch.testing.assert_close(ours["decoded"], decoded)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_openai_native_modules_match_official(openai_files, tmp_path, legacy_format):
    _, encoder, decoder = openai_files
    torch.save(encoder, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=not legacy_format)
    torch.save(decoder, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=not legacy_format)
    vae = OpenAIDiscreteVAE(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")
    images = _images(2, 32)  # the networks are convolutional: a small input exercises every layer
    with torch.no_grad():
        torch.testing.assert_close(vae.encoder(map_pixels(images)), encoder(dall_e_utils.map_pixels(images)))
        codes = torch.randint(0, 512, (2, 4, 4), generator=torch.Generator().manual_seed(1))
        one_hot = F.one_hot(codes, 512).permute(0, 3, 1, 2).float()
        torch.testing.assert_close(vae.decoder(codes), decoder(one_hot))


def test_openai_interface_and_config(openai_files):
    directory, _, _ = openai_files
    vae = OpenAIDiscreteVAE(directory / "encoder.pkl", directory / "decoder.pkl")
    attributes = (vae.image_size, vae.num_tokens, vae.num_layers, vae.channels, vae.fmap_size)
    assert attributes == (256, 512, 3, 3, 32)
    assert isinstance(vae, torch.nn.Module)
    assert vae.config == {
        "image_size": 256,
        "vocab_size": 512,
        "encoder": {"n_hid": 64, "n_blk_per_group": 1},
        "decoder": {"n_init": 32, "n_hid": 64, "n_blk_per_group": 1},
    }
    # decode is a lookup: the one-hot 1x1 convolution became a (vocab, n_init) embedding table
    assert vae.decoder.token_embedding.weight.shape == (512, 32)
    # Rebuilt from its JSON config without files, then given the weights: the same network.
    rebuilt = OpenAIDiscreteVAE._from_config(json.loads(json.dumps(vae.config)))
    rebuilt.load_state_dict(vae.state_dict())
    codes = torch.randint(0, 512, (1, 3, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.decoder(codes), vae.decoder(codes))


def test_openai_input_validation(openai_files):
    directory, _, _ = openai_files
    vae = OpenAIDiscreteVAE._from_config(
        {
            "image_size": 16,
            "vocab_size": 8,
            "encoder": {"n_hid": 4, "n_blk_per_group": 1},
            "decoder": {"n_init": 4, "n_hid": 4, "n_blk_per_group": 1},
        }
    )
    assert vae.fmap_size == 2
    assert vae.get_codebook_indices(_images(2, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"images must have shape \(b, 3, 16, 16\)"):
        vae.get_codebook_indices(_images(1, 32))
    with pytest.raises(TypeError, match="images"):
        vae.get_codebook_indices(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="img_seq"):
        vae.decode(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"img_seq must have shape \(b, 4\)"):
        vae.decode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 8\)"):
        vae.decode(torch.full((1, 4), 8))
    with pytest.raises(ValueError, match="n_hid"):
        OpenAIDiscreteVAE._from_config({"image_size": 16, "vocab_size": 8, "encoder": {"n_hid": 0}, "decoder": {}})
    with pytest.raises(TypeError, match="encoder_path"):
        OpenAIDiscreteVAE(encoder_path=3, decoder_path=directory / "decoder.pkl")
    with pytest.raises(FileNotFoundError, match="decoder_path"):
        OpenAIDiscreteVAE(directory / "encoder.pkl", directory / "missing.pkl")


def test_openai_rejects_wrong_files(openai_files, tmp_path):
    directory, encoder, _ = openai_files
    with pytest.raises(CheckpointFormatError, match="dall_e.decoder.Decoder, found dall_e.encoder.Encoder"):
        OpenAIDiscreteVAE(directory / "encoder.pkl", directory / "encoder.pkl")

    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes((directory / "encoder.pkl").read_bytes()[:5000])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        OpenAIDiscreteVAE(truncated, directory / "decoder.pkl")

    state_dict_only = tmp_path / "state_dict.pt"
    torch.save(encoder.state_dict(), state_dict_only)
    with pytest.raises(CheckpointFormatError, match="should hold a pickled dall_e.encoder.Encoder"):
        OpenAIDiscreteVAE(state_dict_only, directory / "decoder.pkl")

    reshaped, _ = _official_openai()
    reshaped.blocks.output.conv.w = torch.nn.Parameter(torch.zeros(512, 512, 3, 3))
    torch.save(reshaped, tmp_path / "reshaped.pkl")
    with pytest.raises(CheckpointFormatError, match=r"output.conv.weight has shape \(512, 512, 3, 3\)"):
        OpenAIDiscreteVAE(tmp_path / "reshaped.pkl", directory / "decoder.pkl")

    missing, _ = _official_openai()
    del missing.blocks.group_1.block_1.res_path.conv_2._parameters["b"]
    torch.save(missing, tmp_path / "missing.pkl")
    with pytest.raises(CheckpointFormatError, match="group_1.block_1.res_path.conv_2.bias"):
        OpenAIDiscreteVAE(tmp_path / "missing.pkl", directory / "decoder.pkl")

    other_vocab = dall_e_decoder.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=1024)
    torch.save(other_vocab, tmp_path / "other_vocab.pkl")
    with pytest.raises(CheckpointFormatError, match="do not belong together"):
        OpenAIDiscreteVAE(directory / "encoder.pkl", tmp_path / "other_vocab.pkl")


def test_openai_default_files_come_from_the_cache(openai_files, tmp_path, monkeypatch):
    directory, _, _ = openai_files
    monkeypatch.setenv("DALLE_PYTORCH_OFFLINE", "1")
    with pytest.raises(DownloadError, match="encoder_path=") as raised:
        OpenAIDiscreteVAE(cache_dir=tmp_path)
    for name in ("encoder.pkl", "decoder.pkl"):  # one error names every missing file and its place
        assert str(tmp_path / "openai-dvae" / name) in str(raised.value)
    assert "https://cdn.openai.com/dall-e/decoder.pkl" in str(raised.value)

    (tmp_path / "openai-dvae").mkdir()
    for name in ("encoder.pkl", "decoder.pkl"):
        (tmp_path / "openai-dvae" / name).write_bytes((directory / name).read_bytes())
    monkeypatch.setenv("DALLE_PYTORCH_CACHE", str(tmp_path))
    assert OpenAIDiscreteVAE().num_tokens == 512


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP server over a folder laid out like the cache, as DALLE_PYTORCH_BASE_URL."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("DALLE_PYTORCH_OFFLINE", raising=False)
    monkeypatch.setenv("DALLE_PYTORCH_BASE_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
    yield root
    httpd.shutdown()
    httpd.server_close()


def test_openai_without_recorded_checksum_downloads_on_trust_on_first_use(openai_files, mirror, tmp_path):
    directory, _, _ = openai_files
    (mirror / "openai-dvae").mkdir()
    # a file that is not a dVAE encoder is refused by its structure check and not kept
    (mirror / "openai-dvae" / "encoder.pkl").write_bytes((directory / "decoder.pkl").read_bytes())
    (mirror / "openai-dvae" / "decoder.pkl").write_bytes((directory / "decoder.pkl").read_bytes())
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="does not hold the expected file") as raised:
        OpenAIDiscreteVAE(cache_dir=cache)
    assert "dall_e.encoder" in str(raised.value) and "encoder_path=" in str(raised.value)
    assert not (cache / "openai-dvae" / "encoder.pkl").exists()

    (mirror / "openai-dvae" / "encoder.pkl").write_bytes((directory / "encoder.pkl").read_bytes())
    vae = OpenAIDiscreteVAE(cache_dir=cache)
    assert vae.num_tokens == 512
    for name in ("encoder.pkl", "decoder.pkl"):
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        assert (cache / "openai-dvae" / f"{name}.sha256").read_text().strip() == digest
    # the record is checked on every later load
    (cache / "openai-dvae" / "decoder.pkl").write_bytes((directory / "encoder.pkl").read_bytes())
    with pytest.raises(DownloadError, match="changed since it was downloaded"):
        OpenAIDiscreteVAE(cache_dir=cache)


@pytest.mark.slow
def test_openai_full_size_matches_official(tmp_path):
    encoder, decoder = _official_openai(seed=5, encoder_kwargs={}, decoder_kwargs={})
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    vae = OpenAIDiscreteVAE(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")
    assert (vae.num_tokens, vae.fmap_size) == (8192, 32)
    images = _images(1, 256)
    codes, decoded = _official_codes_and_images(encoder, decoder, images)
    assert torch.equal(vae.get_codebook_indices(images), codes)
    torch.testing.assert_close(vae.decode(codes), decoded)


# --- VQGanVAE -----------------------------------------------------------------------------------------

TINY_DDCONFIG = dict(
    double_z=False,
    z_channels=32,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[16],
    dropout=0.0,
)


class LightningCallbackStandIn:
    """Lightning checkpoints hold objects of arbitrary classes (callbacks); they must stay inert."""

    def __init__(self):
        self.best_model_score = torch.tensor(0.5)


def _taming_vqgan(quantizer: str, ddconfig: dict, n_embed: int, embed_dim: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    modules = {
        "encoder": taming_model.Encoder(**ddconfig),
        "decoder": taming_model.Decoder(**ddconfig),
        "quant_conv": torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1),
        "post_quant_conv": torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1),
        "quantize": (
            taming_quantize.GumbelQuantize(ddconfig["z_channels"], embed_dim, n_embed=n_embed)
            if quantizer == "gumbel"
            else taming_quantize.VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        ),
    }
    for index, module in enumerate(modules.values()):
        _randomize(module, seed + index)
        module.eval()
    return modules


def _write_vqgan(
    directory: Path, modules: dict, quantizer: str, ddconfig: dict, n_embed: int, embed_dim: int
) -> tuple[Path, Path]:
    """A Lightning-style checkpoint and a model.yaml laid out like the released taming files."""
    state_dict = OrderedDict(
        (f"{prefix}.{key}", tensor) for prefix, module in modules.items() for key, tensor in module.state_dict().items()
    )
    state_dict["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # ignored by the loader
    state_dict["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    checkpoint = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.0.8",
        "callbacks": {LightningCallbackStandIn: LightningCallbackStandIn()},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(8)}}, "param_groups": [{"lr": 4.5e-6}]}],
        "lr_schedulers": [],
        "state_dict": state_dict,
    }
    target = "taming.models.vqgan.GumbelVQ" if quantizer == "gumbel" else "taming.models.vqgan.VQModel"
    params = {
        "embed_dim": embed_dim,
        "n_embed": n_embed,
        "ddconfig": ddconfig,
        "lossconfig": {
            "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {"disc_start": 250001, "disc_weight": 0.8},
        },
    }
    if quantizer == "gumbel":
        params["kl_weight"] = 1.0e-08
        params["temperature_scheduler_config"] = {
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "lr_start": 0.9},
        }
    config = {"model": {"base_learning_rate": 4.5e-06, "target": target, "params": params}}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, directory / "last.ckpt")
    (directory / "model.yaml").write_text(yaml.safe_dump(config))
    return directory / "last.ckpt", directory / "model.yaml"


def _taming_codes_and_images(modules: dict, quantizer: str, images: torch.Tensor, embed_dim: int):
    with torch.no_grad():
        h = modules["quant_conv"](modules["encoder"](2 * images - 1))
        if quantizer == "gumbel":
            codes = modules["quantize"].proj(h).argmax(1)  # noise-free limit of the Gumbel sample
        else:
            codes = modules["quantize"](h)[2][2].view(h.shape[0], h.shape[2], h.shape[3])
        b, height, width = codes.shape
        z_q = modules["quantize"].get_codebook_entry(codes.reshape(-1), (b, height, width, embed_dim))
        decoded = modules["decoder"](modules["post_quant_conv"](z_q))
    return codes.flatten(1), (decoded.clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("quantizer,n_embed,embed_dim", [("vector", 64, 16), ("gumbel", 64, 32)])
def test_vqgan_matches_taming(tmp_path, quantizer, n_embed, embed_dim):
    modules = _taming_vqgan(quantizer, TINY_DDCONFIG, n_embed, embed_dim)
    ckpt, config = _write_vqgan(tmp_path, modules, quantizer, TINY_DDCONFIG, n_embed, embed_dim)

    vae = VQGanVAE(ckpt, config)

    assert (vae.image_size, vae.num_tokens, vae.num_layers, vae.channels, vae.fmap_size) == (32, 64, 1, 3, 16)
    assert vae.config["quantizer"] == quantizer
    images = _images(2, 32)
    codes, decoded = _taming_codes_and_images(modules, quantizer, images, embed_dim)
    assert codes.unique().numel() > 1
    ours = vae.get_codebook_indices(images)
    assert ours.dtype == torch.long and ours.shape == (2, 256)
    assert torch.equal(ours, codes)
    torch.testing.assert_close(vae.decode(codes), decoded)


def test_vqgan_config_round_trip_and_validation(tmp_path):
    modules = _taming_vqgan("vector", TINY_DDCONFIG, 64, 16)
    vae = VQGanVAE(*_write_vqgan(tmp_path, modules, "vector", TINY_DDCONFIG, 64, 16))
    rebuilt = VQGanVAE._from_config(json.loads(json.dumps(vae.config)))
    rebuilt.load_state_dict(vae.state_dict())
    codes = torch.randint(0, 64, (1, 256), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rebuilt.decode(codes), vae.decode(codes))

    bad = json.loads(json.dumps(vae.config))
    bad["ddconfig"]["ch"] = 24
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGanVAE._from_config(bad)
    with pytest.raises(ValueError, match="quantizer"):
        VQGanVAE._from_config({**vae.config, "quantizer": "ema"})
    with pytest.raises(ValueError, match="RGB"):
        VQGanVAE._from_config({**vae.config, "ddconfig": {**vae.config["ddconfig"], "in_channels": 1}})
    with pytest.raises(ValueError, match="both"):
        VQGanVAE(vqgan_model_path=tmp_path / "last.ckpt")


def test_vqgan_yaml_is_read_safely(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    modules = _taming_vqgan("vector", TINY_DDCONFIG, 64, 16)
    ckpt, _ = _write_vqgan(tmp_path / "files", modules, "vector", TINY_DDCONFIG, 64, 16)
    with pytest.raises(ValueError, match="not a plain YAML config"):
        VQGanVAE(ckpt, config)
    assert not marker.exists()

    unknown_target = tmp_path / "unknown.yaml"
    unknown_target.write_text(yaml.safe_dump({"model": {"target": "os.system", "params": {}}}))
    with pytest.raises(ValueError, match="not a supported VQGAN"):
        VQGanVAE(ckpt, unknown_target)


def test_vqgan_rejects_wrong_checkpoints(tmp_path):
    modules = _taming_vqgan("vector", TINY_DDCONFIG, 64, 16)
    ckpt, config = _write_vqgan(tmp_path, modules, "vector", TINY_DDCONFIG, 64, 16)

    with pytest.raises(CheckpointFormatError, match="truncated"):
        truncated = tmp_path / "truncated.ckpt"
        truncated.write_bytes(ckpt.read_bytes()[:20000])
        VQGanVAE(truncated, config)

    not_a_checkpoint = tmp_path / "page.ckpt"
    not_a_checkpoint.write_text("<html>quota exceeded</html>")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        VQGanVAE(not_a_checkpoint, config)

    bigger_codebook = _taming_vqgan("vector", TINY_DDCONFIG, 128, 16)
    other_ckpt, _ = _write_vqgan(tmp_path / "other", bigger_codebook, "vector", TINY_DDCONFIG, 128, 16)
    with pytest.raises(CheckpointFormatError, match=r"quantize.embedding.weight has shape \(128, 16\)"):
        VQGanVAE(other_ckpt, config)

    gumbel_modules = _taming_vqgan("gumbel", TINY_DDCONFIG, 64, 32)
    gumbel_ckpt, _ = _write_vqgan(tmp_path / "gumbel", gumbel_modules, "gumbel", TINY_DDCONFIG, 64, 32)
    with pytest.raises(CheckpointFormatError, match="missing keys.*quantize.embedding.weight"):
        VQGanVAE(gumbel_ckpt, config)


def test_vqgan_default_files_come_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_PYTORCH_OFFLINE", "1")
    with pytest.raises(DownloadError, match="vqgan_config_path=") as raised:
        VQGanVAE(cache_dir=tmp_path)
    assert str(tmp_path / "vqgan-imagenet-f16-1024" / "model.yaml") in str(raised.value)
    assert str(tmp_path / "vqgan-imagenet-f16-1024" / "last.ckpt") in str(raised.value)

    modules = _taming_vqgan("vector", TINY_DDCONFIG, 64, 16)
    _write_vqgan(tmp_path / "vqgan-imagenet-f16-1024", modules, "vector", TINY_DDCONFIG, 64, 16)
    assert VQGanVAE(cache_dir=tmp_path).num_tokens == 64


@pytest.mark.slow
def test_vqgan_imagenet_f16_1024_size_matches_taming(tmp_path):
    ddconfig = dict(
        double_z=False,
        z_channels=256,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=[1, 1, 2, 2, 4],
        num_res_blocks=2,
        attn_resolutions=[16],
        dropout=0.0,
    )
    modules = _taming_vqgan("vector", ddconfig, 1024, 256)
    vae = VQGanVAE(*_write_vqgan(tmp_path, modules, "vector", ddconfig, 1024, 256))
    assert (vae.image_size, vae.num_layers, vae.fmap_size) == (256, 4, 16)
    images = _images(1, 256)
    codes, decoded = _taming_codes_and_images(modules, "vector", images, 256)
    assert torch.equal(vae.get_codebook_indices(images), codes)
    torch.testing.assert_close(vae.decode(codes), decoded)
