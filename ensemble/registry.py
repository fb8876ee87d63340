"""Model registry in the style of timm: `register_model`, `create_model`, `list_models`.

Two kinds of entries: plain names (`@register_model` on a builder `fn(in_channels, num_classes)`) and
families (`register_family("wrn-{depth}-{widen}", builder)`), which accept every valid parameter
combination and validate it with a clear message.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from core.errors import SuperweightsError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, tuple[re.Pattern, Callable[..., nn.Module], list[str]]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Decorator: register `fn(in_channels, num_classes) -> nn.Module` under `name` (default fn name)."""

    def wrap(f):
        key = name or f.__name__.replace("_", "-")
        if key in _MODELS:
            raise ValueError(f"model {key!r} registered twice")
        _MODELS[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def register_family(pattern: str, builder: Callable[..., nn.Module], examples: list[str]) -> None:
    """`pattern` like "wrn-{depth}-{widen}": integer fields passed to `builder(in_channels, num_classes, **fields)`.

    `examples` are the well-known members of the family that `list_models()` lists.
    """
    regex = "^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>\\d+)", re.escape(pattern)) + "$"
    _FAMILIES[pattern] = (re.compile(regex), builder, examples)


def list_models() -> list[str]:
    """Concrete names that `create_model` accepts (plain registrations and family examples)."""
    return sorted(set(_MODELS).union(*(ex for _, _, ex in _FAMILIES.values())))


def list_families() -> list[str]:
    """Family patterns; every valid combination of their fields is a model name."""
    return sorted(_FAMILIES)


def create_model(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    if name in _MODELS:
        return _MODELS[name](in_channels=in_channels, num_classes=num_classes)
    for regex, builder, _ in _FAMILIES.values():
        m = regex.match(name)
        if m:
            return builder(in_channels=in_channels, num_classes=num_classes, **{k: int(v) for k, v in m.groupdict().items()})
    raise SuperweightsError(
        f"unknown member {name!r}; valid names: {', '.join(list_models())} (families: {', '.join(list_families())})"
    )
