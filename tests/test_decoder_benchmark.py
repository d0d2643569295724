"""The decoder benchmark cases run at tiny sizes and report what the table and the targets read."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import decoder_cases, report  # noqa: E402


def test_decoder_training_case_reports_flops_and_throughput():
    result = decoder_cases.decoder_train(torch.device("cpu"), quick=True, unet_number=2)
    assert result["train_flops"] > 0 and result["items"] == decoder_cases.DECODER_TRAIN_BATCH[True]
    assert result["config"]["image_size"] == decoder_cases.DECODER_SIZES[True]["image_sizes"][1]
    derived = report.derive("decoder_train_unet2", result, {"matmul": {"matmul_gflops": 10.0}})
    assert derived["mfu"] > 0 and derived["images_per_s"] > 0


def test_decoder_sampling_case_times_ddpm_and_ddim_on_one_model(monkeypatch):
    monkeypatch.setitem(decoder_cases.SAMPLE_STEPS, True, (20, 2))
    result = decoder_cases.decoder_sampling(torch.device("cpu"), quick=True)
    assert (result["ddpm_steps"], result["ddim_steps"]) == (20, 2)
    assert result["ddim_speedup"] == result["median_s"] / (result["ddim_s_per_image"] * decoder_cases.SAMPLE_BATCH)
    assert result["ddim_speedup"] > 0  # a timing: its size is the benchmark's finding, not a test's
    assert "DDIM 2 steps" in report.headline(result)
    row = next(r for r in report.check_targets({"decoder_sampling": result}) if r["case"] == "decoder_sampling")
    assert row["value"] == result["ddim_speedup"] and row["met"] == (result["ddim_speedup"] >= 15)
