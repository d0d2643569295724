"""The demo's pictures and report: what :func:`dalle_pytorch.demo.pipeline.run_demo` leaves behind after training.

- ``grid.png`` (:func:`make_grid`, :func:`grid_rows`): per colour, samples of its held-out colour x shape pair
  and of one seen pair, then ground truth next to its VAE reconstruction.
- ``report.json`` (:func:`build_report`): the config, timings per stage (:class:`Stopwatch`), final training
  losses and the judge's verdicts (``dalle_pytorch.demo.judge.evaluate_fidelity``) against fixed targets; NaN is
  written as ``null`` so the file stays strict JSON (RFC 8259, https://www.rfc-editor.org/rfc/rfc8259).
- :func:`format_report`: the table ``dalle-demo`` prints from such a report.

Nothing here trains or samples; the functions only arrange results the pipeline already computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from dalle_pytorch.data.shapes import ShapePrompt

if TYPE_CHECKING:
    from dalle_pytorch.demo.config import DemoConfig

__all__ = [
    "TARGETS",
    "Stopwatch",
    "build_report",
    "format_precisions",
    "format_report",
    "grid_prompt_indices",
    "grid_rows",
    "json_ready",
    "make_grid",
    "rate",
    "write_grid_and_report",
]

# the demo succeeds when this fraction of samples shows both the colour and the shape asked for
TARGETS = {"seen_both_match": 0.8, "heldout_both_match": 0.5}


# ---------------------------------------------------------------------------------------------------------
# timings


class Stopwatch:
    """Wall-clock and CPU seconds (all threads of this process) per named stage, and in total since creation.

    >>> stopwatch = Stopwatch()
    >>> with stopwatch("data"):
    ...     pass
    >>> sorted(stopwatch.seconds())
    ['cpu_seconds', 'seconds']
    """

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall_start, self._cpu_start = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Record the seconds spent inside the ``with`` block under ``name``."""
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = round(time.perf_counter() - wall_start, 2)
        self.cpu[name] = round(time.process_time() - cpu_start, 2)

    def seconds(self) -> dict[str, dict[str, float]]:
        """``{"seconds": {stage: wall, ..., "total": wall}, "cpu_seconds": {...}}``, totals up to now."""
        return {
            "seconds": {**self.wall, "total": round(time.perf_counter() - self._wall_start, 2)},
            "cpu_seconds": {**self.cpu, "total": round(time.process_time() - self._cpu_start, 2)},
        }


# ---------------------------------------------------------------------------------------------------------
# the grid


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font on Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def make_grid(rows: Sequence[tuple[str, Tensor | None]], scale: int = 2, gap: int = 2) -> Image.Image:
    """A labelled picture: each row is ``(label, images (k, 3, h, w) in [0, 1])`` drawn left to right after its
    label, upscaled ``scale`` times; a row with images ``None`` is a heading spanning the whole width."""
    if not rows:
        raise ValueError("rows must hold at least one (label, images) pair")
    shapes = {tuple(images.shape[1:]) for _, images in rows if images is not None}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"every row's images must be (k, 3, h, w) of one size, got sizes {shapes}")
    _, height, width = next(iter(shapes))
    font = _font(14)
    text_width = lambda text: int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)) + 12
    label_width = max(text_width(label) for label, images in rows if images is not None)
    columns = max(len(images) for _, images in rows if images is not None)
    cell_w, cell_h, heading_h = width * scale + gap, height * scale + gap, 24
    canvas_width = max([label_width + columns * cell_w + gap] + [text_width(label) for label, images in rows])
    row_heights = [heading_h if images is None else cell_h for _, images in rows]
    canvas = Image.new("RGB", (canvas_width, sum(row_heights) + gap), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    _, text_top, _, text_bottom = font.getbbox("Ag")
    top = gap
    for (label, images), row_height in zip(rows, row_heights):
        draw.text((6, top + (row_height - text_bottom - text_top) // 2), label, fill=(230, 230, 230), font=font)
        for column, image in enumerate([] if images is None else images):
            pixels = (rearrange(image.detach().float().cpu().clamp(0, 1), "c h w -> h w c") * 255).round()
            tile = Image.fromarray(pixels.to(torch.uint8).numpy())
            tile = tile.resize((width * scale, height * scale), Image.NEAREST)
            canvas.paste(tile, (label_width + column * cell_w, top))
        top += row_height
    return canvas


def grid_prompt_indices(prompts: Sequence[ShapePrompt]) -> list[int]:
    """Rows to show: per colour, its held-out pair and then the seen pair with the next shape (cyclically), so
    that every shape is shown too."""
    by_colour: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_colour.setdefault(prompt.attributes.colour, []).append(index)
    shown = []
    for indices in by_colour.values():
        held = [i for i in indices if prompts[i].heldout][:1]
        start = indices.index(held[0]) + 1 if held else 0
        following = indices[start:] + indices[:start]
        shown += held + [i for i in following if not prompts[i].heldout][:1]
    return shown


def grid_rows(
    prompts: Sequence[ShapePrompt], samples: Tensor, fidelity: dict, reconstructions: Tensor, per_row: int = 8
) -> list[tuple[str, Tensor | None]]:
    """The rows of ``grid.png`` for :func:`make_grid`.

    Args:
        prompts: the p prompts generated for.
        samples: (p, k, 3, s, s) in [0, 1], ``samples[i]`` generated from ``prompts[i]``.
        fidelity: ``evaluate_fidelity`` of the samples; its ``both_match`` rates head the grid.
        reconstructions: (2, n, 3, s, s): ground truth images and their VAE reconstructions.
        per_row: at most this many images per row.
    """
    if samples.ndim != 5 or len(samples) != len(prompts):
        raise ValueError(f"samples must be (len(prompts), k, 3, s, s), got {tuple(samples.shape)}")
    if reconstructions.ndim != 5 or len(reconstructions) != 2:
        raise ValueError(f"reconstructions must be (2, n, 3, s, s), got {tuple(reconstructions.shape)}")
    seen, heldout = fidelity["seen"]["both_match"], fidelity["heldout"]["both_match"]
    rows: list[tuple[str, Tensor | None]] = [
        (f"DALLE samples; colour and shape right: {seen:.0%} seen pairs, {heldout:.0%} held out", None)
    ]
    for index in grid_prompt_indices(prompts):
        label = prompts[index].caption + ("  (held out)" if prompts[index].heldout else "")
        rows.append((label, samples[index, :per_row]))
    rows += [("VAE: ground truth and reconstruction", None), ("ground truth", reconstructions[0, :per_row])]
    rows += [("reconstruction", reconstructions[1, :per_row])]
    return rows


# ---------------------------------------------------------------------------------------------------------
# the report


def json_ready(value):
    """``value`` with every non-finite float (NaN, inf) in it, however nested, replaced by None: report.json
    stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def build_report(
    config: DemoConfig,
    device: str | torch.device,
    stopwatch: Stopwatch,
    final_losses: dict[str, float],
    shape_classifier_accuracy: float,
    vae_reconstruction: dict,
    fidelity: dict,
    decode_precision: dict | None = None,
) -> dict:
    """The JSON-ready report of a demo run: non-finite floats become ``None``.

    Args:
        config: the run's DemoConfig, written out in full.
        device: where the models ran.
        stopwatch: the stages' timings; the totals run up to this call.
        final_losses: smoothed final training loss per model name.
        shape_classifier_accuracy: the judge's accuracy on unseen ground truth, in [0, 1].
        vae_reconstruction: the judge's ``overall`` rates on VAE reconstructions of ground truth.
        fidelity: ``evaluate_fidelity`` of the samples; ``targets["met"]`` tells whether its ``seen`` and
            ``heldout`` ``both_match`` rates reach :data:`TARGETS`.
        decode_precision: ``judge_decode_precisions`` of the pipeline, when the config asks for it (the
            report's ``decode_precision``).
    """
    met = all(fidelity[group]["both_match"] >= TARGETS[f"{group}_both_match"] for group in ("seen", "heldout"))
    report = {
        "config": dataclasses.asdict(config),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        **stopwatch.seconds(),
        "final_losses": final_losses,
        "shape_classifier_accuracy": shape_classifier_accuracy,
        "vae_reconstruction": vae_reconstruction,
        "fidelity": fidelity,
        "targets": {**TARGETS, "met": bool(met)},
    }
    if decode_precision is not None:
        report["decode_precision"] = decode_precision
    return json_ready(report)


def write_grid_and_report(
    out_dir: str | Path,
    *,
    config: DemoConfig,
    device: str | torch.device,
    stopwatch: Stopwatch,
    final_losses: dict[str, float],
    shape_classifier_accuracy: float,
    prompts: Sequence[ShapePrompt],
    samples: Tensor,
    fidelity: dict,
    vae_reconstruction: dict,
    reconstructions: Tensor,
    decode_precision: dict | None = None,
) -> dict:
    """Save ``grid.png`` (:func:`grid_rows`) and ``report.json`` (:func:`build_report`) into the existing folder
    ``out_dir``; the arguments are described there. Returns the report."""
    out_dir = Path(out_dir)
    make_grid(grid_rows(prompts, samples, fidelity, reconstructions)).save(out_dir / "grid.png")
    report = build_report(
        config, device, stopwatch, final_losses, shape_classifier_accuracy, vae_reconstruction, fidelity,
        decode_precision,
    )
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


# ---------------------------------------------------------------------------------------------------------
# the printed table


def rate(value: float | None) -> str:
    """A rate as a 5-wide figure with two decimals; ``-`` for a missing (None or NaN) rate."""
    return "    -" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:5.2f}"


def format_report(report: dict) -> str:
    """The printed table: per prompt and per group, the fraction of samples matching colour, shape and both."""
    fidelity = report["fidelity"]
    width = max(len(row["prompt"]) for row in fidelity["per_prompt"]) + 12

    def line(label: str, rates: dict) -> str:
        return f"{label:<{width}}{rate(rates['colour_match']):>8}{rate(rates['shape_match']):>8}" + (
            f"{rate(rates['both_match']):>8}"
        )

    lines = [f"{'prompt':<{width}}{'colour':>8}{'shape':>8}{'both':>8}"]
    for row in fidelity["per_prompt"]:
        lines.append(line(row["prompt"] + ("  (held out)" if row["heldout"] else ""), row))
    lines.append("-" * len(lines[0]))
    for group, name in (("seen", "seen pairs"), ("heldout", "held-out pairs"), ("overall", "all pairs")):
        lines.append(line(f"{name} ({fidelity[group]['num_images']} images)", fidelity[group]))
    lines.append(line("chance", fidelity["chance"]))
    recon, seconds, cpu = report["vae_reconstruction"], report["seconds"], report["cpu_seconds"]
    lines += [
        "",
        f"shape judge accuracy on unseen ground truth: {report['shape_classifier_accuracy']:.1%}",
        f"judge on VAE reconstructions of ground truth: colour {rate(recon['colour_match'])}, "
        f"shape {rate(recon['shape_match'])}, both {rate(recon['both_match'])}",
        "seconds (wall / CPU): " + ", ".join(f"{name} {value:.0f}/{cpu[name]:.0f}" for name, value in seconds.items())
        + f" ({report['torch_threads']} torch threads, {report['device']}, "
        f"{report['config'].get('precision', 'fp32')} training)",
    ]  # fmt: skip
    if "decode_precision" in report:
        lines += ["", format_precisions(report["decode_precision"])]
    return "\n".join(lines)


def format_precisions(decode_precision: dict) -> str:
    """The printed table of ``report["decode_precision"]``: per decoding precision (and for fp32 with other
    seeds), the samples showing both colour and shape, the difference to fp32 in points and the seconds."""
    lines = [f"{'decoding precision':<20}{'seen':>8}{'held out':>10}{'all':>8}{'vs fp32 (points)':>18}"
             f"{'identical':>11}{'seconds':>9}"]  # fmt: skip
    rows = [*decode_precision["precisions"].items(), ("fp32, other seeds", decode_precision["noise"])]
    for name, result in rows:
        both, points = result["both_match"], result["points_vs_fp32"]
        seconds = result["generation_seconds"]
        lines.append(
            f"{name:<20}{rate(both['seen']):>8}{rate(both['heldout']):>10}{rate(both['overall']):>8}"
            f"{points['overall']:>+18.1f}{rate(result['identical_to_fp32']):>11}"
            f"{'-' if seconds is None else f'{seconds:.0f}':>9}"
        )
    verdict = "met" if decode_precision["met"] else "NOT met"
    lines.append("(fp32 with other seeds: how much sampling alone moves the rates)")
    lines.append(f"target (all pairs within {decode_precision['max_drop_points']:g} points of fp32): {verdict}")
    return "\n".join(lines)
