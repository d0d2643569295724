"""Weight-only int8 linear layers: int8 weights with one scale per output channel, activations in float.

A weight row ``w`` (one output channel) is stored as ``q = round(w / s)`` in [-127, 127] with
``s = max|w| / 127``, so ``x @ w.T`` becomes ``(x @ q.T) * s``: a quarter of the fp32 weight bytes, which is
what a memory-bound step (decoding one token with a large model) spends its time reading. On the CPU the
product runs PyTorch's ``aten._weight_int8pack_mm`` kernel, which reads the int8 weight and converts it on
the fly; elsewhere (or for an activation dtype the kernel does not take) the dequantized weight is used.

The kernel is given the activations in ``compute_dtype``, bfloat16 by default, and the result is turned
back to the input's dtype: on an AVX2 CPU (torch 2.13, 8 rows, 1 thread) the bf16 kernel ran 1.4-1.9x
faster than the fp32 ``nn.Linear`` it replaces, while the fp32 kernel was 11-17x slower than that linear.
Rounding the activations to bf16 costs less accuracy than the int8 weights do.

Shape letters: n rows (every leading dimension of the input flattened), k input features, m output features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def int8_kernel_available(x: Tensor) -> bool:
    """Whether ``aten._weight_int8pack_mm`` can take the activations x (the CPU kernel; float32 / bf16 / fp16)."""
    return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of weight (m, k), one scale per row: returns (q (m, k) int8, scale (m,) float32)
    with ``q * scale[:, None]`` the closest such approximation of weight (rows of zeros get scale 1)."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D float tensor, got {weight.dtype} of shape {tuple(weight.shape)}")
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``nn.Linear`` with its weight stored as int8 per output channel (see the module docstring).

    The int8 weight and its scales are buffers (the scales in ``compute_dtype``); ``.to(dtype)`` converts
    the scales and the bias, never the int8 weight. Made from a trained layer with :meth:`from_linear`; for
    inference only (no gradient reaches the weight).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, compute_dtype: torch.dtype | None = torch.bfloat16
    ):
        """``compute_dtype``: the activations' dtype inside the kernel (None: the input's own)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = torch.bfloat16) -> Int8Linear:
        """The quantized copy of ``linear`` (which is left unchanged), on its device, scales and bias in its dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype)
        q, scale = quantize_per_channel(linear.weight)
        layer.weight_int8 = q
        # kept in the kernel's dtype: no conversion per call, and a compiler's lowering of the kernel sees a buffer
        layer.scale = scale.to(compute_dtype or linear.weight.dtype)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantized_weight(self) -> Tensor:
        """The weight this layer multiplies by, (out_features, in_features) in the dtype of its scales."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {x.shape[-1]}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not int8_kernel_available(x):
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        compute = self.compute_dtype or x.dtype
        rows = x.reshape(-1, self.in_features).to(compute).contiguous()
        scale = self.scale if self.scale.dtype == compute else self.scale.to(compute)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, scale).to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8, compute_dtype={self.compute_dtype}")  # fmt: skip
