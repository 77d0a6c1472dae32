"""The ``qwen`` VLM module: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (where transformers has it)."""
from __future__ import annotations

import functools
from typing import Any

import torch

from .base import VLMModule
from .loading import read_model_config

_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


@functools.lru_cache(maxsize=None)
def _token_type_keyword() -> tuple[str, ...]:
    """transformers >= 5 computes Qwen's multimodal RoPE positions from ``mm_token_type_ids`` (returned
    by the processor) and refuses image inputs without it, in forward and in generate. Where the
    installed transformers takes it, it is a custom keyword too (a per-token input, zero on text)."""
    import inspect

    from transformers import Qwen2VLForConditionalGeneration
    params = inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters
    return ("mm_token_type_ids",) if "mm_token_type_ids" in params else ()


class QwenModule(VLMModule):
    """Qwen-VL family. The forward takes ``pixel_values`` and ``image_grid_thw`` (plus
    ``mm_token_type_ids`` on transformers >= 5); all are also generate inputs. Images are resized by
    the processor between ``min_pixels`` and ``max_pixels``."""

    model_types = tuple(_CLASSES)
    supports_shared_prefix = True

    def get_vlm_key(self) -> str:
        return "qwen"

    def get_model_class(self, model_id: str, model_init_kwargs: dict[str, Any]) -> type:
        import transformers
        model_type = read_model_config(model_id).get("model_type", "")
        if model_type not in _CLASSES:
            raise ValueError(f"{model_id}: model_type {model_type!r} is not a Qwen-VL model; the 'qwen' module "
                             f"supports {sorted(_CLASSES)}")
        name = _CLASSES[model_type]
        if not hasattr(transformers, name):
            raise ImportError(f"{name} needs a newer transformers (installed: {transformers.__version__})")
        return getattr(transformers, name)

    def get_vision_modules_keywords(self) -> list[str]:
        return ["visual"]

    def get_custom_multimodal_keywords(self) -> list[str]:
        return ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
                *_token_type_keyword()]

    def get_custom_processing_keywords(self) -> list[tuple[str, str]]:
        return [("image_processor", "max_pixels"), ("image_processor", "min_pixels")]

    def completion_position_ids(self, model: Any, inputs: dict[str, torch.Tensor], rows: torch.Tensor,
                                length: int) -> torch.Tensor:
        """``[3, n, length]`` M-RoPE positions: text after the prompt's largest position (``get_rope_index``,
        padding skipped); without images ``P + j`` (the model's positions for text, padding counted).
        Always explicit: the model's own guess over a cache reuses ``rope_deltas`` of an earlier call."""
        ids = inputs["input_ids"]
        if "image_grid_thw" in inputs or "video_grid_thw" in inputs:
            extra = {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                            "second_per_grid_ts") if k in inputs}
            pos, _ = getattr(model, "module", model).model.get_rope_index(
                ids, attention_mask=inputs["attention_mask"], **extra)
            start = pos.amax(dim=(0, 2)) + 1
        else:
            start = torch.full((ids.shape[0],), ids.shape[1], dtype=ids.dtype, device=ids.device)
        return (start.index_select(0, rows)[:, None] + torch.arange(length, device=ids.device)).expand(3, -1, -1)

    def apply_processing_kwargs(self, processing_class: Any, kwargs: dict[str, Any]) -> None:
        super().apply_processing_kwargs(processing_class, kwargs)
        # transformers >= 4.5x reads the pixel budget from image_processor.size; keep both in sync.
        ip = processing_class.image_processor
        size = dict(getattr(ip, "size", None) or {})
        if "min_pixels" in kwargs:
            size["shortest_edge"] = kwargs["min_pixels"]
        if "max_pixels" in kwargs:
            size["longest_edge"] = kwargs["max_pixels"]
        if size:
            ip.size = size

    def vision_token_ids(self, processing_class: Any) -> list[int]:
        vocab = self.tokenizer(processing_class).get_vocab()
        extra = {vocab[t] for t in ("<|vision_start|>", "<|vision_end|>") if t in vocab}
        return sorted(set(super().vision_token_ids(processing_class)) | extra)
