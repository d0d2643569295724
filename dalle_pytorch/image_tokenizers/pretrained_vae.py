"""Released image tokenizers usable as DALLE's `vae`: OpenAI's dVAE and taming VQGANs.

Both classes read the released files natively and safely: the weights are rebuilt by the restricted
unpickler of `safe_pickle` (nothing named in a file is imported or run), YAML configs are read with
`yaml.safe_load`, and the tensors are loaded into our own modules (`openai_dvae.py`, `vqgan.py`) with strict
key and shape checks. Without paths, the default files are taken from the cache directory and, when missing,
downloaded and verified by `download.py`.

Both expose what DALLE reads from any VAE: `image_size`, `num_tokens`, `num_layers` (the token grid is
`image_size // 2 ** num_layers` per side, `fmap_size`), `channels`, `get_codebook_indices(images)` and
`decode(img_seq)`, with images in [0, 1] in and out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import nn

from dalle_pytorch.image_tokenizers.openai_dvae import (
    OpenAIDecoder,
    OpenAIEncoder,
    map_pixels,
    read_released_decoder,
    read_released_encoder,
    unmap_pixels,
)
from dalle_pytorch.image_tokenizers.vqgan import VQGAN, read_vqgan_checkpoint, read_vqgan_yaml, validate_vqgan_config
from dalle_pytorch.io.budget import ModelSizeError, build_within_budget
from dalle_pytorch.io.checkpoint import PretrainedMixin
from dalle_pytorch.io.download import DownloadError, ReleasedFile, fetch_released_file
from dalle_pytorch.io.safe_pickle import CheckpointFormatError, describe, load_tensors_strict

__all__ = ["OpenAIDiscreteVAE", "VQGanVAE", "RELEASED_FILES"]

# Known release locations. Their SHA-256 is not recorded here (the files could not be fetched where this
# code was written): they are downloaded on trust on first use (`download.fetch_released_file`), checked
# by reading them with the readers below, and their hash is recorded in the cache and checked on every load.
OPENAI_ENCODER_FILE = ReleasedFile(
    cache_name="openai-dvae/encoder.pkl",
    url="https://cdn.openai.com/dall-e/encoder.pkl",
    sha256=None,
    size=None,
    description="OpenAI dVAE encoder (encoder.pkl)",
)
OPENAI_DECODER_FILE = ReleasedFile(
    cache_name="openai-dvae/decoder.pkl",
    url="https://cdn.openai.com/dall-e/decoder.pkl",
    sha256=None,
    size=None,
    description="OpenAI dVAE decoder (decoder.pkl)",
)
VQGAN_F16_1024_CHECKPOINT_FILE = ReleasedFile(
    cache_name="vqgan-imagenet-f16-1024/last.ckpt",
    url="https://heibox.uni-heidelberg.de/f/140747ba53464f49b476/?dl=1",
    sha256=None,
    size=None,
    description="taming VQGAN ImageNet f16/1024 checkpoint (last.ckpt)",
)
VQGAN_F16_1024_CONFIG_FILE = ReleasedFile(
    cache_name="vqgan-imagenet-f16-1024/model.yaml",
    url="https://heibox.uni-heidelberg.de/f/6ecf2af6c658432c8298/?dl=1",
    sha256=None,
    size=None,
    description="taming VQGAN ImageNet f16/1024 config (model.yaml)",
)
RELEASED_FILES = (OPENAI_ENCODER_FILE, OPENAI_DECODER_FILE, VQGAN_F16_1024_CHECKPOINT_FILE, VQGAN_F16_1024_CONFIG_FILE)
# how a downloaded file is checked to be the expected model before it is kept (each raises otherwise)
_VERIFY = {
    OPENAI_ENCODER_FILE: read_released_encoder,
    OPENAI_DECODER_FILE: read_released_decoder,
    VQGAN_F16_1024_CHECKPOINT_FILE: read_vqgan_checkpoint,
    VQGAN_F16_1024_CONFIG_FILE: read_vqgan_yaml,
}


def _resolve_paths(requests: list[tuple[Any, ReleasedFile, str]], cache_dir: Any) -> list[Any]:
    """Check given paths; fetch the default file for each None. One error lists every file missing."""
    for path, _, argument in requests:
        if path is not None and not isinstance(path, str | os.PathLike):
            raise TypeError(f"{argument} must be a path (str or os.PathLike) or None, got {type(path).__name__}")
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{argument}: no file at {path}")
    resolved, problems = [], []
    for path, default, argument in requests:
        try:
            if path is None:
                path = fetch_released_file(default, cache_dir, argument=argument, verify=_VERIFY.get(default))
            resolved.append(path)
        except DownloadError as error:
            problems.append(str(error))
    if problems:
        raise DownloadError("\n".join(problems))
    return resolved


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {describe(value)}")
    return value


def _elements(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(tensor.numel() for tensor in tensors.values())


def _build_checked(build: Any, stored_elements: int, source: str) -> None:
    """Build the modules a config read from a file describes, refusing one far larger than its weights
    before allocating it (see `dalle_pytorch.io.budget`)."""
    try:
        build_within_budget(build, stored_elements, source)
    except ModelSizeError as error:
        raise CheckpointFormatError(str(error)) from None


class _ImageTokenizer(PretrainedMixin, nn.Module):
    """Shared input checks and the derived grid size of a pretrained image tokenizer."""

    image_size: int
    num_tokens: int
    num_layers: int
    channels: int

    @property
    def fmap_size(self) -> int:
        """Tokens per side of the image grid."""
        return self.image_size // 2**self.num_layers

    def _check_images(self, images: Any) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError("images must be a float tensor of shape (b, 3, H, W) with values in [0, 1]")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (b, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or infinite values")
        # Other float dtypes (float64, float16) are cast to the dtype of the weights.
        return images.to(next(self.parameters()).dtype)

    def _check_codes(self, img_seq: Any) -> torch.Tensor:
        """(b, fmap_size ** 2) token ids -> (b, fmap_size, fmap_size)."""
        is_tensor = isinstance(img_seq, torch.Tensor)
        if not is_tensor or img_seq.is_floating_point() or img_seq.dtype == torch.bool:
            raise TypeError("img_seq must be an integer tensor of token ids")
        if img_seq.dim() != 2 or img_seq.shape[1] != self.fmap_size**2:
            raise ValueError(f"img_seq must have shape (b, {self.fmap_size**2}), got {tuple(img_seq.shape)}")
        if img_seq.numel() and (img_seq.min() < 0 or img_seq.max() >= self.num_tokens):
            raise ValueError(f"img_seq ids must be in [0, {self.num_tokens})")
        return rearrange(img_seq.long(), "b (h w) -> b h w", h=self.fmap_size)

    def _check_probs(self, probs: Any) -> torch.Tensor:
        """Relaxed codes (b, fmap_size ** 2, num_tokens) float, checked."""
        if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() != 3:
            raise TypeError("probs must be a (b, n, num_tokens) float tensor of weights over the codebook")
        if tuple(probs.shape[1:]) != (self.fmap_size**2, self.num_tokens):
            raise ValueError(
                f"probs must have shape (b, {self.fmap_size**2}, {self.num_tokens}), got {tuple(probs.shape)}"
            )
        return probs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} is a pretrained tokenizer: use get_codebook_indices(images) and decode(img_seq)"
        )

    @classmethod
    def _build_from_config(cls, config: Mapping[str, Any]) -> Any:
        tokenizer = cls.__new__(cls)  # skips __init__: no path resolution, no file access, no download
        nn.Module.__init__(tokenizer)
        tokenizer._build(config)
        return tokenizer

    def _build(self, config: Mapping[str, Any]) -> None:
        raise NotImplementedError


class OpenAIDiscreteVAE(_ImageTokenizer):
    """OpenAI's released DALL-E dVAE: 256x256 RGB images <-> 32x32 grids of 8192 tokens.

    encoder_path / decoder_path: the released `encoder.pkl` / `decoder.pkl` (whole pickled modules, read
    without running them). When None, they are taken from the cache directory (`cache_dir`, else
    `$DALLE_PYTORCH_CACHE`, else `~/.cache/dalle_pytorch`) and downloaded there if missing.
    The logit-Laplace pixel mapping of the paper is applied inside: images are in [0, 1] in and out.
    """

    def __init__(
        self,
        encoder_path: str | os.PathLike | None = None,
        decoder_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        encoder_path, decoder_path = _resolve_paths(
            [
                (encoder_path, OPENAI_ENCODER_FILE, "encoder_path"),
                (decoder_path, OPENAI_DECODER_FILE, "decoder_path"),
            ],
            cache_dir,
        )
        encoder_config, encoder_tensors = read_released_encoder(encoder_path)
        decoder_config, decoder_tensors = read_released_decoder(decoder_path)
        if encoder_config["vocab_size"] != decoder_config["vocab_size"]:
            raise CheckpointFormatError(
                f"encoder ({encoder_config['vocab_size']} codes) and decoder ({decoder_config['vocab_size']} "
                "codes) do not belong together"
            )
        config = {
            "image_size": 256,  # the resolution the released model was trained at
            "vocab_size": encoder_config["vocab_size"],
            "encoder": {key: encoder_config[key] for key in ("n_hid", "n_blk_per_group")},
            "decoder": {key: decoder_config[key] for key in ("n_init", "n_hid", "n_blk_per_group")},
        }
        stored = _elements(encoder_tensors) + _elements(decoder_tensors)
        _build_checked(lambda: self._build(config), stored, f"the sizes in {encoder_path} and {decoder_path}")
        load_tensors_strict(self.encoder, encoder_tensors, f"encoder file {encoder_path}")
        load_tensors_strict(self.decoder, decoder_tensors, f"decoder file {decoder_path}")

    # Defined on the class itself so it wins over any base class's _from_config.
    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> OpenAIDiscreteVAE:
        """The architecture described by `config` (weights uninitialised), built without any file."""
        return cls._build_from_config(config)

    def _build(self, config: Mapping[str, Any]) -> None:
        if (
            not isinstance(config, Mapping)
            or not isinstance(config.get("encoder"), Mapping)
            or not isinstance(config.get("decoder"), Mapping)
        ):
            raise ValueError("config must be a mapping with 'image_size', 'vocab_size', 'encoder' and 'decoder'")
        image_size = _positive_int(config.get("image_size"), "config['image_size']")
        vocab_size = _positive_int(config.get("vocab_size"), "config['vocab_size']")
        encoder = {
            key: _positive_int(config["encoder"].get(key), f"config['encoder']['{key}']")
            for key in ("n_hid", "n_blk_per_group")
        }
        decoder = {
            key: _positive_int(config["decoder"].get(key), f"config['decoder']['{key}']")
            for key in ("n_init", "n_hid", "n_blk_per_group")
        }
        if image_size % 8 or encoder["n_hid"] % 4 or decoder["n_hid"] % 4:
            raise ValueError("config image_size must be a multiple of 8 and n_hid a multiple of 4")
        self.config = {
            "image_size": image_size,
            "vocab_size": vocab_size,
            "encoder": encoder,
            "decoder": decoder,
        }
        self.image_size, self.num_tokens, self.num_layers, self.channels = image_size, vocab_size, 3, 3
        self.encoder = OpenAIEncoder(vocab_size=vocab_size, **encoder)
        self.decoder = OpenAIDecoder(vocab_size=vocab_size, **decoder)

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, 256, 256) in [0, 1] -> token ids (b, 1024), LongTensor in [0, num_tokens)."""
        images = self._check_images(images)
        logits = self.encoder(map_pixels(images))
        return rearrange(logits.argmax(dim=1), "b h w -> b (h w)")

    @torch.no_grad()
    def decode(self, img_seq: torch.Tensor) -> torch.Tensor:
        """Token ids (b, 1024) -> images (b, 3, 256, 256) in [0, 1]: each pixel distribution's mean."""
        stats = self.decoder(self._check_codes(img_seq))
        return unmap_pixels(torch.sigmoid(stats[:, : self.channels]))

    def decode_relaxed(self, probs: torch.Tensor) -> torch.Tensor:
        """Relaxed codes (b, 1024, num_tokens) -> images (b, 3, 256, 256) in [0, 1], differentiable in
        `probs`; one-hot rows give `decode`'s images. The first layer is linear in the one-hot codes, so
        weights over the codebook mix its rows."""
        embedded = self._check_probs(probs) @ self.decoder.token_embedding.weight + self.decoder.token_bias
        stats = self.decoder.blocks(rearrange(embedded, "b (h w) c -> b c h w", h=self.fmap_size))
        return unmap_pixels(torch.sigmoid(stats[:, : self.channels]))


class VQGanVAE(_ImageTokenizer):
    """A taming-transformers VQGAN (vector-quantized or Gumbel) as an image tokenizer.

    vqgan_model_path: the Lightning `.ckpt`; vqgan_config_path: its `model.yaml`. Give both, or neither for
    the default ImageNet f16 model with 1024 codes (from the cache, downloaded when missing). Image size,
    token count and grid come from the config. Images are in [0, 1] in and out.
    """

    def __init__(
        self,
        vqgan_model_path: str | os.PathLike | None = None,
        vqgan_config_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if (vqgan_model_path is None) != (vqgan_config_path is None):
            raise ValueError("give both vqgan_model_path and vqgan_config_path, or neither for the default model")
        config_path, model_path = _resolve_paths(
            [
                (vqgan_config_path, VQGAN_F16_1024_CONFIG_FILE, "vqgan_config_path"),
                (vqgan_model_path, VQGAN_F16_1024_CHECKPOINT_FILE, "vqgan_model_path"),
            ],
            cache_dir,
        )
        config = read_vqgan_yaml(config_path)
        tensors = read_vqgan_checkpoint(model_path)
        _build_checked(lambda: self._build(config), _elements(tensors), f"{config_path} (for {model_path})")
        load_tensors_strict(self.model, tensors, f"VQGAN checkpoint {model_path}")

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> VQGanVAE:
        """The architecture described by `config` (weights uninitialised), built without any file."""
        return cls._build_from_config(config)

    def _build(self, config: Mapping[str, Any]) -> None:
        self.config = validate_vqgan_config(config)
        ddconfig = self.config["ddconfig"]
        self.image_size = ddconfig["resolution"]
        self.num_tokens = self.config["n_embed"]
        self.num_layers = len(ddconfig["ch_mult"]) - 1  # one 2x downsampling between consecutive levels
        self.channels = 3
        self.model = VQGAN(self.config)

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, R, R) in [0, 1] -> token ids (b, fmap_size ** 2), LongTensor in [0, num_tokens)."""
        images = self._check_images(images)
        return rearrange(self.model.encode(2 * images - 1), "b h w -> b (h w)")

    @torch.no_grad()
    def decode(self, img_seq: torch.Tensor) -> torch.Tensor:
        """Token ids (b, fmap_size ** 2) -> images (b, 3, R, R) in [0, 1]."""
        return (self.model.decode(self._check_codes(img_seq)) + 1) / 2

    def decode_relaxed(self, probs: torch.Tensor) -> torch.Tensor:
        """Relaxed codes (b, fmap_size ** 2, num_tokens) -> images (b, 3, R, R) in [0, 1], differentiable
        in `probs`: the code vectors are mixed with these weights; one-hot rows give `decode`'s images."""
        probs = self._check_probs(probs)
        codebook = self.model.quantize.lookup(torch.arange(self.num_tokens, device=probs.device))  # (k, d)
        z = rearrange(probs @ codebook, "b (h w) d -> b d h w", h=self.fmap_size)
        return (self.model.decoder(self.model.post_quant_conv(z)).clamp(-1, 1) + 1) / 2
