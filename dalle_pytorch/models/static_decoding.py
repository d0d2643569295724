"""A static-shape decoding step for `torch.compile`: one compiled graph serves every position of a run.

The eager step (:class:`~dalle_pytorch.models.transformer.DecodingCache`) slices its buffers, masks, rotary
tables and token-shift sources with Python ints, so a compiler would specialise on the position and compile
again at every token. Here the position is a 0-dim tensor: the new keys, values and token-shift history are
written with ``index_copy_`` into the full ``max_len`` buffers the prompt pass allocated, and the new query
attends to all ``max_len`` keys under the pattern's mask row at that position (keys after it are hidden,
their buffer entries zeroed). The arithmetic is the eager step's; only the length of the masked reduction
differs, so the logits agree to float rounding. The same step decodes image codes (:func:`image_step`) and
text (:func:`text_step`), for plain and reversible transformers.

torch.compile: https://pytorch.org/docs/stable/generated/torch.compile.html

Shape letters: b batch (both guidance branches), h heads, L max_len positions, d model dim, e head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from dalle_pytorch.attention.layer import Attention, rotate
from dalle_pytorch.models import token_shift
from dalle_pytorch.models.transformer import DecodingCache, Transformer


def check_static_decoding(transformer: nn.Module) -> None:
    """ValueError unless the static step can run this transformer (the built-in one, plain or reversible)."""
    if type(transformer) is not Transformer:
        raise ValueError(f"compiled decoding needs dalle_pytorch's Transformer, got {type(transformer).__name__}")


def compile_backend(compile: bool | str | Callable | None) -> str | Callable | None:
    """The torch.compile backend a ``compile=`` argument asks for: True -> "inductor", False/None/"" -> None
    (eager), a backend name or callable as given; TypeError for anything else."""
    if compile is True:
        return "inductor"
    if compile is None or compile is False or compile == "":
        return None
    if not (isinstance(compile, str) or callable(compile)):
        raise TypeError(f"compile must be True, a torch.compile backend name or callable, got {compile!r}")
    return compile


def shift_sources(transformer: Transformer) -> Tensor:
    """(L, groups) long: per position, the token-shift source position of each group (-1 = zeros)."""
    return token_shift.shift_sources(
        transformer.text_len, transformer.fmap, transformer.shift_style, transformer.pattern_masks.device
    )


def prepare_cache(cache: DecodingCache) -> None:
    """Zero the unwritten tail of every buffer: masked keys get zero weight, and 0 * garbage could be NaN."""
    for buffer in cache._buffers.values():
        buffer[..., cache.offset :, :].zero_()


def _attend(attn: Attention, x: Tensor, k_buf: Tensor, v_buf: Tensor, mask_row: Tensor, rotary, pos: Tensor):
    """One query x (b, 1, dim) -> (b, 1, dim); its key and value written at ``pos`` of the (b, h, L, e) buffers."""
    qkv = rearrange(attn.to_qkv(x), "b n (three h e) -> three b h n e", three=3, h=attn.heads)
    if rotary is not None and attn.rotary_values:
        q, k, v = rotate(qkv, *rotary).unbind(0)
    elif rotary is not None:
        (q, k), v = rotate(qkv[:2], *rotary).unbind(0), qkv[2]
    else:
        q, k, v = qkv.unbind(0)
    k_buf.index_copy_(2, pos, k)
    v_buf.index_copy_(2, pos, v)
    scale = attn.dim_head**-0.5
    if attn.stable:  # as Attention.forward
        alpha = 32.0
        q = q / alpha
        scale = alpha * scale
    mask_row = mask_row[:, : k_buf.shape[2]]  # the cache may be shorter than the model's sequence
    # one query row: written out rather than F.scaled_dot_product_attention, whose CPU kernel is tuned for
    # blocks of queries; as plain matmuls and a masked softmax the compiler fuses it into the step
    scores = (q @ k_buf.transpose(-1, -2)) * scale  # (b, h, 1, L)
    out = scores.masked_fill(~mask_row, float("-inf")).softmax(dim=-1) @ v_buf  # (b, h, 1, e)
    return attn.to_out(rearrange(out, "b h n e -> b n (h e)"))


def _sublayer(sublayer: nn.Module, x: Tensor, key: tuple, buffers: dict, pos: Tensor, step: tuple) -> Tensor:
    """One sublayer (as ``Sublayer.forward``) on the new position; ``step`` = (mask rows, rotary, shift
    sources, shift style)."""
    rows, rotary, sources, shift_style = step
    y = sublayer.norm(x)
    if sublayer.shift:
        history = buffers[(key, "shift")]
        history.index_copy_(1, pos, y)
        y = token_shift.shift_indexed(history, y, sources, shift_style)
    if key[1] == 0:  # the attention sublayer; rows holds the mask row of its pattern
        y = _attend(sublayer.fn, y, buffers[(key, "k")], buffers[(key, "v")], rows, rotary, pos)
    else:
        y = sublayer.fn(y)
    return sublayer.norm_out(y)


def static_step(transformer: Transformer, x: Tensor, buffers: dict, pos: Tensor, sources: Tensor) -> Tensor:
    """The transformer on one new position: x (b, 1, d) at position ``pos`` (1,) long -> (b, 1, d).

    ``buffers`` are the prepared :class:`DecodingCache` buffers of the prompt pass (updated in place),
    ``sources`` the table of :func:`shift_sources`. A reversible transformer runs its couplings on two
    copies of x and returns their mean, as ``ReversibleSequence`` does without gradients."""
    rotary = None
    if transformer.rotary:
        rotary = (transformer.rotary_cos.index_select(0, pos), transformer.rotary_sin.index_select(0, pos))
    rows = transformer.pattern_masks.index_select(1, pos)  # (patterns, 1, L); True only up to pos (causal)
    step_sources = sources.index_select(0, pos)[0]  # (groups,)

    def run(i: int, j: int, y: Tensor) -> Tensor:
        step = (rows[transformer._pattern_of_layer[i]], rotary, step_sources, transformer.shift_style)
        return _sublayer(transformer.layers[i][j], y, (i, j), buffers, pos, step)

    if transformer.reversible:
        x1 = x2 = x
        for i in range(len(transformer.layers)):
            x1 = x1 + run(i, 0, x2)
            x2 = x2 + run(i, 1, x1)
        return (x1 + x2) / 2
    for i in range(len(transformer.layers)):
        x = x + run(i, 0, x)
        x = x + run(i, 1, x)
    return x


def image_step(model: Any, codes: Tensor, grid: Tensor, buffers: dict, pos: Tensor, sources: Tensor, guided: bool):
    """DALLE's decoding step on the static cache: new codes (b, 1) at grid index ``grid`` (1,) long, sequence
    position ``pos`` (1,) -> image logits (b or 2b, vocab); ``guided`` repeats the rows for the null branch."""
    x = model.image_emb(codes)
    if not model.rotary:
        x = x + model.image_row_emb(grid // model.fmap) + model.image_col_emb(grid % model.fmap)
    if guided:
        x = torch.cat((x, x))
    h = static_step(model.transformer, x, buffers, pos, sources)
    return model._image_logits(h[:, -1])


def text_step(model: Any, tokens: Tensor, buffers: dict, pos: Tensor, sources: Tensor) -> Tensor:
    """DALLE's text decoding step on the static cache: new text ids (b, 1) at sequence position ``pos`` (1,)
    -> text logits (b, num_text_tokens + text_seq_len)."""
    x = model.text_emb(tokens)
    if not model.rotary:
        x = x + model.text_pos_emb(pos)
    h = static_step(model.transformer, x, buffers, pos, sources)
    return model._text_logits(h[:, -1])


# Not used: inductor's freezing pass. It lays the weights out for oneDNN's small-row matmuls (which made
# whole runs 1.6-2x faster than eager on 1 thread) but bakes them into the graph as constants, so a model
# trained further after compiling kept decoding with its old weights. The same layout comes instead from
# kernels.packed_linear, made per generation call.

# (step, backend) -> compiled step; the model is an argument (not a closure or an attribute of the model) so
# that models stay copyable and picklable. Dynamo guards on the model and the shapes: each model and batch
# size compiles once, later runs reuse the graph
_COMPILED_STEPS: dict[Any, Callable] = {}


def compiled_step_fn(backend: str | Callable, step: Callable = image_step) -> Callable:
    """``step`` (:func:`image_step` or :func:`text_step`) compiled with ``backend`` (a torch.compile backend
    name or callable)."""
    if (step, backend) not in _COMPILED_STEPS:
        _COMPILED_STEPS[step, backend] = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED_STEPS[step, backend]
