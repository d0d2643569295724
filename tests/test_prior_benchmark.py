"""The prior's benchmark cases: the analytic FLOP count equals torch's counter, the cases return their fields."""

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import prior_cases, report  # noqa: E402


def test_analytic_prior_flops_match_the_flop_counter():
    """The matmul-weight part of the formula equals torch's count. Two known differences are taken out: the
    counter does not see CPU scaled_dot_product_attention (the attention term is removed here), and the time
    MLP's first layer, whose input needs no gradient, costs 4 W rather than the rule's 6 W per row."""
    prior, config = prior_cases._prior(True, torch.device("cpu"))
    batch, n_text = 3, config["text_len"]
    conditions = prior_cases._conditions(config, batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    inputs = {k: v.requires_grad_() for k, v in conditions.items()}
    image_embed = torch.randn(batch, config["embed_dim"], requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        prior(image_embed=image_embed, **inputs).backward()
    net = prior.net
    n, inner = n_text + 5, net.config["heads"] * net.config["dim_head"]
    attention = 12 * batch * net.config["depth"] * inner * n * (n + 1) // 2
    time_first = net.time_embed.mlp[0].weight.numel()
    expected = prior_cases.prior_train_flops(prior, batch, n_text) - attention - 2 * batch * time_first
    assert counter.get_total_flops() == expected


def test_prior_cases_report_throughput_and_speedup(monkeypatch):
    train = prior_cases.prior_train(torch.device("cpu"), quick=True)
    derived = report.derive("prior_train", train, {"matmul": {"matmul_gflops": 10.0}})
    assert derived["embeddings_per_s"] == train["items"] / train["median_s"] and derived["mfu"] > 0
    monkeypatch.setitem(prior_cases.SAMPLE_STEPS, True, (20, 2))
    sampling = prior_cases.prior_sampling(torch.device("cpu"), quick=True)
    assert sampling["ddim_speedup"] == sampling["median_s"] / (
        sampling["ddim_s_per_embedding"] * prior_cases.SAMPLE_BATCH
    )
