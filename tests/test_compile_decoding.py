"""Compiled decoding (`compile=` of generate_image_codes and generate_texts): one compilation serves every
position and every later run of the batch size, and the tokens equal eager decoding's for the same generator."""

import time
from copy import deepcopy

import pytest
import torch
from conftest import NUM_TEXT_TOKENS, TEXT_SEQ_LEN, make_clip, make_dalle

from dalle_pytorch.models.static_decoding import check_static_decoding


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts compilations."""

    def __init__(self):
        self.compilations = 0

    def __call__(self, graph_module, example_inputs):
        self.compilations += 1
        return graph_module.forward


def _text(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, NUM_TEXT_TOKENS, (batch, TEXT_SEQ_LEN), generator=g)


def _decode(dalle, text, compile=None, **options):
    logits = []
    codes = dalle.generate_image_codes(
        text, generator=torch.Generator().manual_seed(3), compile=compile, step_logits=logits, **options
    )
    return codes, torch.stack(logits)


# (model options, guidance scale): every attention type in a mixture, stable and sandwich norm, both position
# embeddings, with and without token shift and guidance
CASES = {
    "full": ({}, 1.0),
    "mixed patterns, stable, sandwich, guided": (
        dict(
            attn_types=("full", "axial_row", "axial_col", "conv_like", "sparse"),
            depth=5,
            stable=True,
            sandwich_norm=True,
        ),
        3.0,
    ),
    "learned positions, no shift, guided": (dict(rotary_emb=False, shift_tokens=False), 3.0),
    "reversible": (dict(reversible=True), 1.0),
    "reversible, mixed patterns, shared layers, guided": (
        dict(reversible=True, attn_types=("full", "axial_col"), depth=3, shared_attn_ids=(0, 1, 0), sandwich_norm=True),
        3.0,
    ),
    "the original's shift, rotary and conv-like window, guided": (
        dict(
            dim=30, attn_types=("full", "conv_like_corner"), shift_tokens_style="original", rotary_emb_style="original"
        ),
        3.0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_decoding_equals_eager_and_compiles_once(case):
    config, cond_scale = CASES[case]
    dalle = make_dalle(**config).eval()
    backend = CountingBackend()
    text = _text()
    eager_codes, eager_logits = _decode(dalle, text, cond_scale=cond_scale)
    codes, logits = _decode(dalle, text, compile=backend, cond_scale=cond_scale)
    assert backend.compilations == 1  # every position of the run
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(codes, eager_codes)
    again, _ = _decode(dalle, _text(seed=1), compile=backend, cond_scale=cond_scale)
    assert backend.compilations == 1  # a later run of the same batch size
    assert torch.equal(again, _decode(dalle, _text(seed=1), cond_scale=cond_scale)[0])


def test_compiled_decoding_with_priming_equals_eager():
    dalle = make_dalle().eval()
    backend = CountingBackend()
    g = torch.Generator().manual_seed(5)
    prime = torch.randint(0, dalle.num_image_tokens, (1, dalle.image_seq_len), generator=g)
    eager, _ = _decode(dalle, _text(), img=prime, num_init_img_tokens=5)
    compiled, _ = _decode(dalle, _text(), compile=backend, img=prime, num_init_img_tokens=5)
    assert torch.equal(compiled, eager) and torch.equal(compiled[:, :5], prime[:, :5].expand(2, -1))
    assert backend.compilations == 1


def test_compiled_generate_images_with_the_clip_reranker_equals_eager():
    dalle, clip = make_dalle().eval(), make_clip()
    text = _text()
    eager, eager_scores = dalle.generate_images(text, clip=clip, generator=torch.Generator().manual_seed(1))
    compiled, scores = dalle.generate_images(
        text, clip=clip, generator=torch.Generator().manual_seed(1), compile="aot_eager"
    )  # fmt: skip
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(scores, eager_scores)


def test_compile_option_is_checked():
    dalle = make_dalle()
    with pytest.raises(ValueError, match="compile needs use_cache=True"):
        dalle.generate_image_codes(_text(), compile="aot_eager", use_cache=False)
    with pytest.raises(TypeError, match="compile must be True, a torch.compile backend name"):
        dalle.generate_image_codes(_text(), compile=3)
    with pytest.raises(TypeError, match="compile must be True, a torch.compile backend name"):
        make_dalle().generate_texts(_DigitTokenizer(), compile=3)
    with pytest.raises(ValueError, match="needs dalle_pytorch's Transformer"):
        check_static_decoding(torch.nn.Identity())


class _DigitTokenizer:
    def encode(self, text):
        return [int(c) + 1 for c in text.split()]

    def decode(self, ids):
        return " ".join(str(i - 1) for i in ids)


def _texts(dalle, prompt, compile=None, seed=0):
    logits = []
    ids, texts = dalle.generate_texts(
        _DigitTokenizer(), prompt, generator=torch.Generator().manual_seed(seed), compile=compile, step_logits=logits
    )
    return ids, texts, torch.stack(logits)


@pytest.mark.parametrize(
    "config",
    [
        {},
        dict(rotary_emb=False, reversible=True, attn_types=("axial_row", "full")),
        dict(dim=30, shift_tokens_style="original", rotary_emb_style="original"),
    ],
    ids=["rotary", "learned positions, reversible, axial", "the original's shift and rotary"],
)
def test_compiled_text_generation_equals_eager_and_compiles_once(config):
    dalle = make_dalle(**config).eval()
    backend = CountingBackend()
    for prompt, seed in (("3 4", 0), ("", 1), ("7", 2)):  # prompts of several lengths reuse the one graph
        ids, texts, logits = _texts(dalle, prompt, compile=backend, seed=seed)
        eager_ids, eager_texts, eager_logits = _texts(dalle, prompt, seed=seed)
        assert len(logits) == TEXT_SEQ_LEN - len(prompt.split())
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(ids, eager_ids) and texts == eager_texts
    assert backend.compilations == 1


def test_a_model_stays_copyable_after_compiled_decoding():
    dalle = make_dalle().eval()
    _decode(dalle, _text(), compile="aot_eager")
    copy = deepcopy(dalle)
    assert torch.equal(_decode(copy, _text(), compile="aot_eager")[0], _decode(dalle, _text())[0])


@pytest.mark.slow
def test_inductor_decoding_equals_eager():
    dalle = make_dalle(attn_types=("full", "axial_row"), depth=2).eval()
    eager_codes, eager_logits = _decode(dalle, _text(), cond_scale=3.0)
    started = time.perf_counter()
    codes, logits = _decode(dalle, _text(), compile=True, cond_scale=3.0)
    print(f"inductor: compiling and decoding with a tiny DALLE took {time.perf_counter() - started:.1f} s")
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(codes, eager_codes)
    # the weights stay inputs of the frozen graph: a model changed after compiling decodes with its new
    # weights, in place and as a changed copy
    with torch.no_grad():
        for parameter in dalle.parameters():
            parameter.mul_(0.5)
    changed = deepcopy(dalle)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.mul_(3.0)
    for model in (dalle, changed):
        codes, logits = _decode(model, _text(), compile=True, cond_scale=3.0)
        eager_codes, eager_logits = _decode(model, _text(), cond_scale=3.0)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(codes, eager_codes)


@pytest.mark.slow
def test_inductor_reversible_and_text_decoding_equal_eager():
    dalle = make_dalle(reversible=True, attn_types=("full", "axial_col")).eval()
    eager_codes, eager_logits = _decode(dalle, _text())
    started = time.perf_counter()
    codes, logits = _decode(dalle, _text(), compile=True)
    texts = _texts(dalle, "3 4", compile=True)
    print(f"inductor: compiling and decoding images and text with a tiny reversible DALLE took "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(codes, eager_codes)
    eager_texts = _texts(dalle, "3 4")
    torch.testing.assert_close(texts[2], eager_texts[2], rtol=1e-4, atol=1e-4)
    assert torch.equal(texts[0], eager_texts[0])
