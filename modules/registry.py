"""Find a VLM module by key: built-ins, the ``vlgrpo.modules`` entry-point group, a dotted
``package.module:Class`` path, or ``auto`` (the checkpoint's ``config.json`` model_type)."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .base import VLMModule
from .internvl import InternVLModule
from .loading import read_model_config
from .qwen import QwenModule

ENTRY_POINT_GROUP = "vlgrpo.modules"
_BUILTINS: dict[str, type] = {"qwen": QwenModule, "internvl": InternVLModule}


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_modules() -> dict[str, type]:
    """Every registered key mapped to its class (built-ins first, then entry points)."""
    return {**_BUILTINS, **{name: ep.load() for name, ep in _entry_points().items() if name not in _BUILTINS}}


def _check(cls: object, origin: str) -> type:
    if not (isinstance(cls, type) and issubclass(cls, VLMModule)):
        raise TypeError(f"{origin} is {cls!r}, not a subclass of vlgrpo.modules.VLMModule")
    return cls


def get_module_class(key: str) -> type:
    if ":" in key:
        mod_name, _, attr = key.partition(":")
        try:
            return _check(getattr(importlib.import_module(mod_name), attr), key)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load VLM module {key!r}: {e}") from e
    if key in _BUILTINS:
        return _BUILTINS[key]
    eps = _entry_points()
    if key in eps:
        return _check(eps[key].load(), f"entry point {key!r}")
    raise ValueError(f"unknown VLM module key {key!r}; known keys: {', '.join(sorted(set(_BUILTINS) | set(eps)))} "
                     "(or name your own class as 'package.module:ClassName', or register it in the "
                     f"'{ENTRY_POINT_GROUP}' entry-point group)")


def get_module(key: str) -> VLMModule:
    """A fresh module instance for ``key`` (a registered key or ``package.module:Class``)."""
    return get_module_class(key)()


def infer_module_key(model_id: str) -> str:
    """The key of the registered module whose ``model_types`` contains the checkpoint's model_type."""
    model_type = read_model_config(model_id).get("model_type", "")
    for key, cls in available_modules().items():
        if model_type in getattr(cls, "model_types", ()):
            return key
    raise ValueError(f"cannot infer the VLM module of {model_id} (model_type {model_type!r}); set model.module "
                     f"to one of {', '.join(sorted(available_modules()))} or 'package.module:ClassName'")


def resolve_module(model_id: str, key: str = "auto") -> VLMModule:
    return get_module(infer_module_key(model_id) if key in ("auto", "", None) else key)
