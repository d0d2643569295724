"""An exponential moving average of a model's weights, for sampling and evaluation.

Averaged weights give better samples than the last weights of a noisy optimizer, as used for the diffusion
models of DALL-E 2 (https://arxiv.org/abs/2204.06125) and before them by Polyak & Juditsky (1992). The
averaging is PyTorch's `AveragedModel` with `get_ema_multi_avg_fn`
(https://pytorch.org/docs/stable/optim.html#weight-averaging-swa-and-ema): the first update copies the
weights, every later one sets ema = decay * ema + (1 - decay) * weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dalle_pytorch.io.checkpoint import PretrainedMixin, load_pretrained

__all__ = ["WeightAverage"]


class WeightAverage:
    """An averaged copy of `model` (all its parameters; buffers are copied, not averaged)."""

    def __init__(self, model: PretrainedMixin, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model: the same class as the model, so it saves and samples like it."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        """How many updates went into the average (0: it holds the initial copy)."""
        return int(self.averaged.n_averaged)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def restore(self, directory: Path, updates: int | None) -> None:
        """Loads the average saved as the model directory `directory` after `updates` updates. Without one
        (a checkpoint written without averaging) the average starts afresh: its next update copies the weights."""
        if updates is None or not directory.is_dir():
            warnings.warn(f"no moving average of the weights at {directory}; it starts afresh", stacklevel=3)
            self.averaged.n_averaged.zero_()
            return
        self.module.load_state_dict(load_pretrained(directory).state_dict())
        self.averaged.n_averaged.fill_(updates)
