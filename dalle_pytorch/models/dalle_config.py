"""DALLE's constructor arguments, written once.

:class:`DALLEConfig` is the single list of DALLE's options: ``DALLE.__init__`` takes its fields as keyword
arguments (or a whole ``config=DALLEConfig(...)``), ``save_pretrained`` writes them to ``config.json``, and
the ``dalle-train`` command line makes one flag per field. Each field's ``help`` text is the documentation
of the option everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dalle_pytorch.attention.pattern import AttentionPattern, normalize_attn_types
from dalle_pytorch.models.options import option
from dalle_pytorch.models.token_shift import check_shift_style
from dalle_pytorch.models.transformer import check_rotary_style

# the fields that configure the built-in attention patterns given by name
PATTERN_OPTIONS = (
    "conv_kernel_size", "conv_dilation", "sparse_block_size", "sparse_num_local_blocks", "sparse_num_random_blocks",
)  # fmt: skip

# arguments older code passes that no longer do anything: accepted with a DeprecationWarning, then dropped
DEPRECATED_ARGUMENTS = {
    "optimize_for_inference": "it never changed the model; cached decoding is always on (use_cache=True)",
}


@dataclass
class DALLEConfig:
    """Everything that defines a DALLE except its image tokenizer (``vae``)."""

    dim: int = option(help="model width")
    depth: int = option(help="number of transformer layers")
    num_text_tokens: int = option(10000, help="text vocabulary size (ids 0 .. num_text_tokens - 1; 0 is padding)")
    text_seq_len: int = option(256, help="text tokens per caption")
    heads: int = option(8, help="attention heads")
    dim_head: int = option(64, help="width of each attention head")
    ff_mult: int = option(4, help="feed-forward expansion")
    attn_dropout: float = option(0.0, help="attention dropout")
    ff_dropout: float = option(0.0, help="feed-forward dropout")
    attn_types: Sequence[str | AttentionPattern] | str | AttentionPattern | None = option(
        None,
        help="attention patterns cycled over the layers (comma-separated as a flag): names among full, sparse, "
        "axial_row, axial_col, conv_like, conv_like_corner (the original's conv-like window), or AttentionPattern "
        "instances (default: full, or sparse with sparse_attn)",
    )
    sparse_attn: bool = option(False, help="the original's switch for attn_types=('sparse',) when none are given")
    conv_kernel_size: int = option(5, help="conv_like (and conv_like_corner) attention: kernel size (odd)")
    conv_dilation: int = option(1, help="conv_like (and conv_like_corner) attention: dilation")
    sparse_block_size: int = option(16, help="sparse attention: block size")
    sparse_num_local_blocks: int = option(4, help="sparse attention: local blocks each block attends to")
    sparse_num_random_blocks: int = option(2, help="sparse attention: random blocks each block attends to")
    loss_img_weight: float = option(7, help="weight of the image loss vs the text loss")
    reversible: bool = option(False, help="reversible layers (less memory, more compute)")
    stable: bool = option(False, help="CogView's numerically stable tricks (PB-relax, gradient shrink)")
    sandwich_norm: bool = option(False, help="layer norms after attention and feed-forward as well")
    shift_tokens: bool = option(True, help="token shift along text and image rows")
    shift_tokens_style: str = option(
        "default",
        help="which channels the token shift moves: default (a quarter: a text token's from the previous token, an "
        "image token's from the left; the next quarter of an image token from above) or original (as "
        "DALLE-pytorch 1.x: half of a text token's from the previous token; an image token's first quarter from "
        "above, the next from the left)",
    )
    rotary_emb: bool = option(True, help="rotary position embeddings (else learned absolute ones)")
    rotary_emb_style: str = option(
        "default",
        help="rotary angles: default (image tokens after the text, rows and columns counted from 1) or original "
        "(as DALLE-pytorch 1.x: image tokens at text position 8192, rows and columns in [-1, 1] with pixel "
        "frequencies, text at -10 on them; values are turned as well)",
    )
    shared_attn_ids: Sequence | None = option(
        None, help="ids cycled over the layers (comma-separated as a flag): layers with one id share attention"
    )
    shared_ff_ids: Sequence | None = option(
        None, help="ids cycled over the layers (comma-separated as a flag): layers with one id share feed-forwards"
    )
    share_input_output_emb: bool = option(False, help="tie the output projections to the embeddings")

    def __post_init__(self) -> None:
        if self.attn_types is None:
            self.attn_types = ("sparse",) if self.sparse_attn else ("full",)
        self.attn_types = normalize_attn_types(self.attn_types)  # names stay names; config.json dicts become patterns
        for name in ("shared_attn_ids", "shared_ff_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        check_shift_style(self.shift_tokens_style)
        check_rotary_style(self.rotary_emb_style)
        if self.num_text_tokens < 1 or self.text_seq_len < 1:
            raise ValueError(
                f"num_text_tokens and text_seq_len must be >= 1, got {self.num_text_tokens}, {self.text_seq_len}"
            )

    def pattern_options(self) -> dict[str, Any]:
        """The options the built-in attention patterns named in ``attn_types`` are built with."""
        return {name: getattr(self, name) for name in PATTERN_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able constructor arguments ``save_pretrained`` writes to ``config.json``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del values["sparse_attn"]  # attn_types holds its effect
        values["attn_types"] = list(self.attn_types)
        for name in ("shared_attn_ids", "shared_ff_ids"):
            values[name] = None if values[name] is None else list(values[name])
        return values
