"""Model directories: `save_pretrained` / `from_pretrained` / `load_pretrained` (`config.json` +
`model.safetensors`).

A model directory written by `save_pretrained` holds
- `config.json`: `model_type` (class name), `format_version`, `library_version`, the constructor keyword
  arguments (`config`), the names of sub-models saved beside it (`children`) and, when the config holds
  tuples, where they are (`tuple_paths`; JSON only has lists);
- `model.safetensors`: the weights (https://huggingface.co/docs/safetensors), each shared tensor stored
  once, the parameters of sub-models left out;
- one subfolder per sub-model (DALLE's `vae/`), itself a model directory.

`training_state.pt` sits beside it when resuming matters: see `dalle_pytorch.training.state`.

Every save is an atomic directory write (`dalle_pytorch.io.atomic`), so a crash or kill at any point leaves
the previous checkpoint readable. One process writes a given path at a time.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dalle_pytorch._version import __version__
from dalle_pytorch.io.atomic import atomic_write_dir, interrupted_backups
from dalle_pytorch.io.budget import ModelSizeError, build_within_budget
from dalle_pytorch.io.safe_pickle import describe

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 2**22  # a config.json is a few KB; the cap keeps a hostile one from filling memory
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

PathLike = str | os.PathLike
ModelT = TypeVar("ModelT", bound="PretrainedMixin")

# Imported only when a checkpoint of that type is loaded, so this module imports none of the models.
_BUILTIN_MODEL_TYPES = {
    "DiscreteVAE": "dalle_pytorch.models.vae:DiscreteVAE",
    "CLIP": "dalle_pytorch.models.clip:CLIP",
    "DALLE": "dalle_pytorch.models.dalle:DALLE",
    "OpenAIDiscreteVAE": "dalle_pytorch.image_tokenizers.pretrained_vae:OpenAIDiscreteVAE",
    "VQGanVAE": "dalle_pytorch.image_tokenizers.pretrained_vae:VQGanVAE",
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
        return atomic_write_dir(Path(directory), lambda tmp: write_model_dir(self, tmp))

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
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not a model config")
        meta = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a model config") from None
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


def write_model_dir(model: PretrainedMixin, directory: Path) -> None:
    """Writes `model`'s config, weights and sub-model folders into `directory` (created if missing).

    Not atomic by itself: `save_pretrained` and `training_state.save_checkpoint` call it on a temporary
    directory that `atomic.atomic_write_dir` then swaps into place.
    """
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
        write_model_dir(child, directory / name)
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


# ---------------------------------------------------------------------------------------- loading


def _load_model_dir(directory: Path, expected: type[ModelT]) -> ModelT:
    meta = read_config(directory)
    model_type = meta["model_type"]
    cls = expected if model_type == expected.__name__ else _model_class(model_type)
    if not issubclass(cls, expected):
        raise TypeError(
            f"{directory} holds a {model_type}, not a {expected.__name__}; "
            f"use {model_type}.from_pretrained or dalle_pytorch.io.checkpoint.load_pretrained"
        )
    unknown = sorted(set(meta["children"]) - set(cls.pretrained_children))
    if unknown:
        raise CheckpointError(f"{directory} has sub-models {unknown} that {cls.__name__} does not take")
    children = {}
    for name in meta["children"]:
        if not (directory / name / CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory} lacks its sub-model folder '{name}/'")
        children[name] = _load_model_dir(directory / name, PretrainedMixin)
    config_path = directory / CONFIG_NAME
    if getattr(cls._from_config, "__func__", None) is PretrainedMixin._from_config.__func__:
        _check_config_types(cls, meta["config"], config_path)
    weights_path = directory / WEIGHTS_NAME
    stored = sum(math.prod(shape) for shape in _stored_shapes(weights_path).values())
    try:
        model = build_within_budget(lambda: cls._from_config(meta["config"], **children), stored, str(config_path))
    except ModelSizeError as error:
        raise CheckpointError(str(error)) from None
    except (TypeError, ValueError, OverflowError, RecursionError, RuntimeError) as error:
        raise CheckpointError(f"{config_path}: cannot build a {cls.__name__} from this config: {error}") from None
    _load_weights(model, weights_path, cls.pretrained_children)
    return model


def _check_config_types(cls: type, config: dict[str, Any], path: Path) -> None:
    """Each constructor argument with a plain default (or annotation) must have that type in the config."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    kinds = {"bool": bool, "int": int, "float": float, "str": str}
    for name, value in config.items():
        parameter = parameters.get(name)
        if parameter is None:
            continue
        default = parameter.default
        # The annotation when it is one plain type (`loss_img_weight: float = 7`), else the default's type.
        expected = kinds.get(str(parameter.annotation))
        if expected is None and type(default) in (bool, int, float, str):
            expected = type(default)
        if expected is None or value is None and default is None:
            continue
        accepted = (int, float) if expected is float else (expected,)
        if type(value) not in accepted:
            raise CheckpointError(
                f"{path}: config[{name!r}] should be a {expected.__name__}, found {type(value).__name__} "
                f"{describe(value)}"
            )


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header, read without loading any tensor."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


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
        complete = [backup for backup in interrupted_backups(directory) if (backup / CONFIG_NAME).is_file()]
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


def _tensors_to_save(model: nn.Module, children: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    try:
        stored = load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
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
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for key, tensor in stored.items():
        if key not in expected or key in unexpected:
            continue
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            mismatched.append(f"{key}: file has dtype {tensor.dtype}, model expects floating point")
        elif key in parameters and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            mismatched.append(f"{key}: holds NaN or infinite values")
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(items)}): {', '.join(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape, dtype or value problems", mismatched),
            )
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
    to_config = getattr(value, "to_config", None)
    if callable(to_config):  # an object that knows its JSON form (an attention pattern); may raise TypeError
        return _to_json(to_config(), where, path, tuple_paths)
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
