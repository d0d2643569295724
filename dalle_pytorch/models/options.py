"""Option dataclasses: a set of keyword arguments written once, with a help text per field.

A model's constructor or a method takes the fields of such a dataclass as keyword arguments (or a whole
instance); :func:`collect_options` builds the instance from what was passed, and :func:`options_signature`
lists the fields in the callable's signature so ``help()`` and editors show them. The command-line tools
make their flags from the same fields (``dalle_pytorch.cli.flags.add_option_flags``).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

OptionsT = TypeVar("OptionsT")


def option(default: Any = dataclasses.MISSING, *, help: str) -> Any:
    """A dataclass field with its help text (shown by the command-line tools and in the docs)."""
    return dataclasses.field(default=default, metadata={"help": help})


def help_text(options_class: type, name: str) -> str:
    """The help text of the field ``name`` of an options dataclass."""
    for f in dataclasses.fields(options_class):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(f"{options_class.__name__} has no field {name!r}")


def collect_options(
    options_class: type[OptionsT],
    base: OptionsT | None,
    kwargs: dict[str, Any],
    *,
    owner: str,
    deprecated: Mapping[str, str] | None = None,
) -> OptionsT:
    """An ``options_class`` instance from keyword arguments, over ``base`` when given (an ``options_class``
    or an instance of a parent class of it).

    Names in ``deprecated`` (name -> why) warn with a DeprecationWarning and are dropped; unknown names and
    missing required fields are a TypeError naming them, as for an ordinary signature.
    """
    kwargs = dict(kwargs)
    for name in sorted(set(kwargs) & set(deprecated or {})):
        message = f"{owner}: {name} is deprecated and ignored: {deprecated[name]}"
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        del kwargs[name]
    fields = dataclasses.fields(options_class)
    unknown = sorted(set(kwargs) - {f.name for f in fields})
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword arguments {unknown}")
    if isinstance(base, options_class):
        return dataclasses.replace(base, **kwargs)
    if base is not None:
        if not (dataclasses.is_dataclass(base) and issubclass(options_class, type(base))):
            raise TypeError(f"{owner}: expected a {options_class.__name__}, got {type(base).__name__}")
        # the options of a parent class, extended by the fields only options_class has
        kwargs = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **kwargs}
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise TypeError(f"{owner} is missing required keyword arguments {missing}")
    return options_class(**kwargs)


def options_signature(options_class: type) -> Callable[[Callable], Callable]:
    """Decorator: the signature of a ``(..., **kwargs)`` callable shows every field of ``options_class`` as a
    keyword-only argument with its default, in place of ``**kwargs``."""

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in own}
        fields = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
                annotation=f.type,
            )
            for f in dataclasses.fields(options_class)
            if f.name not in names
        ]
        fn.__signature__ = inspect.signature(fn).replace(parameters=[*own, *fields])
        return fn

    return decorate
