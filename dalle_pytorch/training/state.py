"""Training state for exact resume: `training_state.pt` beside a model directory, and checkpoint rotation.

`training_state.pt` holds the optimizer, scheduler and AMP scaler state, step, epoch, position in the data
and every RNG state (Python, NumPy, torch CPU, CUDA, MPS), in a form `torch.load(weights_only=True)` reads
(https://docs.pytorch.org/docs/stable/notes/serialization.html#weights-only-security), so resuming never
unpickles code. `save_checkpoint` writes it together with the model directory (`dalle_pytorch.io.checkpoint`)
in one atomic step (`dalle_pytorch.io.atomic`); `CheckpointManager` keeps the newest `step-XXXXXXXX/` folders.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalle_pytorch._version import __version__
from dalle_pytorch.io.atomic import atomic_write_dir, atomic_write_file, temp_sibling
from dalle_pytorch.io.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    PretrainedMixin,
    read_config,
    write_model_dir,
)
from dalle_pytorch.io.safe_pickle import describe

TRAINING_STATE_NAME = "training_state.pt"
EMA_DIR_NAME = "ema"  # the averaged weights, a model directory inside the checkpoint
TRAINING_STATE_VERSION = 1

PathLike = str | os.PathLike


def save_training_state(
    directory: PathLike,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    step: int,
    epoch: int,
    data_position: Any = None,
    extra: Any = None,
) -> Path:
    """Writes `directory/training_state.pt` atomically: optimizer/scheduler/scaler state, step, epoch,
    `data_position` and `extra` (anything `torch.load(weights_only=True)` reads), and all RNG states."""
    state = _training_state(
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        step=step,
        epoch=epoch,
        data_position=data_position,
        extra=extra,
    )
    path = Path(directory) / TRAINING_STATE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: torch.save(state, tmp))
    return path


def load_training_state(
    directory: PathLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restores the given objects (and the RNGs) from `directory/training_state.pt`; returns the state,
    including `step`, `epoch`, `data_position` and `extra`. Load the model weights before this."""
    path = Path(directory) / TRAINING_STATE_NAME
    state = read_training_state(directory)
    if restore_rng:
        _check_rng_states(state.get("rng"), path)  # before anything is restored: all or nothing
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None:
            if state.get(name) is None:
                raise ValueError(f"{path} holds no {name} state, but a {name} was given to restore")
            try:
                target.load_state_dict(state[name])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
                raise CheckpointError(f"{path}: the {name} state does not fit this {name}: {error}") from None
    # A scaler saved disabled (or not at all) has nothing to restore; a fresh loss scale is harmless.
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        _set_rng_states(state["rng"])
    return state


def read_training_state(directory: PathLike) -> dict[str, Any]:
    """`directory/training_state.pt` as a dict, checked to be a complete training state of a format this
    version reads; a truncated, empty or foreign file is a CheckpointError naming it."""
    path = Path(directory) / TRAINING_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {TRAINING_STATE_NAME} at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted copy?); resume from another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        KeyError,
        MemoryError,
    ) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is truncated or not a training state: {detail}") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if type(version) is not int:
        raise CheckpointError(f"{path} is not a dalle_pytorch training state")
    if version > TRAINING_STATE_VERSION:
        raise CheckpointError(
            f"{path} has training-state format version {version}, but this dalle_pytorch {__version__} "
            f"reads up to {TRAINING_STATE_VERSION}; upgrade dalle_pytorch to resume from it"
        )
    for key in ("step", "epoch"):
        if type(state.get(key)) is not int or state[key] < 0:
            raise CheckpointError(f"{path}: '{key}' should be a non-negative int, found {describe(state.get(key))}")
    return state


def _check_rng_states(rng: Any, path: Path) -> None:
    """The RNG states `_set_rng_states` restores, checked so a damaged file fails before anything changes."""
    problem = None
    if not isinstance(rng, dict):
        problem = "has no 'rng' entry"
    elif not (isinstance(rng.get("python"), dict) and isinstance(rng["python"].get("state"), torch.Tensor)):
        problem = "has no Python RNG state"
    elif not (isinstance(rng.get("numpy"), dict) and isinstance(rng["numpy"].get("keys"), torch.Tensor)):
        problem = "has no NumPy RNG state"
    elif not (isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8):
        problem = "has no torch RNG state"
    else:
        numpy = rng["numpy"]
        if any(key not in numpy for key in ("name", "pos", "has_gauss", "cached_gaussian")):
            problem = "has an incomplete NumPy RNG state"
        elif rng["python"]["state"].numel() != len(random.getstate()[1]) or numpy["keys"].numel() != 624:
            problem = "has RNG states of the wrong size"
    if problem is not None:
        raise CheckpointError(f"{path} {problem}; it cannot restore the random number generators")


def save_checkpoint(
    directory: PathLike,
    model: PretrainedMixin,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    step: int | None = None,
    epoch: int | None = None,
    data_position: Any = None,
    extra: Any = None,
    ema: PretrainedMixin | None = None,
) -> Path:
    """Writes the model directory and, when `optimizer` is given, `training_state.pt` (arguments as in
    `save_training_state`) in one atomic step, so weights and training state always belong together.
    `ema`: a moving average of the weights, written as the model directory `ema/` inside."""
    state = None
    if optimizer is not None:
        state = _training_state(
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            step=step,
            epoch=epoch,
            data_position=data_position,
            extra=extra,
        )
    elif any(value is not None for value in (scheduler, scaler, step, epoch, data_position, extra)):
        raise ValueError("save_checkpoint writes a training state only together with its optimizer=")

    def fill(tmp: Path) -> None:
        write_model_dir(model, tmp)
        if ema is not None:
            write_model_dir(ema, tmp / EMA_DIR_NAME)
        if state is not None:
            torch.save(state, tmp / TRAINING_STATE_NAME)

    return atomic_write_dir(Path(directory), fill)


def _training_state(
    *,
    optimizer: Any,
    scheduler: Any = None,
    scaler: Any = None,
    step: int,
    epoch: int,
    data_position: Any = None,
    extra: Any = None,
) -> dict[str, Any]:
    for name, value in (("step", step), ("epoch", epoch)):
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} should be a non-negative int, got {value!r}")
    for name, value in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if value is not None and not callable(getattr(value, "state_dict", None)):
            raise TypeError(f"{name} should have a state_dict() method, got {type(value).__name__}")
    if optimizer is None:
        raise TypeError("optimizer is required to save a training state")
    state = {
        "format_version": TRAINING_STATE_VERSION,
        "library_version": __version__,
        "step": step,
        "epoch": epoch,
        "data_position": data_position,
        "extra": extra,
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": _get_rng_states(),
    }
    _check_weights_only_loadable(state, "training state")
    return state


_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)


def _check_weights_only_loadable(value: Any, where: str) -> None:
    """Refuses at save time what `torch.load(weights_only=True)` would refuse at resume time."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            _check_weights_only_loadable(key, f"{where} key")
            _check_weights_only_loadable(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple, set):
        for i, item in enumerate(value):
            _check_weights_only_loadable(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) cannot read; use "
        "tensors, numbers, strings, None and lists/tuples/dicts of them"
    )


def _get_rng_states() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
    }


def _set_rng_states(rng: dict[str, Any]) -> None:
    python = rng["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    numpy = rng["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda") or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warnings.warn(
                f"training state has RNG states for {len(cuda)} CUDA devices but {available} are "
                "available; CUDA random draws will differ from the interrupted run",
                stacklevel=3,
            )
    if rng.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(rng["mps"])


# ---------------------------------------------------------------------------------------- integrity


def checkpoint_problem(directory: PathLike, training_state: bool = True) -> str | None:
    """What is wrong with a checkpoint folder, as one line naming the file (None when it looks intact).

    Reads `config.json`, the header and size of every `model.safetensors` (sub-models included) and, when
    `training_state`, checks `training_state.pt` (a zip archive) against its checksums, so a truncated or
    half-copied file is found without building the model."""
    directory = Path(directory)
    try:
        meta = read_config(directory)
    except FileNotFoundError:
        return f"{directory / CONFIG_NAME} is missing"
    except (CheckpointError, OSError, UnicodeDecodeError) as error:
        return str(error)
    problem = _safetensors_problem(directory / WEIGHTS_NAME)
    if problem is not None:
        return problem
    for child in meta["children"]:
        problem = checkpoint_problem(directory / child, training_state=False)
        if problem is not None:
            return problem
    state = directory / TRAINING_STATE_NAME
    if training_state and state.exists():
        try:
            with zipfile.ZipFile(state) as archive:
                damaged = archive.testzip()  # checks every member's CRC
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            return f"{state} is damaged or truncated ({error})"
        if damaged is not None:
            return f"{state} is damaged: {damaged} fails its checksum"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, then
    the data (https://huggingface.co/docs/safetensors): the file must be as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            raw = file.read(8)
            if len(raw) < 8:
                return f"{path} is truncated ({size} bytes, not even a header)"
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                return f"{path} is truncated ({size} bytes; its header alone needs {8 + header_len})"
            header = json.loads(file.read(header_len))
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError) as error:
        return f"{path} is not a readable safetensors file ({error})"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is not a JSON object)"
    entries = [entry for key, entry in header.items() if key != "__metadata__" and isinstance(entry, dict)]
    end = max((entry["data_offsets"][1] for entry in entries), default=0)
    if 8 + header_len + end > size:
        return f"{path} is truncated ({size} bytes; its tensors need {8 + header_len + end})"
    return None


# ---------------------------------------------------------------------------------------- rotation


class CheckpointManager:
    """Writes `root/step-{step:08d}/` (model directory + `training_state.pt`) and keeps the newest
    `keep_n` of them (all when None). One process writes to a root at a time."""

    _STEP_DIR = re.compile(r"step-(\d+)")
    _LEFTOVER = re.compile(r"\.step-\d+\.(tmp|old|del)-[0-9a-f]+")  # names from atomic.temp_sibling

    def __init__(self, root: PathLike, keep_n: int | None = None):
        if keep_n is not None and (type(keep_n) is not int or keep_n < 1):
            raise ValueError(f"keep_n should be a positive int or None, got {keep_n!r}")
        self.root = Path(root)
        self.keep_n = keep_n

    def save(self, model: PretrainedMixin, step: int, **training_state: Any) -> Path:
        """Saves `model` (and, given `optimizer=`, `epoch=`, ..., its training state) as `step`."""
        if type(step) is not int or step < 0:
            raise ValueError(f"step should be a non-negative int, got {step!r}")
        if training_state:
            training_state = {**training_state, "step": step}
        path = save_checkpoint(self.root / f"step-{step:08d}", model, **training_state)
        self._prune(keep=path)
        return path

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest step first."""
        if not self.root.is_dir():
            return []
        found = [
            (int(match.group(1)), entry)
            for entry in self.root.iterdir()
            if (match := self._STEP_DIR.fullmatch(entry.name)) and (entry / CONFIG_NAME).is_file()
        ]
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None when there is none."""
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def latest_intact(
        self, on_damaged: Callable[[Path, str], None] | None = None, training_state: bool = True
    ) -> Path | None:
        """The newest checkpoint that `checkpoint_problem` finds intact (None when there is none);
        `on_damaged(path, problem)` hears of every newer one skipped."""
        for path in reversed(self.checkpoints()):
            problem = checkpoint_problem(path, training_state)
            if problem is None:
                return path
            if on_damaged is not None:
                on_damaged(path, problem)
        return None

    def _prune(self, keep: Path) -> None:
        for entry in self.root.iterdir():
            if self._LEFTOVER.fullmatch(entry.name):  # from an earlier crash
                shutil.rmtree(entry, ignore_errors=True)
        if self.keep_n is None:
            return
        old = [path for path in self.checkpoints() if path != keep]
        for path in old[: max(0, len(old) - (self.keep_n - 1))]:
            # Rename first, so a crash mid-delete never leaves a half-deleted `step-*` directory.
            doomed = temp_sibling(path, "del")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
