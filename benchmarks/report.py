"""Turn raw measurements into the figures of issue 5: MFU, matmul-time ratios, ratios to full attention and
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
)  # fmt: skip


def derive(name: str, result: dict, matmul_gflops: float | None, earlier: dict[str, dict]) -> dict:
    """Add figures that need the reference throughput or another case of the same run."""
    out = dict(result)
    median = out.get("median_s")
    if matmul_gflops and median and "train_flops" in out:
        achieved = out["train_flops"] / median / 1e9
        out["achieved_gflops"] = achieved
        out["mfu"] = achieved / matmul_gflops
    if median and "items" in out:
        out[f"{out['item_name']}_per_s"] = out["items"] / median
    if matmul_gflops and median and "matmul_flops" in out:
        out["matmul_time_s"] = out["matmul_flops"] / matmul_gflops / 1e9
        out["x_matmul_time"] = median / out["matmul_time_s"]
        out["step_matmul_ms"] = out["step_matmul_flops"] / matmul_gflops / 1e6
        out["x_step_matmul_time"] = out["ms_per_token_step"] / out["step_matmul_ms"]
        for window in ("start", "end"):
            flops = out.get(f"step_matmul_flops_window_{window}")
            if flops:
                window_matmul_ms = flops / matmul_gflops / 1e6
                out[f"x_step_matmul_time_window_{window}"] = out[f"ms_step_window_{window}"] / window_matmul_ms
    full = earlier.get("long_full", {}).get("median_s")
    if name.startswith("long_") and full and median:
        out["speedup_vs_full"] = full / median
    match = re.fullmatch(r"memory_(plain|reversible)_depth(\d+)", name)
    if match:
        base = earlier.get(f"memory_{match[1]}_depth4", out if match[2] == "4" else {})
        for field in ("train_memory_mb", "activation_mb"):
            if base.get(field) and out.get(field) is not None:
                out[field.replace("_mb", "_vs_depth4")] = out[field] / base[field]
    return out


def check_targets(results: dict[str, dict]) -> list[dict]:
    """Each target of issue 5 with its measured value and whether it is met (None when not measured)."""
    rows = []
    for description, case, field, comparison, threshold in TARGETS:
        value = results.get(case, {}).get(field)
        met = None if value is None else (value >= threshold if comparison == ">=" else value <= threshold)
        rows.append({"target": description, "case": case, "field": field, "value": value, "met": met})
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
        return f"{result['matmul_gflops']:.1f} GFLOP/s (by size: {result['gflops_by_size']})"
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
        parts.append(f"{_fmt(result[per_s])} {result['item_name']}/s, MFU {100 * result['mfu']:.1f}%")
    if "speedup_vs_full" in result:
        parts.append(f"x{_fmt(result['speedup_vs_full'])} vs full (FLOPs bound x{_fmt(result['flops_speedup_bound'])})")
    if "ms_per_token_step" in result:
        parts.append(f"{_fmt(result['ms_per_token_step'])} ms/step, x{_fmt(result.get('x_step_matmul_time'))} of"
                     f" matmul time, prefill {_fmt(result['prefill_s'])} s")  # fmt: skip
        if result.get("extrapolated"):
            parts.append("extrapolated (see JSON)")
    return "; ".join(parts)


def markdown(results: dict[str, dict], command: str) -> str:
    """A results table and the targets table, in markdown."""
    lines = [f"Command: `{command}`", ""]
    first = next((r for r in results.values() if "torch" in r), {})
    lines += [f"torch {first.get('torch')}, {first.get('threads')} threads, device {first.get('device')}.", ""]
    lines += ["| measurement | median s (min-max) | figures | peak RSS MB |", "|---|---|---|---|"]
    for name, result in results.items():
        spread = f"{_fmt(result.get('median_s'))} ({_fmt(result.get('min_s'))}-{_fmt(result.get('max_s'))})"
        if result.get("extrapolated"):
            spread = f"{_fmt(result.get('median_s'))} (extrapolated)"
        lines.append(f"| {name} | {spread} | {headline(result)} | {_fmt(result.get('peak_rss_mb'), 4)} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for row in check_targets(results):
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        lines.append(f"| {row['target']} | {row['field']} = {_fmt(row['value'])} | {met} |")
    return "\n".join(lines) + "\n"
