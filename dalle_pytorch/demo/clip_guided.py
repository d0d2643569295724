"""The demo's third system: no generator at all, the discrete VAE's codes optimised against the demo's CLIP.

``dalle-demo --model both`` draws every colour x shape prompt this way too (``clip_guided_for_prompts``,
with ``dalle_pytorch.generation.clip_guided.clip_guided_generate``) and judges the results like DALLE's and
DALLE2's, so the three ways of drawing from text are compared on one dataset with one judge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor

from dalle_pytorch.data.shapes import ShapePrompt
from dalle_pytorch.demo.report import grid_prompt_indices
from dalle_pytorch.generation.clip_guided import clip_guided_generate
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.models.vae import DiscreteVAE

if TYPE_CHECKING:
    from dalle_pytorch.demo.config import DemoConfig

__all__ = ["clip_guided_for_prompts", "clip_guided_grid_rows"]


def clip_guided_for_prompts(
    vae: DiscreteVAE, clip: CLIP, prompt_ids: Tensor, config: DemoConfig, batch_size: int = 64
) -> Tensor:
    """``config.clip_guided_samples`` images per caption ids (p, l), each from ``config.clip_guided_steps``
    optimisation steps: (p, k, 3, s, s) in [0, 1]. Every sample has its own generator (results do not depend
    on ``batch_size``)."""
    k = config.clip_guided_samples
    rows = prompt_ids.repeat_interleave(k, dim=0)  # (p * k, l)
    device = next(clip.parameters()).device
    images = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size].to(device)
        seeds = [config.seed * 1_000_000 + start + i for i in range(len(chunk))]
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        result = clip_guided_generate(
            vae, clip, chunk, steps=config.clip_guided_steps, lr=config.clip_guided_learning_rate,
            num_augments=4, generator=generators,
        )  # fmt: skip
        images.append(result.images.clamp(0.0, 1.0).cpu())
    return rearrange(torch.cat(images), "(p k) c h w -> p k c h w", k=k)


def clip_guided_grid_rows(
    prompts: Sequence[ShapePrompt], samples: Tensor, fidelity: dict, per_row: int = 8
) -> list[tuple[str, Tensor | None]]:
    """Grid rows (for ``make_grid``) of the CLIP-guided samples (p, k, 3, s, s), the same prompts as DALLE's rows."""
    seen, heldout = fidelity["seen"]["both_match"], fidelity["heldout"]["both_match"]
    rows: list[tuple[str, Tensor | None]] = [
        (f"CLIP-guided VAE codes; colour and shape right: {seen:.0%} seen pairs, {heldout:.0%} held out", None)
    ]
    for index in grid_prompt_indices(prompts):
        label = prompts[index].caption + ("  (held out)" if prompts[index].heldout else "")
        rows.append((label, samples[index, :per_row]))
    return rows
