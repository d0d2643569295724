"""VQGAN image tokenizer (taming-transformers), re-implemented natively: no `taming`, no Lightning.

VQGAN (Esser et al. 2021, https://arxiv.org/abs/2012.09841) is a convolutional autoencoder with
GroupNorm residual blocks, single-head self-attention at chosen resolutions, and a quantizer between
encoder and decoder. Two quantizers appear in the released checkpoints:

- `vector`: nearest codebook entry in Euclidean distance (VQ-VAE, https://arxiv.org/abs/1711.00937);
- `gumbel`: a 1x1 projection to code logits (trained with Gumbel-softmax, https://arxiv.org/abs/1611.01144);
  for tokenizing we take the arg-max code, the noise-free limit of the Gumbel sample.

Parameter names follow the released Lightning checkpoints (`encoder.down.0.block.0.norm1.weight`,
`quantize.embedding.weight`, ...), so their `state_dict` loads with strict key and shape checks. Images are
in [-1, 1] here; `VQGanVAE` in `pretrained_vae.py` converts from and to [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from einops import rearrange
from torch import nn

from dalle_pytorch.io.safe_pickle import CheckpointFormatError, describe
from dalle_pytorch.io.torch_files import load_torch_file

__all__ = ["VQGAN", "read_vqgan_checkpoint", "read_vqgan_yaml", "validate_vqgan_config"]

_MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> 3x3 conv, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout of training is the identity at inference
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, channels as the head dimension, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        h = self.norm(x)
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as in the released model
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=height))


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        # Stride-2 3x3 conv with padding only on the right/bottom, as trained (torch pads symmetrically).
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _Level(nn.Module):
    """One resolution level: residual blocks, attention after each block (if any), then resampling."""

    def __init__(
        self,
        widths: list[tuple[int, int]],
        use_attention: bool,
        *,
        downsample: nn.Module | None = None,
        upsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(n_in, n_out) for n_in, n_out in widths)
        self.attn = nn.ModuleList(AttnBlock(n_out) for _, n_out in widths if use_attention)
        # Attribute names (and absence at the last level) match the released parameter names.
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[index](h)
        for name in ("downsample", "upsample"):
            if name in self._modules:
                h = self._modules[name](h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (b, in_channels, R, R) in [-1, 1] -> features (b, z_channels, R/2^k, R/2^k), k = levels - 1."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        resamp_with_conv: bool = True,
        **_unused: Any,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        n_in, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            n_out = ch * mult
            widths = [(n_in if i == 0 else n_out, n_out) for i in range(num_res_blocks)]
            is_last = level == len(ch_mult) - 1
            downsample = None if is_last else Downsample(n_out, resamp_with_conv)
            self.down.append(_Level(widths, res in attn_resolutions, downsample=downsample))
            res = res if is_last else res // 2
            n_in = n_out
        self.mid = _Middle(n_in)
        self.norm_out = _group_norm(n_in)
        self.conv_out = nn.Conv2d(n_in, z_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for stage in self.down:
            h = stage(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (b, z_channels, r, r) -> images (b, out_ch, r * 2^k, r * 2^k), roughly in [-1, 1]."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        resolution: int,
        z_channels: int,
        resamp_with_conv: bool = True,
        **_unused: Any,
    ) -> None:
        super().__init__()
        n_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, n_in, 3, padding=1)
        self.mid = _Middle(n_in)
        stages: list[_Level] = []
        for level in reversed(range(len(ch_mult))):  # lowest resolution first
            n_out = ch * ch_mult[level]
            widths = [(n_in if i == 0 else n_out, n_out) for i in range(num_res_blocks + 1)]
            upsample = Upsample(n_out, resamp_with_conv) if level > 0 else None
            stages.append(_Level(widths, res in attn_resolutions, upsample=upsample))
            res = res * 2 if level > 0 else res
            n_in = n_out
        # Indexed by level (0 = full resolution) to match the released parameter names.
        self.up = nn.ModuleList(reversed(stages))
        self.norm_out = _group_norm(n_in)
        self.conv_out = nn.Conv2d(n_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook: features (b, n, d) -> codes (b, n)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, features: torch.Tensor) -> torch.Tensor:
        codebook = self.embedding.weight
        # |z - e|^2 expanded as |z|^2 + |e|^2 - 2 z.e, as taming computes it, so near-ties resolve alike
        distances = features.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1) - 2 * features @ codebook.t()
        return distances.argmin(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embedding(codes)


class GumbelQuantizer(nn.Module):
    """Code logits from a 1x1 projection: features (b, n, d) -> arg-max codes (b, n)."""

    def __init__(self, num_hiddens: int, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def codes(self, features: torch.Tensor) -> torch.Tensor:
        # A 1x1 conv is a linear map of each position's features.
        logits = F.linear(features, rearrange(self.proj.weight, "o i 1 1 -> o i"), self.proj.bias)
        return logits.argmax(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embed(codes)


class VQGAN(nn.Module):
    """Encoder + quantizer + decoder built from a validated config (see `validate_vqgan_config`)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        config = validate_vqgan_config(config)
        dd, n_embed, embed_dim = config["ddconfig"], config["n_embed"], config["embed_dim"]
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)
        if config["quantizer"] == "gumbel":
            self.quantize: nn.Module = GumbelQuantizer(dd["z_channels"], n_embed, embed_dim)
        else:
            self.quantize = VectorQuantizer(n_embed, embed_dim)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, R, R) in [-1, 1] -> codes (b, h, w)."""
        features = self.quant_conv(self.encoder(images))
        height = features.shape[2]
        codes = self.quantize.codes(rearrange(features, "b d h w -> b (h w) d"))
        return rearrange(codes, "b (h w) -> b h w", h=height)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (b, h, w) -> images (b, 3, R, R), clamped to [-1, 1]."""
        z = rearrange(self.quantize.lookup(codes), "b h w d -> b d h w")
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)


# --- configs and checkpoints ------------------------------------------------------------------------

_REQUIRED_DD_INTS = ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels")


def validate_vqgan_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a VQGAN config and return it as a plain JSON-able dict.

    Keys: `ddconfig` (taming's encoder/decoder arguments: ch, out_ch, ch_mult, num_res_blocks,
    attn_resolutions, in_channels, resolution, z_channels, optional resamp_with_conv), `n_embed`,
    `embed_dim`, and `quantizer` ("vector" or "gumbel").
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    dd = config.get("ddconfig")
    if not isinstance(dd, Mapping):
        raise ValueError("config['ddconfig'] must be a mapping of the encoder/decoder settings")

    def positive_int(value: Any, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {describe(value)}")
        return value

    clean = {key: positive_int(dd.get(key), f"ddconfig['{key}']") for key in _REQUIRED_DD_INTS}
    for key in ("ch_mult", "attn_resolutions"):
        values = dd.get(key)
        if not isinstance(values, list | tuple) or (key == "ch_mult" and not values):
            raise ValueError(f"ddconfig['{key}'] must be a list of ints, got {describe(values)}")
        clean[key] = [positive_int(v, f"ddconfig['{key}'] entries") for v in values]
    clean["resamp_with_conv"] = bool(dd.get("resamp_with_conv", True))
    if dd.get("double_z", False):
        raise ValueError("ddconfig['double_z'] must be false for a VQGAN (true is the KL autoencoder)")
    if clean["in_channels"] != 3 or clean["out_ch"] != 3:
        raise ValueError("only RGB VQGANs are supported: ddconfig in_channels and out_ch must be 3")
    if any(clean["ch"] * mult % 32 for mult in clean["ch_mult"]):
        raise ValueError("ddconfig ch * every ch_mult must be a multiple of 32 (GroupNorm with 32 groups)")
    if clean["resolution"] % 2 ** (len(clean["ch_mult"]) - 1):
        raise ValueError("ddconfig resolution must be divisible by 2 ** (len(ch_mult) - 1)")
    quantizer = config.get("quantizer", "vector")
    if quantizer not in ("vector", "gumbel"):
        raise ValueError(f"config['quantizer'] must be 'vector' or 'gumbel', got {describe(quantizer)}")
    embed_dim = positive_int(config.get("embed_dim"), "config['embed_dim']")
    if quantizer == "gumbel" and embed_dim != clean["z_channels"]:
        # The Gumbel projection reads z_channels features from quant_conv's embed_dim outputs.
        raise ValueError("a gumbel VQGAN needs embed_dim == ddconfig['z_channels']")
    return {
        "ddconfig": clean,
        "n_embed": positive_int(config.get("n_embed"), "config['n_embed']"),
        "embed_dim": embed_dim,
        "quantizer": quantizer,
    }


MAX_YAML_BYTES = 2**20  # a taming model.yaml is about 1 KB


class _PlainYamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases (`*name`): a few hundred bytes of nested aliases expand to
    gigabytes (the "billion laughs"), and no VQGAN config needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def read_vqgan_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a taming `model.yaml` safely (no tags, no imports) into a validated VQGAN config.

    Only `model.params` (ddconfig, n_embed, embed_dim) and the class *name* in `model.target` (to tell
    `GumbelVQ` from `VQModel`) are used; no `target:` is ever imported.
    """
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_YAML_BYTES + 1)
        if len(text) > MAX_YAML_BYTES:
            raise ValueError(f"{path} is larger than {MAX_YAML_BYTES} bytes: not a VQGAN model.yaml")
        document = yaml.load(text, Loader=_PlainYamlLoader)  # noqa: S506 -- a SafeLoader without aliases
    except yaml.YAMLError as error:
        raise ValueError(
            f"{path} is not a plain YAML config (tags, Python objects and aliases are refused): {str(error)[:300]}"
        ) from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a VQGAN model.yaml") from None
    model = document.get("model") if isinstance(document, Mapping) else None
    params = model.get("params") if isinstance(model, Mapping) else None
    if not isinstance(params, Mapping):
        raise ValueError(f"{path} has no 'model: params:' section: not a taming VQGAN config")
    target_class = str(model.get("target", "")).rpartition(".")[2]
    if target_class not in ("VQModel", "VQNoDiscModel", "GumbelVQ"):
        raise ValueError(
            f"{path}: model.target {describe(model.get('target'))} is not a supported VQGAN "
            "(taming.models.vqgan.VQModel or GumbelVQ)"
        )
    if params.get("remap") is not None:
        raise ValueError(f"{path}: codebook remapping ('remap') is not supported")
    return validate_vqgan_config(
        {
            "ddconfig": params.get("ddconfig"),
            "n_embed": params.get("n_embed"),
            "embed_dim": params.get("embed_dim"),
            "quantizer": "gumbel" if target_class == "GumbelVQ" else "vector",
        }
    )


def read_vqgan_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The VQGAN weights of a Lightning `.ckpt` (or a bare state dict), read without running its code.

    Discriminator, perceptual-loss and optimizer tensors are left out (and never read from disk).
    """
    checkpoint = load_torch_file(path)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise CheckpointFormatError(f"{path} holds no state_dict mapping: not a VQGAN checkpoint")
    tensors = {
        key: value for key, value in state_dict.items() if isinstance(key, str) and key.startswith(_MODEL_PREFIXES)
    }
    if not tensors:
        raise CheckpointFormatError(f"{path} has no encoder/decoder/quantize weights: not a VQGAN checkpoint")
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(f"{path}: {key} is not a tensor")
    return tensors
