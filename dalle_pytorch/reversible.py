"""Reversible residual execution (RevNet, https://arxiv.org/abs/1707.04585; Reformer, arXiv 2001.04451).

Each layer is a pair (f, g) of sublayers acting on two streams::

    y1 = x1 + f(x2)        x2 = y2 - g(y1)
    y2 = x2 + g(y1)        x1 = y1 - f(x2)

so the inputs of every layer can be recomputed from its outputs. The backward pass walks the layers in
reverse, recomputing each sublayer once (replaying the random state its dropout used) and back-propagating
through it, so memory does not grow with depth. Without gradients (evaluation, cached decoding) the same
couplings run as plain code.
"""

from __future__ import annotations

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


def _run(fn, x, ctx, key, state: _RandomState | None):
    if state is None:
        return fn(x, ctx, key)
    context = state.replay()
    try:
        return fn(x, ctx, key)
    finally:
        context.__exit__(None, None, None)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(autograd_ctx, x: Tensor, stack: ReversibleSequence, ctx: dict, *params: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        states = []
        with torch.no_grad():
            for i, (f, g) in enumerate(stack.layers):
                f_state = _RandomState(x.device)
                x1 = x1 + f(x2, ctx, (i, 0))
                g_state = _RandomState(x.device)
                x2 = x2 + g(x1, ctx, (i, 1))
                states.append((f_state, g_state))
        autograd_ctx.stack, autograd_ctx.ctx, autograd_ctx.states = stack, ctx, states
        out = torch.cat((x1, x2), dim=-1)
        autograd_ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(autograd_ctx, grad_out: Tensor):
        (out,) = autograd_ctx.saved_tensors
        stack, ctx, states = autograd_ctx.stack, autograd_ctx.ctx, autograd_ctx.states
        params = [p for p in stack.parameters() if p.requires_grad]
        param_grads = [torch.zeros_like(p) for p in params]
        y1, y2 = out.chunk(2, dim=-1)
        dy1, dy2 = grad_out.chunk(2, dim=-1)
        for i in reversed(range(len(stack.layers))):
            f, g = stack.layers[i]
            f_state, g_state = states[i]
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_()
                gy1 = _run(g, y1, ctx, (i, 1), g_state)
                grads = torch.autograd.grad(gy1, (y1, *params), dy2, allow_unused=True)
            with torch.no_grad():
                x2 = y2 - gy1
                dx1 = dy1 + grads[0]
                _accumulate(param_grads, grads[1:])
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_()
                fx2 = _run(f, x2, ctx, (i, 0), f_state)
                grads = torch.autograd.grad(fx2, (x2, *params), dx1, allow_unused=True)
            with torch.no_grad():
                x1 = y1 - fx2
                dx2 = dy2 + grads[0]
                _accumulate(param_grads, grads[1:])
            y1, y2, dy1, dy2 = x1.detach(), x2.detach(), dx1, dx2
        return (torch.cat((dy1, dy2), dim=-1), None, None, *param_grads)


def _accumulate(totals: list[Tensor], grads) -> None:
    for total, grad in zip(totals, grads):
        if grad is not None:
            total.add_(grad)


class ReversibleSequence:
    """Runs ``layers`` (each a pair of sublayers ``(f, g)`` called as ``f(x, ctx, key)``) reversibly.

    The model dimension is duplicated into two streams on the way in and averaged on the way out. This is
    an executor, not a module: the parameters belong to the owner of ``layers``.
    """

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def parameters(self):
        return self.layers.parameters()

    def __call__(self, x: Tensor, ctx: dict, use_checkpointing: bool = True) -> Tensor:
        x = torch.cat((x, x), dim=-1)
        if use_checkpointing:
            params = [p for p in self.layers.parameters() if p.requires_grad]
            x = _ReversibleFunction.apply(x, self, ctx, *params)
        else:
            x1, x2 = x.chunk(2, dim=-1)
            for i, (f, g) in enumerate(self.layers):
                x1 = x1 + f(x2, ctx, (i, 0))
                x2 = x2 + g(x1, ctx, (i, 1))
            x = torch.cat((x1, x2), dim=-1)
        y1, y2 = x.chunk(2, dim=-1)
        return (y1 + y2) / 2
