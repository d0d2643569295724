"""Checkpoints: model directories (`config.json` + `model.safetensors`), training state, and rotation.

A model directory written by `save_pretrained` holds
- `config.json`: `model_type` (class name), `format_version`, `library_version`, the constructor keyword
  arguments (`config`), the names of sub-models saved beside it (`children`) and, when the config holds
  tuples, where they are (`tuple_paths`; JSON only has lists);
- `model.safetensors`: the weights (https://huggingface.co/docs/safetensors), each shared tensor stored
  once, the parameters of sub-models left out;
- one subfolder per sub-model (DALLE's `vae/`), itself a model directory.

`training_state.pt` sits beside it when resuming matters: optimizer, scheduler and AMP scaler state,
step, epoch, position in the data and every RNG state, in a form `torch.load(weights_only=True)` reads.

Every write goes to a hidden temporary sibling first and is renamed into place, so a crash or kill at any
point leaves the previous checkpoint readable. One process writes a given path at a time.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import json
import math
import os
import random
import re
import shutil
import sys
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dalle_pytorch._version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_STATE_NAME = "training_state.pt"
FORMAT_VERSION = 1
TRAINING_STATE_VERSION = 1

PathLike = str | os.PathLike
ModelT = TypeVar("ModelT", bound="PretrainedMixin")

# Imported only when a checkpoint of that type is loaded, so this module imports none of the models.
_BUILTIN_MODEL_TYPES = {
    "DiscreteVAE": "dalle_pytorch.vae:DiscreteVAE",
    "CLIP": "dalle_pytorch.clip:CLIP",
    "DALLE": "dalle_pytorch.dalle:DALLE",
    "OpenAIDiscreteVAE": "dalle_pytorch.pretrained_vae:OpenAIDiscreteVAE",
    "VQGanVAE": "dalle_pytorch.pretrained_vae:VQGanVAE",
}
_REGISTERED_MODEL_TYPES: dict[str, type] = {}


class CheckpointError(ValueError):
    """A checkpoint on disk is malformed, from a newer format, or does not match the model."""


class PretrainedMixin:
    """Gives an `nn.Module` `save_pretrained(dir)` and `cls.from_pretrained(dir)`.

    Put it first in the bases (`class DALLE(PretrainedMixin, nn.Module)`) and set `self.config` in
    `__init__` to the JSON-able keyword arguments that rebuild the model. Sub-models named in
    `pretrained_children` are saved in their own subfolder and passed back to the constructor by name.
    """

    config: dict[str, Any]
    pretrained_children: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTERED_MODEL_TYPES[cls.__name__] = cls

    @classmethod
    def _from_config(cls: type[ModelT], config: dict[str, Any], **children: Any) -> ModelT:
        """Builds the architecture (weights are loaded afterwards); override to avoid downloads."""
        return cls(**config, **children)

    def save_pretrained(self, directory: PathLike) -> Path:
        """Writes the model directory atomically (replacing any previous one); returns its path."""
        return _atomic_write_dir(Path(directory), lambda tmp: _write_model_dir(self, tmp))

    @classmethod
    def from_pretrained(cls: type[ModelT], directory: PathLike, map_location: Any = "cpu") -> ModelT:
        """Rebuilds a model saved by `save_pretrained`, in eval mode, on `map_location`.

        The directory may hold this class or a subclass; anything else is a TypeError.
        """
        directory = _readable_model_dir(Path(directory))
        return _load_model_dir(directory, cls).to(map_location).eval()


def load_pretrained(directory: PathLike, map_location: Any = "cpu") -> PretrainedMixin:
    """Loads any model directory, choosing the class from its `model_type`."""
    return PretrainedMixin.from_pretrained(directory, map_location=map_location)


def read_config(directory: PathLike) -> dict[str, Any]:
    """Parses and checks `directory/config.json`; `result["config"]` holds the constructor arguments."""
    path = Path(directory) / CONFIG_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(meta).__name__}")
    missing = [key for key in ("model_type", "format_version", "config") if key not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; is it a dalle_pytorch model directory?")
    version = meta["format_version"]
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: format_version should be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version} (written by dalle_pytorch "
            f"{meta.get('library_version', '?')}), but this dalle_pytorch {__version__} reads up to "
            f"version {FORMAT_VERSION}; upgrade dalle_pytorch to load it"
        )
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: 'config' should be a JSON object")
    meta.setdefault("children", [])
    if not (isinstance(meta["children"], list) and all(isinstance(name, str) for name in meta["children"])):
        raise CheckpointError(f"{path}: 'children' should be a list of sub-model names")
    meta["config"] = _restore_tuples(meta["config"], meta.get("tuple_paths", []), path)
    return meta


# ---------------------------------------------------------------------------------------- model directories


def _write_model_dir(model: PretrainedMixin, directory: Path) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pretrained needs an nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{type(model).__name__} should set `self.config` (a dict of constructor arguments)")
    children = type(model).pretrained_children
    clashing = sorted(set(children) & set(config))
    if clashing:
        raise TypeError(f"{type(model).__name__}.config must not hold the sub-models {clashing}")
    tuple_paths: list[list[str | int]] = []
    config_json = _to_json(config, "config", [], tuple_paths)

    directory.mkdir(parents=True, exist_ok=True)
    saved_children = []
    for name in children:
        child = getattr(model, name, None)
        if child is None:
            continue
        if not isinstance(child, PretrainedMixin):
            raise TypeError(f"{type(model).__name__}.{name} should be a PretrainedMixin model")
        _write_model_dir(child, directory / name)
        saved_children.append(name)

    tensors, aliases = _tensors_to_save(model, children)
    metadata = {"format": "pt", "aliases": json.dumps(aliases)}  # aliases: for readers, not needed to load
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
    meta: dict[str, Any] = {
        "model_type": type(model).__name__,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": config_json,
        "children": saved_children,
    }
    if tuple_paths:
        meta["tuple_paths"] = tuple_paths
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _load_model_dir(directory: Path, expected: type[ModelT]) -> ModelT:
    meta = read_config(directory)
    model_type = meta["model_type"]
    cls = expected if model_type == expected.__name__ else _model_class(model_type)
    if not issubclass(cls, expected):
        raise TypeError(
            f"{directory} holds a {model_type}, not a {expected.__name__}; "
            f"use {model_type}.from_pretrained or dalle_pytorch.checkpoint.load_pretrained"
        )
    unknown = sorted(set(meta["children"]) - set(cls.pretrained_children))
    if unknown:
        raise CheckpointError(f"{directory} has sub-models {unknown} that {cls.__name__} does not take")
    children = {}
    for name in meta["children"]:
        if not (directory / name / CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory} lacks its sub-model folder '{name}/'")
        children[name] = _load_model_dir(directory / name, PretrainedMixin)
    model = cls._from_config(meta["config"], **children)
    _load_weights(model, directory / WEIGHTS_NAME, cls.pretrained_children)
    return model


def _model_class(model_type: str) -> type:
    if model_type in _BUILTIN_MODEL_TYPES:
        module_name, class_name = _BUILTIN_MODEL_TYPES[model_type].split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
    elif model_type in _REGISTERED_MODEL_TYPES:
        cls = _REGISTERED_MODEL_TYPES[model_type]
    else:
        known = sorted(set(_BUILTIN_MODEL_TYPES) | set(_REGISTERED_MODEL_TYPES))
        raise CheckpointError(
            f"unknown model_type {model_type!r}; known: {known} (import the module defining it first)"
        )
    if not (isinstance(cls, type) and issubclass(cls, PretrainedMixin)):
        raise CheckpointError(f"model_type {model_type!r} resolves to {cls!r}, which cannot be loaded")
    return cls


def _readable_model_dir(directory: Path) -> Path:
    """The directory, or if a crash hit between the two renames of a swap, the previous one."""
    if (directory / CONFIG_NAME).is_file():
        return directory
    if not directory.exists():
        backups = glob.glob(str(directory.parent / f".{glob.escape(directory.name)}.old-*"))
        complete = [Path(b) for b in backups if (Path(b) / CONFIG_NAME).is_file()]
        if complete:
            backup = max(complete, key=lambda p: p.stat().st_mtime)
            warnings.warn(f"{directory} is missing after an interrupted save; loading {backup}", stacklevel=3)
            return backup
    raise FileNotFoundError(f"no model checkpoint at {directory} (expected {directory / CONFIG_NAME})")


# ---------------------------------------------------------------------------------------- weights


def _identity(tensor: torch.Tensor) -> tuple | None:
    """Equal for two state-dict entries that are the same tensor (tied weights); None if empty."""
    if tensor.numel() == 0:
        return None
    return (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def _is_child_key(key: str, children: tuple[str, ...]) -> bool:
    return any(key.startswith(f"{name}.") for name in children)


def _tensors_to_save(
    model: nn.Module, children: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Own state-dict tensors with each shared tensor kept once; `aliases` maps dropped -> kept name."""
    state = model.state_dict()
    kept_name: dict[tuple, str] = {}
    for key, tensor in state.items():
        identity = _identity(tensor)
        if _is_child_key(key, children) and identity is not None:
            kept_name.setdefault(identity, key)  # a tensor tied to a sub-model is stored there
    tensors, aliases = {}, {}
    for key, tensor in state.items():
        if _is_child_key(key, children):
            continue
        identity = _identity(tensor)
        if identity in kept_name:
            aliases[key] = kept_name[identity]
            continue
        if identity is not None:
            kept_name[identity] = key
        tensors[key] = tensor.detach().cpu().contiguous()
    # Distinct tensors that overlap in memory (views of one buffer) must not share storage on disk.
    by_storage: dict[tuple, list[str]] = {}
    for key, tensor in tensors.items():
        if tensor.numel():
            by_storage.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(key)
    for keys in by_storage.values():
        if len(keys) > 1:
            for key in keys:
                tensors[key] = tensors[key].clone()
    return tensors, aliases


def _load_weights(model: nn.Module, path: Path, children: tuple[str, ...]) -> None:
    """Loads `path` into `model`, failing with every missing/unexpected key and shape mismatch listed."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    stored = load_file(str(path), device="cpu")
    expected = model.state_dict()
    provided = set(stored) | {key for key in expected if _is_child_key(key, children)}
    names_by_identity: dict[tuple, list[str]] = {}
    for key, tensor in expected.items():
        names_by_identity.setdefault(_identity(tensor), []).append(key)

    missing = []
    for key, tensor in expected.items():
        identity = _identity(tensor)
        tied = names_by_identity[identity] if identity is not None else []
        if key not in provided and not any(other in provided for other in tied):
            missing.append(key)  # neither stored nor tied to a stored (or sub-model) tensor
    unexpected = sorted(key for key in stored if key not in expected or _is_child_key(key, children))
    mismatched = [
        f"{key}: file {tuple(stored[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in stored
        if key in expected and stored[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(items)}): {', '.join(items)}"
            for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", mismatched))
            if items
        ]
        raise CheckpointError(f"{path} does not match {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(stored, strict=False)


# ---------------------------------------------------------------------------------------- config <-> JSON


def _to_json(value: Any, where: str, path: list, tuple_paths: list) -> Any:
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}, which config.json cannot hold")
        return value
    if isinstance(value, list | tuple):
        if isinstance(value, tuple):
            tuple_paths.append(path)
        return [_to_json(item, f"{where}[{i}]", [*path, i], tuple_paths) for i, item in enumerate(value)]
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{where} has key {key!r}; config.json needs string keys")
            result[key] = _to_json(item, f"{where}[{key!r}]", [*path, key], tuple_paths)
        return result
    raise TypeError(
        f"{where} is a {type(value).__name__}, which config.json cannot hold; the config may contain only "
        "None, bool, int, float, str, lists, tuples and dicts with string keys"
    )


def _restore_tuples(config: dict, tuple_paths: Any, source: Path) -> dict:
    if not isinstance(tuple_paths, list):
        raise CheckpointError(f"{source}: 'tuple_paths' should be a list")
    # Innermost first: an inner list must become a tuple while its parent is still a (mutable) list.
    for path in sorted(tuple_paths, key=len, reverse=True):
        try:
            parent, key = None, None
            node = config
            for step in path:
                parent, key, node = node, step, node[step]
            if not isinstance(node, list):
                raise TypeError
            if parent is None:
                raise CheckpointError(f"{source}: the config itself cannot be a tuple")
            parent[key] = tuple(node)
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"{source}: tuple path {path!r} names no list in the config") from None
    return config


# ---------------------------------------------------------------------------------------- training state


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
    state = _training_state(optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step, epoch=epoch,
                            data_position=data_position, extra=extra)
    path = Path(directory) / TRAINING_STATE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_file(path, lambda tmp: torch.save(state, tmp))
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
    state = torch.load(path, map_location="cpu", weights_only=True)
    version = state.get("format_version") if isinstance(state, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"{path} is not a dalle_pytorch training state")
    if version > TRAINING_STATE_VERSION:
        raise CheckpointError(
            f"{path} has training-state format version {version}, but this dalle_pytorch {__version__} "
            f"reads up to {TRAINING_STATE_VERSION}; upgrade dalle_pytorch to resume from it"
        )
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None:
            if state.get(name) is None:
                raise ValueError(f"{path} holds no {name} state, but a {name} was given to restore")
            target.load_state_dict(state[name])
    # A scaler saved disabled (or not at all) has nothing to restore; a fresh loss scale is harmless.
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        _set_rng_states(state["rng"])
    return state


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
) -> Path:
    """Writes the model directory and, when `optimizer` is given, `training_state.pt` (arguments as in
    `save_training_state`) in one atomic step, so weights and training state always belong together."""
    state = None
    if optimizer is not None:
        state = _training_state(optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step,
                                epoch=epoch, data_position=data_position, extra=extra)
    elif any(value is not None for value in (scheduler, scaler, step, epoch, data_position, extra)):
        raise ValueError("save_checkpoint writes a training state only together with its optimizer=")

    def fill(tmp: Path) -> None:
        _write_model_dir(model, tmp)
        if state is not None:
            torch.save(state, tmp / TRAINING_STATE_NAME)

    return _atomic_write_dir(Path(directory), fill)


def _training_state(
    *, optimizer: Any, scheduler: Any = None, scaler: Any = None, step: int, epoch: int,
    data_position: Any = None, extra: Any = None,
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
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
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


# ---------------------------------------------------------------------------------------- rotation


class CheckpointManager:
    """Writes `root/step-{step:08d}/` (model directory + `training_state.pt`) and keeps the newest
    `keep_n` of them (all when None). One process writes to a root at a time."""

    _STEP_DIR = re.compile(r"step-(\d+)")
    _LEFTOVER = re.compile(r"\.step-\d+\.(tmp|old|del)-[0-9a-f]+")

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

    def _prune(self, keep: Path) -> None:
        for entry in self.root.iterdir():
            if self._LEFTOVER.fullmatch(entry.name):  # from an earlier crash
                shutil.rmtree(entry, ignore_errors=True)
        if self.keep_n is None:
            return
        old = [path for path in self.checkpoints() if path != keep]
        for path in old[: max(0, len(old) - (self.keep_n - 1))]:
            # Rename first, so a crash mid-delete never leaves a half-deleted `step-*` directory.
            doomed = _sibling_temp(path, "del")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------- atomic writes


def _sibling_temp(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _fsync_file(path: PathLike) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: PathLike) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_file(path: Path, write: Callable[[Path], None]) -> None:
    tmp = _sibling_temp(path, "tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_write_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Fills a temporary sibling directory, makes it durable, then swaps it in for `path`."""
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_temp(path, "tmp")
    try:
        tmp.mkdir()
        fill(tmp)
        for folder, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(os.path.join(folder, name))
            _fsync_dir(folder)
        _replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tag in ("tmp", "old"):  # leftovers of earlier interrupted saves of this path
        for leftover in glob.glob(str(path.parent / f".{glob.escape(path.name)}.{tag}-*")):
            shutil.rmtree(leftover, ignore_errors=True)
    return path


def _replace_directory(new: Path, path: Path) -> None:
    if not path.exists():
        os.replace(new, path)
    elif _exchange_directories(new, path):  # one atomic step: `new` now holds the old checkpoint
        shutil.rmtree(new)
    else:
        # Two renames; a crash between them leaves only the backup, which `from_pretrained` falls back to.
        backup = _sibling_temp(path, "old")
        os.replace(path, backup)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(backup, path)
            raise
        shutil.rmtree(backup)
    _fsync_dir(path.parent)


def _exchange_directories(a: Path, b: Path) -> bool:
    """Atomically swaps two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
