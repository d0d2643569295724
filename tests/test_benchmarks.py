"""The benchmark harness: JSON lines with the promised fields, isolation, derived figures, FLOP formulas."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import model_flops, report  # noqa: E402
from benchmarks.harness import run_isolated, time_repeats  # noqa: E402
from benchmarks.run import json_line, select  # noqa: E402


def test_quick_run_prints_one_json_line_per_measurement(tmp_path):
    out, table = tmp_path / "results.jsonl", tmp_path / "table.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "dalle_train_full",
               "--out", str(out), "--markdown", str(table)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["name"] for r in lines] == ["matmul", "dalle_train_full"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
    for result in lines:
        for field in ("median_s", "min_s", "max_s", "peak_rss_mb", "config", "torch", "threads", "device"):
            assert field in result, (result["name"], field)
        assert result["min_s"] <= result["median_s"] <= result["max_s"]
        assert result["threads"] == 2 and result["torch"] == torch.__version__ and result["device"] == "cpu"
        assert result["peak_rss_mb"] > 10
    matmul, train = lines
    assert matmul["matmul_gflops"] > 0 and matmul["bandwidth_gbs"] > 0
    assert 0 < train["mfu"] < 2 and train["tokens_per_s"] > 0 and "6 * W_transformer" in train["flops_formula"]
    assert train["cpu_median_s"] > 0 and 0 < train["mfu_cpu"] < 2 and train["load_average_1m"] >= 0
    assert train["achieved_gflops"] == pytest.approx(train["train_flops"] / train["median_s"] / 1e9, rel=1e-3)
    assert "| dalle_train_full |" in table.read_text() and "n/a (--quick)" in table.read_text()


def _returns_config(device: torch.device, value: int) -> dict:
    return {"median_s": 1.0, "config": {"value": value}}


def _raises(device: torch.device) -> dict:
    raise ValueError("broken measurement")


def test_run_isolated_returns_the_child_result_with_its_environment():
    result = run_isolated(_returns_config, {"value": 7}, threads=2, device=torch.device("cpu"), timeout_s=60)
    assert result["config"] == {"value": 7} and result["threads"] == 2 and result["device"] == "cpu"
    assert result["peak_rss_mb"] > 10


def test_run_isolated_reports_an_error_instead_of_raising():
    result = run_isolated(_raises, {}, threads=1, device=torch.device("cpu"), timeout_s=60)
    assert "ValueError: broken measurement" in result["error"]


def test_time_repeats_statistics_and_budget():
    calls = []
    stats = time_repeats(lambda: calls.append(time.sleep(0.01)), device=torch.device("cpu"), warmup=1, repeats=3)
    assert len(calls) == 4 and stats["repeats"] == 3
    assert 0.009 < stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    assert 0 <= stats["cpu_median_s"] < 0.005  # sleeping costs no CPU time
    # a warm-up longer than the budget is taken as the only sample
    long = time_repeats(lambda: time.sleep(0.02), device=torch.device("cpu"), warmup=1, repeats=5, budget_s=0.01)
    assert long["repeats"] == 1 and long["warmup_reused"]


def test_select_keeps_matmul_first_and_rejects_unknown_names():
    names = ["matmul", "vae_train", "gen_full_16_cached", "gen_sparse_16_cached", "clip_train"]
    assert select(names, "gen_*") == ["matmul", "gen_full_16_cached", "gen_sparse_16_cached"]
    assert select(names, "clip_train,vae_train") == ["matmul", "vae_train", "clip_train"]
    assert select(names, None) == names
    with pytest.raises(SystemExit, match="no_such"):
        select(names, "no_such")


def test_json_line_puts_name_and_timing_first_and_environment_last():
    line = json_line("x", {"device": "cpu", "mfu": 0.5, "max_s": 3.0, "median_s": 2.0, "min_s": 1.0})
    assert list(json.loads(line)) == ["name", "median_s", "min_s", "max_s", "mfu", "device"]


def _tiny_dalle(attn_types=("full",)):
    from dalle_pytorch import DALLE, DiscreteVAE

    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)
    return DALLE(dim=32, vae=vae, num_text_tokens=50, text_seq_len=6, depth=2, heads=2, dim_head=16,
                 attn_types=attn_types)  # fmt: skip


def test_analytic_matmul_flops_match_the_flop_counter():
    model = _tiny_dalle()
    flops = model_flops.DalleFlops(model)
    batch = 3
    text = torch.randint(1, 50, (batch, 6))
    codes = torch.randint(0, 32, (batch, model.image_seq_len))
    with FlopCounterMode(display=False) as counter:
        model(text, codes, return_loss=True).backward()
    counted = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counted.items() if str(k).split(".")[-1] in ("mm", "addmm", "bmm"))
    n = model.text_seq_len + model.image_seq_len
    attention = 3 * batch * 4 * flops.inner * flops.attention_pairs(0, n)
    assert flops.train_step(batch) - attention == pytest.approx(matmuls, rel=1e-9)
    assert flops.attention_pairs(0, n) == 2 * n * (n + 1) / 2  # two causal full layers


def test_sparse_masks_count_fewer_pairs_and_cached_steps_fewer_flops():
    full, axial = model_flops.DalleFlops(_tiny_dalle()), model_flops.DalleFlops(_tiny_dalle(("axial_row",)))
    n = full.text_seq_len + full.image_seq_len
    assert axial.attention_pairs(0, n) < full.attention_pairs(0, n)
    assert axial.train_step(2, ["full", "full"]) == pytest.approx(full.train_step(2))
    cached = full.generation_steps(2, guided=True, cached=True)
    uncached = full.generation_steps(2, guided=True, cached=False)
    assert len(cached) == len(uncached) == full.image_seq_len and cached[0] == uncached[0]
    assert all(c < u for c, u in zip(cached[1:], uncached[1:]))


def test_derived_figures_and_targets():
    earlier = {"matmul": {"matmul_gflops": 100.0, "bandwidth_gbs": 10.0, "gflops_per_cpu_s": 50.0},
               "long_full": {"median_s": 3.0}}  # fmt: skip
    train = report.derive("dalle_train_full", {"median_s": 0.5, "cpu_median_s": 2.0, "train_flops": 40e9,
                                               "items": 768, "item_name": "tokens"}, earlier)  # fmt: skip
    assert train["mfu"] == pytest.approx(0.8) and train["tokens_per_s"] == pytest.approx(1536)
    assert train["mfu_cpu"] == pytest.approx(0.4)
    gen = report.derive("gen_full_256_cached", {"median_s": 2.0, "matmul_flops": 1e9, "ms_per_token_step": 3.0,
                                                "step_matmul_flops": 1e8, "step_bytes": 2e7}, earlier)  # fmt: skip
    assert gen["step_matmul_ms"] == pytest.approx(1.0) and gen["step_roofline_ms"] == pytest.approx(2.0)
    assert gen["x_step_matmul_time"] == pytest.approx(3.0) and gen["x_matmul_time"] == pytest.approx(200.0)
    sparse = report.derive("long_sparse", {"median_s": 1.5}, earlier)
    assert sparse["speedup_vs_full"] == pytest.approx(2.0)
    results = {**earlier, "dalle_train_full": train, "gen_full_256_cached": gen, "long_sparse": sparse}
    met = {row["case"]: row["met"] for row in report.check_targets(results)}
    assert met["dalle_train_full"] is True and met["gen_full_256_cached"] is True and met["long_sparse"] is True
    assert met["long_axial_row"] is None  # not measured
    assert all(row["met"] is None for row in report.check_targets(results, quick=True))


def test_report_from_an_earlier_results_file(tmp_path):
    from benchmarks.run import main

    results = tmp_path / "results.jsonl"
    lines = [{"name": "matmul", "median_s": 1.0, "matmul_gflops": 100.0, "bandwidth_gbs": 10.0, "gflops_by_size": {}},
             {"name": "dalle_train_full", "median_s": 0.5, "min_s": 0.4, "max_s": 0.6, "train_flops": 30e9,
              "items": 768, "item_name": "tokens", "peak_rss_mb": 500.0}]  # fmt: skip
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = tmp_path / "table.md"
    assert main(["--from", str(results), "--markdown", str(table)]) == 0
    text = table.read_text()
    assert "| dalle_train_full | 0.5 (0.4-0.6) | 1536 tokens/s, MFU 60.0%" in text
    assert "MFU >= 60% | mfu = 0.6 (best repeat 0.75) | yes |" in text


def test_sparse_vs_full_prints_every_kind(tmp_path):
    tiny = ["--fmap", "4", "--text-seq-len", "4", "--text-tokens", "50", "--image-tokens", "16", "--dim", "16",
            "--depth", "1", "--heads", "2", "--dim-head", "8", "--rounds", "1", "--threads", "1",
            "--attn-dropout", "0.1", "--types", "full,conv_like,sparse"]  # fmt: skip
    command = [sys.executable, str(ROOT / "benchmarks" / "sparse_vs_full.py"), *tiny]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = {(r["kind"], r["attn_type"], r["path"]) for r in lines}
    for kind in ("memory", "attention", "dalle_step"):
        assert (kind, "full", "causal_kernel") in kinds
        for attn_type in ("conv_like", "sparse"):
            assert {(kind, attn_type, "fast"), (kind, attn_type, "dense_mask")} <= kinds
    assert len(lines) == 3 * 5
    for r in lines:
        assert r["config"]["attn_dropout"] == 0.1
        if r["kind"] == "memory":
            assert r["saved_activations_mb"] > 0 and r["peak_rss_mb"] > 0
        else:
            assert r["time_s"] > 0 and r["speedup_vs_full"] > 0


def test_memory_floor_of_the_precision_cases():
    from benchmarks import precision_cases

    earlier = {"matmul": {"matmul_gflops": 100.0, "bandwidth_gbs": 10.0}}
    raw = {"median_s": 0.03, "ms_per_token_step": 30.0, "ms_step_window_start": 20.0, "ms_step_window_end": 40.0,
           "weight_bytes": 1e8, "step_bytes": 2e8, "step_bytes_window_start": 1.5e8, "step_bytes_window_end": 2.5e8}
    gen = report.derive("gen_quickstart_precision_bf16", raw, earlier)  # fmt: skip
    assert gen["memory_floor_ms"] == pytest.approx(20.0) and gen["x_memory_floor"] == pytest.approx(1.5)
    assert gen["x_memory_floor_window_start"] == pytest.approx(20 / 15)
    assert gen["x_memory_floor_window_end"] == pytest.approx(40 / 25)
    assert "x1.5 memory floor (20 ms" in report.headline(gen)
    met = {row["case"]: row["met"] for row in report.check_targets({"gen_quickstart_precision_bf16": gen})}
    assert met["gen_quickstart_precision_bf16"] is True and met["gen_quickstart_precision_int8"] is None
    # weight bytes as stored: fp32, bf16 (half), int8 (a quarter, plus one scale per output channel)
    model = _tiny_dalle()
    sizes = {p: precision_cases.matmul_weight_bytes([model.decoding_copy(p).transformer.layers])
             for p in ("fp32", "bf16", "int8")}  # fmt: skip
    channels = sum(m.out_features for m in model.transformer.layers.modules() if isinstance(m, torch.nn.Linear))
    assert sizes["fp32"] == 4 * model_flops.linear_weights([model.transformer.layers]) == 2 * sizes["bf16"]
    assert sizes["int8"] == sizes["fp32"] // 4 + 2 * channels  # the scales in bf16, the kernel's dtype


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("compile", [None, "aot_eager"])
@pytest.mark.usefixtures("one_thread_per_module", "fresh_dynamo")
def test_precision_case_runs_at_quick_sizes(precision, compile):
    from benchmarks import precision_cases

    result = precision_cases.gen_precision(torch.device("cpu"), quick=True, precision=precision, compile=compile)
    assert result["ms_per_token_step"] > 0 and result["config"]["precision"] == precision
    assert ("compile_s" in result) == (compile is not None)
    assert result["step_bytes_window_start"] < result["step_bytes"] < result["step_bytes_window_end"]
    assert result["config"]["cache_dtype"] == ("bfloat16" if precision == "bf16" else "float32")


def test_compiled_and_bf16_training_cases_report_ratios_in_one_process():
    from benchmarks import compile_cases

    cpu = torch.device("cpu")
    for case in (compile_cases.clip_train_compiled, compile_cases.vae_train_compiled):
        result = case(cpu, True, backend="aot_eager")  # graph capture without code generation: cheap
        assert result["speedup_vs_eager"] == pytest.approx(result["eager_median_s"] / result["median_s"])
        assert result["config"]["backend"] == "aot_eager" and result["train_flops"] > 0 and "compile_s" in result
        assert " vs eager (" in report.headline(result) and "; compile " in report.headline(result)
    bf16 = compile_cases.dalle_train_bf16(cpu, True)
    assert bf16["speedup_vs_fp32"] == pytest.approx(bf16["fp32_median_s"] / bf16["median_s"])
    assert bf16["config"]["precision"] == "bf16 autocast" and bf16["item_name"] == "tokens"
    assert "vs fp32" in report.headline(report.derive("dalle_train_bf16", bf16, {}))
    decoding = {"ms_per_token_step": 1.0, "eager_ms_per_token_step": 2.5, "step_speedup": 2.5, "compile_s": 40.0,
                "break_even_images": 12.0}  # fmt: skip
    assert "eager 2.5 ms/step, x2.5 vs eager, break-even 12 images; compile 40 s" in report.headline(decoding)
    assert report.headline({"ms_per_token_step": 1.0, "extrapolated": True}).endswith("extrapolated (see JSON)")
