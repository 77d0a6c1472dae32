"""The VLM Module interface: everything model-family specific lives behind VLM-R1's 11 functions, defined below in
its order, with two changes callers may rely on (per-instance state; images per prompt, exact forward keys).
Call order and contract: docs/design.md#the-vlm-module-interface."""
from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image


@functools.lru_cache(maxsize=None)
def takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


@functools.lru_cache(maxsize=None)
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class Video(list):
    """The frames (PIL images, in time order) of one video, sampled at ``fps`` frames a second: an item of a
    prompt's visuals next to its images."""

    def __init__(self, frames: Sequence[Image.Image] = (), fps: float = 2.0) -> None:
        super().__init__(frames)
        self.fps = float(fps)

    def metadata(self) -> dict[str, Any]:
        """As HF video processors and vLLM read it (timestamps, Qwen2.5-VL's ``second_per_grid_ts``): every
        frame given is used, none sampled again."""
        return {"fps": self.fps, "duration": len(self) / self.fps, "total_num_frames": len(self),
                "frames_indices": list(range(len(self)))}


def split_visuals(visuals: Sequence[Any]) -> tuple[list[Image.Image], list[Video]]:
    """``(images, videos)`` of a list of visuals, each in order."""
    return [v for v in visuals if not isinstance(v, Video)], [v for v in visuals if isinstance(v, Video)]


class VLMModule(ABC):
    """Base class of every model family. Subclass it and register the class (see ``registry``)."""

    # True where the learner may run each prompt once with a KV cache and its completions over it
    # (``learner.logprobs``), exact given ``completion_position_ids``; False: one full forward per row.
    supports_shared_prefix: bool = False

    def __init__(self) -> None:
        # Filled by post_model_init; per instance, never global.
        self.model_config: Any = None

    @abstractmethod
    def get_vlm_key(self) -> str:
        """Short identifier of the family, e.g. ``"qwen"``; the key users write in configs."""

    @abstractmethod
    def get_model_class(self, model_id: str, model_init_kwargs: dict[str, Any]) -> type:
        """The ``transformers`` class whose ``from_pretrained(model_id, **model_init_kwargs)`` loads
        the policy. May read ``config.json`` of ``model_id`` to pick between versions."""

    def post_model_init(self, model: torch.nn.Module, processing_class: Any) -> None:
        """Called once after model and processor are loaded (before DeepSpeed/vLLM wrap them).
        Record per-model facts here (token ids, image token counts) and adapt the model so that its
        forward accepts every key of ``get_custom_multimodal_keywords``."""
        self.model_config = getattr(model, "config", None)

    def is_embeds_input(self) -> bool:
        """True if ``generate`` must be called with ``inputs_embeds`` instead of ``input_ids``."""
        return False

    def get_processing_class(self) -> type:
        """Class with ``from_pretrained`` that builds the processor (by default ``AutoProcessor``)."""
        from transformers import AutoProcessor

        return AutoProcessor

    @abstractmethod
    def get_vision_modules_keywords(self) -> list[str]:
        """Substrings of parameter names that belong to the vision tower (frozen on request)."""

    @abstractmethod
    def get_custom_multimodal_keywords(self) -> list[str]:
        """Model-input keys besides ``input_ids``/``attention_mask`` that the forward receives."""

    def get_non_generate_params(self) -> list[str]:
        """Subset of the custom multimodal keywords that must not be passed to ``generate``."""
        return []

    def get_custom_processing_keywords(self) -> list[tuple[str, str]]:
        """``(component, keyword)`` pairs of processor options this family understands, e.g.
        ``("image_processor", "max_pixels")``. Config values under these keywords are set on
        ``getattr(processor, component)`` by ``apply_processing_kwargs``."""
        return []

    def prepare_prompt(self, processing_class: Any, inputs: Sequence[dict[str, Any]]) -> list[str]:
        """Render each example's ``"prompt"`` conversation (transformers' chat format: ``[{"role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, ...]``, or a plain string ``content``)
        with the chat template (generation prompt appended). Returns one string per example, with the
        family's image placeholders."""
        return [processing_class.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
                for ex in inputs]

    def prepare_model_inputs(self, processing_class: Any, prompts_text: Sequence[str],
                             images: Sequence[Sequence[Image.Image]], return_tensors: str = "pt", padding: bool = True,
                             padding_side: str = "left", add_special_tokens: bool = False) -> dict[str, torch.Tensor]:
        """Tokenise prompts and process images. ``images[i]`` are the images of prompt ``i`` (may be empty; an item may
        be a ``Video``). Returns exactly ``input_ids``, ``attention_mask`` and the custom multimodal keywords that
        apply (the image ones when any image is present, the video ones with a video). The default calls a processor
        with ``text=``/``images=``/``videos=`` (Qwen-VL, InternVL-hf, most current VLMs) on all prompts at once,
        images and videos each flattened in prompt order."""
        flat, videos = split_visuals([im for per_prompt in images for im in per_prompt])
        kw = {"videos": [list(v) for v in videos], "video_metadata": [v.metadata() for v in videos],
              "do_sample_frames": False} if videos else {}
        out = processing_class(text=list(prompts_text), images=flat or None,
                               **kw, return_tensors=return_tensors,
                               padding=padding, padding_side=padding_side, add_special_tokens=add_special_tokens)
        return self.forward_inputs(dict(out))

    # -- helpers shared by all families (not part of the 11) -------------------------------------
    def collate_inputs(self, per_prompt: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
        """The ``prepare_model_inputs`` of several prompts from each one's own: per-token tensors (shaped as
        ``input_ids``) left-padded, the others (pixels, grids: flat over a batch's visuals) joined in order."""
        width, keys = max(x["input_ids"].shape[1] for x in per_prompt), dict.fromkeys(k for x in per_prompt for k in x)
        tokens = {k for k in keys if all(k in x and x[k].shape == x["input_ids"].shape for x in per_prompt)}
        return {k: torch.cat([F.pad(x[k], (width - x[k].shape[1], 0), value=pad_id if k == "input_ids" else 0)
                              if k in tokens else x[k] for x in per_prompt if k in x]) for k in keys}

    def apply_processing_kwargs(self, processing_class: Any, kwargs: dict[str, Any]) -> None:
        """Set the family's custom processing keywords (e.g. ``max_pixels``) on the processor.
        Unknown keys are an error naming the allowed ones."""
        allowed = {kw: comp for comp, kw in self.get_custom_processing_keywords()}
        for key, value in kwargs.items():
            if key not in allowed:
                raise ValueError(f"processing option {key!r} is not understood by the {self.get_vlm_key()!r} "
                                 f"module; allowed: {sorted(allowed) or 'none'}")
            setattr(getattr(processing_class, allowed[key]), key, value)

    def generate_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` without the non-generate params: what ``generate`` may receive."""
        drop = set(self.get_non_generate_params())
        return {k: v for k, v in inputs.items() if k not in drop}

    def forward_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Exactly ``input_ids``, ``attention_mask`` and the custom multimodal keywords present."""
        keep = ["input_ids", "attention_mask", *self.get_custom_multimodal_keywords()]
        return {k: inputs[k] for k in keep if k in inputs}

    def append_completions(self, inputs: dict[str, torch.Tensor], completion_ids: torch.Tensor,
                           completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward inputs for prompt + completion: ``input_ids`` and ``attention_mask`` are extended
        with the (right-padded) completion tokens and mask; every other per-token input (an integer
        tensor of the same [B, L] shape as ``input_ids``, e.g. Qwen's ``mm_token_type_ids``) with
        zeros (text); per-image inputs are kept as they are. Row ``i`` of the completions belongs to
        prompt row ``i``. Override it if your family has per-token inputs of another kind."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if completion_ids.shape[0] != ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} prompt rows but {completion_ids.shape[0]} completion rows")
        comp = completion_ids.to(ids)
        out = {**inputs, "input_ids": torch.cat([ids, comp], dim=1),
               "attention_mask": torch.cat([mask, completion_mask.to(mask)], dim=1)}
        for key, value in inputs.items():
            if (key not in ("input_ids", "attention_mask") and torch.is_tensor(value) and value.shape == ids.shape
                    and not value.is_floating_point()):
                out[key] = torch.cat([value, value.new_zeros(comp.shape)], dim=1)
        return out

    def completion_position_ids(self, model: Any, inputs: dict[str, torch.Tensor], rows: torch.Tensor,
                                length: int) -> torch.Tensor | None:
        """Position ids of ``length`` completion tokens per row, after the ``[n_p, P]`` prompts ``inputs``
        (``rows`` ``[n]``: each row's prompt), as the full per-row forward gives them; None: the
        model's default over a KV cache (``P + j``: positions that count padding, as plain LMs do)."""
        return None

    def prefill_shared(self, model: Any, inputs: dict[str, torch.Tensor], rows: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run the ``[n_p, P]`` prompts ``inputs`` once with a KV cache (which keeps its graph) and expand it to the
        ``n`` rows (``rows`` ``[n]``: each row's prompt): the logits ``[n, 1, V]`` of each row's last prompt position
        and the kwargs (the cache) that continue the rows over it, with ``completion_position_ids``."""
        if not self.supports_shared_prefix:
            raise ValueError(f"{self!r} does not support the shared-prefix forward: pass rows=None")
        fwd, cls = self.forward_inputs(inputs), type(getattr(model, "module", model))
        out = model(**fwd, use_cache=True, **({"logits_to_keep": 1} if takes_logits_to_keep(cls) else {}))
        key = _cache_kwarg(cls)
        cache, rows = getattr(out, key, None), rows.to(out.logits.device)
        if cache is None or cache.get_seq_length() != fwd["input_ids"].shape[1]:
            raise RuntimeError("the shared-prefix forward got no KV cache (gradient checkpointing drops it): "
                               "set learner.shared_prefix=false")
        cache.reorder_cache(rows)  # [n_p] -> [n] rows on every layer (index_select: gradients flow back)
        return out.logits[:, -1:, :].index_select(0, rows), {key: cache, "use_cache": True}

    _VISION_TOKEN_ATTRS = ("image_token", "video_token", "start_image_token", "end_image_token",
                           "vision_start_token", "vision_end_token")

    def vision_token_ids(self, processing_class: Any) -> list[int]:
        """Ids of the tokens only the processor may place (image/video placeholders, vision
        start/end). Rollout engines forbid sampling them: a completion holding an image placeholder
        cannot be scored by the learner (the model would look for image features that are absent)."""
        tok = self.tokenizer(processing_class)
        names = {getattr(processing_class, a, None) or getattr(tok, a, None) for a in self._VISION_TOKEN_ATTRS}
        ids = {tok.convert_tokens_to_ids(n) for n in names if isinstance(n, str)}
        return sorted(i for i in ids if isinstance(i, int) and i != tok.unk_token_id)

    def tokenizer(self, processing_class: Any) -> Any:
        return getattr(processing_class, "tokenizer", processing_class)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.get_vlm_key()!r})"
