"""Linear layers on oneDNN with weights laid out in advance, for the CPU decoding step.

A decoding step multiplies a few rows (the batch, twice with guidance) by every weight matrix of the model.
On CPU, ``F.linear`` hands such a product to MKL's sgemm, which reads the weights well below the memory
bandwidth and on one thread; oneDNN, given each weight reordered once into its blocked layout for that row
count, runs the same product 1.1-1.5x faster on one thread and 1.6-3x on two (measured on an AVX2 CPU;
``benchmarks/`` measures a whole step).
torch.compile's inductor makes this reorder only when it freezes the weights into the graph as constants,
after which a model trained or loaded further would keep decoding with its old weights.

Here the reordered copies are made when a generation call starts and dropped when it ends
(:func:`packed_linears`). Inside that block the model's linear layers call the op
``dalle_pytorch::packed_linear``, which uses the weight's reordered copy when there is one for exactly this
tensor at this version, and ``F.linear`` otherwise; so the results never depend on stale weights. The op is
opaque to torch.compile (a fake implementation gives its shape): a compiled step calls it as an external
kernel. oneDNN sums in another order than MKL: results agree with ``F.linear`` to float32
rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["packed_linears", "packing_available"]

# (data_ptr, shape, stride) of a weight -> [its version when packed, the reordered copy, open blocks using it]
_PACKED: dict[tuple, list] = {}

_LIBRARY = torch.library.Library("dalle_pytorch", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def packing_available(device: torch.device | str = "cpu") -> bool:
    """Whether weights on ``device`` can be packed: a CPU with PyTorch's oneDNN (mkldnn) backend."""
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()


def _key(weight: Tensor) -> tuple:
    return weight.data_ptr(), tuple(weight.shape), weight.stride()


def _packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    entry = _PACKED.get(_key(weight))
    if entry is None or entry[0] != weight._version or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, entry[1], bias, "none", [], "")


_LIBRARY.impl("packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("dalle_pytorch::packed_linear")
def _packed_linear_shape(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _packable(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2


def _packed_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """``nn.Linear.forward`` inside :func:`packed_linears`: the packed op for float32 inference, else as usual."""
    if torch.is_grad_enabled() or x.dtype != torch.float32:
        return F.linear(x, self.weight, self.bias)
    return torch.ops.dalle_pytorch.packed_linear(x, self.weight, self.bias)


# id(layer) -> how many open blocks route that layer's forward to _packed_forward
_ROUTED: dict[int, int] = {}


@contextlib.contextmanager
def packed_linears(module: nn.Module, rows: int) -> Iterator[int]:
    """Within the block, every ``nn.Linear`` of ``module`` with a float32 CPU weight runs on oneDNN with that
    weight reordered for products with ``rows`` rows (other row counts work too), when gradients are off;
    yields how many layers were packed (0 where :func:`packing_available` is False).

    The layers' ``forward`` is redirected for the block (an attribute on each layer instance, removed when
    the last block using it ends), so the model's own code, user-defined sublayers included, runs unchanged,
    eagerly or under torch.compile. The reordered copies are freed when the block ends. The weights should
    not change inside the block; one that does is used unpacked."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    layers: dict[int, nn.Linear] = {}
    keys: list[tuple] = []
    if packing_available():
        for layer in module.modules():
            weight = getattr(layer, "weight", None)
            if type(layer) is not nn.Linear or not isinstance(weight, Tensor) or not _packable(weight):
                continue
            if id(layer) in layers:  # a layer used in several places
                continue
            if "forward" in vars(layer) and id(layer) not in _ROUTED:  # its owner replaced forward: leave it
                continue
            layers[id(layer)] = layer
            key = _key(weight)
            entry = _PACKED.get(key)
            if entry is None or entry[0] != weight._version:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
                entry = _PACKED[key] = [weight._version, packed, 0 if entry is None else entry[2]]
            entry[2] += 1
            keys.append(key)
    for layer in layers.values():
        if _ROUTED.get(id(layer), 0) == 0:
            layer.forward = types.MethodType(_packed_forward, layer)
        _ROUTED[id(layer)] = _ROUTED.get(id(layer), 0) + 1
    try:
        yield len(keys)
    finally:
        for layer in layers.values():
            _ROUTED[id(layer)] -= 1
            if _ROUTED[id(layer)] == 0:
                del _ROUTED[id(layer)]
                del layer.forward
        for key in keys:
            entry = _PACKED[key]
            entry[2] -= 1
            if entry[2] == 0:
                del _PACKED[key]
