"""Turn raw measurements into the reported figures: MFU, matmul-time ratios, ratios to full attention and
to depth 4, the targets, and a markdown table for the README.

All figures refer to the matmul throughput measured in the same run (``matmul`` case), so they compare like
with like on a shared, noisy machine.
"""

from __future__ import annotations

import re

TARGETS = (
    # (description, case, field, comparison, threshold)
    ("DALLE training step, full attention: MFU >= 60%", "dalle_train_full", "mfu", ">=", 0.60),
    ("Generation, 256 image tokens, cache, dim 256 / depth 4, batch 4: <= 4 ms per token step",
     "gen_full_256_cached", "ms_per_token_step", "<=", 4.0),
    ("Generation, dim 1024 / depth 12 / 1024 tokens, cache: <= 3x the step's matmul time",
     "gen_quickstart_cached", "x_step_matmul_time", "<=", 3.0),
    *((f"Training step at 1024 image tokens, {t}: >= 1.5x faster than full", f"long_{t}", "speedup_vs_full", ">=", 1.5)
      for t in ("axial_row", "axial_col", "conv_like", "sparse")),
    ("Reversible depth 16: <= 1.3x the peak training memory of reversible depth 4",
     "memory_reversible_depth16", "train_memory_vs_depth4", "<=", 1.3),
    ("Decoder sampling, same model: DDIM with 50 steps >= 15x faster than 1000-step DDPM",
     "decoder_sampling", "ddim_speedup", ">=", 15.0),
    *((f"Generation, dim 1024 / depth 12, {p} weights: cached step <= 1.5x its memory floor",
       f"gen_quickstart_precision_{p}", "x_memory_floor", "<=", 1.5) for p in ("bf16", "int8")),
)  # fmt: skip


def derive(name: str, result: dict, earlier: dict[str, dict]) -> dict:
    """Add figures that need the reference throughput (``earlier["matmul"]``) or another case of the run."""
    out = dict(result)
    median = out.get("median_s")
    gflops = earlier.get("matmul", {}).get("matmul_gflops")
    bandwidth = earlier.get("matmul", {}).get("bandwidth_gbs")
    best = out.get("min_s")  # the least disturbed repeat on a shared machine
    if gflops and median and "train_flops" in out:
        out["achieved_gflops"] = out["train_flops"] / median / 1e9
        out["mfu"] = out["achieved_gflops"] / gflops
        if best:
            out["mfu_best"] = out["train_flops"] / best / 1e9 / gflops
        per_cpu_s = earlier["matmul"].get("gflops_per_cpu_s")
        if per_cpu_s and out.get("cpu_median_s"):  # FLOPs per CPU-second, relative to the matmul's
            out["mfu_cpu"] = out["train_flops"] / out["cpu_median_s"] / 1e9 / per_cpu_s
    if median and "items" in out:
        out[f"{out['item_name']}_per_s"] = out["items"] / median
    if gflops and median and "matmul_flops" in out:
        out["matmul_time_s"] = out["matmul_flops"] / gflops / 1e9
        out["x_matmul_time"] = median / out["matmul_time_s"]
        for suffix, ms in (("", "ms_per_token_step"), ("_window_start", "ms_step_window_start"),
                           ("_window_end", "ms_step_window_end")):  # fmt: skip
            flops, step_bytes = out.get(f"step_matmul_flops{suffix}"), out.get(f"step_bytes{suffix}")
            if flops is None or ms not in out:
                continue
            out[f"step_matmul_ms{suffix}"] = flops / gflops / 1e6
            out[f"x_step_matmul_time{suffix}"] = out[ms] / out[f"step_matmul_ms{suffix}"]
            if step_bytes and bandwidth:
                # roofline: a step takes at least its matmul time and at least the time to read its bytes
                out[f"step_roofline_ms{suffix}"] = max(out[f"step_matmul_ms{suffix}"], step_bytes / bandwidth / 1e6)
                out[f"x_step_roofline{suffix}"] = out[ms] / out[f"step_roofline_ms{suffix}"]
    if bandwidth and "weight_bytes" in out:  # the bytes in the dtypes the step reads (precision_cases)
        for suffix, ms in (("", "ms_per_token_step"), ("_window_start", "ms_step_window_start"),
                           ("_window_end", "ms_step_window_end")):  # fmt: skip
            if out.get(f"step_bytes{suffix}") and ms in out:
                out[f"memory_floor_ms{suffix}"] = out[f"step_bytes{suffix}"] / bandwidth / 1e6
                out[f"x_memory_floor{suffix}"] = out[ms] / out[f"memory_floor_ms{suffix}"]
    eager_train = earlier.get("dalle_train_full", {})
    if name == "dalle_train_compiled" and "speedup_vs_eager" not in out and eager_train.get("median_s") and median:
        out["speedup_vs_eager"] = eager_train["median_s"] / median  # results of a version without eager timing
    full = earlier.get("long_full", {})
    if name.startswith("long_") and full.get("median_s") and median:
        out["speedup_vs_full"] = full["median_s"] / median
        if best and full.get("min_s"):
            out["speedup_vs_full_best"] = full["min_s"] / best
        if out.get("cpu_median_s") and full.get("cpu_median_s"):
            out["speedup_vs_full_cpu"] = full["cpu_median_s"] / out["cpu_median_s"]
    match = re.fullmatch(r"memory_(plain|reversible)_depth(\d+)", name)
    if match:
        base = earlier.get(f"memory_{match[1]}_depth4", out if match[2] == "4" else {})
        for field in ("train_memory_mb", "activation_mb"):
            if base.get(field) and out.get(field) is not None:
                out[field.replace("_mb", "_vs_depth4")] = out[field] / base[field]
    return out


def check_targets(results: dict[str, dict], quick: bool = False) -> list[dict]:
    """Each performance target with its measured value and whether it is met (None when not measured, and
    always in quick mode, whose tiny sizes are not the ones the targets are about)."""
    rows = []
    for description, case, field, comparison, threshold in TARGETS:
        value = results.get(case, {}).get(field)
        met = None if value is None or quick else (value >= threshold if comparison == ">=" else value <= threshold)
        best = results.get(case, {}).get(f"{field}_best")
        cpu = results.get(case, {}).get(f"{field}_cpu")
        rows.append({"target": description, "case": case, "field": field, "value": value, "best": best, "cpu": cpu,
                     "met": met})  # fmt: skip
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def headline(result: dict) -> str:
    """The one or two figures that matter for a case, for the table."""
    if "error" in result:
        return "error: " + result["error"].strip().splitlines()[-1][:80]
    if "matmul_gflops" in result:
        return (f"{result['matmul_gflops']:.1f} GFLOP/s (by size: {result['gflops_by_size']}); memory copy"
                f" {result['bandwidth_gbs']:.1f} GB/s")  # fmt: skip
    parts = []
    if "train_memory_mb" in result:
        parts.append(f"train memory {_fmt(result['train_memory_mb'])} MB = state {_fmt(result['state_mb'])}"
                     f" + activations {_fmt(result['activation_mb'])}")  # fmt: skip
        if "train_memory_vs_depth4" in result:
            parts.append(f"x{_fmt(result['train_memory_vs_depth4'])} of depth 4"
                         f" (activations x{_fmt(result.get('activation_vs_depth4'))})")  # fmt: skip
        return "; ".join(parts)
    if "mfu" in result:
        per_s = f"{result['item_name']}_per_s"
        variants = [f"{label} {100 * result[key]:.1f}%" for key, label in (("mfu_best", "best repeat"),
                    ("mfu_cpu", "CPU time")) if key in result]  # fmt: skip
        parts.append(f"{_fmt(result[per_s])} {result['item_name']}/s, MFU {100 * result['mfu']:.1f}%"
                     f" ({', '.join(variants)})")  # fmt: skip
    if "speedup_vs_eager" in result:
        parts.append(f"x{_fmt(result['speedup_vs_eager'])} vs eager ({_fmt(result.get('eager_median_s'))} s)")
    if "speedup_vs_fp32" in result:
        parts.append(f"x{_fmt(result['speedup_vs_fp32'])} vs fp32 ({_fmt(result['fp32_median_s'])} s)")
    if "ddim_speedup" in result:
        unit = "image" if "ddpm_s_per_image" in result else "embedding"
        parts.append(f"DDPM {result['ddpm_steps']} steps {_fmt(result[f'ddpm_s_per_{unit}'])} s/{unit}, DDIM"
                     f" {result['ddim_steps']} steps {_fmt(result[f'ddim_s_per_{unit}'])} s/{unit}:"
                     f" x{_fmt(result['ddim_speedup'])}")  # fmt: skip
    if "speedup_vs_full" in result:
        best, cpu = _fmt(result.get("speedup_vs_full_best")), _fmt(result.get("speedup_vs_full_cpu"))
        parts.append(f"x{_fmt(result['speedup_vs_full'])} vs full (best repeats x{best}, CPU time x{cpu},"
                     f" FLOPs bound x{_fmt(result['flops_speedup_bound'])})")  # fmt: skip
    if "ms_per_token_step" in result:
        step = f"{_fmt(result['ms_per_token_step'])} ms/step"
        if "x_step_matmul_time" in result:
            step += f" = x{_fmt(result['x_step_matmul_time'])} matmul time"
        if "x_step_roofline" in result:
            step += f", x{_fmt(result['x_step_roofline'])} roofline"
        if "x_memory_floor" in result:
            step += (f", x{_fmt(result['x_memory_floor'])} memory floor ({_fmt(result['memory_floor_ms'])} ms;"
                     f" start x{_fmt(result.get('x_memory_floor_window_start'))},"
                     f" end x{_fmt(result.get('x_memory_floor_window_end'))})")  # fmt: skip
        if "ms_per_token_step_cpu" in result:
            step += f" (CPU time {_fmt(result['ms_per_token_step_cpu'])} ms/step)"
        if "prefill_s" in result:
            step += f"; prefill {_fmt(result['prefill_s'])} s"
        if "step_speedup" in result:
            step += (f"; eager {_fmt(result['eager_ms_per_token_step'])} ms/step, x{_fmt(result['step_speedup'])}"
                     f" vs eager, break-even {_fmt(result.get('break_even_images'))} images")  # fmt: skip
        parts.append(step)
    if "compile_s" in result:
        parts.append(f"compile {_fmt(result['compile_s'])} s")
    if result.get("extrapolated"):
        parts.append("extrapolated (see JSON)")
    return "; ".join(parts)


def markdown(results: dict[str, dict], command: str, quick: bool = False) -> str:
    """A results table and the targets table, in markdown."""
    lines = [f"Command: `{command}`", ""]
    first = next((r for r in results.values() if "torch" in r), {})
    lines += [f"torch {first.get('torch')}, {first.get('threads')} threads, device {first.get('device')}. "
              "*load*: the 1-minute load average at the end of the measurement, its own threads included;"
              " much above the thread count means other programs shared the cores. *cores busy*: CPU time /"
              " wall time; near 1 with 2 threads means one thread mostly waited for the other.", ""]  # fmt: skip
    lines += ["| measurement | median s (min-max) | figures | peak RSS MB | load, cores busy |", "|---" * 5 + "|"]
    for name, result in results.items():
        spread = f"{_fmt(result.get('median_s'))} ({_fmt(result.get('min_s'))}-{_fmt(result.get('max_s'))})"
        if result.get("extrapolated"):
            spread = f"{_fmt(result.get('median_s'))} (extrapolated)"
        load = _fmt(result.get("load_average_1m"))
        if result.get("cpu_median_s") and result.get("median_s"):
            load += f", {result['cpu_median_s'] / result['median_s']:.2f}"
        lines.append(f"| {name} | {spread} | {headline(result)} | {_fmt(result.get('peak_rss_mb'), 4)} | {load} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for row in check_targets(results, quick):
        met = {True: "yes", False: "**no**", None: "n/a (--quick)" if quick else "not measured"}[row["met"]]
        others = [f"{label} {_fmt(row[key])}" for key, label in (("best", "best repeat"), ("cpu", "CPU time"))
                  if row[key] is not None]  # fmt: skip
        others_text = f" ({'; '.join(others)})" if others else ""
        lines.append(f"| {row['target']} | {row['field']} = {_fmt(row['value'])}{others_text} | {met} |")
    return "\n".join(lines) + "\n"
