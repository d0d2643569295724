"""Analytic FLOP counts of the models, for model FLOPs utilisation (MFU) and matmul-time bounds.

Conventions (as in PaLM, Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311, appendix B):

- A matmul with a weight of ``W`` entries costs ``2 * W`` FLOPs per token forward, and twice that backward,
  so training costs ``6 * W * tokens`` per weight (embedding lookups, norms and element-wise ops are not
  counted).
- Attention costs ``4 * pairs * inner`` FLOPs forward (``q k^T`` and ``attn v``), ``12 * pairs * inner``
  in training, where ``inner = heads * dim_head`` and ``pairs`` is the number of (query, key) pairs the
  layer's mask allows: ``n (n + 1) / 2`` for causal full attention, fewer for the sparse types. Work a
  kernel spends on masked-out pairs is not useful work and is not counted.
- Reversible layers recompute their forward pass in the backward pass; that recomputation is not counted
  either (model FLOPs, not hardware FLOPs).

Shape letters: b batch, n positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

TRAIN_FORMULA = (
    "6 * W_transformer * b * n + 6 * (W_text_logits * b * text_seq_len + W_image_logits * b * image_seq_len)"
    " + 12 * inner * b * sum_layers(pairs allowed by the layer's mask); W = matmul weight entries,"
    " inner = heads * dim_head"
)
GENERATION_FORMULA = (
    "per sampled token: 2 * rows * (new positions * W_transformer + W_image_logits)"
    " + 4 * rows * inner * sum_layers(pairs of the new queries); rows = 2 * batch with guidance;"
    " bytes per cached step: 4 * (W_transformer + W_image_logits + 2 * rows * inner * sum_layers(keys))"
)
CLIP_FORMULA = (
    "6 * b * (W_text_encoder * n_text + W_visual_encoder * n_patches + W_latents)"
    " + 12 * b * depth * inner * (n_text^2 + n_patches^2)"
)


def linear_weights(modules: Iterable[nn.Module]) -> int:
    """Entries of all nn.Linear weights inside ``modules`` (a module used twice counts twice)."""
    return sum(m.weight.numel() for module in modules for m in module.modules() if isinstance(m, nn.Linear))


class DalleFlops:
    """FLOP counts for one DALLE model; per-layer key counts are computed once from the attention masks."""

    def __init__(self, dalle: nn.Module):
        config = dalle.config
        self.text_seq_len, self.image_seq_len = dalle.text_seq_len, dalle.image_seq_len
        self.text_len = dalle.text_seq_len + 1
        self.inner = config["heads"] * config["dim_head"]
        self.w_transformer = linear_weights(dalle.transformer.layers)
        dim = config["dim"]
        self.w_text_logits = dim * dalle.num_text_total
        self.w_image_logits = dim * dalle.num_image_tokens
        # keys_per_query[t][i]: how many keys query i sees in a layer of pattern t (the masks are causal);
        # patterns are keyed by their repr, "full" is the causal mask
        transformer = dalle.transformer
        self.layer_types = [repr(pattern) for pattern in transformer.layer_patterns]
        n = self.text_len + self.image_seq_len
        self.keys_per_query = {"full": torch.arange(1, n + 1, dtype=torch.float64)}
        for layer, layer_type in enumerate(self.layer_types):
            if layer_type not in self.keys_per_query:
                self.keys_per_query[layer_type] = transformer.layer_mask(layer).sum(dim=1).double().cpu()

    def attention_pairs(self, start: int, end: int, layer_types: list[str] | None = None) -> float:
        """Allowed (query, key) pairs over all layers for queries [start, end) of one sequence.

        ``layer_types`` overrides the model's (only ``full`` may be added): the same model with other masks.
        """
        return sum(float(self.keys_per_query[t][start:end].sum()) for t in layer_types or self.layer_types)

    def attention_share(self) -> float:
        """Fraction of one training step's transformer FLOPs (logits excluded) spent in attention."""
        n = self.text_seq_len + self.image_seq_len
        attention = 4 * self.inner * self.attention_pairs(0, n)
        return attention / (attention + 2 * n * self.w_transformer)

    def train_step(self, batch: int, layer_types: list[str] | None = None) -> float:
        """Model FLOPs of one training step (forward + backward) on ``batch`` [text | image] sequences."""
        n = self.text_seq_len + self.image_seq_len  # BOS + text + image codes except the last
        forward = 2 * n * self.w_transformer + 4 * self.inner * self.attention_pairs(0, n, layer_types)
        forward += 2 * (self.text_seq_len * self.w_text_logits + self.image_seq_len * self.w_image_logits)
        return 3 * batch * forward

    def generation_steps(self, batch: int, *, guided: bool, cached: bool, primed: int = 0) -> list[float]:
        """Forward FLOPs of each sampled token: [prefill + first token, second token, ...].

        ``primed`` image codes are given; ``image_seq_len - primed`` tokens are sampled.
        """
        rows = 2 * batch if guided else batch
        steps = []
        for token in range(primed, self.image_seq_len):
            end = self.text_len + token  # positions whose hidden states exist when ``token`` is sampled
            start = 0 if (token == primed or not cached) else end - 1
            flops = 2 * (end - start) * self.w_transformer + 4 * self.inner * self.attention_pairs(start, end)
            steps.append(rows * (flops + 2 * self.w_image_logits))
        return steps

    def step_cache_values(self, batch: int, *, guided: bool, token: int) -> float:
        """Cached keys and values (entries) the cached step sampling image token ``token`` attends to."""
        rows = 2 * batch if guided else batch
        end = self.text_len + token
        return 2 * rows * self.inner * self.attention_pairs(end - 1, end)

    def generation_step_bytes(self, batch: int, *, guided: bool, token: int, bytes_per_value: int = 4) -> float:
        """Bytes a cached decoding step must read at least: every matmul weight once, plus the cached keys
        and values it attends to (the floor when the step is limited by memory bandwidth, not FLOPs)."""
        kv_values = self.step_cache_values(batch, guided=guided, token=token)
        return bytes_per_value * (self.w_transformer + self.w_image_logits + kv_values)


def clip_train_step(clip: nn.Module, batch: int, text_len: int) -> float:
    """Model FLOPs of one CLIP training step (forward + backward), see ``CLIP_FORMULA``."""
    patches = (clip.image_size // clip.patch_size) ** 2
    w_text = linear_weights([clip.text_transformer])
    w_visual = linear_weights([clip.visual_transformer, clip.to_patch_emb])
    w_latents = linear_weights([clip.to_text_latent, clip.to_visual_latent])
    attention = 0.0
    for encoder, n in ((clip.text_transformer, text_len), (clip.visual_transformer, patches)):
        for layer in encoder.layers:
            attn = layer[1]
            attention += 4 * attn.heads * attn.dim_head * n * n
    forward = 2 * (w_text * text_len + w_visual * patches + w_latents) + attention
    return 3 * batch * forward
