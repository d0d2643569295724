"""The training loop shared by the command-line tools: precision, accumulation, clipping, NaN guard,
checkpoints with exact resume, logging, several processes.

A `Trainer` runs optimizer steps over a batch source (`dalle_pytorch.training.data_order`). Each optimizer step
reseeds torch's RNG from (seed, step, rank), and each sample is read with its own seed, so what happens at
step k depends only on the checkpoint before it: a run resumed from step k continues exactly as if it had
never stopped. Checkpoints are `step-XXXXXXXX/` model directories (`dalle_pytorch.io.checkpoint`) with
`training_state.pt` beside the weights (`dalle_pytorch.training.state`), written by rank 0 only (DDP keeps
the weights identical on every rank, so rank 0's copy is complete).

With `settings.ema_decay`, a moving average of the weights (`dalle_pytorch.training.ema`) is updated after
every optimizer step that was not skipped, saved as the model directory `ema/` inside each checkpoint and
restored on resume.

With `settings.compile`, the module the loss function receives is `torch.compile`d
(https://pytorch.org/docs/stable/generated/torch.compile.html); checkpoints, EMA and sampling use the
original module, so a compiled run writes the same checkpoints as an eager one and either can resume the other.

Settings and the learning-rate schedule: `dalle_pytorch.training.settings`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dalle_pytorch.io.checkpoint import PretrainedMixin
from dalle_pytorch.training.data_order import derive_seed
from dalle_pytorch.training.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    deepspeed_config,
    deepspeed_initialize,
    gathered_parameters,
    no_sync,
    wrap_ddp,
)
from dalle_pytorch.training.ema import WeightAverage
from dalle_pytorch.training.run_logging import RunLogger
from dalle_pytorch.training.settings import LR_SCHEDULES, PRECISIONS, TrainingSettings, lr_factor_fn
from dalle_pytorch.training.state import EMA_DIR_NAME, CheckpointManager, load_training_state

__all__ = [
    "LR_SCHEDULES",
    "PRECISIONS",
    "NonFiniteLossError",
    "Trainer",
    "TrainingInterrupted",
    "TrainingSettings",
    "TrainResult",
]

HISTORY_LENGTH = 10_000

# loss_fn(model, batch, step) -> loss, or (loss, {name: float}) of extra values to log
LossFn = Callable[[nn.Module, Any, int], "Tensor | tuple[Tensor, dict[str, float]]"]
# on_sample(step, model, batch, logger): writes sample images etc.; called on rank 0 with its RNG isolated
SampleFn = Callable[[int, nn.Module, Any, RunLogger], None]


def make_adamw(params: list[torch.Tensor], *, fused: bool = True, **options) -> torch.optim.AdamW:
    """AdamW, with the fused single-kernel step where torch has it for these parameters (CPU and CUDA
    floating point; several times faster than the per-tensor loop on CPU), else the default implementation.
    Both compute the same update up to rounding."""
    kinds = {(p.device.type, p.dtype) for p in params}
    fusable = fused and all(device in ("cpu", "cuda") and dtype.is_floating_point for device, dtype in kinds)
    if fusable:
        try:
            return torch.optim.AdamW(params, fused=True, **options)
        except (RuntimeError, TypeError, ValueError):  # an older torch or an unsupported dtype/device
            pass
    return torch.optim.AdamW(params, **options)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients were NaN/inf for too many optimizer steps in a row."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped training; `checkpoint` is where the state was saved (None: nothing to save)."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(f"training interrupted; checkpoint: {checkpoint}")
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    model: nn.Module
    step: int
    history: list[dict[str, Any]]  # this rank's per-step records (the last HISTORY_LENGTH)
    checkpoints: list[Path]  # written by this rank (only rank 0 writes)
    stopped_by: str = ""  # "max_steps", "epochs" or "interrupted": which limit ended the run


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list | tuple):
        return type(batch)(move_to(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    return batch


def _with_last_flag(items: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs, reading one item ahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True


class Trainer:
    """Trains `model` (a PretrainedMixin module) on `data` (IndexedBatches or StreamingBatches)."""

    def __init__(
        self,
        model: PretrainedMixin,
        data: Any,
        loss_fn: LossFn,
        settings: TrainingSettings,
        ctx: DistributedContext,
        *,
        on_sample: SampleFn | None = None,
        description: str | None = None,
    ):
        """``description``: a label for the progress bar."""
        self.model, self.data, self.loss_fn, self.settings, self.ctx = model, data, loss_fn, settings, ctx
        self.on_sample, self.description = on_sample, description
        self.model.to(ctx.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = make_adamw(
            self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
            betas=tuple(settings.adam_betas), fused=settings.precision != "fp16",
        )  # fmt: skip
        per_epoch = data.batches_per_epoch
        self.total_steps = settings.max_steps or (
            settings.epochs * -(-per_epoch // settings.ga_steps) if per_epoch is not None else None
        )
        # the learning rate is a pure function of the step (set before every step), so it resumes exactly
        self.lr_factor = lr_factor_fn(settings, self.total_steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=settings.precision == "fp16")
        self.manager = CheckpointManager(settings.output_dir, settings.keep_n_checkpoints)
        self.step, self.epoch, self.samples_in_epoch, self.nan_streak = 0, 0, 0, 0
        self.last_saved_step = -1
        self.history: collections.deque = collections.deque(maxlen=HISTORY_LENGTH)
        self.checkpoints: list[Path] = []
        self.engine = None  # a DeepSpeed engine when settings.deepspeed
        self.ema = WeightAverage(model, settings.ema_decay) if settings.ema_decay is not None else None
        self._resume_dir: Path | None = None
        self._stop_requested = False
        self.stopped_by = ""

    @property
    def ema_model(self) -> nn.Module | None:
        """The averaged copy of the model (for sampling), or None when `ema_decay` is off."""
        return None if self.ema is None else self.ema.module

    @property
    def global_batch(self) -> int:
        return self.settings.batch_size * self.settings.ga_steps * self.ctx.world_size

    def resume(self, directory: str | Path) -> None:
        """Continue from a checkpoint written by this trainer; load the model weights before calling."""
        directory = Path(directory)
        state = load_training_state(
            directory,
            optimizer=None if self.settings.deepspeed else self.optimizer,
            scaler=self.scaler,
        )
        extra = state.get("extra") or {}
        position = state.get("data_position") or {}
        self.step, self.last_saved_step = state["step"], state["step"]
        self.epoch, self.samples_in_epoch = position.get("epoch", state["epoch"]), position.get("samples", 0)
        self.nan_streak = extra.get("nan_streak", 0)
        if self.ema is not None:
            self.ema.restore(directory / EMA_DIR_NAME, extra.get("ema_updates"))
        if extra.get("global_batch", self.global_batch) != self.global_batch:
            warnings.warn(
                f"resuming with {self.global_batch} samples per step instead of {extra['global_batch']}: "
                "the data order continues approximately, not exactly",
                stacklevel=2,
            )
        self._resume_dir = directory

    def fit(self) -> TrainResult:
        """Train until `max_steps` or `epochs`, whichever comes first (`epochs=None`: until `max_steps`);
        saves every `save_every_n_steps` and at the end."""
        settings, ctx = self.settings, self.ctx
        model = self._prepare_model()
        self.model.train()
        logger = None
        if ctx.is_main:
            logger = RunLogger(
                settings.output_dir,
                tensorboard=settings.tensorboard,
                wandb=settings.wandb,
                wandb_project=settings.wandb_project,
                wandb_name=settings.wandb_name,
                wandb_entity=settings.wandb_entity,
                config=settings.run_config,
            )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.description,
            unit="step",
            dynamic_ncols=True,
            disable=not (ctx.is_main and settings.progress),
        )
        try:
            with self._stop_on_signal():
                self._loop(model, logger, bar)
            if self.step > self.last_saved_step and self.step > 0:
                self._save()
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, the last checkpoint stays as it is
            raise TrainingInterrupted(self._latest()) from None
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        barrier(ctx)
        return TrainResult(self.model, self.step, list(self.history), self.checkpoints, self.stopped_by)

    # ------------------------------------------------------------------------------------------ the loop

    @contextlib.contextmanager
    def _stop_on_signal(self):
        """Ctrl-C or SIGTERM (a cluster preempting the job) finishes the current step, saves and stops; a
        second one stops at once. Handlers can only be set from the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.ctx.is_main:
                saving = " and saving a checkpoint" if self.settings.save_checkpoints else ""
                print(f"\nstopping after this step{saving} (again to stop at once)", flush=True)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _prepare_model(self) -> nn.Module:
        settings = self.settings
        if not settings.deepspeed:
            model = wrap_ddp(
                self.model,
                self.ctx,
                powersgd=settings.powersgd,
                powersgd_rank=settings.powersgd_rank,
                powersgd_start_iter=settings.powersgd_start_iter,
                find_unused_parameters=settings.find_unused_parameters,
            )
            # the compiled wrapper only runs the steps; self.model (its weights are shared) is what gets saved
            backend = settings.compile_backend
            return model if backend is None else torch.compile(model, backend=backend)
        config = deepspeed_config(
            batch_size=settings.batch_size,
            ga_steps=settings.ga_steps,
            clip_grad_norm=settings.clip_grad_norm,
            precision=settings.precision,
            zero_stage=settings.zero_stage,
        )
        if settings.deepspeed_config:
            config.update(json.loads(Path(settings.deepspeed_config).read_text(encoding="utf-8")))
        self.engine = deepspeed_initialize(self.model, self.optimizer, None, config)
        if self._resume_dir is not None:
            self.engine.load_checkpoint(
                str(self._resume_dir.parent / "deepspeed"), tag=self._resume_dir.name, load_module_only=False
            )
        return self.engine

    def _loop(self, model: nn.Module, logger: RunLogger | None, bar: tqdm) -> None:
        settings, ga = self.settings, self.settings.ga_steps
        self.stopped_by = "max_steps"
        if settings.max_steps is not None and self.step >= settings.max_steps:
            return  # resumed from a run that already got there
        while settings.epochs is None or self.epoch < settings.epochs:
            step_before = self.step
            window: list[float] = []
            ids: list[Tensor] = []
            samples = 0
            for (batch_ids, batch), last_in_epoch in _with_last_flag(
                self.data.iterate(self.epoch, self.samples_in_epoch)
            ):
                if not window:
                    torch.manual_seed(derive_seed("step", settings.seed, self.step, self.ctx.rank))
                    for group in self.optimizer.param_groups:
                        group["lr"] = settings.learning_rate * self.lr_factor(self.step)
                    started, extras = time.perf_counter(), collections.Counter()
                sync = len(window) + 1 == ga or last_in_epoch
                loss, batch_extras = self._micro_step(model, batch, sync)
                window.append(loss)
                extras.update(batch_extras)
                samples += len(batch_ids) if batch_ids is not None else len(batch[0])
                if batch_ids is not None:
                    ids.append(batch_ids)
                if not sync:
                    continue
                record = self._update(window)
                self.samples_in_epoch += samples * self.ctx.world_size
                self.step += 1
                elapsed = time.perf_counter() - started
                record.update({key: value / len(window) for key, value in extras.items()})
                record.update(epoch=self.epoch, samples_per_sec=samples * self.ctx.world_size / max(elapsed, 1e-9))
                if settings.log_sample_ids and ids:
                    record["sample_ids"] = torch.cat(ids).tolist()
                self._after_step(record, batch, logger, bar)
                window, ids, samples = [], [], 0
                if settings.max_steps is not None and self.step >= settings.max_steps:
                    return
            if self.step == step_before and self.samples_in_epoch == 0:
                raise ValueError(f"epoch {self.epoch} of the data yielded no batch: is the dataset empty?")
            self.epoch, self.samples_in_epoch = self.epoch + 1, 0
        self.stopped_by = "epochs"

    def _micro_step(self, model: nn.Module, batch: Any, sync: bool) -> tuple[float, dict[str, float]]:
        """Forward and backward of one micro-batch; returns its loss (NaN/inf kept) and extra values."""
        batch = move_to(batch, self.ctx.device)
        dtype = PRECISIONS[self.settings.precision]
        with no_sync(model, not sync):
            with torch.autocast(self.ctx.device.type, dtype=dtype, enabled=dtype is not None):
                out = self.loss_fn(model, batch, self.step)
            loss, extras = out if isinstance(out, tuple) else (out, {})
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
            value = float(loss.detach())
            if self.engine is not None:
                # DeepSpeed would apply a NaN update: every rank skips this micro-batch if any rank has one
                bad = all_reduce_sum(torch.tensor([float(not math.isfinite(value))]), self.ctx).item()
                if not bad:
                    self.engine.backward(loss)
                    self.engine.step()
            else:
                # backward even when not finite: DDP needs every rank's all-reduce, and the update is skipped
                self.scaler.scale(loss / self.settings.ga_steps).backward()
        return value, {key: float(v) for key, v in extras.items()}

    def _update(self, window: list[float]) -> dict[str, Any]:
        """The optimizer step after a window of micro-batches, unless a loss or gradient is NaN/inf."""
        finite = [value for value in window if math.isfinite(value)]
        # one collective per step: losses, NaN counts and stop requests of all ranks
        local = [sum(finite), len(finite), len(window) - len(finite), float(self._stop_requested)]
        stats = all_reduce_sum(torch.tensor(local, dtype=torch.float64), self.ctx)
        self._stop_requested = stats[3].item() > 0
        loss = (stats[0] / stats[1]).item() if stats[1] > 0 else float("nan")
        record = {"loss": loss, "local_loss": sum(window) / len(window), "lr": self.optimizer.param_groups[0]["lr"]}
        bad_loss = stats[2].item() > 0
        if self.engine is not None:
            skipped = bad_loss
            record["grad_norm"] = self.engine.get_global_grad_norm()
        else:
            if len(window) < self.settings.ga_steps:  # a short window at the end of an epoch
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(self.settings.ga_steps / len(window))
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            max_norm = self.settings.clip_grad_norm or float("inf")
            grad_norm = float(nn.utils.clip_grad_norm_(self.params, max_norm))
            record["grad_norm"] = grad_norm
            # fp16 overflow with a finite loss is loss scaling at work: the scaler skips the step and backs off
            skipped = bad_loss or (not math.isfinite(grad_norm) and not self.scaler.is_enabled())
            if skipped:
                if self.scaler.is_enabled():
                    self.scaler.update(new_scale=float(self.scaler.get_scale()))  # clears the unscale_ record
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        record["skipped"] = skipped
        if self.ema is not None and not skipped:
            self.ema.update(self.model)
        self.nan_streak = self.nan_streak + 1 if skipped else 0
        if skipped:
            message = (
                f"step {self.step + 1}: loss or gradients are NaN/inf; the update was skipped "
                f"({self.nan_streak} in a row)"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            if self.nan_streak >= self.settings.max_nan_steps:
                raise NonFiniteLossError(
                    f"stopping: loss or gradients were NaN/inf for {self.nan_streak} steps in a row (up to step "
                    f"{self.step + 1}); the weights were not updated by those steps. Last checkpoint: "
                    f"{self._latest()}. Try a lower --learning_rate, --clip_grad_norm or --precision fp32/bf16."
                )
        return record

    def _after_step(self, record: dict[str, Any], batch: Any, logger: RunLogger | None, bar: tqdm) -> None:
        settings, step = self.settings, self.step
        self.history.append({"step": step, **record})
        bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_sec']:.1f}", refresh=False)
        bar.update(1)
        if logger is not None and (step % settings.log_every_n_steps == 0 or record["skipped"]):
            logger.log(step, record)
        # ZeRO-3 parameters are gathered by collectives, which rank 0 cannot run alone: no samples then
        zero3 = self.engine is not None and self.engine.zero_optimization_stage() >= 3
        if (
            logger is not None
            and self.on_sample is not None
            and step % settings.sample_every_n_steps == 0
            and not zero3
        ):
            devices = [self.ctx.device.index or 0] if self.ctx.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():  # sampling must not shift training's RNG
                self.on_sample(step, self.model, move_to(batch, self.ctx.device), logger)
            self.model.train()
        if step % settings.save_every_n_steps == 0:
            self._save()
        if self._stop_requested:
            raise TrainingInterrupted(self._save() if self.last_saved_step < step else self._latest())

    # ------------------------------------------------------------------------------------------ checkpoints

    def _latest(self) -> Path | None:
        return self.manager.latest()

    def _save(self) -> Path | None:
        """Rank 0 writes `step-XXXXXXXX/` (model + training state); with DeepSpeed every rank also writes its
        optimizer partition under `deepspeed/`. Nothing with `save_checkpoints=False`."""
        if not self.settings.save_checkpoints:
            return None
        tag = f"step-{self.step:08d}"
        optimizer: Any = self.optimizer
        if self.engine is not None:
            self.engine.save_checkpoint(str(Path(self.settings.output_dir) / "deepspeed"), tag=tag)
            optimizer = _EmptyState()  # the optimizer state lives in DeepSpeed's checkpoint
        path = None
        with gathered_parameters(self.engine):
            if self.ctx.is_main:
                path = self.manager.save(
                    self.model, self.step, optimizer=optimizer, scaler=self.scaler,
                    epoch=self.epoch, data_position={"epoch": self.epoch, "samples": self.samples_in_epoch},
                    extra={"seed": self.settings.seed, "global_batch": self.global_batch,
                           "world_size": self.ctx.world_size, "nan_streak": self.nan_streak,
                           "ema_updates": None if self.ema is None else self.ema.updates},
                    ema=self.ema_model,
                )  # fmt: skip
                self.checkpoints.append(path)
        if self.engine is not None and self.ctx.is_main:  # DeepSpeed's folders follow --keep_n_checkpoints
            kept = {checkpoint.name for checkpoint in self.manager.checkpoints()}
            for folder in (Path(self.settings.output_dir) / "deepspeed").glob("step-*"):
                if folder.name not in kept:
                    shutil.rmtree(folder, ignore_errors=True)
        self.last_saved_step = self.step
        return path


class _EmptyState:
    def state_dict(self) -> dict:
        return {}
