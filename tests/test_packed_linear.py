"""oneDNN linears on weights packed for a generation call: equal to F.linear to float32 rounding, never stale,
freed when the call ends, and what eager and compiled decoding call."""

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_TEXT_TOKENS, TEXT_SEQ_LEN, make_dalle
from torch import nn

from dalle_pytorch.kernels import packed_linear
from dalle_pytorch.kernels.packed_linear import packed_linears, packing_available

needs_onednn = pytest.mark.skipif(not packing_available(), reason="PyTorch built without oneDNN")


def _onednn_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.count for event in profile.key_averages() if event.key == "mkldnn::_linear_pointwise")


def _layer(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(48, 80, bias=bias)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(8, 48), (4, 2, 48), (1, 48), (33, 48)])
def test_packed_linear_equals_f_linear_for_any_row_count(bias, shape):
    layer = _layer(bias)
    x = torch.randn(shape)
    with torch.no_grad(), packed_linears(layer, rows=8) as packed:
        assert packed == 1
        out = torch.ops.dalle_pytorch.packed_linear(x, layer.weight, layer.bias)
        assert _onednn_calls(lambda: torch.ops.dalle_pytorch.packed_linear(x, layer.weight, layer.bias)) == 1
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_outside_a_block_the_op_is_f_linear_exactly():
    layer, x = _layer(), torch.randn(8, 48)
    with torch.no_grad():
        out = torch.ops.dalle_pytorch.packed_linear(x, layer.weight, layer.bias)
        assert _onednn_calls(lambda: torch.ops.dalle_pytorch.packed_linear(x, layer.weight, layer.bias)) == 0
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_a_weight_changed_inside_the_block_is_not_used_stale():
    layer, x = _layer(), torch.randn(8, 48)
    with torch.no_grad(), packed_linears(layer, rows=8):
        layer.weight.mul_(-2.0)
        out = torch.ops.dalle_pytorch.packed_linear(x, layer.weight, layer.bias)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_nested_blocks_share_the_packed_copies_and_the_last_one_frees_them():
    shared = _layer()
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(80, 48), shared.__class__(48, 80))
    model[3] = shared  # a layer used twice is packed once
    with packed_linears(model, rows=4) as outer:
        assert outer == 2
        with packed_linears(model[2], rows=4) as inner:
            assert inner == 1
        assert len(packed_linear._PACKED) == 2 and "forward" in vars(model[2])
    assert packed_linear._PACKED == {} and packed_linear._ROUTED == {}
    assert "forward" not in vars(model[2]) and "forward" not in vars(shared)


def test_a_layer_whose_forward_was_replaced_is_left_alone():
    layer = _layer()
    layer.forward = lambda x: x * 2  # set by its owner (a hook library, a test double)
    with packed_linears(layer, rows=8) as packed:
        assert packed == 0 and layer(torch.ones(1)).item() == 2.0
    assert layer(torch.ones(1)).item() == 2.0


def test_rows_must_be_a_positive_int():
    for rows in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="rows must be a positive int"), packed_linears(_layer(), rows=rows):
            pass


@needs_onednn
def test_layers_run_packed_with_gradients_off_and_are_left_as_they_were():
    model = nn.Sequential(_layer(), nn.GELU(), nn.Linear(80, 8))
    x = torch.randn(5, 48)
    with packed_linears(model, rows=5):
        with torch.no_grad():
            assert _onednn_calls(lambda: model(x)) == 2
            inference = model(x)
        training = model(x)  # gradients on: plain F.linear, and the graph for backward is built
        assert _onednn_calls(lambda: model(x)) == 0
        training.sum().backward()
    assert model[0].weight.grad is not None
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(layer) for layer in model)  # the class's forward again
    with torch.no_grad():
        hidden = F.gelu(F.linear(x, model[0].weight, model[0].bias))
        assert torch.equal(model(x), F.linear(hidden, model[2].weight, model[2].bias))


class _GraphRecorder:
    """A torch.compile backend that records the captured graphs and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


@needs_onednn
@pytest.mark.usefixtures("fresh_dynamo")
def test_eager_and_compiled_decoding_call_the_packed_op_for_every_linear():
    dalle = make_dalle().eval()
    text = torch.randint(1, NUM_TEXT_TOKENS, (2, TEXT_SEQ_LEN), generator=torch.Generator().manual_seed(0))
    recorder = _GraphRecorder()
    logits, eager_logits = [], []
    codes = dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(1), compile=recorder,
                                       step_logits=logits)  # fmt: skip
    eager = dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(1), step_logits=eager_logits)
    (graph,) = recorder.graphs
    op = torch.ops.dalle_pytorch.packed_linear
    packed_calls = [n for n in graph.graph.nodes if n.target in (op, op.default)]
    linear_calls = [n for n in graph.graph.nodes if n.target is F.linear]
    assert len(packed_calls) == 4 * len(dalle.transformer.layers) + 1 and not linear_calls  # qkv, out, ff x2; logits
    torch.testing.assert_close(torch.stack(logits), torch.stack(eager_logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(codes, eager)
    assert packed_linear._PACKED == {}  # freed when the call returned
    # eager decoding runs its linears on the packed weights too: 9 per step (4 per layer and the logits)
    calls = _onednn_calls(lambda: dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(1)))
    assert calls == 9 * dalle.image_seq_len
