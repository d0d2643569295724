"""Lower-precision weights for decoding: a copy of a model in bf16, or with weight-only int8 linear layers.

Decoding one token of a large model reads every weight once per step and does little arithmetic with it, so
the step takes about (weight bytes + cached key/value bytes) / memory bandwidth. Halving or quartering the
weight bytes shortens it by about as much. The copy serves generation; the original (fp32) model is left
as it was and stays the one to train, save and load.

- ``"bf16"``: every weight, the key/value cache and the activations in bfloat16; logits are turned to
  float32 before guidance, filtering and sampling.
- ``"int8"``: every ``nn.Linear`` outside the frozen image tokenizer becomes an
  :class:`~dalle_pytorch.kernels.int8_linear.Int8Linear` (int8 weights, one scale per output channel);
  embeddings, norms, activations and the cache stay float32.
- ``"fp32"``: a plain copy, for comparisons.

The image tokenizer (``vae``) is shared with the original, not copied: it is frozen and decodes the codes
to pixels once per image, in its own precision.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dalle_pytorch.kernels.int8_linear import Int8Linear

DECODING_PRECISIONS = ("fp32", "bf16", "int8")
_ALIASES = {torch.float32: "fp32", torch.bfloat16: "bf16", "float32": "fp32", "bfloat16": "bf16"}


def precision_name(precision: str | torch.dtype) -> str:
    """``"fp32"``, ``"bf16"`` or ``"int8"`` for a name or a torch dtype (torch.float32, torch.bfloat16)."""
    name = _ALIASES.get(precision, precision) if isinstance(precision, str | torch.dtype) else precision
    if name not in DECODING_PRECISIONS:
        choices = f"{DECODING_PRECISIONS} (or torch.float32, torch.bfloat16)"
        raise ValueError(f"precision must be one of {choices}, got {precision!r}")
    return name


def quantize_linears(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    """Replace every ``nn.Linear`` inside ``module`` (in place) by its :class:`Int8Linear`, leaving the modules
    ``skip`` and what they hold alone; a layer used in several places stays one shared layer. Returns the
    number of layers quantized."""
    done: dict[int, Int8Linear | None] = {}
    skipped = {id(m) for m in skip}

    def visit(parent: nn.Module) -> None:
        # every slot, a module held twice included (named_children lists it once)
        for name, child in list(parent._modules.items()):
            if child is None or id(child) in skipped:
                continue
            if type(child) is nn.Linear:
                if id(child) not in done:
                    done[id(child)] = Int8Linear.from_linear(child)
                setattr(parent, name, done[id(child)])
            elif id(child) not in done:
                done[id(child)] = None  # visited: a shared module is quantized once
                visit(child)

    visit(module)
    return sum(layer is not None for layer in done.values())


def decoding_copy(model: nn.Module, precision: str | torch.dtype) -> nn.Module:
    """A copy of ``model`` for generation with its weights in ``precision`` (see the module docstring), in
    eval mode. Its children named in ``model.pretrained_children`` (DALLE's ``vae``) are shared, not copied
    or converted."""
    name = precision_name(precision)
    shared = [getattr(model, child) for child in getattr(model, "pretrained_children", ())]
    # deepcopy's memo maps an object to its copy: the shared children map to themselves
    out = copy.deepcopy(model, memo={id(child): child for child in shared})
    if name == "bf16":
        keep = {id(child) for child in shared}
        for child in out.children():
            if id(child) not in keep:
                child.to(torch.bfloat16)
    elif name == "int8":
        quantize_linears(out, skip=tuple(shared))
    return out.eval()


def weights_dtype(model: nn.Module, skip: tuple[nn.Module, ...] = ()) -> torch.dtype:
    """The one floating dtype of the parameters and buffers of ``model`` outside the modules ``skip``; a
    TypeError naming two tensors when they differ (a model converted in part would fail deep inside a matmul)."""
    skipped = {id(p) for module in skip for p in (*module.parameters(), *module.buffers())}
    # the scales of int8 layers are in the dtype their kernel computes in, whatever the activations'
    skipped |= {id(m.scale) for m in model.modules() if isinstance(m, Int8Linear)}
    first: tuple[str, torch.dtype] | None = None
    for tensor_name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if id(tensor) in skipped or not tensor.is_floating_point():
            continue
        if first is None:
            first = (tensor_name, tensor.dtype)
        elif tensor.dtype != first[1]:
            raise TypeError(
                f"the model's weights must all have one dtype to decode, but {first[0]} is {first[1]} and "
                f"{tensor_name} is {tensor.dtype}; convert the whole model (model.to(dtype)) or use "
                "model.decoding_copy(precision)"
            )
    return first[1] if first is not None else torch.get_default_dtype()
