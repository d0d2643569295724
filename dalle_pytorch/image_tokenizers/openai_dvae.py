"""OpenAI's released DALL-E discrete VAE (dVAE), re-implemented natively.

Architecture from the paper (Ramesh et al. 2021, https://arxiv.org/abs/2102.12092, appendix A) and the
module definitions of the `DALL-E` package (https://github.com/openai/DALL-E): four groups of
bottleneck residual blocks, max-pooling between groups in the encoder (256x256 -> 32x32 logits over 8192
codes) and nearest upsampling in the decoder, whose output holds the logit-Laplace statistics of each pixel.

The released `encoder.pkl` / `decoder.pkl` are whole pickled modules; `read_released_encoder` /
`read_released_decoder` read them with the restricted unpickler of `safe_pickle` (nothing from the file is
imported or run) and return a config plus tensors keyed for the native modules below. Parameter names
follow the released files (`blocks.group_1.block_1.res_path.conv_1.w` -> `...conv_1.weight`) except the
decoder's first 1x1 convolution over one-hot codes, which is stored as an embedding table: decoding looks
codes up instead of multiplying one-hot maps.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from einops import rearrange
from torch import nn

from dalle_pytorch.io.safe_pickle import (
    CheckpointFormatError,
    PickledObject,
    describe,
    pickled_module_tensors,
)
from dalle_pytorch.io.torch_files import load_torch_file

__all__ = [
    "GROUP_COUNT",
    "LOGIT_LAPLACE_EPS",
    "OpenAIDecoder",
    "OpenAIEncoder",
    "map_pixels",
    "read_released_decoder",
    "read_released_encoder",
    "unmap_pixels",
]

GROUP_COUNT = 4  # fixed in the released architecture: three 2x resolution changes, a 32x32 grid at 256px
LOGIT_LAPLACE_EPS = 0.1  # paper section A.3: pixels are squeezed into [eps, 1 - eps]


def map_pixels(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [eps, 1 - eps], the range the logit-Laplace likelihood is defined on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS


def unmap_pixels(images: torch.Tensor) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return ((images - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class ResidualBlock(nn.Module):
    """Bottleneck block: x -> id_path(x) + post_gain * res_path(x), res_path = 4x (ReLU, conv)."""

    def __init__(self, n_in: int, n_out: int, kernel_sizes: tuple[int, ...], post_gain: float) -> None:
        super().__init__()
        n_hid = n_out // 4
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        self.post_gain = post_gain
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for index, kernel in enumerate(kernel_sizes, start=1):
            layers[f"relu_{index}"] = nn.ReLU()
            layers[f"conv_{index}"] = nn.Conv2d(widths[index - 1], widths[index], kernel, padding=kernel // 2)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(
    widths: list[tuple[int, int]],
    kernel_sizes: tuple[int, ...],
    post_gain: float,
    resample: nn.Module | None,
    resample_name: str,
) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (f"block_{index}", ResidualBlock(n_in, n_out, kernel_sizes, post_gain))
        for index, (n_in, n_out) in enumerate(widths, start=1)
    )
    if resample is not None:
        layers[resample_name] = resample
    return nn.Sequential(layers)


class OpenAIEncoder(nn.Module):
    """Images (b, 3, H, W), already mapped by `map_pixels` -> code logits (b, vocab_size, H/8, W/8)."""

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192) -> None:
        super().__init__()
        # Residual branches are scaled by 1 / L^2 (L = total number of blocks) so the sum stays well behaved.
        post_gain = 1 / (GROUP_COUNT * n_blk_per_group) ** 2
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=nn.Conv2d(3, n_hid, 7, padding=3))
        n_in = n_hid
        for group in range(1, GROUP_COUNT + 1):
            n_out = n_hid * 2 ** (group - 1)
            widths = [(n_in if block == 0 else n_out, n_out) for block in range(n_blk_per_group)]
            pool = nn.MaxPool2d(2) if group < GROUP_COUNT else None
            layers[f"group_{group}"] = _group(widths, (3, 3, 3, 1), post_gain, pool, "pool")
            n_in = n_out
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(n_in, vocab_size, 1)))
        self.blocks = nn.Sequential(layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images)


class OpenAIDecoder(nn.Module):
    """Codes (b, h, w) in [0, vocab_size) -> pixel statistics (b, 6, 8h, 8w): 3 means, 3 log-scales.

    The released model starts with a 1x1 convolution over one-hot codes; here that is an embedding lookup
    (`token_embedding` + `token_bias`), which gives the same result without materialising one-hot maps.
    """

    def __init__(self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192) -> None:
        super().__init__()
        post_gain = 1 / (GROUP_COUNT * n_blk_per_group) ** 2
        self.token_embedding = nn.Embedding(vocab_size, n_init)
        self.token_bias = nn.Parameter(torch.zeros(n_init))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        n_in = n_init
        for group in range(1, GROUP_COUNT + 1):
            n_out = n_hid * 2 ** (GROUP_COUNT - group)
            widths = [(n_in if block == 0 else n_out, n_out) for block in range(n_blk_per_group)]
            upsample = nn.Upsample(scale_factor=2, mode="nearest") if group < GROUP_COUNT else None
            layers[f"group_{group}"] = _group(widths, (1, 3, 3, 3), post_gain, upsample, "upsample")
            n_in = n_out
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(n_in, 2 * 3, 1)))
        self.blocks = nn.Sequential(layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(codes) + self.token_bias  # (b, h, w, n_init)
        return self.blocks(rearrange(x, "b h w c -> b c h w"))


# --- reading the released pickles -------------------------------------------------------------------


def _read_pickled_module(path: str | os.PathLike, module: str, name: str) -> tuple[dict, dict]:
    root = load_torch_file(path)
    if not isinstance(root, PickledObject) or (root.pickled_module, root.pickled_name) != (module, name):
        found = root.qualified_name() if isinstance(root, PickledObject) else type(root).__name__
        raise CheckpointFormatError(f"{path} should hold a pickled {module}.{name}, found {found}")
    if not isinstance(root.state, dict):
        raise CheckpointFormatError(f"{path}: the pickled {name} has no attribute dictionary")
    return root.state, pickled_module_tensors(root)


def _int_attribute(state: dict, key: str, path: Any, minimum: int = 1) -> int:
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CheckpointFormatError(f"{path}: attribute {key!r} should be an int >= {minimum}, found {describe(value)}")
    return value


def _native_key(released_key: str) -> str:
    """`...conv_1.w` -> `...conv_1.weight`, `...conv_1.b` -> `...conv_1.bias` (the released names)."""
    stem, _, leaf = released_key.rpartition(".")
    if leaf not in ("w", "b"):
        raise CheckpointFormatError(f"unexpected parameter {describe(released_key)} in the released file")
    return f"{stem}.{'weight' if leaf == 'w' else 'bias'}"


def read_released_encoder(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Read OpenAI's `encoder.pkl`: (OpenAIEncoder kwargs, tensors keyed for OpenAIEncoder)."""
    state, tensors = _read_pickled_module(path, "dall_e.encoder", "Encoder")
    if _int_attribute(state, "input_channels", path) != 3:
        raise CheckpointFormatError(f"{path}: only 3-channel (RGB) encoders are supported")
    config = {key: _int_attribute(state, key, path) for key in ("n_hid", "n_blk_per_group", "vocab_size")}
    return config, {_native_key(key): tensor for key, tensor in tensors.items()}


def read_released_decoder(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Read OpenAI's `decoder.pkl`: (OpenAIDecoder kwargs, tensors keyed for OpenAIDecoder)."""
    state, tensors = _read_pickled_module(path, "dall_e.decoder", "Decoder")
    if _int_attribute(state, "output_channels", path) != 3:
        raise CheckpointFormatError(f"{path}: only 3-channel (RGB) decoders are supported")
    config = {key: _int_attribute(state, key, path) for key in ("n_init", "n_hid", "n_blk_per_group", "vocab_size")}
    native = {}
    for key, tensor in tensors.items():
        if key == "blocks.input.w":  # (n_init, vocab, 1, 1) 1x1 conv over one-hot codes -> embedding table
            if tensor.dim() != 4 or tensor.shape[2:] != (1, 1):
                raise CheckpointFormatError(
                    f"{path}: blocks.input.w has shape {tuple(tensor.shape)}, expected (n_init, vocab_size, 1, 1)"
                )
            native["token_embedding.weight"] = rearrange(tensor, "o v 1 1 -> v o")
        elif key == "blocks.input.b":
            native["token_bias"] = tensor
        else:
            native[_native_key(key)] = tensor
    return config, native
