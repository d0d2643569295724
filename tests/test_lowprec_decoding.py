"""Decoding with lower-precision weights: bf16 models and weight-only int8 copies (``DALLE.decoding_copy``).

Low-precision decoding samples other codes than fp32 as soon as a near-tie flips, so its logits are compared
teacher-forced: the fp32 model (or the uncached path) is run on the codes the low-precision model sampled,
and the logits it gives at every step must be within :data:`ATOL` of those the low-precision decoding used.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_clip, make_dalle, random_text
from torch import nn

from dalle_pytorch import DALLE
from dalle_pytorch.kernels.int8_linear import Int8Linear, int8_kernel_available, quantize_per_channel
from dalle_pytorch.models.precision import decoding_copy, precision_name, quantize_linears
from dalle_pytorch.models.sampling import guide
from dalle_pytorch.models.transformer import DecodingCache

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# The stated tolerance: an unguided image logit (of magnitude up to ~5, std ~1 in these models) may differ
# from fp32 by 0.03, about 4 bf16 steps at that magnitude (int8 weights with one scale per channel err about
# as much). Guidance s * cond + (1 - s) * null multiplies the error by at most |s| + |1 - s|.
ATOL = 0.03
COND_SCALE = 3.0
GUIDED_ATOL = ATOL * (abs(COND_SCALE) + abs(1 - COND_SCALE))

# every attention type, alone and mixed (with stable and sandwich norm), and learned positions without shift
CASES = {
    "full": {},
    "axial_row": dict(attn_types=("axial_row",)),
    "axial_col": dict(attn_types=("axial_col",)),
    "conv_like": dict(attn_types=("conv_like",)),
    "sparse": dict(attn_types=("sparse",)),
    "mixed, stable, sandwich": dict(
        attn_types=("full", "axial_row", "axial_col", "conv_like", "sparse"), depth=5, stable=True, sandwich_norm=True
    ),
    "learned positions, no shift": dict(rotary_emb=False, shift_tokens=False),
}


@torch.no_grad()
def teacher_forced(model: DALLE, text, codes, cond_scale=1.0, use_cache=True) -> torch.Tensor:
    """The (guided) logits (steps, b, vocab) the decoding path gives at every step when fed ``codes``."""
    model.eval()
    text_ids = model._prepare_text(text, None)
    batch, guided = text_ids.shape[0], cond_scale != 1.0
    branch = torch.cat((text_ids, model._null_text(batch))) if guided else text_ids
    cache = DecodingCache(model.seq_len) if use_cache else None
    out = [model._prefill(branch, codes[:, :0], guided, cache)]
    for i in range(1, codes.shape[1]):
        if use_cache:
            out.append(model._decode_step(codes[:, i - 1 : i], i - 1, guided, cache))
        else:
            out.append(model._prefill(branch, codes[:, :i], guided, None))
    out = torch.stack(out)
    return guide(out[:, :batch], out[:, batch:], cond_scale) if guided else out


def _decode(model, text, **options):
    logits = []
    codes = model.generate_image_codes(text, generator=torch.Generator().manual_seed(3), step_logits=logits, **options)
    return codes, torch.stack(logits)


def _close(actual, expected, atol):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------
# bf16


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_decoding_follows_fp32_logits(case, precision):
    model = make_dalle(**CASES[case]).eval()
    low = model.decoding_copy(precision)
    text = random_text(2)
    codes, logits = _decode(low, text, cond_scale=COND_SCALE)
    assert codes.shape == (2, model.image_seq_len) and logits.dtype == torch.float32
    assert codes.min() >= 0 and codes.max() < model.num_image_tokens
    _close(logits, teacher_forced(model, text, codes, COND_SCALE), GUIDED_ATOL)  # fp32 on the same codes
    # the low-precision cache: cached steps give the uncached logits of the same precision
    _close(logits, teacher_forced(low, text, codes, COND_SCALE, use_cache=False), GUIDED_ATOL)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_decoding_without_guidance_and_with_priming(precision):
    model = make_dalle(attn_types=("full", "conv_like")).eval()
    low = model.decoding_copy(precision)
    text = random_text(2)
    g = torch.Generator().manual_seed(5)
    prime = torch.randint(0, model.num_image_tokens, (1, model.image_seq_len), generator=g)
    codes, logits = _decode(low, text, img=prime, num_init_img_tokens=5)
    assert torch.equal(codes[:, :5], prime[:, :5].expand(2, -1))
    _close(logits, teacher_forced(model, text, codes)[5:], ATOL)
    _close(logits, teacher_forced(low, text, codes, use_cache=False)[5:], ATOL)


def test_a_model_converted_with_to_bfloat16_decodes_and_reranks_with_an_fp32_clip():
    model, clip = make_dalle().eval(), make_clip()
    reference = model.decoding_copy("bf16")
    model.to(torch.bfloat16)  # the VAE too: the images come out in bf16
    text = random_text(2)
    codes, logits = _decode(model, text, cond_scale=COND_SCALE)
    assert torch.equal(logits, _decode(reference, text, cond_scale=COND_SCALE)[1])
    images, scores = model.generate_images(text, clip=clip, generator=torch.Generator().manual_seed(1))
    assert images.dtype == torch.bfloat16 and scores.dtype == torch.float32 and scores.shape == (2,)
    token_ids, _ = model.generate_texts(_Words(), "a b")
    assert token_ids.shape == (1, model.text_seq_len)


class _Words:
    def encode(self, text):
        return [ord(c) % 19 + 1 for c in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_low_precision_decoding_equals_eager(precision):
    model = make_dalle(attn_types=("full", "axial_row"), depth=2).decoding_copy(precision)
    text = random_text(2)
    eager_codes, eager_logits = _decode(model, text, cond_scale=COND_SCALE)
    codes, logits = _decode(model, text, cond_scale=COND_SCALE, compile="aot_eager")
    _close(logits[:1], eager_logits[:1], GUIDED_ATOL)
    _close(logits, teacher_forced(model, text, codes, COND_SCALE), GUIDED_ATOL)


def test_decoding_copy_leaves_the_model_and_its_checkpoints_as_they_were(tmp_path):
    model = make_dalle().eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.save_pretrained(tmp_path / "before")
    copies = {precision: model.decoding_copy(precision) for precision in ("fp32", "bf16", "int8")}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(t.dtype == torch.float32 for t in model.parameters())
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) > 0
    for copy in copies.values():
        assert copy.vae is model.vae and not copy.training
    assert all(p.dtype == torch.bfloat16 for n, p in copies["bf16"].named_parameters() if not n.startswith("vae."))
    quantized = copies["int8"]
    assert not any(type(m) is nn.Linear for name, m in quantized.named_modules() if not name.startswith("vae"))
    assert quantized.transformer.layers[0][0].fn.to_qkv.weight_int8.dtype == torch.int8
    model.save_pretrained(tmp_path / "after")
    reloaded = DALLE.from_pretrained(tmp_path / "after")
    assert all(torch.equal(before[k], v) for k, v in reloaded.state_dict().items())
    assert reloaded.state_dict().keys() == before.keys()
    assert (tmp_path / "before" / "config.json").read_text() == (tmp_path / "after" / "config.json").read_text()


def test_dtype_errors_are_clear():
    model = make_dalle()
    model.transformer.to(torch.bfloat16)  # converted in part
    with pytest.raises(TypeError, match="must all have one dtype to decode.*decoding_copy"):
        model.generate_image_codes(random_text(1))
    with pytest.raises(ValueError, match="precision must be one of"):
        make_dalle().decoding_copy("fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        decoding_copy(make_dalle(), torch.float16)
    assert precision_name(torch.bfloat16) == "bf16" and precision_name("float32") == "fp32"
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="expected 8 input features, got 5"):
        Int8Linear(8, 4)(torch.randn(2, 5))


# ---------------------------------------------------------------------------------------------------------
# int8


def test_int8_kernel_is_available_on_this_cpu():
    assert int8_kernel_available(torch.randn(1, 4))
    assert not int8_kernel_available(torch.randn(1, 4, dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("dtype", "compute_dtype"),
    [(torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float64, None)],
)
def test_int8_linear_equals_the_dequantized_weight_matmul(bias, dtype, compute_dtype):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(40, 24, bias=bias)
    layer = Int8Linear.from_linear(linear, compute_dtype=compute_dtype).to(dtype)
    x = torch.randn(3, 5, 40, generator=g).to(dtype)
    out = layer(x)
    assert out.shape == (3, 5, 24) and out.dtype == dtype
    # the reference in float64, on the activations as the kernel sees them
    seen = x.to(compute_dtype or dtype).double()
    weight = layer.weight_int8.double() * layer.scale.double()[:, None]
    reference = F.linear(seen, weight, None if layer.bias is None else layer.bias.double())
    if compute_dtype is None and dtype != torch.bfloat16:  # float32 or float64 throughout
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    else:  # the kernel's output (and for bf16 inputs, the bias addition) is rounded to bf16: 2^-8 relative
        tolerance = 2 * 2**-8 * reference.abs().max().item()
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=tolerance)


def test_per_channel_quantization_rounds_each_weight_to_its_nearest_level():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    weight[3] = 0.0
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (16,) and q.abs().max() == 127
    assert torch.all((weight - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[3], torch.zeros(32, dtype=torch.int8)) and scale[3] == 1.0
    with pytest.raises(TypeError, match="2-D float tensor"):
        quantize_per_channel(torch.zeros(4, dtype=torch.int8))


def test_quantize_linears_keeps_a_shared_layer_shared():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared, nn.Sequential(nn.Linear(4, 2)))
    assert quantize_linears(net) == 2
    assert net[0] is net[2] and isinstance(net[0], Int8Linear) and isinstance(net[3][0], Int8Linear)


def test_int8_copy_of_a_model_with_shared_layers_decodes():
    model = make_dalle(depth=4, shared_attn_ids=(0, 1), shared_ff_ids=(0, 0)).eval()
    low = model.decoding_copy("int8")
    assert low.transformer.layers[0][0].fn is low.transformer.layers[2][0].fn
    text = random_text(2)
    codes, logits = _decode(low, text, cond_scale=COND_SCALE)
    _close(logits, teacher_forced(model, text, codes, COND_SCALE), GUIDED_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_low_precision_decoding_follows_eager(precision):
    # inductor lowers the int8 kernel itself: its scales must reach it as a buffer, not a converted tensor
    model = make_dalle(attn_types=("full", "axial_row"), depth=2).decoding_copy(precision)
    text = random_text(2)
    codes, logits = _decode(model, text, cond_scale=COND_SCALE, compile=True)
    _close(logits, teacher_forced(model, text, codes, COND_SCALE), GUIDED_ATOL)
