"""The ``internvl`` VLM module, on transformers' native InternVL classes (``OpenGVLab/InternVL3-*-hf``).

VLM-R1 used the remote-code ``InternVLChatModel``, whose forward takes ``pixel_values`` and
``image_flags`` (1 for real image tiles, 0 for padding tiles; generate does not take it). We keep
that interface: ``prepare_model_inputs`` returns ``image_flags`` and ``post_model_init`` teaches the
native model's forward to accept it (tiles whose flag is 0 are dropped before the vision tower), so
the learner can pass every custom keyword while ``generate`` must not receive ``image_flags``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from .base import VLMModule
from .loading import read_model_config


def _image_flags_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    flags = kwargs.pop("image_flags", None)
    if flags is not None and kwargs.get("pixel_values") is not None:
        keep = flags.reshape(-1).bool()
        if not bool(keep.all()):
            kwargs["pixel_values"] = kwargs["pixel_values"][keep]
    return args, kwargs


class InternVLModule(VLMModule):
    model_types = ("internvl",)
    supports_shared_prefix = True  # 1-D positions 0..P+T-1 counting padding: the cache's default

    def get_vlm_key(self) -> str:
        return "internvl"

    def get_model_class(self, model_id: str, model_init_kwargs: dict[str, Any]) -> type:
        model_type = read_model_config(model_id).get("model_type", "")
        if model_type == "internvl_chat":
            raise ValueError(f"{model_id} is a remote-code InternVL checkpoint (model_type 'internvl_chat'); use its "
                             "'-hf' conversion (e.g. OpenGVLab/InternVL3-1B-hf), which transformers loads natively")
        from transformers import InternVLForConditionalGeneration
        return InternVLForConditionalGeneration

    def post_model_init(self, model: torch.nn.Module, processing_class: Any) -> None:
        super().post_model_init(model, processing_class)
        if not getattr(model, "_vlgrpo_image_flags_hook", False):
            model.register_forward_pre_hook(_image_flags_pre_hook, with_kwargs=True)
            model._vlgrpo_image_flags_hook = True

    def get_vision_modules_keywords(self) -> list[str]:
        return ["vision_tower", "multi_modal_projector"]

    def get_custom_multimodal_keywords(self) -> list[str]:
        return ["pixel_values", "image_flags"]

    def get_non_generate_params(self) -> list[str]:
        return ["image_flags"]

    def get_custom_processing_keywords(self) -> list[tuple[str, str]]:
        return [("image_processor", "max_anyres_num")]

    def apply_processing_kwargs(self, processing_class: Any, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if "max_anyres_num" in kwargs:  # VLM-R1's name for the tile budget of dynamic resolution
            n = int(kwargs.pop("max_anyres_num"))
            ip = processing_class.image_processor
            ip.max_patches, ip.crop_to_patches = n, n > 1
        super().apply_processing_kwargs(processing_class, kwargs)

    def prepare_model_inputs(self, processing_class: Any, prompts_text: Sequence[str],
                             images: Sequence[Sequence[Image.Image]], **kwargs: Any) -> dict[str, torch.Tensor]:
        out = super().prepare_model_inputs(processing_class, prompts_text, images, **kwargs)
        if "pixel_values" in out:
            out["image_flags"] = torch.ones(out["pixel_values"].shape[0], dtype=torch.long)
        return out
