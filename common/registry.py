"""A small typed registry that maps a model name (the `--model_type` / `--arch` value) to its class.

Modelled on torchvision's `models/_api.py`: networks register themselves with a decorator, training
scripts look them up by name instead of an if/elif chain, and an unknown name lists the valid ones.
A family tag keeps each folder's list to its own models (`list_models("isic")`).

Example:
    >>> from common.registry import register_model, get_model
    >>> @register_model("TinyNet", family="demo")  # doctest: +SKIP
    ... class TinyNet(torch.nn.Module): ...
    >>> model = get_model("TinyNet", family="demo")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from torch import nn

from common.errors import ConfigError

__all__ = ["register_model", "get_model", "get_model_builder", "list_models"]

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    family: str | None


# Insertion order is registration order, so listings follow the order of the defining file.
_REGISTRY: dict[str, _Entry] = {}


def _origin(obj: object) -> tuple[str, str]:
    return getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(obj))


def register_model(name: str | None = None, family: str | None = None) -> Callable[[BuilderT], BuilderT]:
    """Decorator that registers a model class (or factory) under `name` (default: its `__name__`).

    Args:
        name: the name users pass on the command line; defaults to the decorated object's name.
        family: an optional tag (e.g. "isic") so that a folder can list only its own models.

    Raises:
        ValueError: when another object is already registered under the same name. Re-registering
            the same definition (same module and qualified name, as after `importlib.reload`) replaces it.
    """

    def decorator(builder: BuilderT) -> BuilderT:
        key = name if name is not None else builder.__name__
        previous = _REGISTRY.get(key)
        if previous is not None and _origin(previous.builder) != _origin(builder):
            module, qualname = _origin(previous.builder)
            raise ValueError(f"model name {key!r} is already registered by {module}.{qualname}")
        _REGISTRY[key] = _Entry(builder, family)
        return builder

    return decorator


def list_models(family: str | None = None) -> list[str]:
    """Registered model names in registration order, optionally only those tagged with `family`."""
    return [key for key, entry in _REGISTRY.items() if family is None or entry.family == family]


def get_model_builder(
    name: str, *, family: str | None = None, flag: str = "--model_type"
) -> Callable[..., nn.Module]:
    """The class (or factory) registered under `name`.

    Args:
        name: a registered model name.
        family: when given, only models of this family are accepted and listed in the error.
        flag: the command-line flag named in the error message (`--arch` for the nested-UNet folder).

    Raises:
        ConfigError: the name is unknown (or belongs to another family); the message lists the valid names.
    """
    entry = _REGISTRY.get(name)
    if entry is None or (family is not None and entry.family != family):
        valid = ", ".join(list_models(family)) or "(none registered)"
        raise ConfigError(f"unknown {flag} {name!r}; valid: {valid}")
    return entry.builder


def get_model(name: str, /, *, family: str | None = None, **kwargs: object) -> nn.Module:
    """Build the model registered under `name` with `kwargs` (see `get_model_builder` for `family`).

    Example:
        >>> import common.networks  # registers the ISIC family
        >>> model = get_model("AttU_Net", family="isic", img_ch=3, output_ch=1)
    """
    return get_model_builder(name, family=family)(**kwargs)
