"""DALLE as researchers extend it: the options written once (DALLEConfig), the loss hook, forward's outputs,
generation options, and swapping the transformer or a block."""

import dataclasses
import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_TEXT_TOKENS, TEXT_SEQ_LEN, make_dalle, make_vae, random_images, random_text
from torch import nn

from dalle_pytorch import DALLE
from dalle_pytorch.cli import generate, train_dalle
from dalle_pytorch.cli.flags import options_from_args
from dalle_pytorch.models.dalle import DALLEOutput
from dalle_pytorch.models.dalle_config import DALLEConfig
from dalle_pytorch.models.generation import GenerationOptions
from dalle_pytorch.models.options import help_text
from dalle_pytorch.models.transformer import Transformer

# ------------------------------------------------------------------------------------------ configuration


def test_signature_lists_every_option_keyword_only_with_its_default():
    params = inspect.signature(DALLE).parameters
    fields = dataclasses.fields(DALLEConfig)
    assert [name for name in params if name not in ("vae", "config")] == [f.name for f in fields]
    for f in fields:
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        expected = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert params[f.name].default == expected, f.name
    # the defaults users know
    assert params["dim"].default is inspect.Parameter.empty and params["depth"].default is inspect.Parameter.empty
    assert (params["num_text_tokens"].default, params["text_seq_len"].default, params["heads"].default) == (
        10000,
        256,
        8,
    )
    assert params["loss_img_weight"].default == 7 and params["shift_tokens"].default is True


def test_config_object_and_keywords_build_the_same_model():
    by_keywords = make_dalle(attn_types=("full", "axial_row"), ff_mult=2)
    torch.manual_seed(0)
    config = DALLEConfig(dim=32, depth=2, num_text_tokens=NUM_TEXT_TOKENS, text_seq_len=TEXT_SEQ_LEN, heads=2)
    by_config = DALLE(vae=by_keywords.vae, config=config, dim_head=16, attn_types=("full", "axial_row"), ff_mult=2)
    assert by_config.config == by_keywords.config
    assert by_config.dalle_config == by_keywords.dalle_config
    for (name, a), (_, b) in zip(by_keywords.state_dict().items(), by_config.state_dict().items()):
        assert torch.equal(a, b), name
    assert config.dim_head == 64  # the caller's config is not modified by the overrides


def test_bad_arguments_are_type_errors_naming_them(vae):
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['dimm'\\]"):
        DALLE(vae=vae, dim=32, depth=1, dimm=3)
    with pytest.raises(TypeError, match="missing required keyword arguments \\['depth'\\]"):
        DALLE(vae=vae, dim=32)
    with pytest.raises(TypeError, match="DALLEConfig"):
        DALLE(vae=vae, config=dict(dim=32, depth=1))
    with pytest.raises(ValueError, match="num_text_tokens and text_seq_len must be >= 1"):
        DALLE(vae=vae, dim=32, depth=1, text_seq_len=0)
    with pytest.raises(ValueError, match="rotary_emb_style must be one of \\('default', 'original'\\), got 'new'"):
        DALLE(vae=vae, dim=32, depth=1, rotary_emb_style="new")


def test_optimize_for_inference_is_deprecated_and_ignored():
    with pytest.warns(DeprecationWarning, match="optimize_for_inference is deprecated"):
        dalle = make_dalle(optimize_for_inference=True)
    reference = make_dalle()
    assert "optimize_for_inference" not in dalle.config and dalle.config == reference.config
    text, images = random_text(2), random_images(2)
    torch.testing.assert_close(dalle(text, images, return_loss=True), reference(text, images, return_loss=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_dalle()  # no warning without it


def test_sparse_attn_is_the_default_attention_type_switch():
    assert make_dalle(sparse_attn=True).config["attn_types"] == ["sparse"]
    assert make_dalle().config["attn_types"] == ["full"]
    assert make_dalle(sparse_attn=True, attn_types="axial_row").config["attn_types"] == ["axial_row"]


def test_config_json_written_before_the_config_class_still_loads(tmp_path):
    dalle = make_dalle(attn_types=("full", "conv_like"), shared_ff_ids=(0, 0))
    dalle.save_pretrained(tmp_path / "model")
    path = tmp_path / "model" / "config.json"
    meta = json.loads(path.read_text())
    # the keys and layout the constructor wrote before DALLEConfig existed (no sparse_attn)
    meta["config"] = dict(
        dim=32, num_text_tokens=NUM_TEXT_TOKENS, text_seq_len=TEXT_SEQ_LEN, depth=2, heads=2, dim_head=16,
        reversible=False, attn_dropout=0.0, ff_dropout=0.0, attn_types=["full", "conv_like"], loss_img_weight=7,
        stable=False, sandwich_norm=False, shift_tokens=True, rotary_emb=True, shared_attn_ids=None,
        shared_ff_ids=[0, 0], share_input_output_emb=False, ff_mult=4, conv_kernel_size=5, conv_dilation=1,
        sparse_block_size=16, sparse_num_local_blocks=4, sparse_num_random_blocks=2,
    )  # fmt: skip
    meta.pop("tuple_paths", None)
    path.write_text(json.dumps(meta))
    loaded = DALLE.from_pretrained(tmp_path / "model")
    assert loaded.config == dalle.config
    text, images = random_text(2), random_images(2)
    torch.testing.assert_close(loaded(text, images), dalle.eval()(text, images))
    # an old file that still names optimize_for_inference loads with the deprecation warning
    meta["config"]["optimize_for_inference"] = True
    path.write_text(json.dumps(meta))
    with pytest.warns(DeprecationWarning, match="optimize_for_inference"):
        assert DALLE.from_pretrained(tmp_path / "model").config == dalle.config


# ------------------------------------------------------------------------------------------ loss and outputs


def _text_with_padding(batch: int) -> torch.Tensor:
    text = random_text(batch)
    text[:, -2:] = 0  # padding: each padded position has its own padding token
    return text


def test_default_loss_is_the_weighted_cross_entropy_exactly(dalle):
    text, images = _text_with_padding(2), random_images(2)
    out = dalle(text, images, return_loss=True, return_outputs=True)
    assert isinstance(out, DALLEOutput)
    # the targets, built independently: padding positions get num_text_tokens + position
    padded = torch.where(text == 0, NUM_TEXT_TOKENS + torch.arange(TEXT_SEQ_LEN), text)
    codes = dalle.vae.get_codebook_indices(images)
    assert torch.equal(out.text_targets, padded) and torch.equal(out.image_targets, codes)
    ce_text = F.cross_entropy(out.text_logits.flatten(0, 1), padded.flatten())
    ce_image = F.cross_entropy(out.image_logits.flatten(0, 1), codes.flatten())
    expected = (ce_text + 7 * ce_image) / 8
    assert torch.equal(out.loss, expected)
    assert torch.equal(dalle(text, images, return_loss=True), expected)


def test_outputs_hold_the_logits_forward_returns(dalle):
    text, images = _text_with_padding(2), random_images(2)
    out = dalle(text, images, return_outputs=True)
    assert out.loss is None
    assert out.text_logits.shape == (2, TEXT_SEQ_LEN, NUM_TEXT_TOKENS + TEXT_SEQ_LEN)
    assert out.image_logits.shape == (2, dalle.image_seq_len, dalle.num_image_tokens)
    assert out.text_targets.shape == (2, TEXT_SEQ_LEN) and out.image_targets.shape == (2, dalle.image_seq_len)
    full = dalle(text, images)
    offset = NUM_TEXT_TOKENS + TEXT_SEQ_LEN
    torch.testing.assert_close(full[:, :TEXT_SEQ_LEN, :offset], out.text_logits)
    torch.testing.assert_close(full[:, TEXT_SEQ_LEN:, offset:], out.image_logits)
    text_only = dalle(text, return_outputs=True)
    assert text_only.image_logits is None and text_only.image_targets is None
    torch.testing.assert_close(text_only.text_logits, out.text_logits)


def test_targets_follow_the_captions_null_cond_prob_dropped(dalle):
    text, images = random_text(8), random_images(8)
    torch.manual_seed(3)
    out = dalle(text, images, return_loss=True, return_outputs=True, null_cond_prob=0.5)
    null = NUM_TEXT_TOKENS + torch.arange(TEXT_SEQ_LEN)
    dropped = (out.text_targets == null).all(dim=1)
    assert 0 < dropped.sum() < 8  # both kinds of rows in this batch
    assert torch.equal(out.text_targets[~dropped], text[~dropped])
    # the targets are what the model was given: feeding them as the caption reproduces the logits
    fed = torch.where(dropped[:, None], torch.zeros_like(text), text)
    again = dalle(fed, images, return_outputs=True)
    torch.testing.assert_close(again.text_logits, out.text_logits)
    torch.testing.assert_close(again.image_logits, out.image_logits)
    torch.testing.assert_close(out.loss, dalle.loss(*out[:4]))


class SmoothedDALLE(DALLE):
    """Label smoothing: the loss override a user writes."""

    smoothing = 0.1

    def loss(self, text_logits, image_logits, text_targets, image_targets):
        text = F.cross_entropy(text_logits.flatten(0, 1), text_targets.flatten(), label_smoothing=self.smoothing)
        image = F.cross_entropy(image_logits.flatten(0, 1), image_targets.flatten(), label_smoothing=self.smoothing)
        return (text + self.loss_img_weight * image) / (self.loss_img_weight + 1)


def _smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Hand-written label-smoothed cross entropy over logits (b, n, v)."""
    log_probs = logits.log_softmax(dim=-1)
    smooth = torch.full_like(log_probs, eps / logits.shape[-1])
    smooth.scatter_add_(-1, targets[..., None], torch.full_like(log_probs[..., :1], 1 - eps))
    return -(smooth * log_probs).sum(-1).mean()


def test_a_subclass_loss_trains_with_the_gradient_of_a_reference():
    plain = make_dalle()
    smoothed = SmoothedDALLE(vae=plain.vae, config=plain.dalle_config)
    smoothed.load_state_dict(plain.state_dict())
    text, images = _text_with_padding(3), random_images(3)
    smoothed(text, images, return_loss=True).backward()

    # reference: slice the valid columns of the -inf-padded logits and smooth by hand
    logits = plain(text, images)
    offset = NUM_TEXT_TOKENS + TEXT_SEQ_LEN
    text_targets = torch.where(text == 0, NUM_TEXT_TOKENS + torch.arange(TEXT_SEQ_LEN), text)
    codes = plain.vae.get_codebook_indices(images)
    loss_text = _smoothed_ce(logits[:, :TEXT_SEQ_LEN, :offset], text_targets, 0.1)
    loss_image = _smoothed_ce(logits[:, TEXT_SEQ_LEN:, offset:], codes, 0.1)
    reference = (loss_text + 7 * loss_image) / 8
    reference.backward()
    torch.testing.assert_close(smoothed(text, images, return_loss=True), reference)
    assert not torch.allclose(reference, plain(text, images, return_loss=True))  # smoothing changes the loss
    grads = dict(plain.named_parameters())
    for name, p in smoothed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


@dataclasses.dataclass
class SmoothingConfig(DALLEConfig):
    smoothing: float = 0.0


class ConfigurableSmoothedDALLE(SmoothedDALLE):
    """Options of its own: a config subclass, saved in config.json like the built-in ones."""

    config_class = SmoothingConfig

    @property
    def smoothing(self):
        return self.dalle_config.smoothing


def test_a_subclass_adds_options_of_its_own(tmp_path):
    dalle = ConfigurableSmoothedDALLE(
        vae=make_vae(), dim=32, depth=1, heads=2, dim_head=16, num_text_tokens=NUM_TEXT_TOKENS,
        text_seq_len=TEXT_SEQ_LEN, smoothing=0.2,
    )  # fmt: skip
    assert dalle.config["smoothing"] == 0.2
    dalle.save_pretrained(tmp_path / "model")
    loaded = DALLE.from_pretrained(tmp_path / "model")
    assert type(loaded) is ConfigurableSmoothedDALLE and loaded.smoothing == 0.2
    text, images = random_text(2), random_images(2)
    torch.testing.assert_close(loaded(text, images, return_loss=True), dalle.eval()(text, images, return_loss=True))
    plain = dataclasses.replace(dalle.dalle_config, smoothing=0.0)
    unsmoothed = ConfigurableSmoothedDALLE(vae=dalle.vae, config=plain)
    unsmoothed.load_state_dict(dalle.state_dict())
    assert not torch.allclose(unsmoothed(text, images, return_loss=True), dalle(text, images, return_loss=True))


# ------------------------------------------------------------------------------------------ swapping blocks


class ReluFeedForward(nn.Module):
    """A plain two-layer MLP in place of the GEGLU feed-forward."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class ReluTransformer(Transformer):
    feed_forward_class = ReluFeedForward


class ReluDALLE(DALLE):
    transformer_class = ReluTransformer


class ScaledTransformer(nn.Module):
    """A whole different transformer: the library's, its output scaled by a learned gate."""

    def __init__(self, **options):
        super().__init__()
        self.inner = Transformer(**options)
        self.gate = nn.Parameter(torch.tensor(0.5))
        self.seq_len = self.inner.seq_len

    def forward(self, x, cache=None):
        return self.inner(x, cache) * self.gate


class GatedDALLE(DALLE):
    transformer_class = ScaledTransformer


@pytest.mark.parametrize("cls", [ReluDALLE, GatedDALLE])
def test_a_subclass_swaps_the_transformer_trains_generates_and_reloads(cls, tmp_path):
    torch.manual_seed(0)
    dalle = cls(vae=make_vae(), dim=32, depth=2, heads=2, dim_head=16, num_text_tokens=NUM_TEXT_TOKENS,
                text_seq_len=TEXT_SEQ_LEN)  # fmt: skip
    if cls is ReluDALLE:
        assert all(isinstance(layer[1].fn, ReluFeedForward) for layer in dalle.transformer.layers)
    else:
        assert isinstance(dalle.transformer, ScaledTransformer)
    text, images = random_text(2), random_images(2)
    optimizer = torch.optim.SGD(dalle.parameters(), lr=0.1)
    before = dalle(text, images, return_loss=True)
    before.backward()
    assert all(p.grad is not None for p in dalle.parameters() if p.requires_grad)
    optimizer.step()
    assert dalle(text, images, return_loss=True) < before
    generator = torch.Generator().manual_seed(0)
    cached = dalle.generate_image_codes(text, generator=generator)
    uncached = dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert cached.shape == (2, dalle.image_seq_len) and torch.equal(cached, uncached)
    dalle.save_pretrained(tmp_path / "model")
    loaded = DALLE.from_pretrained(tmp_path / "model")
    assert type(loaded) is cls
    torch.testing.assert_close(loaded(text, images), dalle.eval()(text, images))


# ------------------------------------------------------------------------------------------ generation options


def test_generation_options_object_equals_keywords(dalle):
    text = random_text(2)
    options = GenerationOptions(filter_thres=0.3, temperature=0.8, cond_scale=2.0)
    by_object = dalle.generate_image_codes(text, options=dataclasses.replace(options, generator=torch.Generator()))
    by_keywords = dalle.generate_image_codes(
        text, filter_thres=0.3, temperature=0.8, cond_scale=2.0, generator=torch.Generator()
    )
    assert torch.equal(by_object, by_keywords)
    # keywords override the object's fields
    overridden = dalle.generate_image_codes(text, options=options, temperature=1.0, generator=torch.Generator())
    plain = dalle.generate_image_codes(text, filter_thres=0.3, cond_scale=2.0, generator=torch.Generator())
    assert torch.equal(overridden, plain)


def test_generation_signatures_list_the_options():
    for method in (DALLE.generate_images, DALLE.generate_image_codes):
        params = inspect.signature(method).parameters
        for f in dataclasses.fields(GenerationOptions):
            assert params[f.name].default == f.default and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "clip" in inspect.signature(DALLE.generate_images).parameters


def test_bad_generation_options(dalle):
    # the range checks of each option: tests/test_generation.py; here what only the options object adds
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['top_kk'\\]"):
        dalle.generate_images(random_text(1), top_kk=3)
    with pytest.raises(TypeError, match="expected a GenerationOptions"):
        dalle.generate_image_codes(random_text(1), options=dict(temperature=0.5))
    with pytest.raises(ValueError, match="filter_thres must be in"):
        GenerationOptions(filter_thres=1.0)  # checked when the options are made, before any decoding


# ------------------------------------------------------------------------------------------ command-line flags


def _flag(parser, name):
    return next(action for action in parser._actions if f"--{name}" in action.option_strings)


def test_dalle_train_flags_come_from_the_config():
    parser = train_dalle.build_parser()
    for f in dataclasses.fields(DALLEConfig):
        if f.name == "num_text_tokens":  # the tokenizer's vocabulary size, not a flag
            assert not any("--num_text_tokens" in action.option_strings for action in parser._actions)
            continue
        action = _flag(parser, train_dalle.MODEL_FLAGS.get(f.name, f.name))
        assert help_text(DALLEConfig, f.name) in action.help
        assert action.default == train_dalle.MODEL_DEFAULTS.get(f.name, f.default), f.name
    assert (_flag(parser, "dim").default, _flag(parser, "depth").default) == (512, 2)  # the tool's defaults

    args = parser.parse_args(
        ["--image_text_folder", "x", "--dim", "32", "--depth", "3", "--heads", "2", "--dim_head", "16",
         "--text_seq_len", str(TEXT_SEQ_LEN), "--attn_types", "full, axial_row", "--stable_softmax",
         "--no_rotary_emb", "--shared_ff_ids", "0,0,1", "--conv_kernel_size", "3", "--shift_tokens_style", "original"]
    )  # fmt: skip
    dalle = train_dalle.build_dalle(args, make_vae(), NUM_TEXT_TOKENS)
    expected = DALLEConfig(
        dim=32, depth=3, heads=2, dim_head=16, num_text_tokens=NUM_TEXT_TOKENS, text_seq_len=TEXT_SEQ_LEN,
        attn_types=("full", "axial_row"), stable=True, rotary_emb=False, shared_ff_ids=(0, 0, 1), conv_kernel_size=3,
        shift_tokens_style="original",
    )  # fmt: skip
    assert dalle.dalle_config == expected
    sparse = parser.parse_args(["--image_text_folder", "x", "--sparse_attn", "--dim", "32"])
    assert train_dalle.build_dalle(sparse, make_vae(), NUM_TEXT_TOKENS).config["attn_types"] == ["sparse"]


def test_dalle_generate_flags_come_from_the_generation_options():
    parser = generate.build_parser()
    for f in dataclasses.fields(GenerationOptions):
        if f.name in generate.NOT_FLAGS:
            continue
        action = _flag(parser, generate.OPTION_FLAGS.get(f.name, f.name))
        assert help_text(GenerationOptions, f.name) in action.help
        assert action.default == (0.9 if f.name == "filter_thres" else f.default), f.name
    args = parser.parse_args(["--dalle_path", "x", "--text", "a", "--top_k", "0.5", "--temperature", "0.7"])
    options = options_from_args(GenerationOptions, args, flags=generate.OPTION_FLAGS)
    assert options == GenerationOptions(filter_thres=0.5, temperature=0.7)


# ------------------------------------------------------------------------------------------ docs/models.md

MODELS_DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_models_doc_lists_every_option():
    doc = MODELS_DOC.read_text(encoding="utf-8")
    for options_class in (DALLEConfig, GenerationOptions):
        for f in dataclasses.fields(options_class):
            assert f"| `{f.name}` |" in doc, f.name


def test_models_doc_examples_run(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", MODELS_DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 8
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(MODELS_DOC), "exec"), namespace)  # noqa: S102 (our own docs)
    assert namespace["images_out"].shape == (2, 3, 32, 32)
    assert namespace["codes"].shape == (2, 64)
    assert all(p.grad is not None for p in namespace["smoothed"].parameters() if p.requires_grad)
