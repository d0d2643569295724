"""A user's own attention pattern, defined here without touching the library, works everywhere: training,
cached decoding, reversible and shared layers, attention dropout and checkpoints."""

from dataclasses import dataclass

import pytest
import torch
from conftest import make_dalle, random_images, random_text

from dalle_pytorch import DALLE
from dalle_pytorch.attention import AttentionPattern, AxialRow, ConvLike, Full, grid_mask, register_pattern
from dalle_pytorch.kernels import sparse_attention
from dalle_pytorch.models.reversible import ReversibleSequence

# ---------------------------------------------------------------------------------------------------------
# The user's pattern: image tokens see all text, themselves and the image rows just above them


@register_pattern("previous_rows")
@dataclass(frozen=True)
class PreviousRows(AttentionPattern):
    rows: int = 1  # how many rows above the query's row it sees

    def mask(self, text_len: int, fmap: int) -> torch.Tensor:
        def rule(q_row, q_col, k_row, k_col):
            above = (q_row - k_row >= 1) & (q_row - k_row <= self.rows)
            return above | ((q_row == k_row) & (q_col == k_col))

        return grid_mask(text_len, fmap, rule)


# ---------------------------------------------------------------------------------------------------------


def test_the_mask_by_hand():
    mask = PreviousRows().mask(2, 3)  # text 0-1, image rows (2 3 4) (5 6 7) (8 9 10)
    assert mask[9].nonzero().flatten().tolist() == [0, 1, 5, 6, 7, 9]
    assert mask[3].nonzero().flatten().tolist() == [0, 1, 3]
    assert mask[1].nonzero().flatten().tolist() == [0, 1]


def _grads(dalle, text, images):
    dalle.zero_grad(set_to_none=True)
    loss = dalle(text, images, return_loss=True)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in dalle.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "config",
    [
        dict(attn_types=(PreviousRows(),)),
        dict(depth=3, attn_types=("full", PreviousRows(rows=2), "axial_col"), shared_attn_ids=(0, 1, 2)),
        dict(reversible=True, attn_types=(PreviousRows(), "sparse"), sparse_block_size=4, attn_dropout=0.2),
    ],
)
def test_forward_backward_every_parameter_gets_a_finite_gradient(config):
    dalle = make_dalle(**config)
    loss, grads = _grads(dalle, random_text(2), random_images(2))
    assert torch.isfinite(loss)
    trainable = {name for name, p in dalle.named_parameters() if p.requires_grad}
    assert grads.keys() == trainable and all(torch.isfinite(g).all() for g in grads.values())


def test_reversible_backward_equals_plain_autograd(monkeypatch):
    # the memory-saving backward recomputes each sublayer (replaying attention dropout) under the user's mask
    dalle = make_dalle(reversible=True, depth=3, attn_types=(PreviousRows(), "axial_row"), attn_dropout=0.2,
                       shared_attn_ids=(0, 1, 0))  # fmt: skip
    text, images = random_text(2), random_images(2)
    original = ReversibleSequence.__call__
    results = []
    for checkpointing in (True, False):
        with monkeypatch.context() as patch:

            def call(self, x, inputs, use_checkpointing=True, checkpointing=checkpointing):
                return original(self, x, inputs, checkpointing)

            patch.setattr(ReversibleSequence, "__call__", call)
            torch.manual_seed(3)
            results.append(_grads(dalle, text, images))
    (loss, grads), (reference_loss, reference_grads) = results
    torch.testing.assert_close(loss, reference_loss)
    for name in reference_grads:
        torch.testing.assert_close(grads[name], reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_no_future_leak():
    dalle = make_dalle(attn_types=(PreviousRows(),)).eval()
    text, codes = random_text(1), torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = dalle(text, codes)
    for t in (dalle.text_seq_len + 2, dalle.text_seq_len + 9):  # positions of image tokens 2 and 9
        changed = codes.clone()
        changed[0, t - dalle.text_seq_len - 1] = (changed[0, t - dalle.text_seq_len - 1] + 1) % 32  # input at t
        other = dalle(text, changed)
        torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=0)
        assert not torch.equal(other[:, t:], logits[:, t:])


def _decode(dalle, use_cache, **kwargs):
    logits = []
    codes = dalle.generate_image_codes(
        random_text(2), use_cache=use_cache, generator=torch.Generator().manual_seed(11), step_logits=logits,
        filter_thres=0.0, **kwargs,
    )  # fmt: skip
    return codes, torch.stack(logits)


@pytest.mark.parametrize(
    ("config", "mode"),
    [
        (dict(attn_types=(PreviousRows(),)), "plain"),
        (dict(attn_types=(PreviousRows(),)), "guided_primed"),
        (dict(depth=3, attn_types=(PreviousRows(rows=2), "conv_like", "full"), shared_ff_ids=(0, 0, 1)), "plain"),
        (
            dict(reversible=True, attn_types=("sparse", PreviousRows()), sparse_block_size=4, attn_dropout=0.3),
            "guided_primed",
        ),
    ],
)
def test_cached_equals_uncached_generation(config, mode):
    dalle = make_dalle(**config)
    kwargs = dict(cond_scale=3.0, img=random_images(2), num_init_img_tokens=5) if mode == "guided_primed" else {}
    cached_codes, cached_logits = _decode(dalle, True, **kwargs)
    plain_codes, plain_logits = _decode(dalle, False, **kwargs)
    assert torch.equal(cached_codes, plain_codes)
    torch.testing.assert_close(cached_logits, plain_logits, atol=1e-4, rtol=1e-4)


def test_attention_dropout_applies_in_training_only():
    dalle = make_dalle(attn_types=(PreviousRows(),), attn_dropout=0.5)
    text, images = random_text(2), random_images(2)
    torch.manual_seed(0)
    first = dalle(text, images, return_loss=True)
    torch.manual_seed(0)
    assert torch.equal(first, dalle(text, images, return_loss=True))  # dropout replays from the global seed
    assert not torch.equal(first, dalle(text, images, return_loss=True))
    without = make_dalle(attn_types=(PreviousRows(),))
    torch.testing.assert_close(dalle.eval()(text, images), without.eval()(text, images), rtol=0, atol=0)


class RowsOnly(ConvLike):
    """A subclass that changes only the mask: the conv-like fast path it inherits must not be used."""

    def mask(self, text_len: int, fmap: int) -> torch.Tensor:
        return AxialRow().mask(text_len, fmap)


def test_a_subclass_changing_only_the_mask_trains_and_decodes_on_that_mask(monkeypatch):
    planned = []
    original = sparse_attention._PlannedAttention.apply
    monkeypatch.setattr(sparse_attention._PlannedAttention, "apply", lambda *a: planned.append(a[3]) or original(*a))
    subclass = make_dalle(attn_types=(RowsOnly(kernel_size=3),))
    rows = make_dalle(attn_types=(AxialRow(),))  # the same weights (same seed), the pattern the mask says
    text, images = random_text(2), random_images(2)
    loss, grads = _grads(subclass, text, images)
    assert not planned  # the inherited conv-like plan was not used: the dense kernel ran with the mask
    rows_loss, rows_grads = _grads(rows, text, images)
    assert planned  # the built-in pattern does use its fast path
    torch.testing.assert_close(loss, rows_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], rows_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    expected = _decode(rows, True)[0]
    assert torch.equal(_decode(subclass, True)[0], expected) and torch.equal(_decode(subclass, False)[0], expected)


def test_a_registered_user_pattern_round_trips_through_a_checkpoint(tmp_path):
    dalle = make_dalle(depth=3, attn_types=("full", PreviousRows(rows=2), AxialRow()))
    path = dalle.save_pretrained(tmp_path / "dalle")
    loaded = DALLE.from_pretrained(path)
    assert loaded.config == dalle.config
    assert loaded.transformer.layer_patterns == [Full(), PreviousRows(rows=2), AxialRow()]
    text, images = random_text(2), random_images(2)
    torch.testing.assert_close(loaded(text, images), dalle.eval()(text, images), rtol=0, atol=0)
