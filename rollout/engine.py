"""The generation-engine interface shared by the vLLM engine (production) and the transformers
engine (CPU fallback). Engines are plain objects; the rollout actor wraps one."""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import torch

from .types import GenerationResult, Sample, SamplingConfig

if TYPE_CHECKING:
    from ..modules.base import VLMModule


class GenerationEngine(ABC):
    """Generate G completions per prompt and take new weights in place.

    Subclasses get ``model_path`` (a Hugging Face checkpoint directory or hub id) and a VLM module;
    prompts are rendered with ``module.prepare_prompt`` and multimodal inputs never carry
    ``module.get_non_generate_params()``.
    """

    weights_version: int = 0
    module: "VLMModule"  # the VLM module the engine renders prompts with
    processor: Any  # that module's processing class, loaded for the checkpoint

    @abstractmethod
    def generate(self, samples: Sequence[Sample], sampling: SamplingConfig,
                 prompt_inputs: Optional[Sequence[dict]] = None) -> list[GenerationResult]:
        """One ``GenerationResult`` per sample, each with ``sampling.n`` completions. ``prompt_inputs``: each
        sample's ``prepare_model_inputs`` where the caller has them (an engine that runs the model in this process
        uses them instead of running the processor again)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Copy ``(hf_name, tensor)`` pairs into the engine's model (names as in the HF state_dict
        of the checkpoint) and set ``weights_version``. Returns the number of tensors loaded."""

    def tokenizer(self):
        """The tokenizer used to decode completions (pad/eos ids for batching)."""
        return self.module.tokenizer(self.processor)

    def close(self) -> None:
        """Release the engine's memory (optional)."""


def tensor_checksum(t: torch.Tensor) -> str:
    """Exact fingerprint of a tensor's bytes, dtype and shape: how engines report the weights they
    hold, to be compared with the learner's (weight-sync verification, tests)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
