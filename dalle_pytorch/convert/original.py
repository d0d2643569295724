"""Checkpoints of the original DALLE-pytorch scripts (`vae.pt`, `dalle.pt`) as models of this library.

The original's `train_vae.py` saves `{'hparams', 'weights'}` and its `train_dalle.py` saves `{'hparams',
'vae_params', 'epoch', 'version', 'vae_class_name', 'weights', 'opt_state', 'scheduler_state'}` with
`torch.save`; under DeepSpeed the weights are in DeepSpeed's checkpoint folder beside it
(`<name>-ds-cp/<tag>/mp_rank_00_model_states.pt`, key `module`). They are read with the restricted
unpickler (`dalle_pytorch.io.safe_pickle`: nothing named in the file is imported or run) and the weights
are renamed into this library's modules. The two architectures compute the same function, with these
differences handled here:

- the original multiplies each attention and feed-forward output by a learned per-channel LayerScale
  (https://arxiv.org/abs/2103.17239); the factor is folded into the output projection (or the sandwich
  norm), which gives the same outputs up to float rounding;
- one output projection over text and image tokens is split into the text and the image projection;
- the VAE's layer indices differ (the original nests each convolution with its ReLU);
- token shift, rotary embeddings and conv-like attention (`train_dalle.py --shift_tokens / --rotary_emb`,
  `--attn_types conv_like`) are computed differently by the original: the converted model uses this library's
  variants that compute them its way (`shift_tokens_style="original"`, `rotary_emb_style="original"`, the
  `conv_like_corner` attention pattern). The rotary frequencies the file stores are checked against them.

The original's `vae.decode` returns images in the normalized range (its scripts rescale them when saving);
this library's returns [0, 1]: converted decode = original decode * 0.5 + 0.5.

Refused, with a message saying why (`REFUSED`), where the original computes a different function: `sparse`
attention (DeepSpeed's kernel), shared layers, a shared output projection with a bias, and a VAE without
residual blocks whose codebook_dim differs from hidden_dim. The optimizer and scheduler states are not carried
over: the converted model starts a new run (fine-tuning).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle_pytorch.io.checkpoint import CheckpointError, PretrainedMixin
from dalle_pytorch.io.safe_pickle import CheckpointFormatError
from dalle_pytorch.io.torch_files import load_torch_file
from dalle_pytorch.models.dalle import DALLE
from dalle_pytorch.models.dalle_config import DALLEConfig
from dalle_pytorch.models.transformer import rotary_angles
from dalle_pytorch.models.vae import DiscreteVAE

__all__ = ["load_original", "convert_original", "is_original_checkpoint", "read_original"]

PathLike = str | os.PathLike

# why an option of the original cannot be converted to an equal model
REFUSED = {
    "sparse": "'sparse' is DeepSpeed's block-sparse pattern, which this library does not reproduce",
    "share_input_output_emb": "the original's shared output projection has a bias, this library's has none",
    "shared_ids": "the original keeps a norm and a layer scale per layer around a shared block, this library "
    "shares the whole sublayer",
}
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
_SEQUENTIAL_LAYER = re.compile(r"transformer\.layers\.layers\.(\d+)\.([01])\.(.+)")
_REVERSIBLE_LAYER = re.compile(r"transformer\.layers\.blocks\.(\d+)\.([fg])\.net\.(.+)")
_SUBLAYER_KEYS = [
    (re.compile(r"scale"), "scale"),
    (re.compile(r"fn\.norm\.(weight|bias)"), r"norm.\1"),
    (re.compile(r"fn\.norm_out\.(weight|bias)"), r"norm_out.\1"),
    (re.compile(r"fn\.(?:fn\.)*to_qkv\.weight"), "fn.to_qkv.weight"),
    (re.compile(r"fn\.(?:fn\.)*to_out\.0\.(weight|bias)"), r"fn.to_out.0.\1"),
    (re.compile(r"fn\.(?:fn\.)*net\.0\.(weight|bias)"), r"fn.proj_in.\1"),
    (re.compile(r"fn\.(?:fn\.)*net\.3\.(weight|bias)"), r"fn.proj_out.\1"),
]


def is_original_checkpoint(path: PathLike) -> bool:
    """True for a file (not a model folder) that looks like a `torch.save` checkpoint of the original."""
    path = Path(path)
    return path.is_file() and path.suffix in (".pt", ".pth", ".ckpt")


def read_original(path: PathLike) -> dict[str, Any]:
    """The checkpoint dict of an original `vae.pt` / `dalle.pt`, its `weights` a {name: tensor} dict (read
    from DeepSpeed's folder when the file itself holds none). Runs no code from the file."""
    path = Path(path)
    if path.is_dir():  # DeepSpeed's `<name>-ds-cp` folder itself
        aux = path / "auxiliary.pt"
        if not aux.is_file():
            raise CheckpointError(
                f"{path} is a folder but not a DeepSpeed checkpoint of the original (no auxiliary.pt)"
            )
        saved = _read_dict(aux)
        saved["weights"] = _deepspeed_weights(path)
        return saved
    saved = _read_dict(path)
    if isinstance(saved.get("weights"), str):  # the original's DeepSpeed runs write a note here instead
        saved["weights"] = _deepspeed_weights(path.parent / f"{path.stem}-ds-cp")
    weights = saved.get("weights")
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: 'weights' is not a dict of tensors")
    saved["weights"] = {key: value.float() for key, value in weights.items()}  # fp16 DeepSpeed weights too
    return saved


def _read_dict(path: Path) -> dict[str, Any]:
    try:
        saved = load_torch_file(path)
    except CheckpointFormatError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(saved, dict) or "hparams" not in saved:
        raise CheckpointError(
            f"{path} is not a checkpoint of the original DALLE-pytorch scripts (no 'hparams' in it); a model of "
            "this library is a folder written by save_pretrained"
        )
    return saved


def _deepspeed_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The module weights of the newest DeepSpeed checkpoint in `folder` (its `latest` file names the tag)."""
    latest = folder / "latest"
    if not latest.is_file():
        raise CheckpointError(
            f"the weights were saved by DeepSpeed, but {latest} is missing: pass the folder holding DeepSpeed's "
            "checkpoint (NAME-ds-cp) next to the .pt file"
        )
    model_file = folder / latest.read_text(encoding="utf-8").strip() / DEEPSPEED_MODEL_FILE
    if not model_file.is_file():
        raise CheckpointError(f"{model_file} is missing (ZeRO stage 3 partitions need DeepSpeed's zero_to_fp32.py)")
    module = _read_any(model_file).get("module")
    if not isinstance(module, Mapping):
        raise CheckpointError(f"{model_file} holds no 'module' weights")
    return dict(module)


def _read_any(path: Path) -> dict:
    try:
        saved = load_torch_file(path)
    except CheckpointFormatError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} does not hold a dict")
    return saved


def load_original(path: PathLike, *, vae: nn.Module | None = None) -> PretrainedMixin:
    """A DiscreteVAE (from a `vae.pt`) or a DALLE (from a `dalle.pt`) of the original DALLE-pytorch, with equal
    outputs, in eval mode. A DALLE trained on OpenAI's or a VQGAN VAE (its file holds no `vae_params`) needs
    that `vae` passed in (e.g. `OpenAIDiscreteVAE()`)."""
    saved = read_original(path)
    if "vae_params" in saved or "vae_class_name" in saved:
        return _dalle(saved, Path(path), vae)
    return _discrete_vae(saved["hparams"], saved["weights"], Path(path))


def convert_original(path: PathLike, output_dir: PathLike, *, vae: nn.Module | None = None) -> Path:
    """Converts an original `vae.pt` / `dalle.pt` into a model folder (`save_pretrained`); returns its path."""
    return load_original(path, vae=vae).save_pretrained(output_dir)


# ------------------------------------------------------------------------------------------ VAE


def _discrete_vae(hparams: Mapping, weights: Mapping[str, torch.Tensor], source: Path) -> DiscreteVAE:
    params = dict(hparams)
    layers, blocks = params.get("num_layers", 3), params.get("num_resnet_blocks", 0)
    codebook_dim, hidden_dim = params.get("codebook_dim", 512), params.get("hidden_dim", 64)
    if blocks == 0 and codebook_dim != hidden_dim:
        raise CheckpointError(
            f"{source}: a VAE without residual blocks (num_resnet_blocks=0) whose codebook_dim ({codebook_dim}) "
            f"differs from hidden_dim ({hidden_dim}) cannot be converted: its decoder starts with a transposed "
            "convolution from codebook_dim channels, this library's with a 1x1 convolution to hidden_dim"
        )
    channels = params.get("channels", 3)
    vae = DiscreteVAE(**params, normalization=((0.5,) * channels, (0.5,) * channels))
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        renamed[_vae_key(key, layers, blocks, source)] = tensor
    if blocks == 0:  # the identity 1x1 convolution the original does not have
        renamed["decoder.0.weight"] = torch.eye(hidden_dim).view(hidden_dim, hidden_dim, 1, 1)
        renamed["decoder.0.bias"] = torch.zeros(hidden_dim)
    _load(vae, renamed, source)
    return vae.eval()


def _vae_key(key: str, layers: int, blocks: int, source: Path) -> str:
    """The original's VAE key -> ours: encoder [(conv, relu)] * layers, res blocks, conv; decoder
    (conv 1x1 when blocks), res blocks, [(conv_t, relu)] * layers, conv. Ours lists the ReLUs flat."""
    part, _, rest = key.partition(".")
    if part == "codebook":
        return key
    index, _, tail = rest.partition(".")
    if not index.isdigit() or part not in ("encoder", "decoder"):
        raise CheckpointError(f"{source}: unexpected VAE weight {key}")
    i = int(index)
    if part == "encoder":
        if i < layers:  # Sequential(conv, relu): '0.0.weight'
            return f"encoder.{2 * i}.{tail.removeprefix('0.')}"
        return f"encoder.{2 * layers + (i - layers)}.{tail}"
    offset = 1 + blocks if blocks else 0  # our decoder.0 is the 1x1 convolution in both cases
    if blocks and i <= blocks:
        return f"decoder.{i}.{tail}"
    if i < offset + layers:
        return f"decoder.{(1 + blocks) + 2 * (i - offset)}.{tail.removeprefix('0.')}"
    return f"decoder.{(1 + blocks) + 2 * layers}.{tail}"


# ------------------------------------------------------------------------------------------ DALLE


def _dalle(saved: Mapping, source: Path, vae: nn.Module | None) -> DALLE:
    hparams = dict(saved["hparams"])
    weights = saved["weights"]
    if vae is None:
        if not saved.get("vae_params"):
            raise CheckpointError(
                f"{source} was trained with {saved.get('vae_class_name') or 'a released VAE'}, whose weights it does "
                "not describe: pass that VAE (vae=OpenAIDiscreteVAE() / VQGanVAE(...); on the command line: "
                "dalle-convert with the VAE flags, e.g. --taming)"
            )
        vae_weights = {key[4:]: value for key, value in weights.items() if key.startswith("vae.")}
        vae = _discrete_vae(saved["vae_params"], vae_weights, source)
    attn_types = hparams.get("attn_types") or ("full",)
    attn_types = (attn_types,) if isinstance(attn_types, str) else tuple(attn_types)
    refused = ["sparse"] if "sparse" in attn_types else []
    refused += ["sparse"] if hparams.get("sparse_attn") and "sparse" not in refused else []
    refused += (
        ["shared_ids"] if any(hparams.get(name) is not None for name in ("shared_attn_ids", "shared_ff_ids")) else []
    )
    bias = saved["weights"].get("to_logits.1.bias")
    if hparams.get("share_input_output_emb") and bias is not None and bias.any():
        refused.append("share_input_output_emb")
    if refused:
        reasons = "; ".join(f"{option}: {REFUSED[option]}" for option in refused)
        raise CheckpointError(
            f"{source} cannot be converted to an equal model ({', '.join(refused)}): {reasons}. Options that "
            "convert: full, axial_row, axial_col and conv_like attention, reversible, stable, shift_tokens, "
            "rotary_emb, share_input_output_emb with a zero output bias"
        )
    for name in ("sparse_attn", "optimize_for_inference"):  # refused above when on; no effect on outputs
        hparams.pop(name, None)
    known = {field.name for field in dataclasses.fields(DALLEConfig)}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise CheckpointError(f"{source}: hparams {unknown} have no counterpart in this library's DALLE")
    # the original's conv_like window is the square ending at the query (its kernel size and dilation are fixed)
    hparams["attn_types"] = tuple("conv_like_corner" if kind == "conv_like" else kind for kind in attn_types)
    for option in ("shift_tokens", "rotary_emb"):  # files from before these options existed lack the keys
        hparams[option] = bool(hparams.get(option, False))
        if hparams[option]:
            hparams[f"{option}_style"] = "original"
    dalle = DALLE(vae=vae, **hparams)
    _check_rotary(weights.get("transformer.pos_emb"), dalle, source)
    renamed = _dalle_tensors(weights, dalle, source)
    _load(dalle, renamed, source, skip_prefix="vae.")
    return dalle.eval()


def _check_rotary(stored: torch.Tensor | None, dalle: DALLE, source: Path) -> None:
    """The rotary angles the original stored (1, n, r) must be those rotary_emb_style="original" computes."""
    if stored is None or not dalle.config["rotary_emb"]:
        return
    transformer = dalle.transformer
    angles = rotary_angles(transformer.text_len, transformer.fmap, dalle.config["dim_head"], style="original")
    stored = stored.reshape(stored.shape[-2:]).float()
    if stored.shape != angles.shape or not torch.allclose(stored, angles, rtol=1e-6, atol=1e-6):
        raise CheckpointError(
            f"{source}: the rotary angles stored in the file (transformer.pos_emb {tuple(stored.shape)}) differ from "
            f"those of DALLE-pytorch 1.6.6 ({tuple(angles.shape)}), which the converted model would use; the file "
            "comes from a version of the original whose rotary embeddings this converter does not know"
        )


def _dalle_tensors(weights: Mapping[str, torch.Tensor], dalle: DALLE, source: Path) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    num_text = dalle.num_text_total
    for key, tensor in weights.items():
        if key.startswith("vae.") or key == "transformer.pos_emb":  # rotary frequencies: computed, not learned
            continue
        layer = _SEQUENTIAL_LAYER.fullmatch(key) or _REVERSIBLE_LAYER.fullmatch(key)
        if layer is not None:
            index, part, rest = layer.groups()
            prefix = f"transformer.layers.{index}.{0 if part in ('0', 'f') else 1}."
            for pattern, replacement in _SUBLAYER_KEYS:
                if pattern.fullmatch(rest):
                    name = prefix + pattern.sub(replacement, rest)
                    break
            else:
                raise CheckpointError(f"{source}: unexpected weight {key}")
            if name.endswith(".scale"):
                scales[prefix] = tensor.reshape(-1)  # (1, 1, d) -> (d,)
            else:
                renamed[name] = tensor
        elif key == "to_logits.0.weight" or key == "to_logits.0.bias":
            renamed[f"norm_out.{key.rsplit('.', 1)[1]}"] = tensor
        elif key == "to_logits.1.weight" or key == "to_logits.1.bias":
            kind = key.rsplit(".", 1)[1]
            renamed[f"to_text_logits.{kind}"] = tensor[:num_text]  # the original's logits: text ids, then image
            renamed[f"to_image_logits.{kind}"] = tensor[num_text:]
        elif key == "image_pos_emb.weights_0":
            renamed["image_row_emb.weight"] = tensor.reshape(tensor.shape[1], -1)  # (1, fmap, 1, d) -> (fmap, d)
        elif key == "image_pos_emb.weights_1":
            renamed["image_col_emb.weight"] = tensor.reshape(tensor.shape[2], -1)  # (1, 1, fmap, d) -> (fmap, d)
        elif key.startswith(("text_emb.", "image_emb.")) and dalle.config["share_input_output_emb"]:
            continue  # views of the output projection, tied to it here as well
        else:
            renamed[key] = tensor
    for prefix, scale in scales.items():  # LayerScale: out * scale, folded into the last affine map
        sandwich = prefix + "norm_out.weight" in renamed
        last = prefix + (
            "norm_out" if sandwich else "fn.to_out.0" if prefix + "fn.to_qkv.weight" in renamed else "fn.proj_out"
        )
        weight = renamed[last + ".weight"]
        renamed[last + ".weight"] = weight * (scale if sandwich else scale[:, None])
        renamed[last + ".bias"] = renamed[last + ".bias"] * scale
    if dalle.config["share_input_output_emb"]:  # the output projection is the embeddings (its bias is zero)
        renamed["text_emb.weight"] = renamed.pop("to_text_logits.weight")
        renamed["image_emb.weight"] = renamed.pop("to_image_logits.weight")
        del renamed["to_text_logits.bias"], renamed["to_image_logits.bias"]
    return renamed


def _load(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: Path, skip_prefix: str = "") -> None:
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith(skip_prefix or "\0")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{key} {tuple(tensors[key].shape)} vs {tuple(expected[key].shape)}"
        for key in tensors
        if key in expected and tensors[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not match its hparams: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shapes {mismatched[:4]}"
        )
    model.load_state_dict(dict(tensors), strict=False)
