"""Attention patterns as objects: masks equal the frozen reference, names and instances are interchangeable,
fast paths are checked against the masks, and checkpoints store patterns by name."""

import json
from dataclasses import dataclass, field

import pytest
import torch
from conftest import make_dalle, random_images, random_text
from reference import reference_attention_mask

from dalle_pytorch import DALLE
from dalle_pytorch.attention import (
    AttentionPattern,
    AxialCol,
    AxialRow,
    BlockSparse,
    ConvLike,
    ConvLikeCorner,
    Full,
    attention_mask,
    causal_mask,
    register_pattern,
    registered_patterns,
)
from dalle_pytorch.attention.pattern import build_pattern, checked_mask, fast_plan
from dalle_pytorch.kernels.tile_plans import plan_covers

# (reference type name, its options, the pattern object that must give the same mask)
BUILT_IN = [
    ("full", {}, Full()),
    ("axial_row", {}, AxialRow()),
    ("axial_col", {}, AxialCol()),
    ("conv_like", {}, ConvLike()),
    ("conv_like", dict(kernel_size=3), ConvLike(kernel_size=3)),
    ("conv_like", dict(kernel_size=5, dilation=2), ConvLike(kernel_size=5, dilation=2)),
    ("conv_like", dict(kernel_size=1), ConvLike(kernel_size=1)),
    ("conv_like", dict(kernel_size=7, dilation=3), ConvLike(kernel_size=7, dilation=3)),
    ("sparse", {}, BlockSparse()),
    ("sparse", dict(sparse_block_size=3, sparse_num_local_blocks=2, sparse_num_random_blocks=1), BlockSparse(3, 2, 1)),
    (
        "sparse",
        dict(sparse_block_size=4, sparse_num_local_blocks=1, sparse_num_random_blocks=3, sparse_seed=5),
        BlockSparse(block_size=4, num_local_blocks=1, num_random_blocks=3, seed=5),
    ),
    ("sparse", dict(sparse_block_size=2, sparse_num_random_blocks=0), BlockSparse(block_size=2, num_random_blocks=0)),
]
GRIDS = [(1, 1), (2, 3), (5, 4), (7, 5), (17, 6), (3, 8), (33, 10)]


@pytest.mark.parametrize("case", range(len(BUILT_IN)))
def test_masks_equal_the_frozen_reference_bit_for_bit(case):
    name, options, pattern = BUILT_IN[case]
    for text_len, fmap in GRIDS:
        expected = reference_attention_mask(name, text_len, fmap, **options)
        assert torch.equal(pattern.mask(text_len, fmap), expected), (text_len, fmap)
        assert torch.equal(attention_mask(name, text_len, fmap, **options), expected)  # by name, old keywords
        assert torch.equal(attention_mask(pattern, text_len, fmap), expected)


def test_names_map_to_classes_and_dalle_options_configure_them():
    assert registered_patterns()[:5] == ("full", "axial_row", "axial_col", "conv_like", "sparse")
    assert build_pattern("conv_like", dict(conv_kernel_size=3, conv_dilation=2, sparse_block_size=4)) == ConvLike(3, 2)
    assert build_pattern("sparse", dict(sparse_block_size=4, sparse_num_random_blocks=0)) == BlockSparse(4, 4, 0)
    assert build_pattern({"pattern": "conv_like", "kernel_size": 3}) == ConvLike(kernel_size=3)
    assert build_pattern(AxialRow()) == AxialRow() != AxialCol()
    with pytest.raises(ValueError, match="attn_types"):
        build_pattern("diagonal")
    with pytest.raises(ValueError, match="cannot rebuild"):
        build_pattern({"pattern": "conv_like", "size": 3})
    with pytest.raises(TypeError, match="attn_types"):
        build_pattern(3)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvLike(kernel_size=4)
    with pytest.raises(ValueError, match="sparse_block_size"):
        BlockSparse(block_size=0)


def test_the_corner_conv_like_window_ends_at_the_query():
    # one text position, a 4 x 4 grid: image token (r, c) is position 1 + 4 r + c
    mask = ConvLikeCorner(kernel_size=3).mask(1, 4)
    seen = {(int(j) - 1) // 4 * 10 + (int(j) - 1) % 4 for j in mask[1 + 4 * 2 + 2].nonzero() if j > 0}
    assert seen == {0, 1, 2, 10, 11, 12, 20, 21, 22}  # (as 10 r + c) rows 0-2 and columns 0-2: the 3 x 3 square
    assert mask[1 + 4 * 2 + 2, 0]  # and the text
    mask = ConvLikeCorner(kernel_size=3, dilation=2).mask(1, 4)
    seen = {(int(j) - 1) // 4 * 10 + (int(j) - 1) % 4 for j in mask[1 + 4 * 2 + 3].nonzero() if j > 0}
    assert seen == {1, 3, 21, 23}  # every second row and column, up to 2 * 2 back
    # the 5 x 5 corner window on a 4 x 4 grid: every earlier row and column
    row, col = (torch.arange(17) - 1) // 4, (torch.arange(17) - 1) % 4
    image = torch.arange(17) > 0
    expected = causal_mask(17) & (~image[None] | ((row[:, None] >= row) & (col[:, None] >= col)))
    assert torch.equal(ConvLikeCorner().mask(1, 4), expected)
    assert build_pattern("conv_like_corner", dict(conv_kernel_size=3)) == ConvLikeCorner(3) != ConvLike(3)
    assert build_pattern(ConvLikeCorner(3).to_config()) == ConvLikeCorner(3)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvLikeCorner(kernel_size=2)


def test_instances_names_and_mixtures_build_the_same_dalle():
    by_name = make_dalle(depth=4, attn_types=("full", "conv_like", "sparse", "axial_col"), conv_kernel_size=3,
                         sparse_block_size=4)  # fmt: skip
    patterns = (Full(), ConvLike(kernel_size=3), BlockSparse(block_size=4), AxialCol())
    by_instance = make_dalle(depth=4, attn_types=patterns)
    mixed = make_dalle(depth=4, attn_types=("full", ConvLike(kernel_size=3), "sparse", AxialCol()), sparse_block_size=4)
    assert by_name.transformer.layer_patterns == list(patterns)
    text, images = random_text(2), random_images(2)
    expected = by_name(text, images)
    for model in (by_instance, mixed):
        assert model.transformer.layer_patterns == list(patterns)
        torch.testing.assert_close(model(text, images), expected, rtol=0, atol=0)
    single = make_dalle(attn_types=AxialRow())
    assert single.transformer.layer_patterns == [AxialRow(), AxialRow()]


@pytest.mark.parametrize("case", range(1, len(BUILT_IN)))
def test_every_fast_path_covers_exactly_its_mask(case):
    pattern = BUILT_IN[case][2]
    for text_len, fmap in GRIDS[:-1]:
        mask = pattern.mask(text_len, fmap)
        full = text_len + fmap * fmap
        for n in sorted({1, text_len, text_len + 1, full - 1, full} - {0}):
            plan = pattern.tile_plan(text_len, fmap, n)
            assert plan_covers(plan, mask[:n, :n]), (text_len, fmap, n)
            assert fast_plan(pattern, text_len, fmap, n) is plan


def test_full_has_no_tile_plan_and_runs_the_causal_kernel():
    assert Full().tile_plan(3, 4, 19) is None and fast_plan(Full(), 3, 4, 19) is None
    dalle = make_dalle(attn_types=("full", "axial_row"))
    inputs = dalle.transformer._attention_inputs(0, dalle.seq_len, cached=False)
    assert inputs[0].causal and inputs[0].mask is None and inputs[0].plan is None
    assert not inputs[1].causal and inputs[1].plan is not None


def test_plan_covers_catches_wrong_plans():
    text_len, fmap, n = 3, 4, 19
    row_plan = AxialRow().tile_plan(text_len, fmap, n)
    assert plan_covers(row_plan, AxialRow().mask(text_len, fmap)[:n, :n])
    assert not plan_covers(row_plan, AxialCol().mask(text_len, fmap)[:n, :n])
    assert not plan_covers(row_plan, Full().mask(text_len, fmap)[:n, :n])
    # a window reaching before the region sees prefix keys twice: counted, so not covered
    conv = ConvLike(kernel_size=3).tile_plan(text_len, fmap, n)
    band = conv.bands[0]
    wrong = type(conv)(conv.prefix_len, conv.region_len, conv.front, (type(band)(**{**band.__dict__, "mask": None}),))
    assert not plan_covers(wrong, ConvLike(kernel_size=3).mask(text_len, fmap)[:n, :n])


@dataclass(frozen=True)
class _ColumnsWithRowPlan(AttentionPattern):  # a broken fast path: its own plan is for another mask
    def mask(self, text_len, fmap):
        return AxialCol().mask(text_len, fmap)

    def tile_plan(self, text_len, fmap, n):
        return AxialRow().tile_plan(text_len, fmap, n)


class _RowsOnConv(ConvLike):  # a subclass that changes only the mask: the inherited plan no longer applies
    def mask(self, text_len, fmap):
        return AxialRow().mask(text_len, fmap)


class _SameMaskConv(ConvLike):  # a subclass that changes the mask's code, not its value: the plan still applies
    def mask(self, text_len, fmap):
        return ConvLike(self.kernel_size, self.dilation).mask(text_len, fmap) | torch.eye(text_len + fmap**2).bool()


def test_fast_plan_is_used_only_when_it_matches_the_mask():
    with pytest.raises(ValueError, match="_ColumnsWithRowPlan.tile_plan"):
        fast_plan(_ColumnsWithRowPlan(), 3, 4, 19)
    assert fast_plan(_RowsOnConv(kernel_size=3), 3, 4, 19) is None
    assert fast_plan(_SameMaskConv(kernel_size=3), 3, 4, 19) is ConvLike(kernel_size=3).tile_plan(3, 4, 19)


@dataclass(frozen=True)
class _UnhashableRows(AxialRow):  # a list field: equal by value, but no hash (fast_plan cannot cache it)
    notes: list = field(default_factory=list)


def test_unhashable_patterns_still_get_their_checked_fast_path(monkeypatch):
    pattern = _UnhashableRows(["a"])
    with pytest.raises(TypeError):
        hash(pattern)
    assert fast_plan(pattern, 3, 4, 19) is AxialRow().tile_plan(3, 4, 19)
    dalle = make_dalle(attn_types=(pattern, _UnhashableRows(["a"])), shared_attn_ids=(0, 0))
    inputs = dalle.transformer._attention_inputs(0, dalle.seq_len, cached=False)
    assert len(dalle.transformer.patterns) == 1 and all(layer.plan is not None for layer in inputs)


@dataclass(frozen=True)
class _Bad(AttentionPattern):
    kind: str = "future"

    def mask(self, text_len, fmap):
        n = text_len + fmap * fmap
        return {
            "future": torch.ones(n, n, dtype=torch.bool),
            "empty": causal_mask(n) & ~torch.eye(n, dtype=torch.bool),
            "shape": causal_mask(n + 1),
            "dtype": causal_mask(n).float(),
        }[self.kind]


@pytest.mark.parametrize(
    ("kind", "message"),
    [("future", "later key"), ("empty", "without any key"), ("shape", "bool tensor"), ("dtype", "bool tensor")],
)
def test_bad_masks_are_errors_naming_the_pattern(kind, message):
    with pytest.raises(ValueError, match=f"_Bad.mask.*{message}|{message}"):
        checked_mask(_Bad(kind), 2, 2)
    with pytest.raises(ValueError, match=message):
        make_dalle(attn_types=(_Bad(kind),))


def test_register_pattern_errors():
    with pytest.raises(ValueError, match="already taken"):
        register_pattern("full", _Bad)
    with pytest.raises(ValueError, match="already registered"):
        register_pattern("another_name_for_full", Full)
    with pytest.raises(TypeError, match="AttentionPattern subclass"):
        register_pattern("not_a_pattern", dict)
    with pytest.raises(TypeError, match="non-empty string"):
        register_pattern("", _Bad)


def test_checkpoints_keep_names_as_names_and_store_instances_by_name(tmp_path):
    dalle = make_dalle(depth=3, attn_types=("axial_row", ConvLike(kernel_size=3), "sparse"), sparse_block_size=4)
    path = dalle.save_pretrained(tmp_path / "dalle")
    stored = json.loads((path / "config.json").read_text())["config"]["attn_types"]
    assert stored == ["axial_row", {"pattern": "conv_like", "kernel_size": 3, "dilation": 1}, "sparse"]
    loaded = DALLE.from_pretrained(path)
    assert loaded.config == dalle.config
    assert loaded.transformer.layer_patterns == dalle.transformer.layer_patterns
    text, images = random_text(2), random_images(2)
    torch.testing.assert_close(loaded(text, images), dalle.eval()(text, images), rtol=0, atol=0)


def test_loading_an_unknown_pattern_name_says_to_register_it(tmp_path):
    path = make_dalle(attn_types=(ConvLike(kernel_size=3),)).save_pretrained(tmp_path / "dalle")
    config = json.loads((path / "config.json").read_text())
    config["config"]["attn_types"][0]["pattern"] = "not_imported_yet"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'not_imported_yet'.*register_pattern"):
        DALLE.from_pretrained(path)


def test_unregistered_pattern_is_an_error_at_save_time(tmp_path):
    dalle = make_dalle(attn_types=(_RowsOnConv(kernel_size=3),))  # builds and trains without a name
    dalle(random_text(1), random_images(1), return_loss=True).backward()
    with pytest.raises(TypeError, match=r"_RowsOnConv is not registered.*register_pattern"):
        dalle.save_pretrained(tmp_path / "dalle")
    assert not (tmp_path / "dalle").exists()
