"""VLM modules: the model-family adapters (see ``base.VLMModule``) and their registry."""
from .base import Video, VLMModule
from .registry import available_modules, get_module, get_module_class, infer_module_key, resolve_module

__all__ = ["Video", "VLMModule", "available_modules", "get_module", "get_module_class", "infer_module_key",
           "resolve_module"]
