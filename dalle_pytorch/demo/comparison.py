"""The side-by-side report of ``dalle-demo --model dalle2`` and ``--model both``: each system's judge verdicts
and times in one ``report.json`` and one printed table, and one ``grid.png`` with every system's rows.

Systems: ``dalle`` (DiscreteVAE + DALLE), ``dalle2`` (CLIP + diffusion prior + decoder) and ``clip_guided``
(the VAE's codes optimised against CLIP). Each is judged by ``dalle_pytorch.demo.judge`` on the same prompts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dalle_pytorch.demo.report import TARGETS, Stopwatch, json_ready, make_grid, rate

if TYPE_CHECKING:
    from dalle_pytorch.demo.config import DemoConfig

__all__ = ["SYSTEM_STAGES", "build_comparison", "format_comparison", "write_comparison"]

# the stages whose seconds each system needs: (training, generation); the data and the judge are shared
SYSTEM_STAGES = {
    "dalle": (("vae", "dalle"), ("generation",)),
    "dalle2": (("clip", "dalle2_embed", "prior", "decoder"), ("dalle2_generation",)),
    "clip_guided": (("vae", "clip"), ("clip_guided",)),
}
SYSTEM_NAMES = {"dalle": "DALLE", "dalle2": "DALLE2", "clip_guided": "CLIP-guided VAE"}


def build_comparison(
    model: str,
    config: DemoConfig,
    device: str | torch.device,
    stopwatch: Stopwatch,
    final_losses: dict[str, float],
    shape_classifier_accuracy: float,
    results: dict[str, dict],
    vae_reconstruction: dict | None,
) -> dict:
    """The JSON-ready report: shared facts, then ``systems[name]`` with the judge's ``fidelity``, the
    ``train_seconds`` and ``generation_seconds`` (wall clock) and whether it met :data:`TARGETS`."""
    times = stopwatch.seconds()
    systems = {}
    for name, fidelity in results.items():
        train, generate = SYSTEM_STAGES[name]
        if name == "dalle2" and config.dalle2_latent_decoder:
            train = ("vae", *train)  # its decoder diffuses in the VAE's latents
        met = all(fidelity[g]["both_match"] >= TARGETS[f"{g}_both_match"] for g in ("seen", "heldout"))
        systems[name] = {
            "train_seconds": round(sum(times["seconds"].get(stage, 0.0) for stage in train), 2),
            "generation_seconds": round(sum(times["seconds"].get(stage, 0.0) for stage in generate), 2),
            "targets_met": bool(met),
            "fidelity": fidelity,
        }
    report = {
        "model": model,
        "config": dataclasses.asdict(config),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        **times,
        "final_losses": final_losses,
        "shape_classifier_accuracy": shape_classifier_accuracy,
        "vae_reconstruction": vae_reconstruction,
        "targets": dict(TARGETS),
        "systems": systems,
    }
    return json_ready(report)


def write_comparison(
    out_dir: str | Path, rows: Sequence[tuple[str, Tensor | None]], *, model: str, **report_kwargs
) -> dict:
    """Save ``grid.png`` from ``rows`` and ``report.json`` (:func:`build_comparison` of ``report_kwargs``) into
    the existing folder ``out_dir``. Returns the report."""
    out_dir = Path(out_dir)
    make_grid(list(rows)).save(out_dir / "grid.png")
    report = build_comparison(model, **report_kwargs)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def format_comparison(report: dict) -> str:
    """The printed side-by-side table: per system, colour+shape accuracy on seen and held-out pairs and times."""
    systems = report["systems"]
    width = 18
    header = f"{'':<28}" + "".join(f"{SYSTEM_NAMES[name]:>{width}}" for name in systems)
    lines = [header]

    def row(label: str, cell) -> None:
        lines.append(f"{label:<28}" + "".join(f"{cell(s):>{width}}" for s in systems.values()))

    for group, label in (("seen", "seen pairs"), ("heldout", "held-out pairs"), ("overall", "all pairs")):
        row(f"colour+shape, {label}", lambda s, g=group: rate(s["fidelity"][g]["both_match"]).strip())
        row(f"  colour only, {label}", lambda s, g=group: rate(s["fidelity"][g]["colour_match"]).strip())
        row(f"  shape only, {label}", lambda s, g=group: rate(s["fidelity"][g]["shape_match"]).strip())
    row("training seconds", lambda s: f"{s['train_seconds']:.0f}")
    row("generation seconds", lambda s: f"{s['generation_seconds']:.0f}")
    row("targets met", lambda s: "yes" if s["targets_met"] else "no")
    chance = next(iter(systems.values()))["fidelity"]["chance"]["both_match"]
    seconds, cpu = report["seconds"], report["cpu_seconds"]
    lines += [
        "-" * len(header),
        f"chance (colour+shape): {chance:.3f}; targets: colour+shape >= {report['targets']['seen_both_match']:.0%} "
        f"on seen pairs, >= {report['targets']['heldout_both_match']:.0%} on held-out pairs",
        f"shape judge accuracy on unseen ground truth: {report['shape_classifier_accuracy']:.1%}",
        "seconds (wall / CPU): " + ", ".join(f"{name} {value:.0f}/{cpu[name]:.0f}" for name, value in seconds.items())
        + f" ({report['torch_threads']} torch threads, {report['device']}, "
        f"{report['config'].get('precision', 'fp32')} training)",
    ]  # fmt: skip
    return "\n".join(lines)
