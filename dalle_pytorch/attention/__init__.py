"""Attention over `[text | image grid]`: the attention layer and the patterns that say which keys a query sees."""

from dalle_pytorch.attention.pattern import (
    AttentionPattern,
    causal_mask,
    grid_mask,
    register_pattern,
    registered_patterns,
)
from dalle_pytorch.attention.patterns import (
    AxialCol,
    AxialRow,
    BlockSparse,
    ConvLike,
    ConvLikeCorner,
    Full,
    attention_mask,
)

__all__ = [
    "AttentionPattern", "AxialCol", "AxialRow", "BlockSparse", "ConvLike", "ConvLikeCorner", "Full", "attention_mask",
    "causal_mask", "grid_mask", "register_pattern", "registered_patterns",
]  # fmt: skip
