"""Reversible residual execution (RevNet, https://arxiv.org/abs/1707.04585; Reformer, arXiv 2001.04451).

Each layer is a pair (f, g) of sublayers acting on two streams::

    y1 = x1 + f(x2)        x2 = y2 - g(y1)
    y2 = x2 + g(y1)        x1 = y1 - f(x2)

so the inputs of every layer can be recomputed from its outputs. The backward pass walks the layers in
reverse, recomputing each sublayer once (replaying the random state its dropout used) and back-propagating
through it, so memory does not grow with depth: each layer is its own autograd function that saves nothing
(the last saves its output) and hands its reconstructed input to the layer before it. Without gradients
(evaluation, cached decoding) the same couplings run as plain code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _RandomState:
    """Records the CPU and (when used) CUDA random state so dropout can be replayed exactly."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    def replay(self):
        devices = [self.cuda_device] if self.cuda_device is not None else []
        context = torch.random.fork_rng(devices=devices, device_type="cuda")
        context.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda_device is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)
        return context


def _run(fn, x, inputs, key, state: _RandomState | None):
    if state is None:
        return fn(x, inputs, key)
    context = state.replay()
    try:
        return fn(x, inputs, key)
    finally:
        context.__exit__(None, None, None)


class _Handoff:
    """Carries each layer's reconstructed input to the backward of the layer before it.

    Layer i's output is layer i+1's input; instead of saving it, the backward of layer i+1 rebuilds it from
    its own output and leaves it here, and autograd runs layer i's backward next (it needs the gradient
    layer i+1 returns). Only the last layer saves its output.
    """

    def __init__(self, num_layers: int):
        self.outputs: list[Tensor | None] = [None] * num_layers


class _ReversibleLayer(torch.autograd.Function):
    """One coupling (f, g) whose backward recomputes instead of reading stored activations.

    The layer's own parameters are inputs, so their gradients are returned (and accumulated into ``.grad``)
    layer by layer: the temporaries of the backward are those of one layer, whatever the depth.
    """

    @staticmethod
    def forward(autograd_ctx, x: Tensor, stack: ReversibleSequence, inputs: Any, index: int, handoff: _Handoff,
                *params: Tensor) -> Tensor:  # fmt: skip
        f, g = stack.layers[index]
        x1, x2 = x.chunk(2, dim=-1)
        with torch.no_grad():
            f_state = _RandomState(x.device)
            y1 = x1 + f(x2, inputs, (index, 0))
            g_state = _RandomState(x.device)
            y2 = x2 + g(y1, inputs, (index, 1))
        out = torch.cat((y1, y2), dim=-1)
        autograd_ctx.stack, autograd_ctx.inputs, autograd_ctx.index = stack, inputs, index
        autograd_ctx.handoff, autograd_ctx.states = handoff, (f_state, g_state)
        autograd_ctx.num_params = len(params)
        is_last = index == len(stack.layers) - 1
        autograd_ctx.save_for_backward(*([out] if is_last else []))
        return out

    @staticmethod
    def backward(autograd_ctx, grad_out: Tensor):
        stack, inputs, i, handoff = autograd_ctx.stack, autograd_ctx.inputs, autograd_ctx.index, autograd_ctx.handoff
        saved = autograd_ctx.saved_tensors
        out = saved[0] if saved else handoff.outputs[i]
        if out is None:
            raise RuntimeError("reversible layers must be back-propagated from the last one, in one pass")
        handoff.outputs[i] = None
        f, g = stack.layers[i]
        f_state, g_state = autograd_ctx.states
        params = stack.layer_parameters(i)
        y1, y2 = out.chunk(2, dim=-1)
        dy1, dy2 = grad_out.chunk(2, dim=-1)
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            gy1 = _run(g, y1, inputs, (i, 1), g_state)
            g_grads = torch.autograd.grad(gy1, (y1, *params), dy2, allow_unused=True)
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + g_grads[0]
        del gy1
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_()
            fx2 = _run(f, x2, inputs, (i, 0), f_state)
            f_grads = torch.autograd.grad(fx2, (x2, *params), dx1, allow_unused=True)
        with torch.no_grad():
            x1 = y1 - fx2
            dx2 = dy2 + f_grads[0]
            param_grads = [_add(a, b) for a, b in zip(f_grads[1:], g_grads[1:])]
        if i > 0:
            handoff.outputs[i - 1] = torch.cat((x1, x2.detach()), dim=-1)
        return (torch.cat((dx1, dx2), dim=-1), None, None, None, None, *param_grads)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class ReversibleSequence:
    """Runs ``layers`` (each a pair of sublayers ``(f, g)`` called as ``f(x, inputs, key)``) reversibly.

    ``inputs`` is passed to every sublayer unchanged (the transformer's ``LayerInputs``); ``key`` is
    ``(layer index, 0 for f / 1 for g)``.

    The model dimension is duplicated into two streams on the way in and averaged on the way out. This is
    an executor, not a module: the parameters belong to the owner of ``layers``.
    """

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def parameters(self):
        return self.layers.parameters()

    def layer_parameters(self, index: int) -> list[Tensor]:
        """The trainable parameters of layer ``index`` (those shared with other layers included)."""
        return [p for p in self.layers[index].parameters() if p.requires_grad]

    def __call__(self, x: Tensor, inputs: Any, use_checkpointing: bool = True) -> Tensor:
        x = torch.cat((x, x), dim=-1)
        if use_checkpointing:
            handoff = _Handoff(len(self.layers))
            for i in range(len(self.layers)):
                x = _ReversibleLayer.apply(x, self, inputs, i, handoff, *self.layer_parameters(i))
        else:
            x1, x2 = x.chunk(2, dim=-1)
            for i, (f, g) in enumerate(self.layers):
                x1 = x1 + f(x2, inputs, (i, 0))
                x2 = x2 + g(x1, inputs, (i, 1))
            x = torch.cat((x1, x2), dim=-1)
        y1, y2 = x.chunk(2, dim=-1)
        return (y1 + y2) / 2
