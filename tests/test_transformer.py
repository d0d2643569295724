"""Token shift and rotary positions: the pure helpers of transformer.py, and their fast forms equal the references
in tests/reference.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import apply_rotary, original_shift_tokens, shift_tokens, token_shift_sources

from dalle_pytorch.attention.layer import Attention, rotary_tables, rotate
from dalle_pytorch.models.token_shift import shift_indexed, shift_sources
from dalle_pytorch.models.transformer import (
    rotary_angles,
    shift_one_token,
    shift_sequence,
    token_shift_source,
    token_shift_tables,
)


def test_token_shift_sources_by_hand():
    # text_len 2 (BOS + one text token), 2x2 image grid: positions 2 3 / 4 5
    expected = [
        (-1, 0),  # BOS: nothing before it, keeps its own second group
        (0, 1),  # text: previous token, keeps its own
        (-1, -1),  # image (0, 0): no left, no above
        (2, -1),  # image (0, 1): left = 2, no above
        (-1, 2),  # image (1, 0): no left, above = 2
        (4, 3),  # image (1, 1): left = 4, above = 3
    ]
    assert token_shift_sources(2, 2).tolist() == [list(pair) for pair in expected]


@pytest.mark.parametrize(("text_len", "fmap"), [(2, 2), (5, 3), (1, 4)])
def test_one_token_shift_equals_the_reference(text_len, fmap):
    sources = token_shift_sources(text_len, fmap)
    history = torch.randn(2, text_len + fmap * fmap, 16)
    for position in range(len(sources)):
        source = token_shift_source(position, text_len, fmap)
        assert source == tuple(sources[position].tolist())
        fast = shift_one_token(history[:, : position + 1], *source)
        reference = shift_tokens(history[:, : position + 1], sources[position : position + 1])
        torch.testing.assert_close(fast, reference, rtol=0, atol=0)


@pytest.mark.parametrize(("text_len", "fmap"), [(2, 2), (5, 3), (1, 4), (3, 1)])
def test_sequence_shift_equals_the_reference_with_gradients(text_len, fmap):
    sources = token_shift_sources(text_len, fmap)
    tables = token_shift_tables(text_len, fmap)
    for n in range(1, len(sources) + 1):  # every prefix length: training runs all but the last position
        x = torch.randn(2, n, 12, requires_grad=True)
        fast, reference = shift_sequence(x, fmap, tables[:, :n]), shift_tokens(x, sources[:n])
        torch.testing.assert_close(fast, reference, rtol=0, atol=0)
        weights = torch.randn_like(fast)
        (grad_fast,) = torch.autograd.grad((fast * weights).sum(), x)
        (grad_reference,) = torch.autograd.grad((reference * weights).sum(), x)
        torch.testing.assert_close(grad_fast, grad_reference)


def test_shift_moves_groups_and_zeros_missing_neighbours():
    history = torch.arange(2 * 6 * 8, dtype=torch.float).reshape(2, 6, 8)
    shifted = shift_tokens(history, token_shift_sources(2, 2))
    torch.testing.assert_close(shifted[:, 5, :2], history[:, 4, :2])  # from the left
    torch.testing.assert_close(shifted[:, 5, 2:4], history[:, 3, 2:4])  # from above
    torch.testing.assert_close(shifted[:, 5, 4:], history[:, 5, 4:])  # kept
    assert (shifted[:, 2, :4] == 0).all()  # top-left image token has no neighbours
    assert not torch.equal(history, torch.zeros_like(history))  # input untouched
    assert history[0, 0, 1] == 1


def test_original_token_shift_by_hand():
    # text_len 2, a 2 x 2 grid (positions 2 3 / 4 5), 8 channels: text moves [0, 4), image [0, 2) and [2, 4)
    history = torch.arange(6 * 8, dtype=torch.float).reshape(1, 6, 8) + 1
    tables = token_shift_tables(2, 2, "original")
    shifted = shift_sequence(history, 2, tables, "original")
    torch.testing.assert_close(shifted[:, 1, :4], history[:, 0, :4])  # text: half from the previous token
    torch.testing.assert_close(shifted[:, 5, :2], history[:, 3, :2])  # image (1, 1): a quarter from above
    torch.testing.assert_close(shifted[:, 5, 2:4], history[:, 4, 2:4])  # and the next from the left
    torch.testing.assert_close(shifted[:, :, 4:], history[:, :, 4:])  # the rest kept
    assert (shifted[:, 0, :4] == 0).all() and (shifted[:, 2, :4] == 0).all()  # nothing before, no neighbours
    assert (shifted[:, 3, :2] == 0).all() and (shifted[:, 4, 2:4] == 0).all()  # first row / first column


@pytest.mark.parametrize("dim", [2, 5, 8, 10, 12])
@pytest.mark.parametrize(("text_len", "fmap"), [(2, 2), (5, 3), (1, 4), (3, 1)])
def test_original_token_shift_equals_its_definition_in_every_form(dim, text_len, fmap):
    tables = token_shift_tables(text_len, fmap, "original")
    sources = shift_sources(text_len, fmap, "original")
    history = torch.randn(2, text_len + fmap * fmap, dim)
    for n in range(1, len(sources) + 1):
        x = history[:, :n].clone().requires_grad_()
        fast, reference = shift_sequence(x, fmap, tables[:, :n], "original"), original_shift_tokens(x, text_len, fmap)
        torch.testing.assert_close(fast, reference, rtol=0, atol=0)
        weights = torch.randn_like(fast)
        torch.testing.assert_close(*(torch.autograd.grad((y * weights).sum(), x)[0] for y in (fast, reference)))
        source = token_shift_source(n - 1, text_len, fmap, "original")  # the one-token decoding step
        assert source == tuple(sources[n - 1].tolist())
        one = shift_one_token(history[:, :n], *source, style="original")
        torch.testing.assert_close(one, reference[:, -1:], rtol=0, atol=0)
        indexed = shift_indexed(history, history[:, n - 1 : n], sources[n - 1], "original")  # compiled decoding
        torch.testing.assert_close(indexed, reference[:, -1:], rtol=0, atol=0)


def test_original_rotary_angles_by_hand():
    # text_len 2, a 2 x 2 grid, dim_head 12: 4 features (2 frequencies) per part
    angles = rotary_angles(2, 2, 12, style="original")
    assert angles.shape == (6, 12)
    text_freq = torch.tensor([1.0, 0.01])  # 1 / 10000 ** (i / 4) for i = 0, 2
    pixel_freq = torch.tensor([1.0, 5.0]) * math.pi  # linspace(1, 5) * pi
    torch.testing.assert_close(angles[1, :4], (1 * text_freq).repeat_interleave(2))  # text position 1
    torch.testing.assert_close(angles[1, 4:8], (-10 * pixel_freq).repeat_interleave(2))  # text at -10 on the grid
    torch.testing.assert_close(angles[1, 8:], angles[1, 4:8])
    torch.testing.assert_close(angles[3, :4], (8192 * text_freq).repeat_interleave(2))  # image: text position 8192
    torch.testing.assert_close(angles[3, 4:8], (-1 * pixel_freq).repeat_interleave(2))  # row 0 at -1
    torch.testing.assert_close(angles[3, 8:], (1 * pixel_freq).repeat_interleave(2))  # column 1 at 1
    # a head width whose third is odd: 5 features give 2 frequencies over 5 (text) and linspace(1, 5, 2)
    angles = rotary_angles(2, 2, 15, style="original")
    assert angles.shape == (6, 12)
    torch.testing.assert_close(angles[1, :4], torch.tensor([1.0, 10000**-0.4]).repeat_interleave(2))
    with pytest.raises(ValueError, match="style"):
        rotary_angles(2, 2, 12, style="other")


def test_rotary_values_turn_the_values_by_their_key_angles():
    torch.manual_seed(0)
    attention = Attention(8, heads=2, dim_head=12, rotary_values=True).eval()
    x = torch.randn(2, 6, 8)
    angles = rotary_angles(2, 2, 12, style="original")
    q, k, v = (t.unflatten(-1, (2, 12)).transpose(1, 2) for t in attention.to_qkv(x).chunk(3, dim=-1))
    q, k, v = (apply_rotary(angles, t) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
    got = attention(x, causal=True, rotary=rotary_tables(angles, 12))
    torch.testing.assert_close(got, attention.to_out(expected))


@pytest.mark.parametrize("dim_head", [12, 32, 33])
def test_rotate_with_tables_equals_reference(dim_head):
    angles = rotary_angles(5, 3, dim_head)
    x = torch.randn(2, 3, angles.shape[0], dim_head)
    cos, sin = rotary_tables(angles, dim_head)
    torch.testing.assert_close(rotate(x, cos, sin), apply_rotary(angles, x))
    # features past the rotated ones pass unchanged; rotations keep the norm of each pair
    torch.testing.assert_close(rotate(x, cos, sin)[..., angles.shape[1] :], x[..., angles.shape[1] :])
    torch.testing.assert_close(rotate(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_rotary_scores_depend_on_relative_text_position():
    angles = rotary_angles(text_len=8, fmap=1, dim_head=12)
    cos, sin = rotary_tables(angles, 12)
    q, k = torch.randn(12), torch.randn(12)

    def score(i, j):
        return rotate(q, cos[i], sin[i]) @ rotate(k, cos[j], sin[j])

    torch.testing.assert_close(score(3, 1), score(6, 4))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rotary_tables_bad_input():
    with pytest.raises(ValueError, match="even number"):
        rotary_tables(torch.zeros(4, 3), 8)
    with pytest.raises(ValueError, match="dim_head"):
        rotary_tables(torch.zeros(4, 10), 8)
