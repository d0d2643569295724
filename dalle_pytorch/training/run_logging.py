"""Where training metrics and sample images go: always a `metrics.jsonl` file and PNGs in the output
folder, and TensorBoard (https://www.tensorflow.org/tensorboard) and/or Weights & Biases
(https://docs.wandb.ai) when asked. Both are optional extras, imported only when used. Only the main
process logs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from dalle_pytorch.data.images import image_grid, save_image

METRICS_NAME = "metrics.jsonl"


def _json_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class RunLogger:
    """Writes metrics (`log`) and image grids with captions (`log_images`) to every enabled sink."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "dalle_pytorch",
        wandb_name: str | None = None,
        wandb_entity: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.output_dir / METRICS_NAME, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tensorboard = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from error
            self._tensorboard = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as error:
                raise ImportError("--wandb needs the wandb package: pip install wandb (and `wandb login`)") from error
            self._wandb = wandb_module
            run_id_file = self.output_dir / "wandb_run_id.txt"
            # the same W&B run continues when training resumes in this folder
            run_id = run_id_file.read_text().strip() if run_id_file.is_file() else wandb_module.util.generate_id()
            run_id_file.write_text(run_id)
            wandb_module.init(
                project=wandb_project,
                name=wandb_name,
                entity=wandb_entity,
                config=config or {},
                dir=str(self.output_dir),
                id=run_id,
                resume="allow",
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One line of `metrics.jsonl` ({"step": step, **metrics}) and the scalars to TensorBoard / W&B."""
        record = {"step": step, **{key: _json_number(value) for key, value in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_images(
        self, step: int, tag: str, images: torch.Tensor, captions: list[str] | None = None, nrow: int | None = None
    ) -> Path:
        """Images (b, c, h, w) in [0, 1]: a grid PNG (`nrow` per row) in `samples/` (captions beside it in a
        .txt), and the grid / the captioned images to TensorBoard / W&B. Returns the PNG's path."""
        images = images.detach().float().cpu().clamp(0, 1)
        grid = image_grid(images, nrow)
        path = save_image(grid, self.output_dir / "samples" / f"{tag}-{step:08d}.png")
        if captions:
            path.with_suffix(".txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, grid, step)
            if captions:
                self._tensorboard.add_text(f"{tag}/captions", "\n\n".join(captions), step)
        if self._wandb is not None:
            captions = captions or [""] * len(images)
            pictures = [
                self._wandb.Image(image.permute(1, 2, 0).numpy(), caption=caption)
                for image, caption in zip(images, captions)
            ]
            self._wandb.log({tag: pictures}, step=step)
        return path

    def close(self) -> None:
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `output_dir/metrics.jsonl`, in the order written."""
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
