"""Attention patterns: a pattern is an object whose boolean mask over ``[text | image grid]`` is its one truth.

The sequence DALLE attends over is ``[BOS, text tokens, image tokens]``: ``text_len`` = 1 + text_seq_len
positions of text followed by an ``fmap x fmap`` grid of image tokens in raster order. A pattern's
:meth:`AttentionPattern.mask` is a boolean ``(n, n)`` matrix, ``mask[i, j] = True`` when query ``i`` may
attend to key ``j``; it is causal itself (no query sees a later key). Training, every cached decoding path and
the dense fallback all read this mask. A pattern may add a fast path, :meth:`AttentionPattern.tile_plan`,
which is only used after :func:`fast_plan` has checked that it covers exactly the mask.

Patterns are frozen dataclasses (values: equal when their class and fields are equal). Names map to classes
through :func:`register_pattern`, so ``attn_types=("full", "axial_row")`` and checkpoints can name them.

Shape letters: n / i / j sequence (query / key) positions.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from dalle_pytorch.kernels.tile_plans import TilePlan, plan_covers

PatternT = TypeVar("PatternT", bound=type)
_REGISTRY: dict[str, type[AttentionPattern]] = {}


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """(n, n) bool, True on and below the diagonal."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


GridRule = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def grid_mask(text_len: int, fmap: int, image_rule: GridRule) -> Tensor:
    """(n, n) bool mask of a pattern on the image grid: text queries see earlier text, image queries see all
    text and the earlier-or-same image keys that ``image_rule`` allows.

    ``image_rule(query_row, query_col, key_row, key_col)`` gets (n, 1) and (1, n) long tensors of grid
    coordinates (-1 at text positions) and returns an (n, n) bool tensor; it need not be causal itself.
    """
    n = text_len + fmap * fmap
    pos = torch.arange(n)
    is_image = pos >= text_len
    grid_index = (pos - text_len).clamp(min=0)
    row = torch.where(is_image, grid_index // fmap, -1)
    col = torch.where(is_image, grid_index % fmap, -1)
    image_part = image_rule(row[:, None], col[:, None], row[None, :], col[None, :])
    # text queries: causal text; image queries: all text + the rule among image keys
    allowed = ~is_image[None, :] | (is_image[:, None] & is_image[None, :] & image_part)
    return causal_mask(n) & allowed


@dataclass(frozen=True)
class AttentionPattern:
    """Which keys each query of ``[text | image grid]`` may see. Subclass it, decorated with
    ``@dataclass(frozen=True)`` when it has parameters, and implement :meth:`mask`."""

    option_names: ClassVar[Mapping[str, str]] = {}
    """DALLE keyword arguments (e.g. ``conv_kernel_size``) that set fields of a pattern given by name."""

    def mask(self, text_len: int, fmap: int) -> Tensor:
        """(n, n) bool, n = text_len + fmap ** 2: True where query i may attend to key j (j <= i)."""
        raise NotImplementedError(f"{type(self).__name__} must implement mask(text_len, fmap)")

    def tile_plan(self, text_len: int, fmap: int, n: int) -> TilePlan | None:
        """Optional fast path: a :class:`~dalle_pytorch.kernels.tile_plans.TilePlan` of ``mask(...)[:n, :n]``
        for the positions [0, n) of a pass without cache, or None (the dense kernel with the mask)."""
        return None

    def params(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this pattern (its dataclass fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_config(self) -> dict[str, Any]:
        """``{"pattern": registered name, **params}``, how ``config.json`` stores a pattern."""
        name = registered_name(type(self))
        if name is None:
            cls = type(self)
            raise TypeError(
                f"attention pattern {cls.__module__}.{cls.__qualname__} is not registered, so a checkpoint "
                f"could not rebuild it: call register_pattern('some_name', {cls.__qualname__}) (or decorate the "
                "class with @register_pattern('some_name')) before saving"
            )
        return {"pattern": name, **self.params()}


# ---------------------------------------------------------------------------------------------------------
# The registry: names <-> classes
# ---------------------------------------------------------------------------------------------------------


def register_pattern(name: str, cls: PatternT | None = None) -> PatternT | Callable[[PatternT], PatternT]:
    """Give an :class:`AttentionPattern` subclass a name for ``attn_types`` and checkpoints.

    ``register_pattern("name", Cls)`` or, as a decorator, ``@register_pattern("name")``. Registering a name
    again replaces it only with a class of the same module and qualified name (a re-run notebook cell).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")

    def register(cls: PatternT) -> PatternT:
        if not (isinstance(cls, type) and issubclass(cls, AttentionPattern)):
            raise TypeError(f"register_pattern needs an AttentionPattern subclass, got {cls!r}")
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"attention pattern name {name!r} is already taken by {old.__qualname__}")
        for other, registered in list(_REGISTRY.items()):
            if registered is cls and other != name:
                raise ValueError(f"{cls.__qualname__} is already registered as {other!r}")
        _REGISTRY[name] = cls
        return cls

    return register if cls is None else register(cls)


def registered_name(cls: type) -> str | None:
    """The name a class is registered under (the class itself, not a parent), or None."""
    return next((name for name, registered in _REGISTRY.items() if registered is cls), None)


def registered_patterns() -> tuple[str, ...]:
    """The names ``attn_types`` accepts."""
    return tuple(_REGISTRY)


def pattern_class(name: str, argument: str = "attn_types") -> type[AttentionPattern]:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown attention pattern {name!r} in {argument}: the names are {registered_patterns()}; register a "
            "pattern of your own with register_pattern (import the module that does so before from_pretrained)"
        )
    return _REGISTRY[name]


def build_pattern(spec: str | Mapping | AttentionPattern, options: Mapping[str, Any] | None = None) -> AttentionPattern:
    """A pattern from a name (fields from ``options`` through the class's ``option_names``), a
    ``{"pattern": name, **params}`` dict (from ``config.json``) or an instance (returned as is)."""
    if isinstance(spec, AttentionPattern):
        return spec
    if isinstance(spec, str):
        cls = pattern_class(spec)
        options = options or {}
        return cls(**{field: options[option] for option, field in cls.option_names.items() if option in options})
    if isinstance(spec, Mapping) and isinstance(spec.get("pattern"), str):
        params = {key: value for key, value in spec.items() if key != "pattern"}
        cls = pattern_class(spec["pattern"])
        try:
            return cls(**params)
        except TypeError as error:
            raise ValueError(f"cannot rebuild attention pattern {spec['pattern']!r} from {params}: {error}") from None
    raise TypeError(
        "attn_types entries must be pattern names, AttentionPattern instances or {'pattern': name, ...} dicts, "
        f"got {spec!r}"
    )


def normalize_attn_types(attn_types: str | AttentionPattern | Mapping | Iterable) -> tuple:
    """``attn_types`` as a tuple: names stay names (checked), dicts become instances, instances stay."""
    if isinstance(attn_types, str | AttentionPattern | Mapping):
        attn_types = (attn_types,)
    attn_types = tuple(attn_types)
    if not attn_types:
        raise ValueError("attn_types must not be empty")
    for spec in attn_types:
        build_pattern(spec)  # validates names and dicts
    return tuple(spec if isinstance(spec, str) else build_pattern(spec) for spec in attn_types)


# ---------------------------------------------------------------------------------------------------------
# Checking masks and fast paths
# ---------------------------------------------------------------------------------------------------------


def checked_mask(pattern: AttentionPattern, text_len: int, fmap: int) -> Tensor:
    """``pattern.mask(text_len, fmap)``, checked: (n, n) bool, causal, every query sees at least one key."""
    n = text_len + fmap * fmap
    mask = pattern.mask(text_len, fmap)
    name = type(pattern).__qualname__
    if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.shape == (n, n)):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name}.mask({text_len}, {fmap}) must return a ({n}, {n}) bool tensor, got {got}")
    if mask.triu(diagonal=1).any():
        raise ValueError(f"{name}.mask lets a query see a later key: the mask must be causal (j <= i)")
    if not mask.any(dim=-1).all():
        raise ValueError(f"{name}.mask leaves a query without any key (its attention would be undefined)")
    return mask


def _defining_class(cls: type, attribute: str) -> type:
    return next(base for base in cls.__mro__ if attribute in vars(base))


def fast_plan(
    pattern: AttentionPattern, text_len: int, fmap: int, n: int, mask: Tensor | None = None
) -> TilePlan | None:
    """The pattern's tile plan for positions [0, n), once it is checked to cover exactly ``mask[:n, :n]``.

    None when the pattern has no fast path, or when a subclass overrides ``mask`` below the class that
    defines ``tile_plan`` and the inherited plan does not match the new mask: such a pattern runs the dense
    kernel with its mask. A plan that does not match the mask of its own class is a bug: ValueError.
    ``mask``: the pattern's checked mask (n_all, n_all) if the caller holds it (else it is built). Checked once
    per (pattern, text_len, fmap, n) for hashable patterns (dataclass fields that are values).
    """
    try:
        key = (pattern, text_len, fmap, n)
        hash(key)
    except TypeError:  # a field without a hash (a list): checked every time
        key = None
    if key is not None and key in _CHECKED_PLANS:
        _CHECKED_PLANS.move_to_end(key)
        return _CHECKED_PLANS[key]
    plan = pattern.tile_plan(text_len, fmap, n)
    if plan is not None:
        mask = checked_mask(pattern, text_len, fmap) if mask is None else mask
        if not plan_covers(plan, mask[:n, :n].cpu()):
            plan = _mismatch(pattern, text_len, fmap, n)
    if key is not None:
        _CHECKED_PLANS[key] = plan
        if len(_CHECKED_PLANS) > _MAX_CHECKED_PLANS:
            _CHECKED_PLANS.popitem(last=False)
    return plan


_CHECKED_PLANS: OrderedDict = OrderedDict()  # (pattern, text_len, fmap, n) -> plan or None, least recent first
_MAX_CHECKED_PLANS = 64


def _mismatch(pattern: AttentionPattern, text_len: int, fmap: int, n: int) -> None:
    """None (dense) for a subclass that overrode only the mask; a ValueError for a plan wrong for its own mask."""
    cls = type(pattern)
    mask_owner, plan_owner = _defining_class(cls, "mask"), _defining_class(cls, "tile_plan")
    if mask_owner is not plan_owner and issubclass(mask_owner, plan_owner):
        return None  # the plan was written for another mask
    raise ValueError(
        f"{cls.__qualname__}.tile_plan({text_len}, {fmap}, {n}) does not cover exactly the positions its mask "
        "allows; fix the plan or return None to use the dense kernel"
    )
